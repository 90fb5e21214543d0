"""The run folder's contract: a run writes only into its own out_dir, and only after every input is
checked and the model is loaded; it never writes into its own inputs, into a folder that holds
another run, or beside a live run; a resume continues the same run or refuses, naming what differs.

    with claim(cfg, d, inputs):      # after loading, before the first write
        train(...)

`claim` refuses (ConfigError, one line) an out_dir that equals, contains or lies inside an input;
one that holds a run (run.json, metrics, an export or checkpoints) unless this run resumes it
(--resume, or the online stage's finished rounds) and is the same run, or --overwrite=true, which
first removes the files a run writes (and nothing else); and one that a live run has locked.

The lock is an OS file lock (flock) on out_dir/.lion_min.lock, held open for the run's life: the
kernel knows its holder in any PID namespace of the machine and releases it when the holder dies,
however it dies (a pid written in a file does neither: in a container the trainer is often PID 1,
and another container's PID 1 is another process). A lock file left by a dead run is taken over
with a message, and the temporaries a killed run left inside out_dir (LEFTOVERS) are removed. If
the run fails before its first step, the folder it created is removed again. On a network file
system that does not share flock locks between machines, two runs on two machines cannot see
each other's lock: give each its own --out_dir (docs/multinode.md).

"Same run" = the same settings except SAFE_KEYS and the same fingerprints of the inputs (file sizes
and the first and last MiB of each file, plus the whole of small files: under a second even for a
16 GB checkpoint).
"""

import dataclasses
import errno
import fcntl
import glob
import hashlib
import json
import os
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from lion_min.core.choices import EXPORT_FILES
from lion_min.run.config import ConfigError, read_json

if TYPE_CHECKING:
    import torch

    from lion_min.core.parallel import Dist

# Keys that do not change what a step computes: cadence of logging, eval and saving; how the global
# batch is split (the loss is invariant to micro_batch_size and world size); hardware and speed;
# where and how the run is started. How long a run is may change, with a note: a finished run asked
# for more steps, epochs or (online) rounds continues from where it ended.
SAFE_KEYS = {"log_every", "eval_every", "save_every", "keep_checkpoints", "resume", "overwrite", "micro_batch_size",
             "device", "compile", "activation_checkpointing", "attn_backend", "preset", "out_dir", "export_dtype",
             "revision", "data_cache", "report_to"}
# (sample_batch_size is not safe: the online stage seeds each sampling batch by its position.)
FINGERPRINTED = {"--model": "model", "--ref_model": "ref_model", "--data": "data", "--eval_data": "eval_data",
                 "--prompts": "prompts", "--judge": "judge"}
"""Inputs compared by contents: the same files under another path (./out/sft, a moved folder) are the same run."""
NOTED_KEYS = {"max_steps": " (the schedule now spans a different number of steps)", "epochs":
              " (the schedule now spans a different number of steps)", "rounds": ""}
RUN_RECORDS = ["run.json", "train_config.json", "metrics.jsonl", "summary.json", "checkpoints", "reference_logps*",
               "round_*", "last_round_metrics.jsonl", "curves.png", "tensorboard", "wandb", "wandb_id"]
RUN_FILES = RUN_RECORDS + list(EXPORT_FILES)
"""Everything a run writes into out_dir (what --overwrite removes, and nothing else)."""
LOCK = ".lion_min.lock"
LEFTOVERS = [".*.tmp-*", "checkpoints/step_*.tmp", "summary.json.tmp", "round_*.jsonl.tmp", "round_*.done.tmp",
             "reference_logps*.tmp", "curves.png.tmp.png"]
"""The temporaries a run writes into out_dir and renames when complete (checkpoint.atomic_temp's
export folder, the step folders, ...): what a killed run leaves, removed by the next one."""
DEMO_PRESETS = ("demo", "debug")


def _file_digest(path: Path, name: str, h) -> None:
    size = path.stat().st_size
    h.update(f"{name}:{size}".encode())
    with open(path, "rb") as f:
        if size <= 4 << 20:
            h.update(f.read())
        else:  # the first and last MiB: catches a different or truncated file without reading GBs
            h.update(f.read(1 << 20))
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read())


def _is_input_file(p: Path, root: Path) -> bool:
    """A file of a model or data folder, not a record a run left there (a lion_min run's folder is
    also a checkpoint: its metrics, summary and checkpoints change without changing the model)."""
    rel = p.relative_to(root)
    record = any(Path(rel.parts[0]).match(pattern) for pattern in RUN_RECORDS)
    return p.is_file() and not record and not any(part.startswith(".") for part in rel.parts)


def fingerprint(path: Path) -> str:
    """sha256 over a file's contents (not its name: a copy is the same data), or over the input
    files of a folder with their paths inside it (sorted)."""
    h = hashlib.sha256()
    if path.is_file():
        _file_digest(path, "", h)
    for f in sorted(p for p in path.rglob("*") if _is_input_file(p, path)) if path.is_dir() else []:
        _file_digest(f, f.relative_to(path).as_posix(), h)
    return h.hexdigest()


def local_inputs(inputs: dict[str, Optional[str | Path]]) -> dict[str, Path]:
    """The inputs that are existing local files or folders (hub ids and mixtures are not)."""
    out = {}
    for flag, value in inputs.items():
        if value and Path(str(value)).expanduser().exists():
            out[flag] = Path(str(value)).expanduser().resolve()
    return out


def differences(saved_config: dict, saved_prints: dict, cfg, prints: dict,
                free: frozenset = frozenset()) -> tuple[list[str], dict]:
    """(keys that make it another run, {key: its saved value} for keys that changed harmlessly but are
    worth a note); keys in `free` may change too (online: the training settings while no round has
    finished). A setting the saved config lacks came to lion_min after the run began, which ran as its
    default does: only another value makes it another run."""
    now = dataclasses.asdict(cfg)
    saved_config = {f.name: f.default for f in dataclasses.fields(cfg)
                    if f.name not in saved_config and f.default is not dataclasses.MISSING} | saved_config
    by_contents = {FINGERPRINTED[flag] for flag in prints if flag in saved_prints}
    changed = sorted(k for k in now.keys() | saved_config.keys()
                     if now.get(k) != saved_config.get(k) and k not in by_contents)
    refused = [k for k in changed if k not in SAFE_KEYS | NOTED_KEYS.keys() | free]
    refused += [f"{k} (contents)" for k in sorted(prints)
                if k in saved_prints and prints[k] != saved_prints[k] and FINGERPRINTED[k] not in free]
    quiet = {"resume", "overwrite", "out_dir", "preset"}  # how a run is started, not what it computes
    return refused, {k: saved_config.get(k) for k in changed if k not in quiet and k not in refused}


def has_progress(out_dir: Path) -> bool:
    """Whether a run got anywhere worth keeping: a logged step, a checkpoint, a sampled online round."""
    metrics = out_dir / "metrics.jsonl"
    return ((metrics.is_file() and metrics.stat().st_size > 0) or (out_dir / "checkpoints").is_dir()
            or any(out_dir.glob("round_*.done")) or any(out_dir.glob("round_*.jsonl")))


def _holds_run(out_dir: Path) -> list[str]:
    """The files of out_dir that a run would write over (a lion_min run's, or an export's)."""
    return sorted({p.name for pattern in RUN_FILES for p in out_dir.glob(pattern)})


def _some(names: list[str]) -> str:
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def lock_file(path: Path) -> Optional[int]:
    """An exclusive flock on `path` (created if missing): the descriptor that holds it until closed,
    or None when a live process holds it. Raises OSError where the file system has no such locks."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if path.exists() and os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError:
            os.close(fd)
            raise
        os.close(fd)  # the holder removed the file as it finished, after we opened it: lock the new one


def _lock_owner(lock: Path) -> tuple:
    owner = read_json(lock) or {}  # as the holder wrote it: the pid is the one in its own PID namespace
    return owner.get("pid"), owner.get("host")


def _locked(flag: str, lock: Path) -> ConfigError:
    pid, host = _lock_owner(lock)
    return ConfigError(f"--out_dir={flag}: another run (pid {pid}) is writing there (on host {host}; lock {lock}); "
                       f"wait for it or pick another --out_dir")


def lock_held(path: Path) -> Optional[bool]:
    """Whether a live process holds the flock on `path` (tried and released, nothing written); None
    where the file system has no such locks."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    except OSError:  # no such locks here (claim says so when it takes its own)
        return None
    finally:
        os.close(fd)


def check(cfg, inputs: dict[str, Optional[str | Path]], resuming: bool,
          free: frozenset = frozenset()) -> tuple[dict, list[str]]:
    """Everything claim refuses, without writing: returns (fingerprints, notes)."""
    out_dir = Path(cfg.out_dir).expanduser().resolve()
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out_dir={cfg.out_dir}: is a file, not a folder")
    local = local_inputs(inputs)
    for flag, path in local.items():
        if out_dir == path or out_dir in path.parents or path in out_dir.parents:
            how = "is" if out_dir == path else "contains" if out_dir in path.parents else "lies inside"
            raise ConfigError(f"--out_dir={cfg.out_dir} {how} {flag}={inputs[flag]}: a run never writes into its "
                              f"own inputs; pick another --out_dir")
    prints = {flag: fingerprint(path) for flag, path in local.items()}
    notes = []
    lock = out_dir / LOCK
    if lock.is_file():
        if lock_held(lock):
            raise _locked(cfg.out_dir, lock)
        notes.append("note: taking over the lock of a run that is no longer alive (pid {}) on host {}".format(
            *_lock_owner(lock)))
    found = _holds_run(out_dir) if out_dir.is_dir() else []
    ours = (out_dir / "run.json").is_file() or (out_dir / "train_config.json").is_file()
    if found and not ours:  # a model or files of yours: never written into, even with --overwrite
        raise ConfigError(f"--out_dir={cfg.out_dir} holds files that are not a lion_min run ({_some(found)}); "
                          f"pick another --out_dir (an empty or new folder)")
    saved = read_json(out_dir / "run.json") or {"config": read_json(out_dir / "train_config.json") or {},
                                                 "inputs": {}}
    if found and cfg.overwrite and cfg.preset in DEMO_PRESETS and saved["config"].get("preset") not in DEMO_PRESETS:
        # The demo replaces its own earlier run, never a run of yours given by a stray --out_dir.
        raise ConfigError(f"--out_dir={cfg.out_dir} holds a run that is not the demo's ({_some(found)}); "
                          f"the demo runs only when neither --model nor --data is given: pick another --out_dir")
    if found and not cfg.overwrite:
        refused, noted = differences(saved["config"], saved.get("inputs", {}), cfg, prints, free)
        if not resuming and not refused:  # (--resume=auto is suggested only where it would be accepted)
            raise ConfigError(f"--out_dir={cfg.out_dir} holds a run ({_some(found)}); continue it with "
                              f"--resume=auto, pick another --out_dir, or replace it with --overwrite=true")
        if refused:
            raise ConfigError(f"--out_dir={cfg.out_dir} holds another run: {', '.join(refused)} differ; pick "
                              f"another --out_dir, or replace it with --overwrite=true")
        notes += [f"note: {k} changed from {was!r} to {getattr(cfg, k)!r} since the run began" + NOTED_KEYS.get(k, "")
                  for k, was in noted.items()]
    return prints, notes


def named_checkpoint(resume: str) -> Path:
    """--resume=PATH: that checkpoint folder (it may belong to another out_dir), if it is complete."""
    path = Path(resume)
    if not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(f"--resume={resume}: not a complete checkpoint folder (no trainer_state.json)")
    return path


def overwrite_flag(cfg) -> str:
    """"--overwrite=true", said so that adding it works: a --resume beside it (a recipe's is dropped
    by flags.typed_wins) would contradict it."""
    return "--overwrite=true" + (f" in place of any --resume={cfg.resume}" if cfg.resume else "")


def continue_command(cfg) -> str:
    """How a stopped run goes on from its newest checkpoint, said so that following it works: a typed
    --overwrite=true would replace the run again, and with --resume=auto beside it is refused. The
    demo's presets set overwrite themselves (a typed --resume takes its place: flags.typed_wins), so
    there the user may or may not have typed it."""
    if cfg.overwrite:
        return "the same command with --resume=auto in place of " + (
            "any --overwrite=true" if cfg.preset in DEMO_PRESETS else "--overwrite=true")
    if cfg.resume == "auto":  # (a recipe's resume=auto, or typed)
        return "the same command"
    if cfg.resume:
        return f"the same command with --resume=auto in place of --resume={cfg.resume}"
    return "the same command and --resume=auto"


def broadcast(value, d: "Dist"):
    """Rank 0's value (any picklable object) on every rank."""
    if d.world == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def agree(views: dict[str, str], d: "Dist", why: str) -> None:
    """Every rank's view of the same things (name -> what it sees) must be the same: else every rank
    stops with one line naming the first thing they differ on, the ranks and what each sees, then
    `why`. A collective: call it on every rank, before anything shared is written."""
    if d.world == 1:
        return
    import torch.distributed as dist

    seen = [None] * d.world
    dist.all_gather_object(seen, views)
    for name in dict.fromkeys(k for v in seen for k in v):  # in order of first appearance
        groups: dict = {}
        for r, v in enumerate(seen):
            groups.setdefault(v.get(name, "nothing (it does not see it)"), []).append(r)
        if len(groups) > 1:
            how = "; ".join(f"{_ranks(ranks)} {'see' if len(ranks) > 1 else 'sees'} {value}"
                            for value, ranks in groups.items())
            raise ConfigError(f"ranks disagree on {name}: {how}. {why}")


def _ranks(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {', '.join(map(str, ranks))}"


def _view(source: str) -> str:
    """What this rank sees at a local path, glob or folder (sizes and a fingerprint of the contents)."""
    path = Path(source).expanduser()
    if path.is_file():
        return f"{path.stat().st_size} bytes, contents {fingerprint(path)[:16]}"
    if path.is_dir():
        files = sum(_is_input_file(p, path) for p in path.rglob("*"))
        return f"a folder of {files} files, contents {fingerprint(path)[:16]}"
    matches = sorted(glob.glob(str(path), recursive=True)) if glob.has_magic(source) else []
    if matches:
        h = hashlib.sha256("".join(m + fingerprint(Path(m)) for m in matches).encode()).hexdigest()
        return f"{len(matches)} matches, contents {h[:16]}"
    return "nothing at that path"


def agree_on_inputs(cfg, d: "Dist") -> None:
    """Every rank must see the same inputs (FINGERPRINTED, each source of a mixture): compared
    before anything is loaded or written, so that a rank reading a stale copy stops the run. A rank
    that cannot read one says so itself, and the others stop with it."""
    from lion_min.formats.data import parse_mixture
    from lion_min.run.faults import raise_if_any

    if d.world == 1:
        return
    views, error = {}, None
    try:
        for flag, key in FINGERPRINTED.items():
            value = str(getattr(cfg, key, None) or "").removeprefix("pairrm:")
            sources = [s.path for s in parse_mixture(value)] if value and key in ("data", "eval_data") else [value]
            for source in filter(None, sources):
                views[f"{flag}={source}"] = _view(source)
    except (OSError, ValueError) as e:
        error = e if isinstance(e, ValueError) else ConfigError(f"{e.filename}: cannot read it ({e.strerror})")
    raise_if_any(error, d)
    agree(views, d, "Every rank must see the same files at the same paths (a stale copy on one node?)")


def start_run(cfg) -> tuple["Dist", "torch.dtype"]:
    """What every stage does first: join the process group (torchrun's, or a world of one), compare
    every rank's inputs before any is read, seed, and pick the activation dtype."""
    import torch

    from lion_min.core.parallel import init_distributed
    from lion_min.run.config import resolve_dtype

    d = init_distributed(cfg.device)
    agree_on_inputs(cfg, d)  # every rank sees the same files, before any is read
    torch.manual_seed(cfg.seed)
    return d, resolve_dtype(cfg.dtype, d.device)


def check_shared(out_dir: Path, d: "Dist"):
    """Every rank must see the lock rank 0 just wrote: each writes its checkpoint shards into
    out_dir, so on several nodes it must be a shared file system (else a checkpoint would be
    missing the other nodes' shards)."""
    if d.world == 1:
        return
    import torch.distributed as dist

    from lion_min.run.faults import PeerFailed

    lock = broadcast(read_json(out_dir / LOCK) if d.main else None, d)
    seen = [None] * d.world
    dist.all_gather_object(seen, (read_json(out_dir / LOCK) == lock, socket.gethostname()))
    blind = [f"rank {r} on {host}" for r, (ok, host) in enumerate(seen) if not ok]
    if blind:  # said once, by rank 0
        error = (f"--out_dir={out_dir}: {', '.join(blind)} cannot see the folder rank 0 created there: with several "
                 f"nodes, --out_dir must be on a file system every node shares (docs/multinode.md)")
        raise ConfigError(error) if d.main else PeerFailed(error)


def take_lock(out_dir: Path, flag: str) -> Optional[int]:
    """Lock out_dir for this run (lock_file) and write who holds it; ConfigError if a live run
    holds it. Where the file system has no flock (some network file systems), a note, and None."""
    path = out_dir / LOCK
    try:
        fd = lock_file(path)
    except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
        path.unlink(missing_ok=True)  # (lock_file made it: a lock file nothing holds means nothing here)
        print(f"note: --out_dir={flag}: this file system has no file locks ({e.strerror}): nothing stops "
              f"another run from writing there at the same time; make sure none does")
        return None
    if fd is None:
        raise _locked(flag, path)
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
    return fd


def release_lock(out_dir: Path, fd: Optional[int]) -> None:
    """Remove the lock file while holding it, then let go (lock_file handles the moment between)."""
    if fd is not None:
        (out_dir / LOCK).unlink(missing_ok=True)
        os.close(fd)


def leftovers(out_dir: Path) -> list[Path]:
    """The temporaries (LEFTOVERS) in out_dir: only a killed run leaves them, and the caller holds the lock."""
    return sorted(p for pattern in LEFTOVERS for p in out_dir.glob(pattern))


@contextmanager
def claim(cfg, d: "Dist", inputs: dict[str, Optional[str | Path]], resuming: Optional[bool] = None,
          free: frozenset = frozenset()):
    """Check out_dir (rank 0 decides, every rank raises the same error), lock it, write run.json;
    yields the run record {"config", "inputs"} for the checkpoints; unlocks at the end. Settings in
    `free` may differ from the run's (run.json then records the new ones)."""
    resuming = bool(cfg.resume) if resuming is None else resuming
    out_dir = Path(cfg.out_dir)
    result = None
    if d.main:
        try:
            result = check(cfg, inputs, resuming, free)
        except ConfigError as e:
            result = e
    result = broadcast(result, d)
    if isinstance(result, ConfigError):
        raise result
    prints, notes = result
    record = {"config": dataclasses.asdict(cfg), "inputs": prints}
    created, new_record = not out_dir.exists(), not (out_dir / "run.json").exists()
    error, lock = None, None
    if d.main:
        for note in notes:
            print(note)
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            lock = take_lock(out_dir, cfg.out_dir)
            for p in leftovers(out_dir):
                print(f"note: removing {p}, left by a run that was killed while writing it")
                shutil.rmtree(p) if p.is_dir() else p.unlink()
            if cfg.overwrite:
                for pattern in RUN_FILES:
                    for p in out_dir.glob(pattern):
                        shutil.rmtree(p) if p.is_dir() else p.unlink()
            if not (out_dir / "run.json").is_file() or cfg.overwrite or not resuming or free:
                (out_dir / "run.json").write_text(json.dumps(record, indent=2))
        except OSError as e:  # a read-only or full disk, a path through a file...
            error = ConfigError(f"--out_dir={cfg.out_dir}: cannot write there ({e.strerror or e})")
        except ConfigError as e:  # another run took the lock since check()
            error = e
        if error is not None:
            if created:
                shutil.rmtree(out_dir, ignore_errors=True)
            release_lock(out_dir, lock)
    error = broadcast(error, d)
    if error is not None:
        raise error
    try:
        check_shared(out_dir, d)
        yield record
    except BaseException:
        # A run that failed before its first step leaves nothing behind (a folder it did not create
        # keeps what it had, less the lock and run.json it added).
        if d.main and not has_progress(out_dir):
            if created:
                shutil.rmtree(out_dir, ignore_errors=True)
            elif new_record:
                (out_dir / "run.json").unlink(missing_ok=True)
        raise
    finally:
        if d.main:
            release_lock(out_dir, lock)


def append_summary(out_dir: Path, **fields):
    path = out_dir / "summary.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps(data | fields, indent=2))
