"""Faults seen on real clusters and containers: an out_dir that is a mount point, a run lock in
containers (PID namespaces), ranks that see different inputs, a data cache that breaks.

Run as a script it is the worker of the subprocess tests:
python tests/test_cluster_faults.py FAULT TRAIN_SFT_ARGS...  (under torchrun: every rank runs it)"""

import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_sft  # noqa: E402
from lion_min.run import data_cache as prepare  # noqa: E402
from lion_min.run.config import ConfigError  # noqa: E402
from lion_min.run.run_folder import LOCK, lock_file, lock_held  # noqa: E402


def env() -> dict:
    """The subprocesses' environment, read when they start (conftest points XDG_CACHE_HOME at a
    temporary folder for the session, after this module is imported)."""
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def sft_args(tiny, out, **over):
    a = dict(model=tiny["model"], data=tiny["data"], out_dir=out, seq_len=96, batch_size=4, micro_batch_size=1,
             max_steps=2, lr=1e-3, warmup_ratio=0.0, save_every=2, seed=0, device="cpu") | over
    return [f"--{k}={v}" for k, v in a.items()]


def run_cli_exit(argv, capsys) -> tuple[int, str]:
    from lion_min.cli import run_cli

    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: train_sft.main(argv))
    return exit_info.value.code, capsys.readouterr().err


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- 1. out_dir as a mount point ------------------------------------------------------------------


def mount_at(monkeypatch, mount: Path):
    """Make `mount` behave as a mount point: a rename into or out of it fails as the kernel's does
    across file systems (EXDEV, "Invalid cross-device link")."""
    inside = lambda p: Path(os.path.abspath(p)) == mount or mount in Path(os.path.abspath(p)).parents  # noqa: E731

    def guard(real):
        def rename(src, dst, *args, **kwargs):
            if inside(src) != inside(dst):
                raise OSError(errno.EXDEV, "Invalid cross-device link", str(src), None, str(dst))
            return real(src, dst, *args, **kwargs)
        return rename

    monkeypatch.setattr(os, "rename", guard(os.rename))
    monkeypatch.setattr(os, "replace", guard(os.replace))


def test_an_out_dir_that_is_a_mount_point_exports_and_resumes(tiny_chat_model, tmp_path, monkeypatch):
    """The export and the checkpoints are assembled inside out_dir: nothing renamed across the
    mount, nothing left beside it; --resume=auto continues and exports again."""
    out = tmp_path / "volume"
    out.mkdir()  # a mount point exists before the run
    mount_at(monkeypatch, out)
    train_sft.main(sft_args(tiny_chat_model, out))
    assert (out / "model.safetensors").is_file() and (out / "checkpoints" / "step_2").is_dir()
    first = load_file(str(out / "model.safetensors"))
    train_sft.main(sft_args(tiny_chat_model, out, max_steps=4, resume="auto"))
    assert load_file(str(out / "model.safetensors")).keys() == first.keys()
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 4
    assert [p.name for p in tmp_path.iterdir()] == ["volume"]  # nothing beside out_dir
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]


def test_a_kill_during_the_export_leaves_nothing_beside_out_dir_and_the_next_run_cleans(tiny_chat_model, tmp_path,
                                                                                         capsys):
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, __file__, "kill_in_export", *sft_args(tiny_chat_model, out)],
                         capture_output=True, text=True, env=env(), timeout=300)
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # the half-made export is inside out_dir
    left = [p for p in out.iterdir() if ".tmp-" in p.name]
    assert len(left) == 1 and (left[0] / "model.safetensors").is_file() and not (out / "model.safetensors").exists()
    (out / "checkpoints" / "step_4.tmp").mkdir()  # a checkpoint a killed run was writing, too
    capsys.readouterr()
    train_sft.main(sft_args(tiny_chat_model, out, resume="auto"))
    said = capsys.readouterr().out
    assert f"note: removing {left[0]}, left by a run that was killed while writing it" in said
    assert f"note: removing {out / 'checkpoints' / 'step_4.tmp'}" in said
    assert not left[0].exists() and not (out / "checkpoints" / "step_4.tmp").exists()
    assert (out / "model.safetensors").is_file() and [p.name for p in tmp_path.iterdir()] == ["run"]


def mounts_allowed() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-rm", "sh", "-c", "mount -t tmpfs tmpfs /mnt"], capture_output=True).returncode == 0


def in_namespace(mounts: str, args: list[str], root: Path = ROOT) -> subprocess.CompletedProcess:
    """`python train_sft.py ARGS` in a mount namespace of its own, after the shell commands `mounts`."""
    return subprocess.run(["unshare", "-rm", "sh", "-c", f'{mounts} && exec "$0" "$@"', sys.executable,
                           str(root / "train_sft.py"), *args], capture_output=True, text=True, timeout=300,
                          env=env() | {"PYTHONPATH": str(root)})


@pytest.mark.slow
def test_a_real_mount_point_as_out_dir(tiny_chat_model, tmp_path):
    """out_dir is a mount point (a bind mount: the kernel refuses a rename across it, EXDEV, as for a
    container's volume): the run exports, resumes and exports again, and writes nothing beside it."""
    if not mounts_allowed():
        pytest.skip("unshare -rm is not allowed here")
    volume, out = tmp_path / "volume", tmp_path / "parent" / "run"
    volume.mkdir()
    out.mkdir(parents=True)
    for over in ({}, {"max_steps": 4, "resume": "auto"}):
        res = in_namespace(f"mount --bind {volume} {out}", sft_args(tiny_chat_model, out, **over))
        assert res.returncode == 0, res.stderr[-3000:]
        assert (volume / "model.safetensors").is_file() and not list(out.iterdir())  # all of it in the volume
        assert [p.name for p in out.parent.iterdir()] == ["run"]  # nothing beside out_dir
    assert json.loads((volume / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 4
    assert not [p for p in volume.rglob("*") if ".tmp" in p.name]


@pytest.mark.slow
@pytest.mark.parametrize("fs, says", [("read-only", "Read-only file system"), ("full", "No space left on device")])
def test_a_real_read_only_or_full_cache_is_one_line(tiny_chat_model, tmp_path, fs, says):
    if not mounts_allowed():
        pytest.skip("unshare -rm is not allowed here")
    cache = tmp_path / "cache"
    cache.mkdir()
    mounts = {"read-only": f"mount --bind {cache} {cache} && mount -o remount,ro,bind {cache}",
              "full": f"mount -t tmpfs -o size=12k tmpfs {cache}"}[fs]
    res = in_namespace(mounts, sft_args(tiny_chat_model, tmp_path / "run", data_cache=cache, save_every=0))
    errors = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and len(errors) == 1, res.stderr[-3000:]
    assert errors[0].startswith(f"error: --data_cache: cannot write to {cache} ({says})") and "--data_cache=off" in errors[0]
    assert not (tmp_path / "run").exists()


# --- 2. the run lock -------------------------------------------------------------------------------


def hold_lock(path: Path, namespace: bool = False) -> subprocess.Popen:
    """A process that holds the flock on `path`, as a live run does; with `namespace`, in a PID
    namespace of its own (where it is PID 1, and writes so in the lock file)."""
    code = ("import fcntl, json, os, sys, time; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX); "
            "f.truncate(0); f.write(json.dumps({'pid': os.getpid(), 'host': 'container'})); f.flush(); "
            "print(os.getpid(), flush=True); time.sleep(120)")
    prefix = ["unshare", "-rpf", "--mount-proc", "--kill-child"] if namespace else []
    proc = subprocess.Popen([*prefix, sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    proc.pid_inside = int(proc.stdout.readline())
    return proc


def can_unshare() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-rpf", "--mount-proc", "true"], capture_output=True).returncode == 0


def test_a_resume_takes_over_a_lock_that_names_its_own_pid(tiny_chat_model, tmp_path, capsys):
    """In a container the trainer is PID 1 again after a restart: the lock file of the run that died
    names this very pid. Nobody holds the OS lock, so the resume goes on (a pid proves nothing)."""
    out = tmp_path / "run"
    train_sft.main(sft_args(tiny_chat_model, out))
    (out / LOCK).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    capsys.readouterr()
    train_sft.main(sft_args(tiny_chat_model, out, max_steps=4, resume="auto"))
    assert f"taking over the lock of a run that is no longer alive (pid {os.getpid()})" in capsys.readouterr().out
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 4
    assert not (out / LOCK).exists()


@pytest.mark.parametrize("namespace", [False, True])
def test_a_live_run_is_refused_wherever_it_runs_and_its_lock_is_taken_over_once_dead(tiny_chat_model, tmp_path,
                                                                                       capsys, namespace):
    """A second run is refused while the first holds the lock, also when the first runs in another
    PID namespace (its pid means nothing here); once it is dead, its lock is taken over."""
    if namespace and not can_unshare():
        pytest.skip("unshare -rpf is not allowed here")
    out = tmp_path / "run"
    train_sft.main(sft_args(tiny_chat_model, out))
    holder = hold_lock(out / LOCK, namespace)
    before = snapshot(out)
    try:
        if namespace:
            assert holder.pid_inside == 1
        code, err = run_cli_exit(sft_args(tiny_chat_model, out, max_steps=4, resume="auto"), capsys)
        assert code == 2 and err.count("\n") == 1
        assert f"error: --out_dir={out}: another run (pid {holder.pid_inside}) is writing there" in err
        assert snapshot(out) == before  # not one byte changed, the lock file included
    finally:
        holder.kill()  # (--kill-child: its child, PID 1 of the namespace, with it)
        holder.wait()
    for _ in range(100):  # the kernel releases the lock once the process is gone
        if not lock_held(out / LOCK):
            break
        time.sleep(0.1)
    train_sft.main(sft_args(tiny_chat_model, out, max_steps=4, resume="auto"))
    assert f"no longer alive (pid {holder.pid_inside}) on host container" in capsys.readouterr().out
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 4


@pytest.mark.slow
def test_a_second_run_beside_a_training_run_in_another_pid_namespace_is_refused(tiny_chat_model, tmp_path, capsys):
    """The issue's case: the first run trains as PID 1 of a container's PID namespace; a second
    run with the same out_dir is refused while it trains (the pid it wrote means nothing here), and
    once it is killed the same command resumes from its checkpoint."""
    if not can_unshare():
        pytest.skip("unshare -rpf is not allowed here")
    out = tmp_path / "run"
    first = subprocess.Popen(["unshare", "-rpf", "--mount-proc", "--kill-child", sys.executable,
                              str(ROOT / "train_sft.py"), *sft_args(tiny_chat_model, out, max_steps=2000, epochs=1000,
                                                                    save_every=2)],
                             env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (out / "checkpoints" / "step_2").is_dir() and time.time() < deadline:
            time.sleep(0.1)
        assert first.poll() is None and json.loads((out / LOCK).read_text())["pid"] == 1
        code, err = run_cli_exit(sft_args(tiny_chat_model, out, max_steps=2000, epochs=1000, resume="auto"), capsys)
        assert code == 2 and err.startswith(f"error: --out_dir={out}: another run (pid 1) is writing there")
    finally:
        first.kill()
        first.wait()
    for _ in range(100):
        if not lock_held(out / LOCK):
            break
        time.sleep(0.1)
    steps = len((out / "metrics.jsonl").read_text().splitlines())
    train_sft.main(sft_args(tiny_chat_model, out, max_steps=steps + 2, epochs=1000, resume="auto"))
    said = capsys.readouterr().out
    assert "taking over the lock of a run that is no longer alive (pid 1)" in said
    metrics = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics == list(range(1, len(metrics) + 1)) and metrics[-1] == steps + 2  # one run's lines, in order


def test_the_lock_is_held_for_the_run_and_released_at_its_end(tiny_chat_model, tmp_path, monkeypatch):
    """While a run trains, its lock is held (another open of the file cannot take it); after it, free."""
    import lion_min.core.train as train  # the loop (core.train.steps) calls train_step by this name

    out, seen = tmp_path / "run", []
    real_step = train.train_step

    def step(*args, **kwargs):
        seen.append(lock_file(out / LOCK))
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train, "train_step", step)
    train_sft.main(sft_args(tiny_chat_model, out))
    assert seen == [None, None]
    fd = lock_file(out / LOCK)
    assert fd is not None
    os.close(fd)


def test_a_file_system_without_locks_gets_a_note_and_the_run_goes_on(tiny_chat_model, tmp_path, monkeypatch, capsys):
    """Where flock is not supported (ENOLCK: some network file systems), the run says that nothing
    stops another run from writing there, and trains."""
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    out = tmp_path / "run"
    train_sft.main(sft_args(tiny_chat_model, out))
    assert (f"note: --out_dir={out}: this file system has no file locks (No locks available): nothing stops another "
            f"run from writing there at the same time; make sure none does") in capsys.readouterr().out
    assert (out / "model.safetensors").is_file() and not (out / LOCK).exists()


# --- 3. ranks that disagree on their inputs ------------------------------------------------------


def test_ranks_that_see_different_data_are_told_which_and_how(monkeypatch):
    """agree: one line naming the input, the ranks and what each sees (all_gather simulated)."""
    import torch.distributed as dist

    from lion_min.core.parallel import Dist
    from lion_min.run.run_folder import agree

    views = [{"--data file a.jsonl": "10 bytes, abc", "fingerprint": "f"}] * 3 + [{"--data file a.jsonl":
                                                                                 "7 bytes, def", "fingerprint": "g"}]
    monkeypatch.setattr(dist, "all_gather_object", lambda seen, mine: seen.__setitem__(slice(None), views))
    with pytest.raises(ConfigError, match=r"^ranks disagree on --data file a.jsonl: ranks 0, 1, 2 see 10 bytes, abc; "
                                          r"rank 3 sees 7 bytes, def\. why$"):
        agree(views[0], Dist(0, 4, 0, "cpu"), "why")
    agree(views[0], Dist(0, 1, 0, "cpu"), "why")  # one rank agrees with itself


def test_a_rank_that_fails_first_says_its_own_error(monkeypatch, capsys):
    """An error of a kind every rank usually shares (a missing file) is printed by rank 0 only; when
    raise_if_any found it on rank 1 alone, rank 1 prints it."""
    import torch.distributed as dist

    from lion_min.run import faults as parallel  # raise_if_any, exit_now
    from lion_min import cli
    from lion_min.formats.data_files import DataError
    from lion_min.core.parallel import Dist

    monkeypatch.setattr(dist, "all_gather_object", lambda seen, mine: seen.__setitem__(slice(None), [None, "x"]))
    monkeypatch.setattr(parallel, "exit_now", lambda code: sys.exit(code))
    monkeypatch.setenv("RANK", "1")

    def main():
        parallel.raise_if_any(DataError("data.jsonl: no such file or folder"), Dist(1, 2, 1, "cpu"))

    with pytest.raises(SystemExit):
        cli.run_cli(main)
    assert capsys.readouterr().err == "error: data.jsonl: no such file or folder\n"
    with pytest.raises(SystemExit):  # the same error, not through raise_if_any: rank 0 says it
        cli.run_cli(lambda: (_ for _ in ()).throw(DataError("data.jsonl: no such file or folder")))
    assert capsys.readouterr().err == ""


def torchrun_with_rank1_seeing(tiny, out: Path, cache: Path, what: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, what,
           *sft_args(tiny, out, data_cache=cache, save_every=0)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("what", ["stale_copy", "no_copy"])
def test_a_rank_that_sees_another_copy_of_the_data_stops_every_rank(tiny_chat_model, tmp_path, what):
    """Under torchrun, rank 1 sees a stale copy of the data file at the same path (or none: a folder
    mounted in its place), through a mount namespace of its own: every rank stops at once with one
    line, and nothing is written: no cache entry, no out_dir."""
    if not can_unshare():
        pytest.skip("unshare is not allowed here")
    shutil.copy(tiny_chat_model["data"], tmp_path / "data.jsonl")
    tiny = dict(tiny_chat_model, data=tmp_path / "data.jsonl")
    out, cache = tmp_path / "run", tmp_path / "cache"
    t0 = time.time()
    res = torchrun_with_rank1_seeing(tiny, out, cache, what)
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    size = (tmp_path / "data.jsonl").stat().st_size
    rank1 = "nothing at that path" if what == "no_copy" else f"{size - 100} bytes"
    assert res.returncode != 0 and len(errors) == 1, res.stderr[-3000:]
    assert re.match(rf"error: ranks disagree on --data={re.escape(str(tmp_path))}/data.jsonl: rank 0 sees {size} "
                    rf"bytes, contents \w+; rank 1 sees {rank1}", errors[0]), errors[0]
    assert "[rank" not in res.stderr and time.time() - t0 < 120
    assert not out.exists() and not (cache.exists() and list(cache.iterdir()))


@pytest.mark.slow
@pytest.mark.parametrize("who", ["rank 1", "every rank"])
def test_the_rank_that_fails_first_says_why(tiny_chat_model, tmp_path, who):
    """Reading the data fails (a missing file: an error every rank usually meets alike) on rank 1
    alone, while rank 0 goes on: rank 1's own line is printed (then rank 0's "another rank
    stopped"), not only the connection closed. On every rank: one line."""
    fault = {"rank 1": "rank1_cannot_read", "every rank": "all_cannot_read"}[who]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, fault,
           *sft_args(tiny_chat_model, tmp_path / "run", data_cache="off", save_every=0)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=300)
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert res.returncode != 0 and "[rank" not in res.stderr, res.stderr[-3000:]
    assert errors[0] == f"error: {tiny_chat_model['data']}: cannot read it (injected)", res.stderr[-3000:]
    if who == "rank 1":
        assert len(errors) <= 2 and all("another rank stopped" in ln for ln in errors[1:]), errors
    else:
        assert len(errors) == 1, errors


# --- 4. a data cache that breaks ------------------------------------------------------------------


def cached_entry(cache: Path) -> Path:
    (entry,) = [p for p in cache.iterdir() if ".tmp-" not in p.name]
    return entry


def cut(path: Path, nbytes: int = 10):
    path.write_bytes(path.read_bytes()[:-nbytes])


def edit_json(path: Path, **fields):
    path.write_text(json.dumps(json.loads(path.read_text()) | fields))


DAMAGE = {
    "tokens.bin cut short": (lambda e: cut(e / "train" / "tokens.bin"), "train/tokens.bin is"),
    "mask.bin cut short": (lambda e: cut(e / "train" / "mask.bin", 1), "train/mask.bin is"),
    "docs.npy cut short": (lambda e: cut(e / "train" / "docs.npy", 8), "ValueError"),
    "row_docs.npy cut short": (lambda e: cut(e / "train" / "row_docs.npy", 16), "ValueError"),
    "split.json edited": (lambda e: edit_json(e / "train" / "split.json", token_dtype="uint32"), "train/tokens.bin is"),
    "meta.json edited": (lambda e: (e / "meta.json").write_text("{not json"), "JSONDecodeError"),
    "meta.json of another entry": (lambda e: edit_json(e / "meta.json", fingerprint="0" * 32), "not this folder's"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_cache_entry_is_prepared_again_with_a_note(tiny_chat_model, tmp_path, capsys, damage):
    harm, says = DAMAGE[damage]
    cache = tmp_path / "cache"
    train_sft.main(sft_args(tiny_chat_model, tmp_path / "a", data_cache=cache, save_every=0))
    entry = cached_entry(cache)
    good = snapshot(entry)
    harm(entry)
    capsys.readouterr()
    train_sft.main(sft_args(tiny_chat_model, tmp_path / "b", data_cache=cache, save_every=0))
    said = capsys.readouterr().out
    assert f"note: {entry} is damaged (" in said and says in said.split(f"note: {entry} is damaged (")[1].split("\n")[0]
    again = snapshot(cached_entry(cache))
    assert again.pop("meta.json") != good.pop("meta.json")  # (its timings differ)
    assert again == good  # prepared again, to the same bytes
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert all((a[k] == b[k]).all() for k in a)


@pytest.mark.parametrize("code, says", [(errno.EROFS, "Read-only file system"), (errno.ENOSPC, "No space left")])
@pytest.mark.parametrize("where", ["folder", "shard", "merge"])
def test_an_unwritable_or_full_cache_names_the_folder_and_data_cache_off(tiny_chat_model, tmp_path, monkeypatch,
                                                                         capsys, code, says, where):
    cache = tmp_path / "cache"

    def failing(real):
        def write(*args, **kwargs):  # only what is written into the cache fails
            if where == "shard" or str(cache) in str(args[0]):
                raise OSError(code, os.strerror(code))
            return real(*args, **kwargs)
        return write

    target = {"folder": (Path, "mkdir"), "shard": (prepare.ShardWriter, "write"), "merge": (np, "save")}[where]
    monkeypatch.setattr(*target, failing(getattr(*target)))
    status, err = run_cli_exit(sft_args(tiny_chat_model, tmp_path / "run", data_cache=cache, save_every=0), capsys)
    assert status == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: --data_cache: cannot write to {cache} ({says}") and "--data_cache=off" in err
    assert not (tmp_path / "run").exists() and not (cache.exists() and list(cache.iterdir()))


# --- 5. inputs that real data sets contain --------------------------------------------------------

RECORD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def jsonl(path: Path, n: int = 10, record: dict = RECORD) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for _ in range(n)))
    return path


@pytest.mark.parametrize("spec", ["data", "data/*.jsonl", "data/b.jsonl"])
def test_a_dangling_link_in_the_data_is_named(tmp_path, monkeypatch, spec):
    from lion_min.formats.data import load_conversations
    from lion_min.formats.data_files import DataError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    jsonl(tmp_path / "data" / "a.jsonl")
    os.symlink(tmp_path / "moved" / "b.jsonl", tmp_path / "data" / "b.jsonl")
    with pytest.raises(DataError, match=rf"^data/b.jsonl: a link to {tmp_path}/moved/b.jsonl, which does not exist$"):
        load_conversations(spec)


def test_an_existing_path_with_a_comma_is_one_file_and_a_mixture_says_how_to_name_it(tmp_path, monkeypatch):
    from lion_min.formats.data import load_conversations
    from lion_min.formats.data_files import DataError

    monkeypatch.chdir(tmp_path)
    jsonl(tmp_path / "chat,v2.jsonl", 10)
    jsonl(tmp_path / "other.jsonl", 3)
    assert len(load_conversations("chat,v2.jsonl")[0]) == 10
    assert len(load_conversations("chat,v2.jsonl:0.5")[0]) == 5
    with pytest.raises(DataError, match=r"chat,v2.jsonl has a comma in its name.*give the mixture as JSON"):
        load_conversations("other.jsonl,chat,v2.jsonl")
    assert len(load_conversations('[{"path": "other.jsonl"}, {"path": "chat,v2.jsonl"}]')[0]) == 13


def test_a_mixture_fraction_that_keeps_no_record_is_named(tmp_path):
    from lion_min.formats.data import load_conversations
    from lion_min.formats.data_files import DataError

    a, b = jsonl(tmp_path / "a.jsonl", 10), jsonl(tmp_path / "b.jsonl", 10)
    with pytest.raises(DataError, match=rf"^{b}: its fraction 0.04 keeps 0 of its 10 records; raise it"):
        load_conversations(f"{a},{b}:0.04")
    assert len(load_conversations(f"{a},{b}:0.05")[0]) == 11  # round half up: 1 of 10


def test_a_line_longer_than_the_limit_is_one_line_without_reading_it_whole(tmp_path, monkeypatch):
    from lion_min.formats import data
    from lion_min.formats.data_files import DataError

    monkeypatch.setattr(data, "MAX_LINE_BYTES", 1 << 20)
    path = jsonl(tmp_path / "a.jsonl", 3)
    with open(path, "a") as f:
        f.write(json.dumps({"messages": [{"role": "user", "content": "x" * (2 << 20)}]}) + "\n")
    read = []
    # The reader asks for at most the limit (+1) at a time: a huge line is never held whole.
    monkeypatch.setattr(data, "open", lambda *a, **k: Spy(open(*a, **k), read), raising=False)
    with pytest.raises(DataError, match=rf"^{path}: line 4 is longer than 1 MiB, the most a record may hold"):
        data.load_conversations(str(path))
    assert max(read) <= (1 << 20) + 1


class Spy:
    """A file whose readline sizes are recorded."""

    def __init__(self, f, sizes):
        self.f, self.sizes = f, sizes

    def readline(self, size=-1):
        line = self.f.readline(size)
        self.sizes.append(len(line) if size < 0 else size)
        return line

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@pytest.mark.parametrize("layout", ["json lines", "json array", "jsonl"])
def test_a_prompts_file_is_read_as_data_is_read(tmp_path, layout):
    """A .json holding JSON lines (as datasets' to_json writes it) is records, not literal text."""
    from lion_min.run.prompts import read_prompts

    records = [{"prompt": "What is 2 + 2?"}, {"messages": [{"role": "user", "content": "Hi"},
                                                           {"role": "assistant", "content": "Hello"}]}]
    path = tmp_path / ("prompts.jsonl" if layout == "jsonl" else "prompts.json")
    path.write_text(json.dumps(records) if layout == "json array" else "".join(json.dumps(r) + "\n" for r in records))
    assert read_prompts(str(path)) == ["What is 2 + 2?", [{"role": "user", "content": "Hi"}]]
    (tmp_path / "prompts.txt").write_text("What is 2 + 2?\n{not json\n")
    assert read_prompts(str(tmp_path / "prompts.txt")) == ["What is 2 + 2?", "{not json"]  # text: a prompt a line


def test_a_recipe_with_a_quoted_number_names_the_file_and_key(tiny_chat_model, tmp_path, capsys):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('[shared]\nseed = 1\n\n[sft]\nlr = "2e-5"\n')
    status, err = run_cli_exit([f"--config={recipe}", f"--model={tiny_chat_model['model']}",
                                f"--data={tiny_chat_model['data']}", f"--out_dir={tmp_path / 'run'}"], capsys)
    assert status == 2
    assert err == f"error: {recipe}: lr: expected float, got '2e-5' (a string: write it without quotes)\n"
    recipe.write_text('[sft]\nlr = 2e-5\nmax_steps = 1.5\n')
    status, err = run_cli_exit([f"--config={recipe}", f"--model={tiny_chat_model['model']}"], capsys)
    assert status == 2 and err == f"error: {recipe}: max_steps: expected int, got 1.5\n"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("seed, ok", [(2**32 - 1, True), (2**32, False), (2**64, False)])
def test_a_seed_that_does_not_fit_is_refused_before_anything_loads(seed, ok):
    from lion_min.run.config import OnlineConfig, SFTConfig
    from lion_min.run.flags import parse_cli

    for cls in (SFTConfig, OnlineConfig):
        if ok:
            assert parse_cli(cls, {}, [f"--seed={seed}"]).seed == seed
        else:
            with pytest.raises(ConfigError, match=rf"^--seed={seed}: must be in \[0, 4294967295\]$"):
                parse_cli(cls, {}, [f"--seed={seed}"])
    if ok:  # the online stage's largest sampling seed fits torch's generator
        import torch

        torch.Generator().manual_seed((seed + 100) * 100003 + 1023 * 1009 + 10**9)


@pytest.mark.parametrize("content, says", [
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"0" * 64 + b"\nsize 1234\n",
     "a Git LFS pointer, not the file (git lfs pull fetches it)"),
    (b"<html>404</html>", "not a safetensors file (")])
def test_golden_compare_of_a_file_that_is_not_safetensors_exits_2(tmp_path, content, says):
    vectors = ROOT / "tests" / "golden" / "vectors" / "dpo-ipo"
    shutil.copytree(vectors, tmp_path / "actual")
    (tmp_path / "actual" / "golden.safetensors").write_bytes(content)
    res = subprocess.run([sys.executable, "-m", "lion_min", "golden", "compare", str(vectors), str(tmp_path / "actual")],
                         capture_output=True, text=True, env=env(), timeout=120)
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert res.stderr.startswith(f"error: {tmp_path / 'actual' / 'golden.safetensors'}: {says}")
    same = subprocess.run([sys.executable, "-m", "lion_min", "golden", "compare", str(vectors), str(vectors)],
                          capture_output=True, text=True, env=env(), timeout=120)
    assert same.returncode == 0  # (and 1 when numbers differ: tests/test_golden.py)


# --- the worker of the subprocess tests --------------------------------------------------------------


def worker(what: str, argv: list[str]):
    from lion_min.formats import hf as checkpoint
    from lion_min.cli import run_cli

    if what == "kill_in_export":  # killed (kill -9) once the export has written its weights
        real = checkpoint.save_file

        def save_then_die(tensors, path, *args, **kwargs):
            real(tensors, path, *args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)

        checkpoint.save_file = save_then_die
    elif what in ("rank1_cannot_read", "all_cannot_read") and (what == "all_cannot_read" or os.environ["RANK"] == "1"):
        from lion_min.stages import sft
        data = next(a for a in argv if a.startswith("--data=")).split("=", 1)[1]

        def cannot_read(cfg):
            raise FileNotFoundError(f"{data}: cannot read it (injected)")

        sft.load_sft_data = cannot_read
    elif what in ("stale_copy", "no_copy") and os.environ.get("RANK") == "1" and "LION_MIN_UNSHARED" not in os.environ:
        # Rank 1 sees its own copy of the data at the same path: mounted over it in a mount namespace.
        data = Path(next(a for a in argv if a.startswith("--data=")).split("=", 1)[1])
        if what == "stale_copy":
            stale = data.with_name("stale.jsonl")
            stale.write_bytes(data.read_bytes()[:-100])
            mount = f"mount --bind {stale} {data}"
        else:
            (data.parent / "empty").mkdir()
            mount = f"mount --bind {data.parent / 'empty'} {data.parent}"
        os.environ["LION_MIN_UNSHARED"] = "1"
        os.execvp("unshare", ["unshare", "-rm", "sh", "-c", f'{mount} && exec "$0" "$@"', sys.executable, __file__,
                              what, *argv])
    run_cli(lambda: train_sft.main(argv))


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2:])
