"""The run folder's contract: a run writes only into its own out_dir, and only after every input is
checked and the model is loaded; it never writes into its own inputs, into a folder that holds
another run, or beside a live run; a resume continues the same run or refuses, naming what differs.

    with claim(cfg, d, inputs):      # after loading, before the first write
        train(...)

`claim` refuses (ConfigError, one line) an out_dir that equals, contains or lies inside an input;
one that holds a run (run.json, metrics, an export or checkpoints) unless this run resumes it
(--resume, or the online stage's finished rounds) and is the same run, or --overwrite=true, which
first removes the files a run writes (and nothing else); and one that a live process has locked.
A lock left by a dead process is taken over with a message. If the run fails before its first
step, the folder it created is removed again.

"Same run" = the same settings except SAFE_KEYS and the same fingerprints of the inputs (file sizes
and the first and last MiB of each file, plus the whole of small files: under a second even for a
16 GB checkpoint).
"""

import dataclasses
import hashlib
import json
import os
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from lion_min.choices import EXPORT_FILES
from lion_min.config import ConfigError, read_json

if TYPE_CHECKING:
    from lion_min.parallel import Dist

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
                free: frozenset = frozenset()) -> tuple[list[str], list[str]]:
    """(keys that make it another run, keys that changed harmlessly but are worth a note); keys in
    `free` may change too (online: the training settings while no round has finished)."""
    now = dataclasses.asdict(cfg)
    by_contents = {FINGERPRINTED[flag] for flag in prints if flag in saved_prints}
    changed = sorted(k for k in now.keys() | saved_config.keys()
                     if now.get(k) != saved_config.get(k) and k not in by_contents)
    refused = [k for k in changed if k not in SAFE_KEYS | NOTED_KEYS.keys() | free]
    refused += [f"{k} (contents)" for k in sorted(prints)
                if k in saved_prints and prints[k] != saved_prints[k] and FINGERPRINTED[k] not in free]
    quiet = {"resume", "overwrite", "out_dir", "preset"}  # how a run is started, not what it computes
    return refused, [k for k in changed if k not in quiet and k not in refused]


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


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
        owner = read_json(lock) or {}
        if owner.get("host") != socket.gethostname():  # no way to tell from here whether it is alive
            raise ConfigError(f"--out_dir={cfg.out_dir}: a run on host {owner.get('host')} (pid {owner.get('pid')}) "
                              f"holds the lock {lock}; if it is no longer running, delete that file")
        if pid_alive(int(owner.get("pid", -1))):
            raise ConfigError(f"--out_dir={cfg.out_dir}: another run (pid {owner['pid']}) is writing there "
                              f"(lock {lock}); wait for it or pick another --out_dir")
        notes.append(f"note: taking over the lock of a run that is no longer alive (pid {owner.get('pid')})")
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
        notes += [f"note: {k} changed from {saved['config'].get(k)!r} to {getattr(cfg, k)!r} since the run began"
                  + NOTED_KEYS.get(k, "")
                  for k in noted]
    return prints, notes


def overwrite_flag(cfg) -> str:
    """"--overwrite=true", said so that adding it works: a --resume beside it (a recipe's is dropped
    by flags.typed_wins) would contradict it."""
    return "--overwrite=true" + (f" in place of any --resume={cfg.resume}" if cfg.resume else "")


def continue_command(cfg) -> str:
    """How a stopped run goes on from its newest checkpoint, said so that following it works: a typed
    --overwrite=true would replace the run again, and with --resume=auto beside it is refused."""
    if cfg.overwrite:
        return "the same command with --resume=auto in place of --overwrite=true"
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


def check_shared(out_dir: Path, d: "Dist"):
    """Every rank must see the lock rank 0 just wrote: each writes its checkpoint shards into
    out_dir, so on several nodes it must be a shared file system (else a checkpoint would be
    missing the other nodes' shards)."""
    if d.world == 1:
        return
    import torch.distributed as dist

    from lion_min.parallel import PeerFailed

    lock = broadcast(read_json(out_dir / LOCK) if d.main else None, d)
    seen = [None] * d.world
    dist.all_gather_object(seen, (read_json(out_dir / LOCK) == lock, socket.gethostname()))
    blind = [f"rank {r} on {host}" for r, (ok, host) in enumerate(seen) if not ok]
    if blind:  # said once, by rank 0
        error = (f"--out_dir={out_dir}: {', '.join(blind)} cannot see the folder rank 0 created there: with several "
                 f"nodes, --out_dir must be on a file system every node shares (docs/multinode.md)")
        raise ConfigError(error) if d.main else PeerFailed(error)


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
    error = None
    if d.main:
        for note in notes:
            print(note)
        try:
            if cfg.overwrite:
                for pattern in RUN_FILES:
                    for p in out_dir.glob(pattern):
                        shutil.rmtree(p) if p.is_dir() else p.unlink()
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / LOCK).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
            if not (out_dir / "run.json").is_file() or cfg.overwrite or not resuming or free:
                (out_dir / "run.json").write_text(json.dumps(record, indent=2))
        except OSError as e:  # a read-only or full disk, a path through a file...
            error = ConfigError(f"--out_dir={cfg.out_dir}: cannot write there ({e.strerror or e})")
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
            (out_dir / LOCK).unlink(missing_ok=True)


def append_summary(out_dir: Path, **fields):
    path = out_dir / "summary.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps(data | fields, indent=2))
