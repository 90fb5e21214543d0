"""A run folder's contract: never destroy, mix or mislabel another run; resume only the same run;
a signal stops at a step boundary with a checkpoint; a run that fails before its first step
leaves nothing behind."""

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
import train_online  # noqa: E402
import train_sft  # noqa: E402
from lion_min.run.config import ConfigError  # noqa: E402
from lion_min.run.run_folder import LOCK  # noqa: E402


def sft_args(tiny, out, **over):
    a = dict(model=tiny["model"], data=tiny["data"], out_dir=out, seq_len=96, batch_size=4, micro_batch_size=1,
             max_steps=4, lr=1e-3, warmup_ratio=0.0, lr_schedule="cosine", seed=0, device="cpu") | over
    return [f"--{k}={v}" for k, v in a.items()]


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def lines(out):
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def without_timings(line: dict) -> dict:
    return {k: v for k, v in line.items() if k not in ("tokens_per_s", "step_time_s", "memory_gib", "mfu")}


def test_a_finished_run_is_refused_unchanged_and_overwrite_replaces_it(tiny_chat_model, tmp_path):
    out = tmp_path / "run"
    train_sft.main(sft_args(tiny_chat_model, out))
    before = snapshot(out)
    # (another lr: --resume=auto would be refused, so it is not suggested)
    with pytest.raises(ConfigError, match=r"holds another run: lr differ; pick another --out_dir, or replace it "
                                          r"with --overwrite=true"):
        train_sft.main(sft_args(tiny_chat_model, out, lr=5e-4))
    assert snapshot(out) == before  # not one byte changed
    train_sft.main(sft_args(tiny_chat_model, out, lr=5e-4, overwrite="true"))
    assert json.loads((out / "train_config.json").read_text())["lr"] == 5e-4
    assert load_file(str(out / "model.safetensors")).keys() == load_file(str(tiny_chat_model["model"] /
                                                                            "model.safetensors")).keys()


@pytest.mark.parametrize("where", ["model", "inside_model", "contains_data"])
def test_out_dir_never_overlaps_an_input(tiny_chat_model, tmp_path, where):
    model = tiny_chat_model["model"]
    out = {"model": model, "inside_model": model / "run", "contains_data": tiny_chat_model["data"].parent}[where]
    before = snapshot(model)
    with pytest.raises(ConfigError, match=r"--out_dir=.* (is|lies inside|contains) --(model|data)=.*: a run never "
                                          r"writes into its own inputs"):
        train_sft.main(sft_args(tiny_chat_model, out))
    assert snapshot(model) == before and not (model / "run").exists()


def test_a_live_lock_refuses_and_a_dead_one_is_taken_over(tiny_chat_model, tmp_path, capsys):
    out = tmp_path / "locked"
    out.mkdir()
    # A live run holds an OS lock on the file (a pid in it proves nothing: run_dir's docstring).
    live = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
                             "fcntl.flock(f, fcntl.LOCK_EX); print(flush=True); time.sleep(60)", str(out / LOCK)],
                            stdout=subprocess.PIPE)
    try:
        live.stdout.readline()
        (out / LOCK).write_text(json.dumps({"pid": live.pid, "host": os.uname().nodename}))
        with pytest.raises(ConfigError, match=f"another run \\(pid {live.pid}\\) is writing there"):
            train_sft.main(sft_args(tiny_chat_model, out))
    finally:
        live.kill()
        live.wait()
    capsys.readouterr()
    train_sft.main(sft_args(tiny_chat_model, out))  # the same lock, its process now dead
    assert f"taking over the lock of a run that is no longer alive (pid {live.pid})" in capsys.readouterr().out
    assert not (out / LOCK).exists() and (out / "model.safetensors").is_file()


def test_resume_refuses_another_run_and_allows_safe_changes(tiny_chat_model, tmp_path, capsys):
    out = tmp_path / "run"
    train_sft.main(sft_args(tiny_chat_model, out, max_steps=6, save_every=2))
    before = snapshot(out)
    with pytest.raises(ConfigError, match=r"holds another run: lr, seq_len differ"):
        train_sft.main(sft_args(tiny_chat_model, out, max_steps=6, save_every=2, resume="auto", lr=5e-4, seq_len=128))
    assert snapshot(out) == before
    # Another checkpoint given by path, into a fresh folder: checked against the checkpoint itself.
    fresh = tmp_path / "fresh"
    with pytest.raises(ConfigError, match=r"belongs to another run: lr differ"):
        train_sft.main(sft_args(tiny_chat_model, fresh, max_steps=6, lr=5e-4,
                                resume=out / "checkpoints" / "step_4"))
    assert not fresh.exists()  # failed before its first step: nothing left behind
    # Cadence and micro-batching may change; the result is the uninterrupted run's.
    capsys.readouterr()
    train_sft.main(sft_args(tiny_chat_model, fresh, max_steps=6, resume=out / "checkpoints" / "step_4",
                            log_every=3, micro_batch_size=2))
    printed = capsys.readouterr().out
    assert "with log_every=3 (was 1)" in printed and "with micro_batch_size=2 (was 1)" in printed
    a, b = load_file(str(out / "model.safetensors")), load_file(str(fresh / "model.safetensors"))
    for k in a:
        assert (a[k] - b[k]).abs().max() < 1e-6, k


def test_torn_metrics_line_is_dropped_with_a_warning(tiny_chat_model, tmp_path, capsys):
    full, part = tmp_path / "full", tmp_path / "part"
    train_sft.main(sft_args(tiny_chat_model, full, max_steps=6, save_every=2, lr_schedule="constant"))
    # A run stopped after 4 of 6 steps (a constant schedule, so its first 4 steps are the full run's).
    train_sft.main(sft_args(tiny_chat_model, part, max_steps=4, save_every=2, lr_schedule="constant"))
    with (part / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "loss": 0.1')  # a crash mid-write
    capsys.readouterr()
    train_sft.main(sft_args(tiny_chat_model, part, max_steps=6, save_every=2, lr_schedule="constant", resume="auto"))
    assert "line 5 is not complete JSON" in capsys.readouterr().out
    assert [without_timings(x) for x in lines(part)] == [without_timings(x) for x in lines(full)]


@pytest.mark.slow
def test_sigterm_stops_at_a_step_boundary_and_resume_is_bit_identical(tiny_chat_model, tmp_path):
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    args = dict(max_steps=40, epochs=8, log_every=1)
    train_sft.main(sft_args(tiny_chat_model, full, **args))
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_sft.py"), *sft_args(tiny_chat_model, stopped, **args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        metrics = stopped / "metrics.jsonl"
        if metrics.is_file() and metrics.read_text().count("\n") >= 3:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert err.count("\n") == 1 and err.startswith("stopped by SIGTERM after step ") and "Traceback" not in err
    step = int(err.split("after step ")[1].split(":")[0])
    assert step < 40 and (stopped / "checkpoints" / f"step_{step}").is_dir()
    train_sft.main(sft_args(tiny_chat_model, stopped, resume="auto", **args))
    a, b = load_file(str(full / "model.safetensors")), load_file(str(stopped / "model.safetensors"))
    assert all((a[k] == b[k]).all() for k in a)
    assert [without_timings(x) for x in lines(stopped)] == [without_timings(x) for x in lines(full)]


def test_online_refuses_finished_rounds_of_another_judge(tiny_online_argv, tmp_path):
    out = tmp_path / "online"
    argv = tiny_online_argv(out)
    train_online.main(argv)
    before = snapshot(out)
    with pytest.raises(ConfigError, match="holds another run: judge differ"):
        train_online.main(argv[:2] + ["--judge=brevity"] + argv[3:])
    with pytest.raises(ConfigError, match="holds another run: temperature differ"):
        train_online.main(argv[:-1] + ["--temperature=0.5"])
    assert snapshot(out) == before


def test_disk_full_at_export_is_one_line_and_leaves_no_half_export(tiny_chat_model, tmp_path, monkeypatch, capsys):
    import errno

    from lion_min.formats import hf as checkpoint
    from lion_min.cli import run_cli

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", full)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        run_cli(lambda: train_sft.main(sft_args(tiny_chat_model, out, max_steps=2)))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1
    assert "cannot write the Hugging Face export (No space left on device)" in err
    assert not (out / "model.safetensors").exists() and not list(tmp_path.glob(".run.tmp-*"))
    assert (out / "metrics.jsonl").read_text().count("\n") == 2  # the steps themselves are kept


def test_one_rerun_rule_sft(tiny_chat_model, tmp_path, capsys):
    """The rerun rule, SFT: the same finished run with --resume=auto exits 0 with "nothing to do" and
    changes nothing (so `sft && dpo && online` can be rerun after a later stage failed); asked for
    more epochs or steps it continues from its last checkpoint; asked for fewer it refuses."""
    out = tmp_path / "run"
    args = dict(save_every=2, max_steps=0, epochs=1, batch_size=8)  # 32 rows: 4 steps an epoch
    train_sft.main(sft_args(tiny_chat_model, out, **args))
    before = snapshot(out)
    capsys.readouterr()
    res = subprocess.run([sys.executable, str(ROOT / "train_sft.py"), *sft_args(tiny_chat_model, out, **args),
                          "--resume=auto"], capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "holds this run, finished (4 steps) and exported: nothing to do" in res.stdout
    assert snapshot(out) == before
    train_sft.main(sft_args(tiny_chat_model, out, **args | {"epochs": 2}, resume="auto"))
    stdout = capsys.readouterr().out
    assert "note: epochs changed from 1 to 2" in stdout and "training 8 steps from step 4" in stdout
    assert [x["step"] for x in lines(out)] == list(range(1, 9))
    train_sft.main(sft_args(tiny_chat_model, out, **args | {"max_steps": 10}, resume="auto"))
    assert [x["step"] for x in lines(out)] == list(range(1, 11))
    with pytest.raises(ConfigError, match="is at step 10, but this run has 8 steps"):
        train_sft.main(sft_args(tiny_chat_model, out, **args | {"epochs": 2}, resume="auto"))


def test_one_rerun_rule_online(tiny_online_argv, tmp_path, capsys, monkeypatch):
    """The rerun rule, online: the finished run asked again has nothing to do (nothing is sampled);
    asked for one more round it continues after the last; asked for fewer it refuses."""
    from lion_min.stages import online
    out = tmp_path / "online"
    train_online.main(tiny_online_argv(out, rounds=1))
    before = snapshot(out)
    real = online.sample_and_judge_folder
    monkeypatch.setattr(online, "sample_and_judge_folder", lambda *a, **k: pytest.fail("a finished run must not sample"))
    capsys.readouterr()
    assert [h["round"] for h in train_online.main(tiny_online_argv(out, rounds=1))] == [0]
    assert "holds this run, finished (1 round(s)) and exported: nothing to do" in capsys.readouterr().out
    assert snapshot(out) == before
    monkeypatch.setattr(online, "sample_and_judge_folder", real)
    history = train_online.main(tiny_online_argv(out, rounds=2))
    assert [h["round"] for h in history] == [0, 1] and (out / "round_1.done").is_file()
    assert "round 0: already done" in capsys.readouterr().out
    assert (out / "round_0.jsonl").read_bytes() == before["round_0.jsonl"]
    with pytest.raises(ConfigError, match="--rounds=1: .* holds 2 finished rounds"):
        train_online.main(tiny_online_argv(out, rounds=1))
    # ... which --overwrite=true, as the message says, runs again from the start.
    history = train_online.main(tiny_online_argv(out, rounds=1) + ["--overwrite=true"])
    assert [h["round"] for h in history] == [0] and not (out / "round_1.done").exists()


def test_a_free_input_may_change_its_contents():
    """run_dir.differences: an input compared by contents is refused when it changed, unless the
    caller frees its key (online: --ref_model and --eval_data while no round has finished)."""
    import dataclasses

    from lion_min.run.run_folder import differences

    @dataclasses.dataclass
    class Cfg:
        model: str = "m"
        ref_model: str = "r"

    cfg = Cfg()
    saved, now = {"--model": "a", "--ref_model": "b"}, {"--model": "a", "--ref_model": "c"}
    assert differences(dataclasses.asdict(cfg), saved, cfg, now)[0] == ["--ref_model (contents)"]
    assert differences(dataclasses.asdict(cfg), saved, cfg, now, free=frozenset({"ref_model"}))[0] == []
    assert differences(dataclasses.asdict(cfg), saved, cfg, {"--model": "z", "--ref_model": "c"},
                       free=frozenset({"ref_model"}))[0] == ["--model (contents)"]


def test_the_demo_never_replaces_a_run_that_is_not_the_demos(tiny_chat_model, tmp_path):
    out = tmp_path / "mine"
    train_sft.main(sft_args(tiny_chat_model, out))
    before = snapshot(out)
    with pytest.raises(ConfigError, match="holds a run that is not the demo's"):
        train_sft.main([f"--out_dir={out}", "--max_steps=1"])  # --model and --data forgotten: the demo
    assert snapshot(out) == before
    with pytest.raises(ConfigError, match="--overwrite=true with --resume=auto: .* contradict"):
        train_sft.main(sft_args(tiny_chat_model, out, overwrite="true", resume="auto"))


def test_the_same_inputs_under_another_path_are_the_same_run(tiny_chat_model, tmp_path, monkeypatch):
    import shutil

    out = tmp_path / "run"
    train_sft.main(sft_args(tiny_chat_model, out, max_steps=4, save_every=2, lr_schedule="constant"))
    moved = tmp_path / "moved_data.jsonl"
    shutil.copy(tiny_chat_model["data"], moved)
    monkeypatch.chdir(tmp_path)
    train_sft.main(sft_args(tiny_chat_model, out, max_steps=6, save_every=2, lr_schedule="constant", resume="auto",
                            data="./moved_data.jsonl"))
    assert [x["step"] for x in lines(out)] == list(range(1, 7))
    with pytest.raises(ConfigError, match=r"is at step 4, but this run has 3 steps"):
        train_sft.main(sft_args(tiny_chat_model, tmp_path / "short", max_steps=3, lr_schedule="constant",
                                resume=out / "checkpoints" / "step_4"))


@pytest.mark.parametrize("extra", [[], ["--overwrite=true"]])
def test_an_online_run_stopped_in_round_1_keeps_round_0(tiny_online_argv, tmp_path, monkeypatch, extra):
    """A signal during the second round's training: round 0 stays, and the command the message gives
    (never with --overwrite=true, which would replace it) resumes after it."""
    from test_second_contact import follow

    from lion_min.run.loop import StopRequested
    from lion_min.stages import online

    out = tmp_path / "online"
    argv = tiny_online_argv(out, rounds=2) + extra
    real = online.train_pairs

    def stop_in_round_1(cfg, *args, **kwargs):
        if cfg.out_dir.endswith("round_1"):
            raise StopRequested("stopped by SIGTERM after step 1: ...", code=143)
        return real(cfg, *args, **kwargs)

    monkeypatch.setattr(online, "train_pairs", stop_in_round_1)
    with pytest.raises(StopRequested, match="stopped in round 1: rounds before it are kept") as stop:
        train_online.main(argv)
    assert (out / "round_0.done").is_file() and (out / "round_0" / "model.safetensors").is_file()
    round_0 = (out / "round_0.jsonl").read_bytes()
    monkeypatch.setattr(online, "train_pairs", real)
    history = train_online.main(follow(argv, str(stop.value).split("; continue with ")[1]))
    assert [h["round"] for h in history] == [0, 1] and (out / "round_1.done").is_file()
    assert (out / "round_0.jsonl").read_bytes() == round_0  # round 0 was not sampled again


def test_a_folder_of_your_own_files_is_never_written_into(tiny_chat_model, tmp_path):
    """A model folder (or a lone config.json) that is not a lion_min run: refused, even with --overwrite."""
    import shutil

    mine = tmp_path / "my_model_copy"
    shutil.copytree(tiny_chat_model["model"], mine)
    before = snapshot(mine)
    for extra in ({}, {"overwrite": "true"}):
        with pytest.raises(ConfigError, match="holds files that are not a lion_min run"):
            train_sft.main(sft_args(tiny_chat_model, mine, **extra))
    assert snapshot(mine) == before


def test_resume_of_a_finished_run_without_checkpoints_refuses_instead_of_starting_over(tiny_chat_model, tmp_path):
    out = tmp_path / "run"
    train_sft.main(sft_args(tiny_chat_model, out, max_steps=3))
    before = snapshot(out)
    with pytest.raises(ConfigError, match=r"no checkpoint to continue from \(--save_every=0\)"):
        train_sft.main(sft_args(tiny_chat_model, out, max_steps=5, resume="auto"))
    assert snapshot(out) == before


def test_a_training_checkpoint_given_as_a_model_says_what_it_is(tiny_chat_model, tmp_path):
    from lion_min.formats.hf_config import CheckpointError, resolve_path

    out = tmp_path / "run"
    train_sft.main(sft_args(tiny_chat_model, out, max_steps=2, save_every=2))
    with pytest.raises(CheckpointError, match=r"a resumable training checkpoint .* continue training from it with "
                                              r"--resume=.*step_2; the exported model of the run is in .*run"):
        resolve_path(str(out / "checkpoints" / "step_2"))


def test_the_demos_dpo_before_its_sft_says_which_script_comes_first(tmp_path, monkeypatch):
    import train_dpo

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="out/demo/sft: no such folder: .* run python train_sft.py .* first"):
        train_dpo.main([])
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_a_run_begun_before_a_setting_existed_resumes_as_its_default(tiny_chat_model, tmp_path, capsys):
    """A run folder written by an older lion_min lacks the settings added since: the run had their
    defaults, so resuming with the default continues it and only another value is another run."""
    out = tmp_path / "run"
    train_sft.main(sft_args(tiny_chat_model, out, max_steps=4, save_every=2))
    older = [out / "run.json", *out.glob("checkpoints/*/trainer_state.json")]
    for file in older:  # as if `overflow` and `log_every` (defaults "truncate", 1) had come after the run began
        saved = json.loads(file.read_text())
        for key in ("overflow", "log_every"):
            del (saved if "config" in saved else saved["run"])["config"][key]
        file.write_text(json.dumps(saved))
    with pytest.raises(ConfigError, match=r"holds another run: overflow differ"):
        train_sft.main(sft_args(tiny_chat_model, out, max_steps=6, save_every=2, resume="auto", overflow="drop"))
    capsys.readouterr()
    train_sft.main(sft_args(tiny_chat_model, out, max_steps=6, save_every=2, resume="auto", log_every=2))
    said = capsys.readouterr().out
    assert "training 6 steps from step 4 (resumed from" in said
    assert "note: log_every changed from 1 to 2 since the run began" in said  # its default, not None


def test_an_online_run_from_before_judge_template_goes_on(tiny_online_argv, tmp_path):
    """The case that showed it: online run folders written before --judge_template existed."""
    out = tmp_path / "online"
    train_online.main(tiny_online_argv(out, rounds=1))
    run = json.loads((out / "run.json").read_text())
    del run["config"]["judge_template"]
    (out / "run.json").write_text(json.dumps(run))
    assert [h["round"] for h in train_online.main(tiny_online_argv(out, rounds=2))] == [0, 1]
