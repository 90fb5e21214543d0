"""The SFT stage end to end on a tiny checkpoint: invariances, resume, modes, bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_sft  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tiny_chat_model):
    return tiny_chat_model


def base_args(tiny, out, **over):
    args = dict(model=tiny["model"], data=tiny["data"], out_dir=out, seq_len=96, batch_size=4, micro_batch_size=1,
                max_steps=3, lr=1e-3, warmup_ratio=0.0, lr_schedule="constant", log_every=1, seed=0, device="cpu")
    args |= over
    return [f"--{k}={v}" for k, v in args.items()]


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def weights(out):
    return load_file(str(Path(out) / "model.safetensors"))


def run_torchrun(args, nproc=2):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / "train_sft.py"), *args]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def test_accumulation_and_world_size_invariance(tiny, tmp_path):
    train_sft.main(base_args(tiny, tmp_path / "acc4", micro_batch_size=1))
    train_sft.main(base_args(tiny, tmp_path / "mb4", micro_batch_size=4))
    run_torchrun(base_args(tiny, tmp_path / "ddp2", micro_batch_size=1))
    ref = metrics(tmp_path / "acc4")
    assert ref[0]["step"] == 1 and ref[-1]["step"] == 3
    w_ref = weights(tmp_path / "acc4")
    for other in ("mb4", "ddp2"):
        m = metrics(tmp_path / other)
        for a, b in zip(ref, m):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6), (other, a, b)
            assert a["tokens"] == b["tokens"]
        w = weights(tmp_path / other)
        for k in w_ref:
            torch.testing.assert_close(w[k], w_ref[k], atol=2e-6, rtol=1e-5, msg=f"{other}: {k}")
    # ...and training did something: the weights moved and the loss went down.
    start = load_file(str(tiny["model"] / "model.safetensors"))
    assert not torch.equal(start["model.norm.weight"], w_ref["model.norm.weight"])
    assert ref[-1]["loss"] < ref[0]["loss"]


def test_max_steps_overrides_epochs_and_cycles_the_data(tiny, tmp_path):
    """As in the Hugging Face Trainer: --max_steps is the number of steps, whatever --epochs says.
    32 rows / batch 4 = 8 steps per epoch, so 10 steps run into the second epoch's order."""
    train_sft.main(base_args(tiny, tmp_path / "ten", max_steps=10, epochs=1))
    ten = metrics(tmp_path / "ten")
    assert [m["step"] for m in ten] == list(range(1, 11))
    two_epochs = tmp_path / "two"
    train_sft.main(base_args(tiny, two_epochs, max_steps=0, epochs=2))
    full = metrics(two_epochs)
    assert len(full) == 16
    # Same rows in the same order: the constant-lr runs agree on every step they share.
    for a, b in zip(ten, full):
        assert a["tokens"] == b["tokens"] and a["loss"] == pytest.approx(b["loss"], rel=1e-6)


def test_resume_equals_uninterrupted(tiny, tmp_path):
    full = tmp_path / "full"
    train_sft.main(base_args(tiny, full, max_steps=6, save_every=2, epochs=2))
    part = tmp_path / "part"
    train_sft.main(base_args(tiny, part, max_steps=4, save_every=2, epochs=2))  # "stopped" after 4 of 6
    # A resumed run is the same command with --resume; the schedule is that of the 6-step run.
    train_sft.main(base_args(tiny, part, max_steps=6, save_every=2, epochs=2, resume="auto"))
    a, b = metrics(full), metrics(part)
    assert [m["step"] for m in b] == list(range(1, 7))
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-6), (x, y)
    wa, wb = weights(full), weights(part)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
