"""Resumable training state: step folders written with torch.distributed.checkpoint (DCP).

Not to be confused with the Hugging Face folder a run exports (lion_min/formats/hf.py) or with
activation checkpointing (recomputing blocks in backward). A run with --save_every=N writes

    out_dir/checkpoints/step_N/    model and optimizer shards (DCP, each rank its own),
                                   rng_rank{R}.pt, and trainer_state.json (step, config, counters)

A step folder is written as step_N.tmp and renamed once every rank has finished and
trainer_state.json exists, so a folder without the .tmp suffix is complete. The oldest are pruned
to --keep_checkpoints. --resume=auto picks the newest complete one.
"""

import contextlib
import json
import re
import shutil
import warnings
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError
from torch.distributed.checkpoint.api import CheckpointException

from lion_min.core.parallel import Dist, barrier
from lion_min.run.config import TrainConfig, config_to_json
from lion_min.run.faults import PeerFailed, raise_if_any
from lion_min.run.run_folder import named_checkpoint


def checkpoint_dirs(out_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first. A folder is complete once renamed from its .tmp name,
    which happens only after every rank finished writing and trainer_state.json exists."""
    root = out_dir / "checkpoints"
    found = [p for p in root.glob("step_*") if re.fullmatch(r"step_\d+", p.name) and (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


class CheckpointWriteError(ValueError):
    """A checkpoint could not be written (disk full, read-only folder...): one line naming the path."""


# What a write that fails (a full disk, a read-only folder) raises, by writer: OSError from Python's
# own files, RuntimeError from torch.save's zip writer ("[enforce fail at inline_container.cc]
# unexpected pos"), SafetensorError from safetensors ("No space left on device (os error 28)"), and
# DCP's CheckpointException (a BaseException) wrapping any of these from its writer threads.
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError, CheckpointException)


def one_line(e: BaseException) -> str:
    """The cause of a failed read or write in one line: the library's own error (unwrapped from DCP's)."""
    if isinstance(e, CheckpointException) and e.failures:
        e = next(iter(e.failures.values()))[0]
    if isinstance(e, OSError):
        return e.strerror or str(e)
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}".rstrip(": ")


# What DCP warns on each call without a process group: that it takes the call for a single
# process, which it is. Said in other words by other releases and calls ("torch.distributed is
# disabled, unavailable or uninitialized, assuming the intent is to save in a single process", "...
# is unavailable or uninitialized, ... load in a single process"): matched by what it says.
ONE_PROCESS_WARNING = r"torch\.distributed is .*single process"


@contextlib.contextmanager
def quiet_dcp():
    """Around a torch.distributed.checkpoint call: its one-process warning (above) silenced, and the
    deprecation warning torch 2.9's DCP raises about its own use of tensor.storage() (TypedStorage;
    nothing a user can change), silenced where it comes from, DCP."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=ONE_PROCESS_WARNING, category=UserWarning)
        warnings.filterwarnings("ignore", message=".*TypedStorage", category=UserWarning,
                                module=r"torch\.distributed\.checkpoint")
        yield


def save_checkpoint(out_dir: Path, step: int, model, optimizer, cfg: TrainConfig, d: Dist, extra: dict) -> Path:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final = out_dir / "checkpoints" / f"step_{step}"
    tmp = final.with_name(final.name + ".tmp")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    bad = [k for k, t in model_sd.items() if not torch.isfinite(t.to_local() if hasattr(t, "to_local") else t).all()]
    # Every rank learns of a NaN in one rank's shards, so that none is left waiting in the save.
    raise_if_any(FloatingPointError(f"step {step}: model weights contain NaN/inf ({bad[0]}); checkpoint not "
                                    f"written") if bad else None, d)

    def make_tmp():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)

    def write_shards():
        with quiet_dcp():
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
        rng = {"cpu": torch.get_rng_state()}
        if d.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(d.device)
        torch.save(rng, tmp / f"rng_rank{d.rank}.pt")

    def complete():
        state = {"step": step, "config": json.loads(config_to_json(cfg)), **extra}
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
        shutil.rmtree(final, ignore_errors=True)  # a damaged folder of the same step (resume passed over it)
        tmp.rename(final)

    try:  # each part on its ranks, then every rank learns whether one failed (no rank left waiting)
        for write, here in ((make_tmp, d.main), (write_shards, True), (complete, d.main)):
            error = None
            try:
                if here:
                    write()
            except WRITE_ERRORS as e:
                error = CheckpointWriteError(f"{tmp}: cannot write the checkpoint of step {step}: {one_line(e)}")
            raise_if_any(error, d)
    except (CheckpointWriteError, PeerFailed):  # the half-written step folder is removed; the previous one stays
        if d.main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if d.main and cfg.keep_checkpoints > 0:  # 0 keeps them all; the one just written is always kept
        for old in checkpoint_dirs(out_dir)[: -cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(d)
    return final


def load_checkpoint(path: Path, model, optimizer, d: Dist) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(f"{path}: not a complete checkpoint (no trainer_state.json)")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    with quiet_dcp():
        dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng_file = path / f"rng_rank{d.rank}.pt"
    if rng_file.is_file():
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and d.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], d.device)
    return json.loads((path / "trainer_state.json").read_text())


def damage(path: Path) -> Optional[str]:
    """What makes a complete-looking checkpoint unloadable, or None: an unreadable trainer_state.json,
    DCP metadata missing or unreadable, a shard missing or shorter than the metadata says (a copy or
    disk cut short), an unreadable rng state."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        json.loads((path / "trainer_state.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return "unreadable trainer_state.json"
    try:
        storage = FileSystemReader(str(path)).read_metadata().storage_data
    except Exception as e:  # missing, torn or not DCP's: pickle and OS errors alike
        return f"unreadable DCP metadata: {one_line(e)}"
    needed: dict[str, int] = {}
    for info in storage.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        have = (path / name).stat().st_size if (path / name).is_file() else None
        if have is None or have < size:
            return f"{name} is {'missing' if have is None else f'{have} bytes, cut short of {size}'}"
    for rng in sorted(path.glob("rng_rank*.pt")):
        try:
            torch.load(rng, weights_only=True)
        except Exception as e:  # a truncated zip: RuntimeError, EOFError...
            return f"unreadable {rng.name}: {one_line(e)}"
    return None


def resolve_resume(cfg: TrainConfig, out_dir: Path, verbose: bool = True) -> Optional[Path]:
    """--resume=auto: the newest readable checkpoint (a corrupt newer one is passed over with a
    warning); --resume=PATH: that checkpoint, which may belong to another out_dir."""
    if not cfg.resume:
        return None
    if cfg.resume == "auto":
        for path in reversed(checkpoint_dirs(out_dir)):
            why = damage(path)
            if why is None:
                return path
            if verbose:
                print(f"warning: {path} is damaged ({why}); trying the previous checkpoint")
        return None
    return named_checkpoint(cfg.resume)
