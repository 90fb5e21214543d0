"""The command line over a config dataclass, recipe files, and --help.

    [--preset=NAME | --config=FILE] [--key=value | --key value | --flag] ...

A preset is a named set of values the caller hands in (the scripts: the recipe files
lion_min/run/recipes/NAME.toml, the LION recipes, each value citing its source, and the built-in demo;
lion_min/cli.py); --config=FILE reads a recipe file of your own. A recipe's [shared] table applies
to every stage, then the stage's own table ([sft], [dpo], [online]); flags on the command line
override both. `--help` lists every flag and the presets.
"""

import ast
import dataclasses
import difflib
import inspect
import re
import sys
import tomllib
import typing
from pathlib import Path
from typing import Callable, Optional

from lion_min.run.config import BOOL_WORDS, WERE_BOOLS, ConfigError, check_values, parse_value, type_error, was_bool

RECIPES = Path(__file__).parent / "recipes"


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
    """Every recipe in lion_min/run/recipes/ that has a table for `stage`, by file name."""
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
    `--help` prints `doc`, the presets and every flag, then exits 0; after --preset=NAME or
    --config=FILE the flags show that recipe's values, and where they come from.
    """
    argv = sys.argv[1:] if argv is None else argv
    wants_help = "--help" in argv or "-h" in argv
    fields = {f.name for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    pairs = _split_argv([a for a in argv if a not in ("--help", "-h")], hints)
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
    if wants_help:  # a recipe named on the command line shows its values (not the demo's, chosen by default)
        named = "config" in given or any(k == "preset" for k, _ in pairs)
        print(help_text(cls, presets, doc, overrides if named else None))
        sys.exit(0)
    cfg = cls()
    for key, value in overrides.items():  # recipe values are already typed (TOML)
        where = "--config" if "config" in given else "--preset"
        if key not in fields:
            raise ConfigError(f"{where}={overrides.get('preset')}: {str(_unknown(key, fields)).replace('--', '', 1)}")
        value = was_bool(key, value, hints.get(key))
        if key != "preset" and (wrong := type_error(key, value, hints[key])):
            source = overrides["preset"] if where == "--config" else RECIPES / f"{overrides['preset']}.toml"
            raise ConfigError(f"{source}: {key}: {wrong}")
        setattr(cfg, key, value)
    for key, value in pairs:
        if key in ("preset", "config"):
            continue
        if key not in fields:
            raise _unknown(key, fields)
        if value is None:
            if hints[key] is not bool and key not in WERE_BOOLS:
                raise ConfigError(f"--{key} needs a value (--{key}=VALUE)")
            value = "true"
        setattr(cfg, key, was_bool(key, parse_value(value, hints[key], key), hints[key]))
    typed_wins(cfg, given)
    check_values(cfg)
    return cfg


def typed_wins(cfg, given: set[str]) -> None:
    """What the user typed wins over the recipe: a typed --overwrite=true replaces the run, so a recipe's
    resume=auto gives way (and a typed --resume, a recipe's overwrite); both typed still conflict."""
    if "overwrite" in given and "resume" not in given and getattr(cfg, "overwrite", False) and hasattr(cfg, "resume"):
        cfg.resume = ""
    if "resume" in given and "overwrite" not in given and getattr(cfg, "resume", ""):
        cfg.overwrite = False


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


def help_text(cls, presets: dict[str, dict], doc: str = "", recipe: Optional[dict] = None) -> str:
    """`doc`, the presets and every flag with its default, or with `recipe`'s value (a preset's or
    --config's settings, "preset" naming it) marked by where it comes from."""
    hints = typing.get_type_hints(cls)
    defaults = cls()
    recipe = {k: v for k, v in (recipe or {}).items() if k != "preset" and hasattr(defaults, k)} | (
        {"preset": recipe["preset"]} if recipe else {})
    chosen = recipe.get("preset", "")
    source = (RECIPES / f"{chosen}.toml" if (RECIPES / f"{chosen}.toml").is_file()
              else chosen if Path(chosen).is_file() else "lion_min/demo/task.py")
    groups: dict[str, list[str]] = {}
    for name, (group, text) in field_docs(cls).items():
        hint = hints[name]
        optional = typing.get_origin(hint) is typing.Union
        kind = next(a for a in typing.get_args(hint) if a is not type(None)) if optional else hint
        kind = kind.__name__ + (" or none" if optional else "")
        value = recipe.get(name, getattr(defaults, name))
        line = f"  --{name}={value!r}  ({kind})" + ("  [recipe]" if name in recipe and name != "preset" else "")
        groups.setdefault(group, []).append(line + (f"\n      {text}" if text else ""))
    parts = [doc.strip()] if doc else []
    if recipe:
        which = f" (--preset={chosen})" if str(source) != chosen else ""
        parts.append(f"values marked [recipe] come from {source}{which}; the others are the defaults; flags on the "
                     f"command line override both.")
    if presets:
        parts.append("presets (--preset=NAME; flags after it override its values):")
        parts += [f"  {n:<16} {recipe_summary(n) or presets[n].get('_doc', '')}".rstrip() for n in presets]
        parts.append("--config=FILE reads a recipe file (TOML: [shared] and [sft] / [dpo] / [online] tables).")
    for group, lines in groups.items():
        parts.append(f"\n{group}:")
        parts += lines
    return "\n".join(parts)
