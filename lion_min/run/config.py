"""The training options: the dataclasses, the allowed values, and parsing one value.

TrainConfig and DataConfig hold what every stage shares; each stage's dataclass (SFTConfig,
DPOConfig, OnlineConfig) extends one with its own fields, and its run() is in lion_min/stages/sft.py,
dpo.py, online.py. The field defaults are for fine-tuning a pretrained checkpoint. The command
line over these dataclasses is lion_min/run/flags.py; the scripts' presets are in lion_min/cli.py.

Importing this module does not import torch (tests/test_install.py holds it to that): a command
line is parsed and checked, and --help printed, before torch is loaded, which takes a second or
more. Only the checks that need a device (--device=cuda, --attn_backend=varlen) import it.
"""

import dataclasses
import json
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from lion_min.core.choices import AC_MODES, ATTN_BACKENDS, DPO_LOSS_TYPES

if TYPE_CHECKING:
    import torch


class ConfigError(ValueError):
    pass


@dataclass
class TrainConfig:
    # -- model
    model: str = ""
    """Starting checkpoint: a Hugging Face folder or hub id."""
    revision: Optional[str] = None
    """Hub revision (branch, tag or commit) to pin the download to."""
    preset: str = ""
    """The recipe applied before the flags (recorded here; see --help for the list)."""
    out_dir: str = "out/run"
    """Metrics, checkpoints and the final Hugging Face folder go here."""
    seed: int = 0

    # -- hardware and parallelism
    device: str = "auto"
    """'auto' (cuda if available), 'cpu' or 'cuda'."""
    dtype: str = "auto"
    """Compute dtype: 'auto' (bfloat16 on GPU, float32 on CPU), 'bfloat16' or 'float32'.
    Master weights, optimizer state and gradient reduction stay in float32."""
    compile: bool = False
    """torch.compile each block."""
    activation_checkpointing: str = "auto"
    """'auto' (from the step's estimated memory against free device memory; off on CPU), 'off',
    'selective' (every other block) or 'full' (every block): recompute blocks in backward instead of
    keeping their activations. true / false (older recipes) mean full / off."""
    attn_backend: str = "auto"
    """How packed documents are isolated: 'auto', 'sdpa' (dense mask), 'flex', 'varlen'."""

    # -- optimisation
    lr: float = 2e-5
    """Peak learning rate (the LION SFT value; the DPO stages set their own)."""
    lr_schedule: str = "cosine"
    """'cosine', 'linear' (both decay to lr * min_lr_ratio) or 'constant', after linear warmup."""
    warmup_ratio: float = 0.1
    """Fraction of the total steps spent warming up linearly from 0."""
    min_lr_ratio: float = 0.0
    """The schedule decays to lr * min_lr_ratio."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay, applied to matrices only (not norms)."""
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = off)."""
    epochs: int = 1
    max_steps: int = 0
    """Run exactly this many optimizer steps, cycling the data as needed; overrides epochs, as in the
    Hugging Face Trainer (0 = run all epochs)."""
    batch_size: int = 32
    """Global batch per optimizer step, over all ranks and accumulation steps (rows or pairs)."""
    micro_batch_size: int = 1
    """Per forward pass on one rank; accumulation = batch_size / (micro_batch_size * world)."""
    skip_nonfinite: bool = False
    """On a NaN/inf loss or gradient: False stops the run naming the step; True skips the update."""

    # -- logging and checkpoints
    log_every: int = 1
    report_to: str = "none"
    """Also send metrics.jsonl's scalars, live, to 'tensorboard' (out_dir/tensorboard) or 'wandb'
    (optional packages: requirements-report.txt); 'none' = metrics.jsonl only."""
    eval_every: int = 0
    """Evaluate held-out loss every N steps and at the end (0 = only at the end, if eval data)."""
    save_every: int = 0
    """Write a resumable checkpoint every N steps (0 = never)."""
    keep_checkpoints: int = 2
    """How many resumable checkpoints to keep, the newest (0 = keep all)."""
    resume: str = ""
    """'' (start fresh), 'auto' (newest complete checkpoint in out_dir, if any), or a checkpoint path."""
    overwrite: bool = False
    """Replace a run already in out_dir (its checkpoints, metrics and export are removed first)."""
    export_dtype: str = "source"
    """dtype of the exported weights: 'source' (the starting checkpoint's), 'float32', 'bfloat16', 'float16'."""


@dataclass
class DataConfig(TrainConfig):
    """The data fields of the stages that read a dataset through a chat template (SFT, DPO)."""

    # -- data
    data: str = ""
    """A file, glob, folder, hub dataset or mixture (see lion_min/formats/data.py)."""
    eval_data: str = ""
    eval_fraction: float = 0.0
    """Hold out this fraction of `data` for eval loss when eval_data is not given."""
    schema: Optional[str] = None
    """The record schema (default: detected per source; see lion_min/formats/data.py)."""
    skip_bad: bool = False
    """Skip and count bad records instead of stopping at the first one."""
    chat_template: str = "chatml"
    """chatml (LION's; its two tokens are given ids when the tokenizer lacks them) | llama3 | gemma |
    gemma3 | auto (the model folder's own template, chatml when it carries none)."""
    system_prompt: Optional[str] = None
    """Inserted as the system turn when a conversation has none (LION: '' with ChatML)."""
    data_cache: str = "auto"
    """Folder of prepared (encoded, packed) data, reused by later runs and resumes: 'auto' =
    $XDG_CACHE_HOME/lion_min/data or ~/.cache/lion_min/data; 'off' = prepare in memory each run
    (see lion_min/run/data_cache.py)."""


# --- each stage's own options (its run() is in lion_min/stages/sft.py, dpo.py, online.py) ---------------


@dataclass
class SFTConfig(DataConfig):
    """`data` holds conversations (schema messages | sharegpt | prompt_response)."""

    STAGE = "sft"
    GROUP = "sft"

    out_dir: str = "out/sft"
    # -- sft
    columns: Optional[str] = None
    """Column mapping for the schema's fields, e.g. 'prompt=query,response=response' (MetaMathQA)."""
    seq_len: int = 2048
    """Tokens per packed row (LION: 8192; 2048 fits a 2B-8B model on one GPU without tuning)."""
    packing: bool = True
    """True: bin-pack conversations into rows; False: one conversation per row, padded."""
    isolate_documents: bool = True
    """False: the paper's ablation of naive packing: packed conversations attend to each other and
    positions run on across the row (packing.pack isolate=False)."""
    loss_mask: bool = True
    """True: train on assistant replies only; False: on every token (the paper's ablation)."""
    train_on: str = "assistant"
    """With loss_mask: 'assistant' (every reply) or 'last' (only the last reply)."""
    overflow: str = "truncate"
    """Conversations longer than seq_len: 'truncate' or 'drop' (both counted)."""


@dataclass
class DPOConfig(DataConfig):
    """`data` holds preference pairs (schema text_pairs | message_pairs | hh_rlhf)."""

    STAGE = "dpo"
    GROUP = "dpo"

    out_dir: str = "out/dpo"
    lr: float = 5e-7
    """LION's DPO learning rate (both models)."""
    lr_schedule: str = "linear"
    batch_size: int = 128
    """LION: 128 pairs per optimizer step."""
    # -- dpo
    beta: float = 0.1
    """KL strength (the DPO paper's and TRL's default; LION uses 0.05 for Gemma-2b, 0.01 for Llama-3-8b)."""
    loss_type: str = "sigmoid"
    """sigmoid (DPO), ipo or hinge."""
    label_smoothing: float = 0.0
    """cDPO: probability that a label is flipped (sigmoid loss only)."""
    ref_model: str = ""
    """Reference checkpoint ('' = the starting model)."""
    precompute_ref: bool = True
    """Compute reference log-probs once up front (stored in out_dir) and train without a reference
    in memory (LION); false keeps a frozen reference model."""
    max_len: int = 2048
    """Tokens per sequence, prompt included (LION: 2048)."""
    max_prompt_len: int = 512
    """Prompt tokens kept, from the end (LION Gemma-2b: 512)."""


@dataclass
class OnlineConfig(DPOConfig):
    """`prompts` holds the prompts to sample from; `judge` scores the samples."""

    STAGE = "online"
    GROUP = "online"

    out_dir: str = "out/online"
    batch_size: int = 32
    """LION Gemma-2b online: 32 pairs per optimizer step."""
    # -- online
    prompts: str = ""
    """Prompts: .jsonl with a "prompt" field (text or a list of messages) or an SFT file's "messages"
    (the turns before the final reply), or one per line."""
    judge: str = ""
    """A rule (length, brevity; the demo adds demo), a reward-model folder or hub id, or pairrm:DIR
    (the paper's PairRM ranker, docs/pairrm.md)."""
    judge_template: str = "auto"
    """A reward-model judge renders prompt and response from text with its own tokenizer and this
    chat template: auto (its folder's own), chatml | llama3 | gemma | gemma3, or a .jinja file for a folder
    that carries none."""
    n_samples: int = 5
    """Samples per prompt (LION: 5)."""
    temperature: float = 0.8
    """LION: 0.8."""
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 2048
    """LION: up to 2048 new tokens."""
    rounds: int = 1
    sample_batch_size: int = 64
    """Prompts per sampling batch (each row is one sample of one prompt)."""


# What only the training of a round reads, not its sampling and judging: while no round has finished,
# a rerun in the same out_dir (stages/online.py) may change these and still reuse the rounds already sampled and judged.
TRAINING_KEYS = frozenset({
    "lr", "lr_schedule", "warmup_ratio", "min_lr_ratio", "weight_decay", "beta1", "beta2", "grad_clip", "epochs",
    "max_steps", "batch_size", "skip_nonfinite", "beta", "loss_type", "label_smoothing", "ref_model",
    "precompute_ref", "max_len", "rounds", "eval_data", "eval_fraction"})


# --- python -m lion_min sample --------------------------------------------------------------------


@dataclass
class SampleConfig:
    CHOICES = {"chat_template": ("auto", "chatml", "llama3", "gemma", "gemma3", "none")}

    model: str = ""
    """Hugging Face checkpoint folder (or hub id) holding the weights and tokenizer.json."""
    prompt: str = ""
    """One prompt (the user turn when a chat template is used)."""
    prompts_file: str = ""
    """More prompts: .jsonl with a "prompt" field per line (text, or a list of messages) or an SFT
    file's "messages" (the turns before the final reply), or plain text with one prompt per line."""
    chat_template: str = "auto"
    """auto (the model folder's: the chat_template of the lion_min run that wrote it, else its
    tokenizer's template if it is a known one) | chatml | llama3 | gemma | gemma3 | none (raw text, preceded
    by the tokenizer's BOS if it has one)."""
    max_new_tokens: int = 128
    temperature: float = 1.0
    """0 = greedy."""
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    batch_size: int = 64
    device: str = "auto"
    """'auto' (cuda if available), 'cpu' or 'cuda'."""
    dtype: str = "auto"
    """'auto' (bfloat16 on GPU, float32 on CPU), 'bfloat16' or 'float32'."""


# --- values: checked when the command line is parsed, before anything is loaded ---------------------

DTYPES = ("float32", "bfloat16")
"""--dtype: the compute dtypes (master weights, optimizer state and reductions stay float32)."""

# Allowed range of each numeric flag, as an interval ("[" includes the end, "(" excludes it).
RANGES = {
    "lr": "(0, inf)", "warmup_ratio": "[0, 1]", "min_lr_ratio": "[0, 1]", "weight_decay": "[0, inf)",
    "beta1": "[0, 1)", "beta2": "[0, 1)", "grad_clip": "[0, inf)", "epochs": "[1, inf)", "max_steps": "[0, inf)",
    "batch_size": "[1, inf)", "micro_batch_size": "[1, inf)", "log_every": "[1, inf)", "eval_every": "[0, inf)",
    "save_every": "[0, inf)", "keep_checkpoints": "[0, inf)", "seed": "[0, 4294967295]", "eval_fraction": "[0, 1)",
    "seq_len": "[16, inf)", "beta": "(0, inf)", "label_smoothing": "[0, 0.5)", "max_len": "[16, inf)",
    "max_prompt_len": "[1, inf)", "temperature": "[0, inf)", "top_p": "(0, 1]", "top_k": "[0, inf)",
    "max_new_tokens": "[1, inf)", "sample_batch_size": "[1, inf)",
}
# seed: at most 2**32 - 1, refused up front: the online stage seeds each sampling batch with
# seed * 100003 + rank * 1009 + offset, which must fit torch's 64-bit generator.
CHOICES = {
    "device": ("auto", "cpu", "cuda"), "dtype": ("auto", *DTYPES),
    "attn_backend": ATTN_BACKENDS, "lr_schedule": ("cosine", "linear", "constant"),
    "activation_checkpointing": AC_MODES,
    "export_dtype": ("source", "float32", "bfloat16", "float16"),
    "train_on": ("assistant", "last"), "overflow": ("truncate", "drop"), "report_to": ("none", "tensorboard", "wandb"),
}


def _in_interval(value: float, interval: str) -> bool:
    lo, hi = (float(x) for x in interval[1:-1].split(","))
    above = value >= lo if interval[0] == "[" else value > lo
    below = value <= hi if interval[-1] == "]" else value < hi
    return above and below


def check_values(cfg) -> None:
    """Every range, choice and combination the flags must satisfy; one ConfigError naming the flag."""
    # A config class may widen a range or a choice (golden's lr 0 = no step; the sampler's "none" template).
    for key, interval in (RANGES | getattr(type(cfg), "RANGES", {})).items():
        value = getattr(cfg, key, None)
        if value is not None and not _in_interval(value, interval):
            raise ConfigError(f"--{key}={value}: must be in {interval}")
    from lion_min.core.chat import TEMPLATES

    # The templates and loss types are listed where they are defined.
    choices_of = CHOICES | {"chat_template": (*TEMPLATES, "auto"), "loss_type": DPO_LOSS_TYPES}
    choices_of |= getattr(type(cfg), "CHOICES", {})
    for key, choices in choices_of.items():
        value = getattr(cfg, key, None)
        if value is not None and value not in choices:
            raise ConfigError(f"--{key}={value}: expected one of {', '.join(choices)}")
    if getattr(cfg, "label_smoothing", 0) and getattr(cfg, "loss_type", "sigmoid") != "sigmoid":
        raise ConfigError(f"--label_smoothing={cfg.label_smoothing} applies to --loss_type=sigmoid only (cDPO), "
                          f"not {cfg.loss_type}")
    if getattr(cfg, "max_prompt_len", 0) >= getattr(cfg, "max_len", float("inf")):
        raise ConfigError(f"--max_prompt_len={cfg.max_prompt_len} must be smaller than --max_len={cfg.max_len}")
    if getattr(cfg, "micro_batch_size", 0) > getattr(cfg, "batch_size", float("inf")):
        raise ConfigError(f"--micro_batch_size={cfg.micro_batch_size} is larger than --batch_size={cfg.batch_size}")
    if getattr(cfg, "device", "auto") == "cuda" or getattr(cfg, "attn_backend", "auto") == "varlen":
        import torch

        if cfg.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device=cuda: no CUDA device is available here (use --device=cpu or auto)")
        on_gpu = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
        if cfg.attn_backend == "varlen":
            from lion_min.core.attention import varlen_problem

            as_auto = torch.bfloat16 if on_gpu else torch.float32  # what --dtype=auto picks
            dtype = getattr(torch, cfg.dtype) if cfg.dtype in DTYPES else as_auto
            problem = varlen_problem("cuda" if on_gpu else "cpu", dtype)
            if problem:
                raise ConfigError(f"--attn_backend=varlen: {problem}; use --attn_backend=flex or sdpa")
    if getattr(cfg, "overwrite", False) and getattr(cfg, "resume", ""):
        raise ConfigError(f"--overwrite=true with --resume={cfg.resume}: replacing the run and continuing it "
                          f"contradict each other; drop one")
    if getattr(cfg, "out_dir", None) == "":
        raise ConfigError("--out_dir is empty: name the folder the run writes to")


def resolve_dtype(name: str, device: "torch.device") -> "torch.dtype":
    """--dtype as a torch dtype: auto is bfloat16 on a GPU, float32 on the CPU."""
    import torch

    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ConfigError(f"--dtype={name}: expected auto, float32 or bfloat16")
    return getattr(torch, name)


BOOL_WORDS = ("1", "true", "yes", "on", "0", "false", "no", "off")
# Flags that were booleans once: their true / false words (and a bare flag, and TOML true / false in
# a recipe) still mean what they meant.
WERE_BOOLS = {"activation_checkpointing": ("full", "off")}


def was_bool(key: str, value, hint):
    """`value` of flag `key` (annotated `hint`) with a boolean word of a flag in WERE_BOOLS mapped."""
    if key in WERE_BOOLS and hint is str and (isinstance(value, bool) or str(value).lower() in BOOL_WORDS):
        on = value if isinstance(value, bool) else str(value).lower() in BOOL_WORDS[:4]
        return WERE_BOOLS[key][0 if on else 1]
    return value


def type_error(key: str, value, hint) -> Optional[str]:
    """What is wrong with a typed value (a recipe's TOML) for a field annotated `hint`, or None: a
    number in quotes (lr = "2e-5") is a string, and would fail only later, inside the run."""
    args = typing.get_args(hint) if typing.get_origin(hint) is typing.Union else (hint,)
    simple = [a for a in args if a in (bool, int, float, str)]
    if not simple or (value is None and type(None) in args):  # (a dict is checked where it is used)
        return None
    if any(type(value) is a or (a is float and type(value) is int) for a in simple):
        return None
    quoted = " (a string: write it without quotes)" if isinstance(value, str) else ""
    return f"expected {' or '.join(a.__name__ for a in simple)}, got {value!r}{quoted}"


def parse_value(value: str, annotation, key: str):
    origin = typing.get_origin(annotation)
    if origin is typing.Union:  # Optional[X]
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
        # --system_prompt= is the empty string (LION's empty system turn); none / null is None.
        if value.lower() in ("none", "null") or (value == "" and annotation is not str):
            return None
    if annotation is bool:
        if value.lower() in BOOL_WORDS[:4]:
            return True
        if value.lower() in BOOL_WORDS[4:]:
            return False
        raise ConfigError(f"--{key}: expected true or false, got {value!r}")
    if annotation in (int, float):
        try:
            return annotation(value)
        except ValueError:
            raise ConfigError(f"--{key}: expected {annotation.__name__}, got {value!r}") from None
    return value


def parse_columns(spec: Optional[str]) -> Optional[dict[str, str]]:
    """--columns=field=column,...: which column of a data file holds each field the schema reads."""
    if not spec:
        return None
    try:
        return dict(part.split("=", 1) for part in spec.split(","))
    except ValueError:
        raise ConfigError(f"--columns={spec}: expected field=column pairs separated by commas") from None


def read_json(path: Path) -> Optional[dict]:
    """A JSON file's contents, or None when it is missing or unreadable (a marker or record file
    that may not be there yet, or may be torn)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def config_to_json(cfg) -> str:
    return json.dumps(dataclasses.asdict(cfg), indent=2)


def format_config(cfg) -> str:
    """The config as an aligned block, one `key  value` per line."""
    items = dataclasses.asdict(cfg)
    width = max(map(len, items))
    return "\n".join(f"  {k:<{width}}  {v!r}" for k, v in items.items())
