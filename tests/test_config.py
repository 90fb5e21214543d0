"""The --key=value command line and the learning-rate schedule."""

import math
from dataclasses import dataclass, replace
from typing import Optional

import pytest

from lion_min.config import ConfigError, TrainConfig, parse_cli
from lion_min.train import lr_at


@dataclass
class Cfg(TrainConfig):
    beta: float = 0.1
    name: Optional[str] = None


PRESETS = {"tiny": Cfg(lr=1e-3, batch_size=4)}


def test_types_presets_and_overrides():
    cfg = parse_cli(Cfg, PRESETS, ["--lr=3e-4", "--preset=tiny", "--compile=true", "--max-steps=7", "--name=none"])
    assert (cfg.lr, cfg.batch_size, cfg.compile, cfg.max_steps, cfg.name) == (3e-4, 4, True, 7, None)
    assert PRESETS["tiny"].lr == 1e-3  # presets are not mutated


@pytest.mark.parametrize("argv, message", [
    (["--lr=fast"], "--lr: expected float, got 'fast'"),
    (["--compile=maybe"], "--compile: expected true or false"),
    (["--lrr=1"], r"unknown option --lrr \(did you mean --lr"),
    (["--preset=huge"], "unknown preset 'huge'; known presets: tiny"),
    (["lr=1"], "arguments look like --key=value"),
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
