"""A run's starting checkpoint: the policy built from it (wrapped for training), the checks that
its tokenizer, architecture and length fit the run, and the dtype its export is written in."""

import dataclasses
import json
from pathlib import Path
from typing import NamedTuple, Optional

import torch

from lion_min.core.attention import varlen_model_problem
from lion_min.core.chat import TEMPLATES, template_line, template_of, with_template_tokens
from lion_min.formats.hf import grow_vocab, load_model, read_config, resolve_path
from lion_min.run.config import DTYPES, ConfigError
from lion_min.core.parallel import Dist, build_model
from lion_min.run.memory import choose_checkpointing, min_free_memory
from lion_min.formats.tokenizer import Tokenizer

# A checkpoint may be stored in fp16; training never is.
EXPORT_DTYPES = {name: getattr(torch, name) for name in (*DTYPES, "float16")}


def build_from_folder(folder: Path, args, d: Dist, param_dtype: torch.dtype, **wrap):
    """build_model with the weights of a checkpoint folder (read by rank 0 only); embedding rows for
    token ids beyond the checkpoint's (args.vocab_size larger: chat tokens added) start at the mean."""
    return build_model(args, d, load_weights=lambda: grow_vocab(load_model(folder).state_dict(), args.vocab_size),
                       param_dtype=param_dtype, **wrap)


def chat_tokenizer(cfg, folder: Path, tokenizer: Optional[Tokenizer] = None) -> tuple[Tokenizer, str]:
    """(the tokenizer of `folder`, able to encode the run's chat template; that template's name).
    `tokenizer`: the folder's, when the caller has read it already.

    --chat_template=auto names the folder's own template, or chatml, LION's, when the folder carries
    none; the caller records the name in its config (dataclasses.replace). ChatML's two tokens are
    given ids when the tokenizer lacks them (chat.with_template_tokens), as LION did on the base
    Gemma and Llama-3."""
    tokenizer = tokenizer or Tokenizer.from_dir(folder)
    template = cfg.chat_template
    if template == "auto":
        own = template_of(tokenizer.chat_template)
        if tokenizer.chat_template is not None and own is None:
            raise ConfigError(f"--chat_template=auto: {folder} carries a chat template lion_min does not know; "
                              f"name one with --chat_template ({', '.join(TEMPLATES)})")
        template = own.name if own else "chatml"
    return with_template_tokens(tokenizer, template), template


class Policy(NamedTuple):
    """The starting checkpoint, ready to train (load_policy)."""
    model: torch.nn.Module  # wrapped (AC, compile, FSDP2)
    args: object  # its ModelArgs (vocab_size grown for new chat tokens)
    tokenizer: Tokenizer  # with the chat template's tokens
    folder: Path
    cfg: object  # the run's config with --chat_template=auto resolved to a name


def load_policy(cfg, d: Dist, param_dtype: torch.dtype, folder: Optional[Path] = None) -> Policy:
    """The starting checkpoint as a wrapped training model, its ModelArgs and its tokenizer (with the
    chat template's tokens; new ids grow the embedding: build_from_folder), and the config with
    its chat template named."""
    folder = folder or resolve_path(cfg.model, cfg.revision)
    args = read_config(folder)
    problem = varlen_model_problem(args.attn_softcap, args.sliding_window) if cfg.attn_backend == "varlen" else None
    if problem:  # Gemma-2/3 (config.py has refused varlen where the device cannot run it at all)
        raise ConfigError(f"--attn_backend=varlen: {problem} in {folder}; use --attn_backend=flex or sdpa")
    tokenizer = Tokenizer.from_dir(folder)
    check_vocab(tokenizer, args, folder)
    tokenizer, template = chat_tokenizer(cfg, folder, tokenizer)
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


def check_vocab(tokenizer: Tokenizer, args, folder: Path):
    """Every token id must have an embedding row (a larger model vocabulary, padded, is fine)."""
    if tokenizer.vocab_size > args.vocab_size:
        raise ConfigError(f"{folder}: the tokenizer has {tokenizer.vocab_size} token ids but config.json's "
                          f"vocab_size (the embedding rows) is {args.vocab_size}; resizing embeddings is not supported")


def check_same_architecture(ref_folder: Path, args, flag: str = "--ref_model"):
    """The reference is run with the policy's architecture: refuse one of another shape."""
    ref = read_config(ref_folder)
    # The reference is built with the policy's ModelArgs, so everything they hold must agree.
    keys = ("family", "vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim",
            "tie_embeddings", "norm_eps", "rope_theta", "rope_scaling", "rope_local_theta", "layer_types",
            "sliding_window", "query_pre_attn_scalar", "attn_softcap", "final_softcap")  # the last six: Gemma-2/3
    diff = [f"{k} {getattr(ref, k)} vs {getattr(args, k)}" for k in keys if getattr(ref, k) != getattr(args, k)]
    if diff:
        raise ConfigError(f"{flag}={ref_folder}: another architecture than --model ({', '.join(diff)})")


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


def check_seq_len(seq_len: int, args, key: str = "seq_len", default: Optional[int] = None):
    if seq_len > args.max_seq_len:
        was = " (the default)" if seq_len == default else ""
        raise ConfigError(f"--{key}={seq_len}{was} is above the model's max_position_embeddings ({args.max_seq_len})")
