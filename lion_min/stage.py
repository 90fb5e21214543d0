"""Set-up steps the three stage scripts share: devices and dtypes, the starting checkpoint and its
tokenizer, and conversations -> (ids, loss mask) examples."""

import json
from pathlib import Path
from typing import Optional

import torch

from lion_min.chat import encode_chat
from lion_min.checkpoint import load_model, read_config, resolve_path
from lion_min.config import ConfigError
from lion_min.parallel import Dist, build_model
from lion_min.tokenizer import Tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ConfigError(f"--dtype={name}: expected auto, float32 or bfloat16")
    return DTYPES[name]


def build_from_folder(folder: Path, args, d: Dist, param_dtype: torch.dtype, **wrap):
    """build_model with the weights of a checkpoint folder (read by rank 0 only)."""
    return build_model(args, d, load_weights=lambda: load_model(folder).state_dict(), param_dtype=param_dtype, **wrap)


def load_policy(cfg, d: Dist, param_dtype: torch.dtype, folder: Optional[Path] = None):
    """The starting checkpoint as a wrapped training model, its ModelArgs and its tokenizer."""
    folder = folder or resolve_path(cfg.model, cfg.revision)
    args = read_config(folder)
    tokenizer = Tokenizer.from_dir(folder)
    model = build_from_folder(folder, args, d, param_dtype, activation_checkpointing=cfg.activation_checkpointing,
                              compile=cfg.compile, attn_backend=cfg.attn_backend)
    return model, args, tokenizer, folder


def check_seq_len(seq_len: int, args, key: str = "seq_len"):
    if seq_len > args.max_seq_len:
        raise ConfigError(f"--{key}={seq_len} is above the model's max_position_embeddings ({args.max_seq_len})")


def with_system(messages: list[dict], system_prompt: Optional[str]) -> list[dict]:
    """Prepend a system turn when one is configured and the conversation has none (LION inserts an
    empty one for ChatML)."""
    if system_prompt is None or (messages and messages[0]["role"] == "system"):
        return messages
    return [{"role": "system", "content": system_prompt}] + messages


def encode_conversations(convs, tokenizer, template: str, train_on: str, system_prompt=None):
    out = []
    for conv in convs:
        enc = encode_chat(tokenizer, with_system(conv, system_prompt), template, train_on=train_on)
        out.append((enc.input_ids, enc.loss_mask))
    return out


def append_summary(out_dir: Path, **fields):
    path = out_dir / "summary.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps(data | fields, indent=2))


def run_cli(main) -> None:
    """Run a stage's main(); bad input (a ValueError naming the file, line or key), a missing file,
    or a non-finite loss ends the process with that one line on stderr and exit status 2."""
    import sys

    try:
        main()
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        # One line, even when a library's message (huggingface_hub's, say) spans several.
        message = " | ".join(line.strip() for line in str(e).splitlines() if line.strip())
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
