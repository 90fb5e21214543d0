"""The training options every stage shares, and `--key=value` parsing over a config dataclass.

Each script defines one dataclass that extends TrainConfig with its stage's fields and a dict of
named presets (plain instances). The command line is `--preset=NAME` (applied first) followed by
`--key=value` overrides, each checked against the field's type.
"""

import dataclasses
import difflib
import json
import sys
import typing
from dataclasses import dataclass
from typing import Optional


class ConfigError(ValueError):
    pass


@dataclass
class TrainConfig:
    model: str = ""
    """Starting checkpoint: a Hugging Face folder or hub id ('' = the stage's built-in default)."""
    revision: Optional[str] = None
    """Hub revision (branch, tag or commit) to pin the download to."""
    out_dir: str = "out"
    """Metrics, checkpoints and the final Hugging Face folder go here."""
    seed: int = 0
    device: str = "auto"
    """'auto' (cuda if available), 'cpu' or 'cuda'."""
    dtype: str = "auto"
    """Compute dtype: 'auto' (bfloat16 on GPU, float32 on CPU), 'bfloat16' or 'float32'.
    Master weights, optimizer state and gradient reduction stay in float32."""
    compile: bool = False
    """torch.compile each block."""
    activation_checkpointing: bool = False
    attn_backend: str = "auto"
    """How packed documents are isolated: 'auto', 'sdpa' (dense mask), 'flex', 'varlen'."""

    lr: float = 2e-5
    lr_schedule: str = "cosine"
    """'cosine', 'linear' (decay to 0) or 'constant', after linear warmup."""
    warmup_ratio: float = 0.1
    """Fraction of the total steps spent warming up linearly from 0."""
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    """AdamW decoupled weight decay, applied to matrices only (not norms)."""
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = off)."""

    epochs: int = 1
    max_steps: int = 0
    """Stop after this many optimizer steps (0 = run all epochs)."""
    batch_size: int = 32
    """Global batch per optimizer step, over all ranks and accumulation steps (rows or pairs)."""
    micro_batch_size: int = 1
    """Per forward pass on one rank; accumulation = batch_size / (micro_batch_size * world)."""

    log_every: int = 1
    eval_every: int = 0
    """Evaluate held-out loss every N steps and at the end (0 = only at the end, if eval data)."""
    save_every: int = 0
    """Write a resumable checkpoint every N steps (0 = never)."""
    keep_checkpoints: int = 2
    resume: str = ""
    """'' (start fresh), 'auto' (newest complete checkpoint in out_dir, if any), or a checkpoint path."""
    skip_nonfinite: bool = False
    """On a NaN/inf loss or gradient: False stops the run naming the step; True skips the update."""


@dataclass
class DataConfig(TrainConfig):
    """The data fields of the stages that read a dataset through a chat template (SFT, DPO)."""

    data: str = ""
    """A file, glob, folder, hub dataset or mixture (see lion_min/data.py); '' = the demo's data."""
    eval_data: str = ""
    eval_fraction: float = 0.0
    """Hold out this fraction of `data` for eval loss when eval_data is not given."""
    schema: Optional[str] = None
    """The record schema (default: detected per source; see lion_min/data.py)."""
    skip_bad: bool = False
    """Skip and count bad records instead of stopping at the first one."""
    chat_template: str = "chatml"
    """chatml | llama3 | gemma."""
    system_prompt: Optional[str] = None
    """Inserted as the system turn when a conversation has none (LION: '' with ChatML)."""


def _convert(value: str, annotation, key: str):
    origin = typing.get_origin(annotation)
    if origin is typing.Union:  # Optional[X]
        if value.lower() in ("none", "null", ""):
            return None
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if annotation is bool:
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"--{key}: expected true or false, got {value!r}")
    if annotation in (int, float):
        try:
            return annotation(value)
        except ValueError:
            raise ConfigError(f"--{key}: expected {annotation.__name__}, got {value!r}") from None
    return value


def parse_cli(cls, presets: dict, argv: Optional[list[str]] = None):
    """`--preset=NAME --key=value ...` -> an instance of `cls`."""
    argv = sys.argv[1:] if argv is None else argv
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    pairs = []
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"arguments look like --key=value, got {arg!r}")
        pairs.append(arg[2:].split("=", 1))
    cfg = cls()
    for key, value in pairs:
        if key == "preset":
            if value not in presets:
                raise ConfigError(f"unknown preset {value!r}; known presets: {', '.join(presets)}")
            cfg = dataclasses.replace(presets[value])
    for key, value in pairs:
        if key == "preset":
            continue
        key = key.replace("-", "_")
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=3)
            hint = f" (did you mean {', '.join('--' + c for c in close)}?)" if close else ""
            raise ConfigError(f"unknown option --{key}{hint}")
        setattr(cfg, key, _convert(value, hints[key], key))
    return cfg


def config_to_json(cfg) -> str:
    return json.dumps(dataclasses.asdict(cfg), indent=2)
