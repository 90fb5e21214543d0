"""Crash safety: kill -9 mid-run and resume, a rank killed under torchrun --max-restarts, non-finite
losses, interrupted saves, a full disk, files cut short, a failure on one rank of several.

Run as a script (under torchrun) it is the worker of the one-rank-failure tests:
python tests/test_faults.py FAULT RANK TRAIN_SFT_ARGS..."""

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
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


def worker_pids(parent: int) -> dict[int, int]:
    """{RANK: pid} of torchrun's worker processes (its children that have RANK in their environment)."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) != parent:
                continue
            env = dict(x.split("=", 1) for x in (proc / "environ").read_bytes().decode().split("\0") if "=" in x)
        except (OSError, ValueError):  # the process ended while we looked
            continue
        if "RANK" in env:
            found[int(env["RANK"])] = int(proc.name)
    return found


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


@pytest.fixture(scope="module")
def two_rank_run(tiny_chat_model, tmp_path_factory):
    """An uninterrupted 2-rank run of 16 steps: its weights."""
    full = tmp_path_factory.mktemp("two_ranks") / "full"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    res = subprocess.run([*TORCHRUN, str(ROOT / "train_sft.py"), *sft_args(tiny_chat_model, full, max_steps=16)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return load_file(str(full / "model.safetensors"))


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the workers through /proc (Linux)")
@pytest.mark.parametrize("killed_rank, attempt", [(1, 0), (0, 0), (1, 1), (0, 1)])
def test_torchrun_restarts_the_group_after_a_rank_is_killed(tiny_chat_model, two_rank_run, tmp_path, killed_rank,
                                                            attempt):
    # The plain launch (torchrun's agent shares its TCPStore with the workers): the restarted group
    # must not read the dead attempt's keys (parallel.attempt_store); it failed 7 times in 9 before.
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", None)
    killed = tmp_path / "killed"
    log = tmp_path / "killed.log"
    with log.open("w") as f:
        proc = subprocess.Popen([*TORCHRUN, "--max-restarts=1", str(ROOT / "train_sft.py"),
                                 *sft_args(tiny_chat_model, killed, max_steps=16, resume="auto")],
                                stdout=f, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 240
        while not (killed / "checkpoints" / "step_4").is_dir() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
        ranks = worker_pids(proc.pid)
        assert set(ranks) == {0, 1}, f"workers not found: {ranks}"
        os.kill(ranks[killed_rank], signal.SIGKILL)
        try:
            code = proc.wait(timeout=180)
        except subprocess.TimeoutExpired:  # the restarted group hangs: end it, then fail
            for pid in worker_pids(proc.pid).values():
                os.kill(pid, signal.SIGKILL)
            proc.kill()
            code = "a hang"
        assert code == 0, log.read_text()[-3000:]
    text = log.read_text()
    # torchrun saw a worker fail (the killed one, or its peer, which stops at once on losing it)...
    assert re.search(r"failed \(exitcode: (-9|2)\) local_rank: [01]", text), text[-3000:]
    assert text.count("training 16 steps from step") == 2  # ...and started the group again, which resumed
    assert re.search(r"training 16 steps from step ([4-9]|1[0-4]) \(resumed from .*step_\d+\)", text), text[-3000:]
    got = load_file(str(killed / "model.safetensors"))
    assert got.keys() == two_rank_run.keys() and all((got[k] == two_rank_run[k]).all() for k in got)  # ...bit-identical
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 17))


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


def test_crash_during_a_save_leaves_the_previous_checkpoint_loadable(tiny_chat_model, tmp_path, monkeypatch):
    import torch.distributed.checkpoint as dcp

    full, crashed = tmp_path / "full", tmp_path / "crashed"
    train_sft.main(sft_args(tiny_chat_model, full, max_steps=6, save_every=2))
    real_save, calls = dcp.save, []

    def save_then_crash(state, checkpoint_id):  # the second save writes its tensors, then the process "dies"
        calls.append(checkpoint_id)
        real_save(state, checkpoint_id=checkpoint_id)
        if len(calls) == 2:
            raise OSError("disk full")

    monkeypatch.setattr(dcp, "save", save_then_crash)
    with pytest.raises(ValueError, match=r"step_4.tmp: cannot write the checkpoint of step 4: disk full"):
        train_sft.main(sft_args(tiny_chat_model, crashed, max_steps=6, save_every=2))
    monkeypatch.setattr(dcp, "save", real_save)
    ckpts = sorted(p.name for p in (crashed / "checkpoints").iterdir())
    assert ckpts == ["step_2"]  # the half-written save was removed
    # What a killed process leaves (a .tmp folder) and a damaged newest checkpoint are passed over.
    (crashed / "checkpoints" / "step_5.tmp").mkdir()
    damaged = crashed / "checkpoints" / "step_4"
    damaged.mkdir()
    (damaged / "trainer_state.json").write_text('{"step": 4')  # torn

    from lion_min.run.config import TrainConfig
    from lion_min.run.resume import resolve_resume

    assert resolve_resume(TrainConfig(resume="auto"), crashed).name == "step_2"
    train_sft.main(sft_args(tiny_chat_model, crashed, max_steps=6, save_every=2, resume="auto"))
    a, b = load_file(str(full / "model.safetensors")), load_file(str(crashed / "model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def run_cli_exit(argv, capsys) -> tuple[int, str]:
    """What `python train_sft.py ARGV` does: (exit status, stderr)."""
    from lion_min.cli import run_cli

    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: train_sft.main(argv))
    return exit_info.value.code, capsys.readouterr().err


def fill_disk_after_a_few_bytes(error: BaseException):
    """A stand-in for a writer that runs out of disk: writes a little of the file, then raises `error`."""
    def write(data, target, *args, **kwargs):
        with open(target, "wb") if isinstance(target, (str, Path)) else nullcontext(target) as f:
            f.write(b"\0" * 100)
        raise error
    return write


ENOSPC = OSError(errno.ENOSPC, "No space left on device")
TORCH_FULL = RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 448 vs 384")
SAFETENSORS_FULL = SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                                   '"No space left on device" })')


@pytest.mark.parametrize("where, error, says", [
    ("shards", TORCH_FULL, "RuntimeError: [enforce fail at inline_container.cc:664] . unexpected pos 448 vs 384"),
    ("shards", ENOSPC, "No space left on device"),
    ("rng", TORCH_FULL, "unexpected pos 448 vs 384"),
    ("rng", ENOSPC, "No space left on device"),
])
def test_disk_full_during_a_checkpoint_one_line_and_nothing_lost(tiny_chat_model, tmp_path, monkeypatch, capsys,
                                                                  where, error, says):
    from torch.distributed.checkpoint import filesystem

    out = tmp_path / "run"
    train_sft.main(sft_args(tiny_chat_model, out, max_steps=4, save_every=2))  # step_2 and step_4
    before = {p.relative_to(out): p.read_bytes() for p in (out / "checkpoints").rglob("*") if p.is_file()}
    # Going on to 8 steps, the step-6 save runs out of disk inside DCP's writer or in torch.save of the rng state.
    if where == "shards":  # DCP's writer thread: the error comes back wrapped in a CheckpointException
        monkeypatch.setattr(filesystem, "_write_item",
                            lambda transforms, stream, *a, **k: fill_disk_after_a_few_bytes(error)(None, stream))
    else:
        monkeypatch.setattr(torch, "save", fill_disk_after_a_few_bytes(error))
    code, err = run_cli_exit(sft_args(tiny_chat_model, out, max_steps=8, save_every=2, resume="auto",
                                      keep_checkpoints=0), capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("error: ") and "step_6.tmp: cannot write the checkpoint of step 6" in lines[0]
    assert says in lines[0]
    assert not list(out.rglob("*.tmp*"))
    after = {p.relative_to(out): p.read_bytes() for p in (out / "checkpoints").rglob("*") if p.is_file()}
    assert after == before  # earlier checkpoints untouched, byte for byte


@pytest.mark.parametrize("error, says", [(SAFETENSORS_FULL, "SafetensorError: Error while serializing: IoError"),
                                         (ENOSPC, "No space left on device")])
def test_disk_full_during_the_export_then_resume_exports(tiny_chat_model, tmp_path, monkeypatch, capsys, error, says):
    import lion_min.formats.hf

    full, out = tmp_path / "full", tmp_path / "run"
    train_sft.main(sft_args(tiny_chat_model, full, max_steps=4, eval_fraction=0.25))
    monkeypatch.setattr(lion_min.formats.hf, "save_file", fill_disk_after_a_few_bytes(error))
    code, err = run_cli_exit(sft_args(tiny_chat_model, out, max_steps=4, eval_fraction=0.25), capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"error: {out}: cannot write the Hugging Face export") and says in lines[0]
    assert not list(tmp_path.rglob("*.tmp*")) and not (out / "model.safetensors").exists()
    assert (out / "checkpoints" / "step_4" / "trainer_state.json").is_file()  # the final checkpoint was written
    monkeypatch.undo()
    # The final checkpoint is there but the export is not: a resume exports it (no step to train).
    train_sft.main(sft_args(tiny_chat_model, out, max_steps=4, eval_fraction=0.25, resume="auto"))
    assert "is the run's last step: exporting" in capsys.readouterr().out
    lines = [[json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()] for run in (full, out)]
    assert [r["step"] for r in lines[1]] == [1, 2, 3, 4, 4]  # the final eval once, not again after the resume
    assert [r.get("loss", r.get("eval/loss")) for r in lines[1]] == [r.get("loss", r.get("eval/loss")) for r in lines[0]]
    a, b = load_file(str(full / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert json.loads((out / "summary.json").read_text())["steps"] == 4


def test_disk_full_writing_summary_json_one_line_and_no_half_file(tiny_chat_model, tmp_path, monkeypatch, capsys):
    """summary.json marks a run finished: a full disk while it is written is the export's error (one line,
    exit 2, on every rank), and no summary.json or .tmp is left."""
    import lion_min.run.loop

    out = tmp_path / "run"

    def full(src, dst):
        raise OSError(28, "No space left on device", str(dst))

    monkeypatch.setattr(lion_min.run.loop.os, "replace", full)
    code, err = run_cli_exit(sft_args(tiny_chat_model, out, max_steps=2), capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "No space left on device" in lines[0], err
    assert lines[0].startswith(f"error: {out}: cannot write the Hugging Face export")
    assert not (out / "summary.json").exists() and not list(out.rglob("*.tmp*"))


def test_a_finished_run_continued_keeps_its_final_eval_line(tiny_chat_model, tmp_path, capsys):
    """More steps for a finished run: the old final eval (at step 4) stays in metrics.jsonl; only the
    eval of an export that never finished is dropped (it runs again)."""
    out = tmp_path / "run"
    train_sft.main(sft_args(tiny_chat_model, out, max_steps=4, eval_fraction=0.25))
    train_sft.main(sft_args(tiny_chat_model, out, max_steps=6, eval_fraction=0.25, resume="auto"))
    records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], "eval/loss" in r) for r in records] == [
        (1, False), (2, False), (3, False), (4, False), (4, True), (5, False), (6, False), (6, True)]


@pytest.mark.parametrize("cut", ["__0_0.distcp", "rng_rank0.pt", ".metadata"])
def test_a_truncated_file_in_the_newest_checkpoint_is_passed_over(tiny_chat_model, tmp_path, capsys, cut):
    # A constant lr: the 4-step run's checkpoints are those of the 6-step run, so a resume from step 2
    # gives the 6-step run's weights exactly.
    full, out = tmp_path / "full", tmp_path / "run"
    train_sft.main(sft_args(tiny_chat_model, full, max_steps=6, lr_schedule="constant", save_every=0))
    train_sft.main(sft_args(tiny_chat_model, out, max_steps=4, lr_schedule="constant"))  # step_2, step_4
    shard = out / "checkpoints" / "step_4" / cut
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # present but cut short
    capsys.readouterr()
    train_sft.main(sft_args(tiny_chat_model, out, max_steps=6, lr_schedule="constant", resume="auto"))
    printed = capsys.readouterr().out
    assert f"warning: {shard.parent} is damaged (" in printed and cut.lstrip(".") in printed
    assert f"resumed from {out / 'checkpoints' / 'step_2'}" in printed
    a, b = load_file(str(full / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_a_truncated_reference_logps_file_is_computed_again(tiny_chat_model, tmp_path, capsys):
    import train_dpo

    dpo = dict(model=tiny_chat_model["model"], data=tiny_chat_model["prefs"], max_len=64, max_prompt_len=32,
               batch_size=4, micro_batch_size=2, lr=1e-3, warmup_ratio=0.0, lr_schedule="constant", seed=0,
               device="cpu", precompute_ref=True, save_every=1)
    argv = lambda out, **over: [f"--{k}={v}" for k, v in (dpo | {"out_dir": out} | over).items()]  # noqa: E731
    full, out = tmp_path / "full", tmp_path / "run"
    train_dpo.main(argv(full, max_steps=3, save_every=0))
    train_dpo.main(argv(out, max_steps=2))
    file = out / "reference_logps.safetensors"
    good = file.read_bytes()
    file.write_bytes(good[: len(good) - 40])  # cut short (a crash or a full disk while copying the run)
    capsys.readouterr()
    train_dpo.main(argv(out, max_steps=3, resume="auto"))
    assert f"note: {file} is unreadable (" in capsys.readouterr().out
    assert file.read_bytes() == good  # computed again, to the same bytes
    a, b = load_file(str(full / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


# --- a failure on one rank ends every rank --------------------------------------------------------

FAULTS = {
    # NaN in rank 1's shards only, found when the step-4 checkpoint is saved.
    "nan_shard": ("1", r"error: step 4: model weights contain NaN/inf \(\S+\); checkpoint not written$", 1),
    # The disk fills on rank 1 only, while it writes its rng state into the step-4 checkpoint.
    "disk_full": ("1", r"error: \S+step_4.tmp: cannot write the checkpoint of step 4: No space left on device$", 1),
    # Rank 0 fails alone (a bad value, say) while rank 1 goes on into step 3's all-reduce.
    "rank0_raises": ("0", r"error: injected failure on rank 0$", 2),
}


@pytest.mark.slow
@pytest.mark.parametrize("fault", FAULTS)
def test_a_failure_on_one_rank_ends_every_rank_at_once(tiny_chat_model, tmp_path, fault):
    rank, message, lines = FAULTS[fault]
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, fault, rank,
           *sft_args(tiny_chat_model, out, max_steps=8)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    ended = time.time()
    assert res.returncode != 0
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == lines and re.match(message, errors[0]), res.stderr[-3000:]
    assert all("another rank stopped (its own error says why)" in ln for ln in errors[1:])
    assert "[rank" not in res.stderr  # no rank printed a traceback
    # Every rank has exited (torchrun returns after its last worker) within seconds of the fault.
    fault_time = float((tmp_path / "fault_time").read_text())
    print(f"{fault}: all ranks ended {ended - fault_time:.1f} s after the fault")
    assert ended - fault_time < 30
    assert not list(out.rglob("*.tmp")) and not (out / "model.safetensors").exists()


def inject(fault: str, rank: int, fault_time: Path):
    """Worker side of the test above: make `fault` happen on `rank` only."""
    import lion_min.run.loop as train

    def mark():
        fault_time.write_text(repr(time.time()))

    if fault == "nan_shard":
        real_save = train.save_checkpoint

        def save_poisoned(out_dir, step, model, *args, **kwargs):
            if step == 4 and int(os.environ["RANK"]) == rank:
                p = next(model.parameters())
                with torch.no_grad():
                    (p.to_local() if hasattr(p, "to_local") else p).view(-1)[0] = float("nan")
                mark()
            return real_save(out_dir, step, model, *args, **kwargs)

        train.save_checkpoint = save_poisoned
    elif fault == "disk_full" and int(os.environ["RANK"]) == rank:
        real_torch_save = torch.save

        def torch_save(obj, f, *args, **kwargs):
            if "step_4.tmp" in str(f) and "rng_rank" in str(f):
                mark()
                fill_disk_after_a_few_bytes(ENOSPC)(obj, f)
            return real_torch_save(obj, f, *args, **kwargs)

        torch.save = torch_save
    elif fault == "rank0_raises" and int(os.environ["RANK"]) == rank:
        import lion_min.core.train as core_train  # the loop (core_train.steps) calls train_step by this name

        real_step = core_train.train_step

        def failing_step(*args, **kwargs):
            if args[-1] == 2:  # the third step
                mark()
                raise ValueError(f"injected failure on rank {rank}")
            return real_step(*args, **kwargs)

        core_train.train_step = failing_step


if __name__ == "__main__":
    from lion_min.cli import run_cli

    fault, rank, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    out = Path(next(a for a in argv if a.startswith("--out_dir=")).split("=", 1)[1])
    inject(fault, rank, out.parent / "fault_time")
    run_cli(lambda: train_sft.main(argv))


def test_checkpoints_silence_dcp_s_one_process_warning_in_each_wording(tmp_path, monkeypatch):
    """DCP without a process group warns that it assumes one process, in words that vary by release and
    call: quiet_dcp() silences that warning, in each wording, and torch 2.9 DCP's TypedStorage
    deprecation warning (about its own code), and no other."""
    import warnings

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from lion_min.run.resume import quiet_dcp

    said = ["torch.distributed is disabled, unavailable or uninitialized, assuming the intent is to save in a single "
            "process.", "torch.distributed is unavailable or uninitialized, assuming the intent is to load in a single "
            "process.", "TypedStorage is deprecated. It will be removed in the future", "something else",
            "TypedStorage is deprecated (from elsewhere)"]
    where = ["torch.distributed.checkpoint.filesystem"] * 4 + ["torch.storage"]

    def messages(work, quiet: bool) -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with quiet_dcp() if quiet else nullcontext():
                work()
        return [str(w.message) for w in caught]

    warn_all = lambda: [warnings.warn_explicit(text, UserWarning, "f.py", 1, module=module)
                        for text, module in zip(said, where)]
    assert messages(warn_all, quiet=False) == said
    assert messages(warn_all, quiet=True) == said[3:]
    # The installed torch's own wording, from a real save and load (as with no process group, whatever
    # an earlier test in this process left).
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    state = {"w": torch.arange(4.0)}
    work = lambda folder: lambda: (dcp.save(state, checkpoint_id=folder), dcp.load(state, checkpoint_id=folder))
    bare, quiet = messages(work(str(tmp_path / "a")), quiet=False), messages(work(str(tmp_path / "b")), quiet=True)
    about_no_group = lambda said: [m for m in said if m.startswith("torch.distributed is")]
    assert len(about_no_group(bare)) == 2 and about_no_group(quiet) == [], (bare, quiet)  # (others may warn once)
