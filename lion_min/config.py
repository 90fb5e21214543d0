"""The training options every stage shares, recipes, and the command line over a config dataclass.

Each stage (lion_min/sft.py, dpo.py, online.py) defines one dataclass that extends TrainConfig (or
DataConfig) with its own fields; the field defaults are for fine-tuning a pretrained checkpoint.
The command line is

    [--preset=NAME | --config=FILE] [--key=value | --key value | --flag] ...

A preset is a recipe file lion_min/recipes/NAME.toml (the LION recipes, each value citing its
source) or the built-in demo (lion_min/demo.py); --config=FILE reads a recipe file of your own. A
recipe's [shared] table applies to every stage, then the stage's own table ([sft], [dpo],
[online]); flags on the command line override both. `--help` lists every flag and the presets.
"""

import ast
import dataclasses
import difflib
import inspect
import json
import re
import sys
import tomllib
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

RECIPES = Path(__file__).parent / "recipes"


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
    activation_checkpointing: bool = False
    """Recompute each block in backward instead of keeping its activations."""
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
    """A file, glob, folder, hub dataset or mixture (see lion_min/data.py)."""
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
    data_cache: str = "auto"
    """Folder of prepared (encoded, packed) data, reused by later runs and resumes: 'auto' =
    $XDG_CACHE_HOME/lion_min/data or ~/.cache/lion_min/data; 'off' = prepare in memory each run
    (see lion_min/prepare.py)."""


# --- values: checked when the command line is parsed, before anything is loaded ---------------------

# Allowed range of each numeric flag, as an interval ("[" includes the end, "(" excludes it).
RANGES = {
    "lr": "(0, inf)", "warmup_ratio": "[0, 1]", "min_lr_ratio": "[0, 1]", "weight_decay": "[0, inf)",
    "beta1": "[0, 1)", "beta2": "[0, 1)", "grad_clip": "[0, inf)", "epochs": "[1, inf)", "max_steps": "[0, inf)",
    "batch_size": "[1, inf)", "micro_batch_size": "[1, inf)", "log_every": "[1, inf)", "eval_every": "[0, inf)",
    "save_every": "[0, inf)", "keep_checkpoints": "[0, inf)", "seed": "[0, inf)", "eval_fraction": "[0, 1)",
    "seq_len": "[16, inf)", "beta": "(0, inf)", "label_smoothing": "[0, 0.5)", "max_len": "[16, inf)",
    "max_prompt_len": "[1, inf)", "temperature": "[0, inf)", "top_p": "(0, 1]", "top_k": "[0, inf)",
    "max_new_tokens": "[1, inf)", "sample_batch_size": "[1, inf)",
}
CHOICES = {
    "device": ("auto", "cpu", "cuda"), "dtype": ("auto", "float32", "bfloat16"),
    "attn_backend": ("auto", "sdpa", "flex", "varlen"), "lr_schedule": ("cosine", "linear", "constant"),
    "export_dtype": ("source", "float32", "bfloat16", "float16"),
    "train_on": ("assistant", "last"), "overflow": ("truncate", "drop"),
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
    from lion_min.chat import TEMPLATES
    from lion_min.losses import DPO_LOSS_TYPES

    # The templates and loss types are listed where they are defined.
    choices_of = CHOICES | {"chat_template": tuple(TEMPLATES), "loss_type": DPO_LOSS_TYPES}
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
        if cfg.attn_backend == "varlen" and (cfg.dtype == "float32" or not on_gpu):
            raise ConfigError("--attn_backend=varlen needs a CUDA device and --dtype=bfloat16 (flash varlen kernels "
                              "have no float32 or CPU version); use sdpa or flex")
    if getattr(cfg, "overwrite", False) and getattr(cfg, "resume", ""):
        raise ConfigError(f"--overwrite=true with --resume={cfg.resume}: replacing the run and continuing it "
                          f"contradict each other; drop one")
    if getattr(cfg, "out_dir", None) == "":
        raise ConfigError("--out_dir is empty: name the folder the run writes to")


# --- recipes ---------------------------------------------------------------------------------------


def read_recipe(path: Path, stage: str) -> dict:
    """A recipe file's [shared] table updated with its [stage] table."""
    try:
        recipe = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: not a readable recipe file ({e})") from None
    unknown = set(recipe) - {"shared", "sft", "dpo", "online"}
    if unknown:
        raise ConfigError(f"{path}: unknown table(s) {sorted(unknown)}; expected shared, sft, dpo, online")
    return recipe.get("shared", {}) | recipe.get(stage, {})


def recipe_presets(stage: str) -> dict[str, dict]:
    """Every recipe in lion_min/recipes/ that has a table for `stage`, by file name."""
    return {p.stem: read_recipe(p, stage) for p in sorted(RECIPES.glob("*.toml"))
            if stage in tomllib.loads(p.read_text())}


def recipe_summary(name: str) -> str:
    """The first comment line of a recipe file (its one-line description)."""
    path = RECIPES / f"{name}.toml"
    first = path.read_text().splitlines()[0] if path.is_file() else ""
    return first.lstrip("# ").strip()


# --- the command line ----------------------------------------------------------------------------

# Other tools' names for our flags, so a ported command line gets a pointer instead of a guess.
ALIASES = {
    "learning_rate": "lr", "num_train_epochs": "epochs", "per_device_train_batch_size": "micro_batch_size",
    "output_dir": "out_dir", "model_name_or_path": "model", "max_seq_length": "seq_len", "max_length": "max_len",
    "max_prompt_length": "max_prompt_len", "lr_scheduler_type": "lr_schedule", "max_grad_norm": "grad_clip",
    "logging_steps": "log_every", "save_steps": "save_every", "eval_steps": "eval_every",
    "gradient_checkpointing": "activation_checkpointing", "save_total_limit": "keep_checkpoints",
    "resume_from_checkpoint": "resume", "adam_beta1": "beta1", "adam_beta2": "beta2",
}
ALIAS_NOTES = {
    "gradient_accumulation_steps": "lion_min derives accumulation: give the global --batch_size (rows or pairs per "
                                   "optimizer step over all ranks) and --micro_batch_size (per forward on one rank)",
}


BOOL_WORDS = ("1", "true", "yes", "on", "0", "false", "no", "off")


def _convert(value: str, annotation, key: str):
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


def _split_argv(argv: list[str], hints: dict) -> list[tuple[str, Optional[str]]]:
    """['--a=1', '--b', '2', '--flag'] -> [('a', '1'), ('b', '2'), ('flag', None)]."""
    pairs, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"arguments look like --key=value or --key value, got {arg!r}")
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if not eq:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            # A boolean takes the next word only if it is a boolean word (--packing false); bare, it is true.
            takes_next = nxt is not None and not nxt.startswith("--") and (
                hints.get(key) is not bool or nxt.lower() in BOOL_WORDS)
            value = nxt if takes_next else None  # None: a bare --flag, checked when converted
            i += takes_next
        pairs.append((key, value))
        i += 1
    return pairs


def _unknown(key: str, fields) -> ConfigError:
    if key in ALIASES and ALIASES[key] in fields:
        return ConfigError(f"unknown option --{key}: lion_min calls it --{ALIASES[key]}")
    if key in ALIAS_NOTES:
        return ConfigError(f"unknown option --{key}: {ALIAS_NOTES[key]}")
    close = difflib.get_close_matches(key, list(fields), n=3)
    hint = f" (did you mean {', '.join('--' + c for c in close)}?)" if close else ""
    return ConfigError(f"unknown option --{key}{hint}")


def parse_cli(cls, presets: dict[str, dict], argv: Optional[list[str]] = None,
              default_preset: Optional[Callable[[set], Optional[str]]] = None, doc: str = ""):
    """The command line (see the module docstring) -> an instance of `cls`.

    presets: name -> {field: value}. default_preset(keys given on the command line) names the preset
    to apply when neither --preset nor --config is given (the scripts use it for the demo).
    `--help` prints `doc`, the presets and every flag, then exits 0.
    """
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print(help_text(cls, presets, doc))
        sys.exit(0)
    fields = {f.name for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    pairs = _split_argv(argv, hints)
    given = {k for k, _ in pairs}
    overrides: dict = {}
    name = next((v for k, v in pairs if k == "preset"), None)
    if name is None and "config" not in given and default_preset is not None:
        name = default_preset(given)
    if name is not None:
        if name not in presets:
            raise ConfigError(f"--preset={name}: unknown preset; known presets: {', '.join(presets) or 'none'}")
        # keys starting with "_" describe the preset (its --help line); they are not settings
        overrides = {k: v for k, v in presets[name].items() if not k.startswith("_")} | {"preset": name}
    for key, value in pairs:
        if key == "config":
            if value is None or not Path(value).is_file():
                raise ConfigError(f"--config={value}: no such recipe file")
            stage = getattr(cls, "STAGE", "")
            overrides = read_recipe(Path(value), stage) | {"preset": value}
    cfg = cls()
    for key, value in overrides.items():  # recipe values are already typed (TOML)
        if key not in fields:
            where = "--config" if "config" in given else "--preset"
            raise ConfigError(f"{where}={overrides.get('preset')}: {str(_unknown(key, fields)).replace('--', '', 1)}")
        setattr(cfg, key, value)
    for key, value in pairs:
        if key in ("preset", "config"):
            continue
        if key not in fields:
            raise _unknown(key, fields)
        if value is None:
            if hints[key] is not bool:
                raise ConfigError(f"--{key} needs a value (--{key}=VALUE)")
            value = "true"
        setattr(cfg, key, _convert(value, hints[key], key))
    check_values(cfg)
    return cfg


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


# --- --help ----------------------------------------------------------------------------------------


def field_docs(cls) -> dict[str, tuple[str, str]]:
    """field -> (group, one-line doc) from the attribute docstrings and `# -- group` comments of
    `cls` and its bases (the source is the documentation; nothing is repeated for --help)."""
    out: dict[str, tuple[str, str]] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        lines = inspect.getsource(klass).splitlines()
        body = ast.parse(inspect.cleandoc("\n".join(lines))).body[0].body
        group = getattr(klass, "GROUP", "") or klass.__name__
        for i, node in enumerate(body):
            if isinstance(node, ast.AnnAssign):
                marks = [ln for ln in lines[: node.lineno] if re.match(r"\s*# -- ", ln)]
                name = node.target.id
                if marks:
                    group = marks[-1].split("# -- ", 1)[1].strip()
                nxt = body[i + 1] if i + 1 < len(body) else None
                doc = ""
                if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
                    doc = " ".join(str(nxt.value.value).split())
                # a stage that changes a base field's default keeps the base's group and doc
                base_group, base_doc = out.get(name, (group, ""))
                out[name] = (base_group, doc or base_doc)
    return out


def help_text(cls, presets: dict[str, dict], doc: str = "") -> str:
    hints = typing.get_type_hints(cls)
    defaults = cls()
    groups: dict[str, list[str]] = {}
    for name, (group, text) in field_docs(cls).items():
        hint = hints[name]
        optional = typing.get_origin(hint) is typing.Union
        kind = next(a for a in typing.get_args(hint) if a is not type(None)) if optional else hint
        kind = kind.__name__ + (" or none" if optional else "")
        line = f"  --{name}={getattr(defaults, name)!r}  ({kind})"
        groups.setdefault(group, []).append(line + (f"\n      {text}" if text else ""))
    parts = [doc.strip()] if doc else []
    if presets:
        parts.append("presets (--preset=NAME; flags after it override its values):")
        parts += [f"  {n:<16} {recipe_summary(n) or presets[n].get('_doc', '')}".rstrip() for n in presets]
        parts.append("--config=FILE reads a recipe file (TOML: [shared] and [sft] / [dpo] / [online] tables).")
    for group, lines in groups.items():
        parts.append(f"\n{group}:")
        parts += lines
    return "\n".join(parts)


def stage_main(config_cls, run, argv: Optional[list[str]], doc: str):
    """What each train_*.py script runs: the presets (the demo's and the recipes'), the command
    line, then the stage, on the demo's files when the demo (or debug) preset is chosen, which is
    what a command line without a model and data means (lion_min/demo.py)."""
    from lion_min import demo

    stage = config_cls.STAGE
    presets = demo.presets(stage) | recipe_presets(stage)
    cfg = parse_cli(config_cls, presets, argv, default_preset=demo.wanted(stage), doc=doc)
    if cfg.preset in ("demo", "debug"):
        return demo.run_stage(stage, cfg, run)
    return run(cfg)


def run_cli(main) -> None:
    """Run a stage's main(); bad input (a ValueError naming the file, line or key), a missing file,
    or a non-finite loss ends the process with that one line on stderr and exit status 2."""
    from lion_min.train import StopRequested

    try:
        main()
    except StopRequested as e:
        print(str(e), file=sys.stderr)
        sys.exit(e.code)
    except KeyboardInterrupt:  # Ctrl-C outside the training steps (loading, sampling), or a second one
        print("stopped by Ctrl-C (no checkpoint written for this part of the run)", file=sys.stderr)
        sys.exit(130)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        # One line, even when a library's message (huggingface_hub's, say) spans several.
        message = " | ".join(line.strip() for line in str(e).splitlines() if line.strip())
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    # After success only (a failed rank must not wait for the others): leave the process group
    # and exit without the interpreter's teardown (parallel.shutdown says why).
    from lion_min.parallel import shutdown

    shutdown()
