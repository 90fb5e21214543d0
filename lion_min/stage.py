"""Set-up steps the three stages share: devices and dtypes, the starting checkpoint and its
tokenizer, the system turn, and the run's summary.json."""

import json
from pathlib import Path
from typing import Optional

import torch

from lion_min.chat import template_of
from lion_min.checkpoint import load_model, read_config, resolve_path
from lion_min.config import ConfigError
from lion_min.parallel import Dist, build_model
from lion_min.tokenizer import Tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
EXPORT_DTYPES = DTYPES | {"float16": torch.float16}  # a checkpoint may be stored in fp16; training never is


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
    check_vocab(tokenizer, args, folder)
    own = template_of(tokenizer.chat_template)
    if d.main and own is not None and own.name != cfg.chat_template:
        print(f"note: {folder} carries the {own.name} chat template; this run uses --chat_template="
              f"{cfg.chat_template} (the export will carry that one)")
    model = build_from_folder(folder, args, d, param_dtype, activation_checkpointing=cfg.activation_checkpointing,
                              compile=cfg.compile, attn_backend=cfg.attn_backend)
    return model, args, tokenizer, folder


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
            "tie_embeddings", "norm_eps", "rope_theta", "rope_scaling")
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


def with_system(messages: list[dict], system_prompt: Optional[str]) -> list[dict]:
    """Prepend a system turn when one is configured and the conversation has none (LION inserts an
    empty one for ChatML)."""
    if system_prompt is None or (messages and messages[0]["role"] == "system"):
        return messages
    return [{"role": "system", "content": system_prompt}] + messages


def append_summary(out_dir: Path, **fields):
    path = out_dir / "summary.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps(data | fields, indent=2))


def opening_summary(cfg, batches, items: str, lines: dict[str, str], eval_items: int = 0,
                    export_dtype: Optional[torch.dtype] = None) -> str:
    """The block a run prints once before training (rank 0): the stage's own `lines` (data read and
    kept, rows or pairs, target tokens), then the eval set, the steps, what the last partial batch
    of each epoch leaves out, and what will be written where. `items` names what a batch holds."""
    total, per_epoch = cfg.max_steps or batches.num_steps, batches.steps_per_epoch
    if cfg.max_steps:
        steps = f"{total} (--max_steps; one epoch is {per_epoch} steps, so {total / per_epoch:.3g} epochs)"
    else:
        steps = f"{total} = {cfg.epochs} epoch(s) x {per_epoch} steps"
    world = batches.d.world
    accum = batches.batch_size // (batches.micro_batch_size * world)
    out = Path(cfg.out_dir)
    rows = dict(lines)
    if eval_items:
        where = cfg.eval_data or f"--eval_fraction={cfg.eval_fraction} of --data"
        when = f"every {cfg.eval_every} steps and at the end" if cfg.eval_every else "at the end"
        rows["eval"] = f"{eval_items} {items} from {where}, {when}"
    rows |= {
        "steps": steps,
        "batch": f"{batches.batch_size} {items} = {batches.micro_batch_size} per micro-batch x {accum} accumulated x "
                 f"{world} rank(s)",
        "left out": f"{batches.dropped_items} {items} per epoch (the last partial batch)",
        "writes": f"{out}/: the Hugging Face folder (weights in "
                  f"{str(export_dtype).removeprefix('torch.') if export_dtype else 'the training dtype'}), "
                  f"train_config.json, metrics.jsonl, summary.json",
        "checkpoints": (f"every {cfg.save_every} steps to {out / 'checkpoints'}/step_N ("
                        + (f"the last {cfg.keep_checkpoints} kept)" if cfg.keep_checkpoints else "all kept)")
                        if cfg.save_every else "none (--save_every=0)"),
    }
    width = max(map(len, rows))
    return "run:\n" + "\n".join(f"  {k:<{width}}  " + v.replace("\n", "\n" + " " * (width + 4))
                                    for k, v in rows.items())
