"""The --key=value command line and the learning-rate schedule."""

import math
import dataclasses
from dataclasses import dataclass, replace
from typing import Optional

import pytest

from lion_min.run.config import ConfigError, TrainConfig
from lion_min.run.flags import parse_cli
from lion_min.core.train import lr_at


@dataclass
class Cfg(TrainConfig):
    beta: float = 0.1
    name: Optional[str] = None


PRESETS = {"tiny": {"lr": 1e-3, "batch_size": 4}}


def test_types_presets_and_overrides():
    cfg = parse_cli(Cfg, PRESETS, ["--lr=3e-4", "--preset=tiny", "--compile=true", "--max-steps=7", "--name=none"])
    assert (cfg.lr, cfg.batch_size, cfg.compile, cfg.max_steps, cfg.name) == (3e-4, 4, True, 7, None)
    assert PRESETS["tiny"] == {"lr": 1e-3, "batch_size": 4}  # presets are not mutated
    assert cfg.preset == "tiny" and Cfg().lr == 2e-5


@pytest.mark.parametrize("argv, message", [
    (["--lr=fast"], "--lr: expected float, got 'fast'"),
    (["--compile=maybe"], "--compile: expected true or false"),
    (["--lrr=1"], r"unknown option --lrr \(did you mean --lr"),
    (["--preset=huge"], "--preset=huge: unknown preset; known presets: tiny"),
    (["lr=1"], "arguments look like --key=value"),
    (["--learning_rate=1"], "unknown option --learning_rate: lion_min calls it --lr"),
    (["--gradient_accumulation_steps=4"], "lion_min derives accumulation: give the global --batch_size"),
    (["--lr"], "--lr needs a value"),
])
def test_bad_flags(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_cli(Cfg, PRESETS, argv)


def test_lr_schedule_shapes():
    cfg = TrainConfig(lr=1.0, warmup_ratio=0.1, lr_schedule="cosine")
    lrs = [lr_at(s, 100, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # 10 warmup steps, linear
    assert lrs[10] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 89 / 90)))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    lin = [lr_at(s, 100, replace(cfg, lr_schedule="linear")) for s in range(100)]
    assert lin[55] == pytest.approx(1 - 45 / 90)
    assert lr_at(50, 100, replace(cfg, lr_schedule="constant")) == 1.0
    with pytest.raises(ValueError, match="unknown lr_schedule"):
        lr_at(50, 100, replace(cfg, lr_schedule="step"))


def test_space_form_and_bare_boolean_flags():
    cfg = parse_cli(Cfg, PRESETS, ["--lr", "3e-4", "--compile", "--name", "x", "--activation_checkpointing=false"])
    assert (cfg.lr, cfg.compile, cfg.name, cfg.activation_checkpointing) == (3e-4, True, "x", "off")
    cfg = parse_cli(Cfg, PRESETS, ["--compile", "False", "--skip_nonfinite", "yes", "--lr", "1e-4"])
    assert (cfg.compile, cfg.skip_nonfinite, cfg.lr) == (False, True, 1e-4)


def test_activation_checkpointing_modes_and_the_old_booleans(tmp_path):
    """auto | off | selective | full; the boolean it was (flags, a bare flag, TOML in recipes) still works."""
    ac = lambda *argv, presets=PRESETS: parse_cli(Cfg, presets, list(argv)).activation_checkpointing
    assert ac() == "auto"
    assert [ac(f"--activation_checkpointing={v}") for v in ("off", "selective", "full", "auto")] == [
        "off", "selective", "full", "auto"]
    assert [ac(f"--activation_checkpointing={v}") for v in ("true", "yes", "1", "false", "no", "0")] == [
        "full"] * 3 + ["off"] * 3
    assert ac("--activation_checkpointing", "--lr", "1e-3") == "full"  # bare: true, as before
    assert ac("--activation_checkpointing", "selective") == "selective"
    assert ac("--preset=old", presets={"old": {"activation_checkpointing": True}}) == "full"  # TOML / preset boolean
    assert ac("--preset=old", presets={"old": {"activation_checkpointing": False}}) == "off"
    recipe = tmp_path / "r.toml"
    recipe.write_text("[shared]\nactivation_checkpointing = true\n")
    assert ac(f"--config={recipe}") == "full"
    with pytest.raises(ConfigError, match="--activation_checkpointing=some: expected one of auto, off, selective, full"):
        ac("--activation_checkpointing=some")
    with pytest.raises(ConfigError, match="unknown option --gradient_checkpointing: lion_min calls it "
                                          "--activation_checkpointing"):
        ac("--gradient_checkpointing=true")


def test_help_lists_every_flag_with_its_doc_and_the_presets(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_cli(Cfg, PRESETS, ["--help"], doc="usage line")
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage line") and "  tiny" in out
    for f in dataclasses.fields(Cfg):
        assert f"--{f.name}=" in out, f.name
    assert "Clip the global gradient norm to this (0 = off)." in out  # the attribute docstring
    assert "\noptimisation:\n" in out and "\nmodel:\n" in out


def test_demo_is_the_default_only_without_model_and_data():
    from lion_min.demo import task as demo
    from lion_min.run.config import SFTConfig

    presets = demo.presets("sft")
    pick = demo.wanted("sft")
    assert parse_cli(SFTConfig, presets, [], default_preset=pick).preset == "demo"
    assert parse_cli(SFTConfig, presets, ["--max_steps=3"], default_preset=pick).preset == "demo"
    assert parse_cli(SFTConfig, presets, ["--model=m"], default_preset=pick).preset == ""
    assert parse_cli(SFTConfig, presets, ["--data=d.jsonl"], default_preset=pick).preset == ""


@pytest.mark.parametrize("stage, cls", [("sft", "lion_min.stages.sft.SFTConfig"), ("dpo", "lion_min.stages.dpo.DPOConfig"),
                                        ("online", "lion_min.stages.online.OnlineConfig")])
def test_recipes_load_for_every_stage_and_flags_override(stage, cls):
    """Every recipe value is a field of the stage (parse_cli refuses unknown keys), has a comment
    naming its source, and a flag after --preset wins."""
    import importlib

    from lion_min.run.flags import RECIPES, recipe_presets

    module, name = cls.rsplit(".", 1)
    klass = getattr(importlib.import_module(module), name)
    presets = recipe_presets(stage)
    assert {"lion-gemma-2b", "lion-llama3-8b"} <= presets.keys()
    for preset in presets:
        cfg = parse_cli(klass, presets, [f"--preset={preset}", "--lr=1e-3"])
        assert cfg.lr == 1e-3 and cfg.chat_template == "chatml" and cfg.out_dir.startswith(f"out/{preset}/")
    gemma = parse_cli(klass, presets, ["--preset=lion-gemma-2b"])
    expect = {"sft": dict(lr=2e-5, epochs=3, batch_size=32, seq_len=8192),
              "dpo": dict(lr=5e-7, beta=0.05, epochs=2, batch_size=128, max_prompt_len=512),
              "online": dict(lr=5e-7, beta=0.05, batch_size=32, n_samples=5, temperature=0.8)}[stage]
    assert {k: getattr(gemma, k) for k in expect} == expect
    # The Gemma-2/3 recipes are the paper's Gemma-2b values on newer checkpoints.
    for preset, model in (("lion-gemma2-2b", "google/gemma-2-2b"), ("lion-gemma2-9b", "google/gemma-2-9b"),
                          ("lion-gemma3-1b", "google/gemma-3-1b-pt"),
                          ("lion-gemma3-4b", "google/gemma-3-4b-pt")):
        newer = parse_cli(klass, presets, [f"--preset={preset}"])
        assert {k: getattr(newer, k) for k in expect} == expect, preset
        assert stage != "sft" or newer.model == model
    for path in RECIPES.glob("*.toml"):
        for line in path.read_text().splitlines():
            if "=" in line and not line.lstrip().startswith("#"):
                assert "#" in line, f"{path.name}: a value without its source: {line}"


def test_config_file_of_your_own(tmp_path):
    recipe = tmp_path / "mine.toml"
    recipe.write_text('[shared]\nlr = 0.5\nseed = 3\n[sft]\nbatch_size = 8\n')
    from lion_min.run.config import SFTConfig

    cfg = parse_cli(SFTConfig, {}, [f"--config={recipe}", "--seed=4"])
    assert (cfg.lr, cfg.batch_size, cfg.seed, cfg.preset) == (0.5, 8, 4, str(recipe))
    recipe.write_text('[shared]\nlrr = 0.5\n')
    with pytest.raises(ConfigError, match=r"mine.toml: unknown option lrr \(did you mean --lr\?\)"):
        parse_cli(SFTConfig, {}, [f"--config={recipe}"])
    recipe.write_text('[sft]\nlearning_rate = 0.5\n')  # another tool's name: pointed at ours
    with pytest.raises(ConfigError, match="unknown option learning_rate: lion_min calls it --lr"):
        parse_cli(SFTConfig, {}, [f"--config={recipe}"])


@pytest.mark.parametrize("entry", ["train_sft.py", "train_dpo.py", "train_online.py", "-m lion_min sft",
                                   "-m lion_min dpo", "-m lion_min online", "-m lion_min sample",
                                   "-m lion_min plot", "-m lion_min prepare sft", "-m lion_min experiments",
                                   "-m lion_min golden", "-m lion_min tiny"])
def test_every_entry_point_answers_help(entry):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, *entry.split()] + ["--help"], capture_output=True, text=True, cwd=root)
    assert res.returncode == 0, res.stderr[-2000:]
    assert any(f in res.stdout for f in ("--model=", "--sft=", "--size=", "--tokenizer="))
    if entry.startswith("train_") or entry.split()[-1] in ("sft", "dpo", "online"):
        assert "lion-gemma-2b" in res.stdout and "demo" in res.stdout


def test_empty_string_is_kept_for_optional_text_and_none_means_none():
    from lion_min.run.config import SFTConfig

    assert parse_cli(SFTConfig, {}, ["--model=m", "--data=d", "--system_prompt="]).system_prompt == ""
    assert parse_cli(SFTConfig, {}, ["--model=m", "--data=d", "--system_prompt=none"]).system_prompt is None
    assert parse_cli(Cfg, {}, ["--name=null"]).name is None


def test_help_after_a_preset_shows_its_values_and_file(capsys):
    """`--preset=lion-gemma-2b --help`: each flag the recipe sets shows the recipe's value, marked,
    and the help says which file they come from; plain --help shows the defaults."""
    from lion_min.cli import sft_main
    from lion_min.run.flags import RECIPES

    with pytest.raises(SystemExit) as e:
        sft_main(["--preset=lion-gemma-2b", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    assert f"values marked [recipe] come from {RECIPES / 'lion-gemma-2b.toml'} (--preset=lion-gemma-2b)" in out
    for flag in ("--seq_len=8192", "--epochs=3", "--lr=2e-05", "--model='google/gemma-2b'"):
        assert f"  {flag}  " in out and out.split(f"  {flag}  ")[1].split("\n")[0].endswith("[recipe]"), flag
    with pytest.raises(SystemExit):
        sft_main(["--help"])
    plain = capsys.readouterr().out
    assert "  --seq_len=2048  (int)\n" in plain and "[recipe]" not in plain
