"""Crash safety: kill -9 mid-run and resume, non-finite losses, interrupted saves."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_sft  # noqa: E402


def sft_args(tiny, out, **over):
    a = dict(model=tiny["model"], data=tiny["data"], out_dir=out, seq_len=96, batch_size=4, micro_batch_size=1,
             epochs=4, max_steps=24, lr=1e-3, warmup_ratio=0.0, lr_schedule="cosine", save_every=2, seed=0,
             device="cpu") | over
    return [f"--{k}={v}" for k, v in a.items()]


@pytest.mark.slow
def test_kill_9_then_resume_equals_uninterrupted(tiny_chat_model, tmp_path):
    full = tmp_path / "full"
    train_sft.main(sft_args(tiny_chat_model, full))
    killed = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_sft.py"), *sft_args(tiny_chat_model, killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "step_6").is_dir() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / "model.safetensors").exists()
    train_sft.main(sft_args(tiny_chat_model, killed, resume="auto"))
    a, b = load_file(str(full / "model.safetensors")), load_file(str(killed / "model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 25))


def test_nonfinite_loss_stops_naming_the_step(tiny_chat_model, tmp_path):
    # lr 1e30 makes the weights huge after step 1, so step 2's loss is not finite.
    out = tmp_path / "nan"
    with pytest.raises(FloatingPointError, match=r"step 2: non-finite loss or gradient"):
        train_sft.main(sft_args(tiny_chat_model, out, lr=1e30, lr_schedule="constant", max_steps=4, save_every=1,
                                grad_clip=0))
    assert not (out / "model.safetensors").exists()


def test_skip_nonfinite_counts_skipped_steps(tiny_chat_model, tmp_path):
    out = tmp_path / "skip"
    train_sft.main(sft_args(tiny_chat_model, out, lr=1e30, lr_schedule="constant", max_steps=4, save_every=0,
                            grad_clip=0, skip_nonfinite=True))
    last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["skipped_steps"] == 3  # step 1 updated (to huge weights), steps 2-4 skipped


def test_resume_auto_ignores_incomplete_checkpoint(tiny_chat_model, tmp_path):
    out = tmp_path / "partial"
    train_sft.main(sft_args(tiny_chat_model, out, max_steps=4, save_every=2))
    # A save that crashed half-way leaves a .tmp folder: never picked by resume=auto.
    (out / "checkpoints" / "step_8.tmp").mkdir()
    from lion_min.config import TrainConfig
    from lion_min.train import resolve_resume

    assert resolve_resume(TrainConfig(resume="auto"), out).name == "step_2"
