"""The opening summary a run prints before training (lion_min/run/batches.py:opening_summary) and the
progress line (lion_min/run/loop.py:progress_line): what they say, and that they stay readable."""

import dataclasses

import numpy as np
import torch

from lion_min.core.parallel import Dist
from lion_min.run.config import SFTConfig
from lion_min.run.batches import Batches, opening_summary
from lion_min.run.loop import progress_line


def batches(num_items: int, batch_size: int, micro: int, epochs: int, world: int = 1) -> Batches:
    d = Dist(rank=0, world=world, local_rank=0, device=torch.device("cpu"))
    return Batches(num_items, batch_size, micro, epochs, 0, d, make_micro=lambda idx: {},
                   norm=lambda idx: float(len(idx)))


def fields(text: str) -> dict[str, str]:
    """`  key   value` lines -> {key: value}; continuation lines are left out."""
    lines = text.splitlines()
    assert lines[0] == "run:"
    return {ln[2:].split("  ")[0]: ln[2:].split("  ", 1)[1].strip() for ln in lines[1:] if ln[2] != " "}


def test_opening_summary_counts_steps_leftovers_and_outputs():
    cfg = SFTConfig(model="m", data="train.jsonl", out_dir="out/x", epochs=2, save_every=50, keep_checkpoints=3,
                    eval_every=10)
    b = batches(num_items=23, batch_size=4, micro=1, epochs=2, world=2)  # 5 steps an epoch, 3 rows left over
    text = opening_summary(cfg, b, "rows", {"data": "1 source(s), 30 read\n  a.jsonl: read 30", "rows": "23 rows"},
                           eval_items=6, export_dtype=torch.bfloat16)
    f = fields(text)
    assert f["data"] == "1 source(s), 30 read" and f["rows"] == "23 rows"
    # One value column: 2 + len("checkpoints") + 2; a continuation line keeps its own indent under it.
    assert all(ln[15] != " " and ln[13:15] == "  " for ln in text.splitlines()[1:] if ln[2] != " ")
    assert "\n" + " " * 15 + "  a.jsonl: read 30\n" in text
    assert f["steps"] == "10 = 2 epoch(s) x 5 steps"
    assert f["batch"] == "4 rows = 1 per micro-batch x 2 accumulated x 2 rank(s)"
    assert f["left out"] == "3 rows per epoch (the last partial batch)"
    assert f["eval"] == "6 rows from --eval_fraction=0.0 of --data, every 10 steps and at the end"
    assert f["writes"].startswith("out/x/: the Hugging Face folder (weights in bfloat16)")
    assert f["checkpoints"] == "every 50 steps to out/x/checkpoints/step_N (the last 3 kept)"

    short = dataclasses.replace(cfg, max_steps=3, save_every=0, eval_data="eval.jsonl", eval_every=0)
    f = fields(opening_summary(short, b, "pairs", {}, eval_items=2))
    assert f["steps"] == "3 (--max_steps; one epoch is 5 steps, so 0.6 epochs)"
    assert f["eval"] == "2 pairs from eval.jsonl, at the end"
    assert f["checkpoints"] == "none (--save_every=0)"
    assert "weights in the training dtype" in f["writes"]


def test_dpo_progress_line_stays_short_with_realistic_values():
    line = {"step": 11234, "loss": 0.61234, "rewards/accuracies": 0.71875, "rewards/margins": 1.2345,
            "rewards/chosen": -12.345, "rewards/rejected": -13.579, "lr": 4.5e-7, "grad_norm": 123.456,
            "tokens_per_s": 123456.7, "mfu": 0.4523, "memory_gib": 123.45}
    text = progress_line(line, 12000, eta=12 * 3600 + 59 * 60)
    assert text.startswith("step 11234/12000 | loss 0.6123 | acc 0.719 | margin 1.234 | chosen -12.345 | lr 4.50e-07")
    assert len(text) <= 160, (len(text), text)
    evals = {"eval/loss": 0.6543, "eval/rewards/accuracies": 0.7, "eval/rewards/margins": 1.1}
    first, second = progress_line(line | evals, 12000, eta=60).splitlines()
    assert first == text.replace("eta 12h59m", "eta 1m00s") and len(first) <= 160
    assert second == "  eval: loss 0.6543 | acc 0.700 | margin 1.100"
    assert np.isclose(line["rewards/chosen"] - line["rewards/margins"], -13.5795)  # rejected = chosen - margin
