"""A run's starting checkpoint: the policy built from it (wrapped for training) and the dtype its
export is written in. Whether the folder fits the run is checked in model_checks.py."""

import dataclasses
import json
from pathlib import Path
from typing import NamedTuple, Optional

import torch

from lion_min.core.chat import template_line
from lion_min.core.parallel import Dist, build_model
from lion_min.formats.hf import grow_vocab, load_model
from lion_min.formats.tokenizer import Tokenizer
from lion_min.run.config import DTYPES, ConfigError
from lion_min.run.memory import choose_checkpointing, min_free_memory
from lion_min.run.model_checks import ModelFolder, read_model_folder

# A checkpoint may be stored in fp16; training never is.
EXPORT_DTYPES = {name: getattr(torch, name) for name in (*DTYPES, "float16")}


def build_from_folder(folder: Path, args, d: Dist, param_dtype: torch.dtype, **wrap):
    """build_model with the weights of a checkpoint folder (read by rank 0 only); embedding rows for
    token ids beyond the checkpoint's (args.vocab_size larger: chat tokens added) start at the mean."""
    return build_model(args, d, load_weights=lambda: grow_vocab(load_model(folder).state_dict(), args.vocab_size),
                       param_dtype=param_dtype, **wrap)


class Policy(NamedTuple):
    """The starting checkpoint, ready to train (load_policy)."""
    model: torch.nn.Module  # wrapped (AC, compile, FSDP2)
    args: object  # its ModelArgs (vocab_size grown for new chat tokens)
    tokenizer: Tokenizer  # with the chat template's tokens
    folder: Path
    cfg: object  # the run's config with --chat_template=auto resolved to a name


def load_policy(cfg, d: Dist, param_dtype: torch.dtype, start: Optional[ModelFolder] = None) -> Policy:
    """The starting checkpoint as a wrapped training model, its ModelArgs and its tokenizer (with the
    chat template's tokens; new ids grow the embedding: build_from_folder), and the config with
    its chat template named. `start`: --model's folder, when the stage has read it already."""
    folder, args, tokenizer, template = start or read_model_folder(cfg)
    cfg = dataclasses.replace(cfg, chat_template=template)
    if d.main and "replacing" in (line := template_line(cfg.chat_template, tokenizer)):
        print(f"note: chat template {line}")  # said again in the opening summary
    if tokenizer.vocab_size > args.vocab_size:
        tokenizer.added += (f"; the embedding{'' if args.tie_embeddings else ' and the output head'} grow from "
                            f"{args.vocab_size} to {tokenizer.vocab_size} rows, each new row the mean of the others")
        args = dataclasses.replace(args, vocab_size=tokenizer.vocab_size)
    # Checkpointing from the step's estimated memory against what the device has free (before loading).
    # Tokens per micro-batch at most: rows of seq_len (SFT), or a pair's two sequences of max_len (DPO).
    tokens = cfg.micro_batch_size * (cfg.seq_len if hasattr(cfg, "seq_len") else 2 * cfg.max_len)
    live_ref = hasattr(cfg, "precompute_ref") and not cfg.precompute_ref
    ac, why = choose_checkpointing(cfg.activation_checkpointing, args, tokens, d.world, param_dtype, d.device, live_ref,
                                   free_bytes=min_free_memory(d))
    if d.main:
        print(f"memory: activation checkpointing {why}")
    model = build_from_folder(folder, args, d, param_dtype, activation_checkpointing=ac, compile=cfg.compile,
                              attn_backend=cfg.attn_backend)
    return Policy(model, args, tokenizer, folder, cfg)


def checkpoint_dtype(folder: Path) -> torch.dtype:
    """The dtype a checkpoint folder's config.json names (torch_dtype, or transformers 5's dtype;
    float32 when it names none)."""
    config = json.loads((folder / "config.json").read_text())
    name = config.get("torch_dtype") or config.get("dtype") or "float32"
    if name not in EXPORT_DTYPES:
        raise ConfigError(f"{folder / 'config.json'}: dtype {name!r} is not one of {', '.join(EXPORT_DTYPES)}")
    return EXPORT_DTYPES[name]


def export_dtype(cfg, folder: Path) -> torch.dtype:
    """--export_dtype: 'source' = the dtype the starting checkpoint names (so a bf16 checkpoint is
    exported in bf16, not in the fp32 of the master weights), else as named."""
    return checkpoint_dtype(folder) if cfg.export_dtype == "source" else EXPORT_DTYPES[cfg.export_dtype]
