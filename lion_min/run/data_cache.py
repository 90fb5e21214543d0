"""Prepared data: conversations encoded and packed once, kept on disk, memory-mapped by every rank.

    python -m lion_min prepare sft --model=M --data=D [the SFT flags]     # ahead, on a CPU machine
    torchrun --nproc_per_node=8 -m lion_min prepare sft ...               # the same, 8 processes
    python -m lion_min prepare dpo --model=M --data=D [the DPO flags]     # preference pairs

The stages call `sft.prepare_sft` / `dpo.prepare_dpo` themselves, so a run with an unprepared data
set prepares it first (every rank encoding its share) and a later run, or a resume, reuses it.

This module is the part the stages share: the fingerprint's pieces, the cache folder, the shard
writer, the memory-mapped sequences, and `prepare_folder`, which shares the work across ranks. It
is handed each stage's own encoding and layout (sft.py: encode_shard, merge_shards, PreparedRows;
dpo.py: encode_pair_shard, merge_pair_shards, PreparedPairs) and knows no stage.

Where: --data_cache=DIR (default `auto`: $XDG_CACHE_HOME/lion_min/data, else
~/.cache/lion_min/data), one folder per fingerprint: the sha256 of everything that changes the
tokens (`sft.sft_cache_key`, `dpo.dpo_cache_key`): each data file's bytes (a hub file: its
repo, commit and path, fixed by the commit; not the path: a copy is the same data), each source's
fraction, weight, schema and columns, skip_bad, the eval split, the seed where it samples, the
tokenizer.json and special tokens, the chat template, the system prompt, seq_len, packing, loss
mask / train_on, overflow, and the source of the code that encodes and packs. With several ranks
(or nodes) the folder must be one that every rank sees. `--data_cache=off` is the old path: every
rank encodes and packs everything in memory.

The cache holds content only: what a run prints and records about its data (the summary of the
records read) names that run's own files, whichever copy of the same bytes filled the cache.

Preparation writes into `<fingerprint>.tmp-<id>/` and renames it to `<fingerprint>/` last, so an
interrupted preparation never looks complete; it is redone by the next run. A preparation that
fails removes its temporary folder; one left by a process that was killed (on this machine) is
removed by the next preparation of the same data. With N ranks, rank r encodes the r-th contiguous 1/N of the conversations
and writes them as a shard; rank 0 waits for every shard, lays out the rows and renames; the others
wait for the folder. The waits poll the file system (no collective: a long preparation cannot hit
a process-group timeout); a rank that does not see rank 0's temporary folder within a minute stops
with an error asking for a shared --data_cache. Before any of this, every rank's view of the data
files (size and sha256) and the fingerprint are compared (run_folder.agree): a rank that reads a stale
copy stops every rank before the cache is written. A folder found damaged (`damage`: cut short, a
meta file edited) is prepared again with a note; a cache that cannot be written (read-only, full)
stops with one line naming it and `--data_cache=off`.

The format of one split (train/, eval/), all flat arrays:

    tokens.bin    the kept tokens of every conversation, in conversation order (uint16 when the
                  vocabulary fits, else uint32); a truncated conversation keeps its first seq_len
    mask.bin      one byte per token: the loss mask of chat.encode_chat
    docs.npy      (conversations + 1,) int64 token offsets; a dropped conversation is empty
    rows.npy      (rows + 1,) int64 offsets into row_docs.npy
    row_docs.npy  the conversations of each row, in the order pack() lays them out
    row_targets.npy  (rows,) int64 target tokens of each row: the global normaliser of a step
                  without reading the rows

From these `sft.PreparedRows.take(rows)` builds, per micro-batch, exactly what packing.pack() gives
for those rows (it calls pack() on each row's conversations), so host memory grows with the batch,
not with the data set: 5 bytes per token on disk (4 + 1) instead of 32 in memory.

DPO (`dpo.prepare_dpo`): the same tokens.bin, mask.bin and docs.npy hold each kept pair's chosen
then rejected sequence as dpo.encode_pairs made them (truncated, final reply scored), and split.json
its PairStats; `dpo.PreparedPairs[i]` is pair i, read from disk when a micro-batch needs it.
"""

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import tokenizers

from lion_min.core.chat import ChatEncoding
from lion_min.core.parallel import Dist
from lion_min.formats.data import parse_mixture
from lion_min.formats.data_files import resolve_files
from lion_min.formats.hf import hash_files
from lion_min.formats.tokenizer import Tokenizer
from lion_min.run.config import read_json
from lion_min.run.faults import raise_if_any

FORMAT = 1
"""Bumped when the layout on disk changes."""
SHARD_CHUNK = 1024
"""Records encoded per chunk of a shard (for SFT, one batched tokenizer call)."""
CODE = ("core/chat.py", "core/packing.py", "run/data_cache.py", "formats/data.py", "formats/schemas.py",
        "formats/tokenizer.py")
"""The modules whose source is part of every fingerprint: they decide the tokens and the rows
(tokenizer.py calls the tokenizer, chat.py also inserts the system turn); each stage adds its own file,
which encodes and lays out its data (sft.py packs the rows, dpo.py truncates the pairs). The
tokenizers library's version is hashed too."""
_HUB_FILE = re.compile(r"datasets--[^/]+/snapshots/[0-9a-f]{40}/.+$")


def cache_root(setting: str) -> Path:
    """--data_cache: 'auto' -> $XDG_CACHE_HOME/lion_min/data (else ~/.cache/lion_min/data)."""
    if setting == "auto":
        return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lion_min" / "data"
    return Path(setting).expanduser()


# --- the fingerprint -------------------------------------------------------------------------------


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    hash_files(h, [path], names=False)
    return h.hexdigest()


def file_identity(path: Path) -> str:
    """A file in the hub cache is fixed by its repo, commit and path (no need to read it); any other
    file by its bytes."""
    hub = _HUB_FILE.search(Path(path).as_posix())
    return f"hub:{hub.group(0)}" if hub else _sha256_file(path)


def data_identity(spec) -> list[dict]:
    """Per source of a mixture: how it is sampled and read, and the identity of each of its files
    (not the path or revision that found them: a copy of the same bytes is the same data)."""
    if not spec:
        return []
    return [{"fraction": src.fraction, "weight": src.weight, "schema": src.schema, "columns": src.columns,
             "files": [file_identity(f) for f in resolve_files(src.path, src.revision)]}
            for src in parse_mixture(spec)]


def tokenizer_identity(tokenizer: Tokenizer) -> dict:
    tok_json = tokenizer.files.get("tokenizer.json") or tokenizer._tok.to_str().encode()
    return {"tokenizer.json": hashlib.sha256(tok_json).hexdigest(), "bos": tokenizer.bos_token,
            "pad_id": tokenizer.pad_id, "tokenizers": tokenizers.__version__}


def uses_seed(cfg) -> bool:
    """Whether cfg.seed changes which records are used (a mixture that samples, a random split)."""
    sampled = any(s.fraction not in (None, 1.0) or s.weight is not None for s in parse_mixture(cfg.data))
    return sampled or (not cfg.eval_data and cfg.eval_fraction > 0)


def cache_key(parts: dict, code_files: tuple[str, ...] = CODE) -> str:
    code = {name: _sha256_file(Path(__file__).parent.parent / name) for name in code_files}
    blob = json.dumps(parts | {"format": FORMAT, "code": code}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


# --- reading ---------------------------------------------------------------------------------------


def _memmap(path: Path, dtype) -> np.ndarray:
    return np.memmap(path, dtype=dtype, mode="r") if path.stat().st_size else np.zeros(0, dtype)


class Sequences:
    """The encoded sequences of one split folder (tokens.bin, mask.bin, docs.npy), memory-mapped."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.meta = json.loads((folder / "split.json").read_text())
        self.tokens = _memmap(folder / "tokens.bin", np.dtype(self.meta["token_dtype"]))
        self.mask = _memmap(folder / "mask.bin", np.uint8)
        self.docs = np.load(folder / "docs.npy")

    def example(self, i: int) -> ChatEncoding:
        a, b = self.docs[i], self.docs[i + 1]
        return ChatEncoding(self.tokens[a:b].tolist(), self.mask[a:b].astype(bool).tolist())


def input_names(cfg) -> list[str]:
    """The strings by which a run names its data: each source as given and each of its files, in
    order. Runs with one fingerprint have as many, naming files of the same bytes one for one."""
    names = []
    for spec in (cfg.data, cfg.eval_data):
        for src in parse_mixture(spec) if spec else []:
            names += [src.path, *(str(f) for f in resolve_files(src.path, src.revision))]
    return names


def _without_names(text: str, names: list[str]) -> str:
    for i in sorted(range(len(names)), key=lambda i: -len(names[i])):  # a folder's path is inside its files'
        text = text.replace(names[i], f"{{input {i}}}")
    return text


def _with_names(text: str, names: list[str]) -> str:
    for i, name in enumerate(names):
        text = text.replace(f"{{input {i}}}", name)
    return text


@dataclass
class Prepared:
    folder: Path
    train: Sequences
    """PreparedRows (SFT) or PreparedPairs (DPO)."""
    eval: Optional[Sequences]
    data_summary: str
    """LoadStats.summary() of the records read when it was prepared."""
    seconds: float
    """Time spent preparing (0 when the cache was reused)."""

    def how(self) -> str:
        return f"{f'prepared in {self.seconds:.1f}s' if self.seconds else 'prepared before'}: {self.folder}"


def open_prepared(folder: Path, kind: type, seconds: float = 0.0, names: Sequence[str] = ()) -> Prepared:
    """The prepared folder; its data summary names this run's inputs (`names`, input_names)."""
    meta = json.loads((folder / "meta.json").read_text())
    return Prepared(folder, kind(folder / "train"), kind(folder / "eval") if (folder / "eval").is_dir() else None,
                    _with_names(meta["data_summary"], list(names)), seconds)


# --- writing ---------------------------------------------------------------------------------------


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


class ShardWriter:
    """Appends token ids and loss masks to out/tokens.bin and out/mask.bin; close() writes the
    per-example arrays (lengths.npz) and then the marker out/done that says the shard is complete."""

    def __init__(self, out: Path, dtype: np.dtype):
        out.mkdir(parents=True)
        self.out, self.dtype = out, dtype
        self.tokens, self.mask = open(out / "tokens.bin", "wb"), open(out / "mask.bin", "wb")

    def write(self, ids, mask) -> None:
        self.tokens.write(np.asarray(ids).astype(self.dtype).tobytes())
        self.mask.write(np.asarray(mask, dtype=np.uint8).tobytes())

    def close(self, **arrays: np.ndarray) -> None:
        self.tokens.close()
        self.mask.close()
        np.savez(self.out / "lengths.npz", **arrays)
        (self.out / "done").touch()


def concat_shards(shards: list[Path], out: Path) -> dict[str, np.ndarray]:
    """The shards' tokens.bin and mask.bin, in order, into out/; their lengths.npz arrays joined."""
    out.mkdir(parents=True)
    for name in ("tokens.bin", "mask.bin"):
        with open(out / name, "wb") as f:
            for shard in shards:
                with open(shard / name, "rb") as part:
                    shutil.copyfileobj(part, f, 1 << 24)
    parts = [np.load(s / "lengths.npz") for s in shards]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0].files}


# --- preparing ------------------------------------------------------------------------------------


class DataCacheError(ValueError):
    pass


VISIBLE_WITHIN_S = 60.0
"""How long a rank waits to see a file that rank 0 made before it concludes that --data_cache is
not shared (a network file system can take a moment to show it)."""


def _wait_for(paths: list[Path], within: Optional[float] = None) -> None:
    """Poll until every path exists (a rank that fails ends the job under torchrun); with `within`,
    raise DataCacheError if they have not appeared by then."""
    t0 = time.perf_counter()
    while not all(p.exists() for p in paths):
        if within is not None and time.perf_counter() - t0 > within:
            missing = next(p for p in paths if not p.exists())
            raise DataCacheError(f"--data_cache: {missing}, written by rank 0, is not visible to this rank after "
                                 f"{within:.0f}s: give a --data_cache folder that every rank shares")
        time.sleep(0.2 if time.perf_counter() - t0 < 60 else 2.0)


def _temporary_folder(final: Path, d: Dist) -> tuple[Path, Optional[int]]:
    """The temporary folder of this preparation and, on rank 0, the descriptor of its flock: made
    by rank 0 (owner.json: its host and pid), which holds the lock until the preparation ends (the
    kernel releases it if the process dies), and named for all ranks; every rank checks that it
    sees it (so a cache folder that is not shared fails now, not after the work)."""
    name, fd, error = [f"{final.name}.tmp-{uuid.uuid4().hex[:12]}"], None, None
    if d.main:
        try:
            (final.parent / name[0]).mkdir(parents=True)
            fd = os.open(final.parent / name[0], os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # no file locks here (some network file systems): never taken for the dead's
                pass
            (final.parent / name[0] / "owner.json").write_text(json.dumps({"host": socket.gethostname(),
                                                                           "pid": os.getpid()}))
        except OSError as e:
            error = cache_write_error(final.parent, e)
            shutil.rmtree(final.parent / name[0], ignore_errors=True)
            if fd is not None:
                os.close(fd)
    raise_if_any(error, d)
    if d.world > 1:
        import torch.distributed as dist

        dist.broadcast_object_list(name, src=0)
        _wait_for([final.parent / name[0]], within=VISIBLE_WITHIN_S)
    return final.parent / name[0], fd


def _left_by_the_dead(stale: list[Path]) -> list[Path]:
    """The temporary folders whose preparing process, on this machine, is gone (its flock is free)."""
    from lion_min.run.run_folder import lock_held

    return [folder for folder in stale
            if (read_json(folder / "owner.json") or {}).get("host") == socket.gethostname()
            and lock_held(folder) is False]


def prepare_folder(final: Path, d: Dist, load: Callable[[], tuple[list, list, str]],
             encode: Callable[[list, Path], None], merge: Callable[[list[Path], Path], None], parts: dict,
             names: Sequence[str] = ()) -> float:
    """Make the folder `final` unless it exists: every rank encodes its share of each split into a
    shard, rank 0 merges them and renames the temporary folder last. Returns the seconds spent
    (0 when the folder existed). The stored data summary names the inputs as `{input i}` (names[i]).
    First every rank's view of the inputs must agree (agree): a rank that reads another copy of the
    data must not fill the cache under the fingerprint of the others'. A damaged folder is prepared again."""
    from lion_min.run.run_folder import agree

    agree(_views(final, parts, names), d, "Every rank must read the same data (a stale copy on one node?); nothing "
                                          "was written")
    found = [final.is_dir()]
    if d.main and found[0] and (why := damage(final)) is not None:
        print(f"note: {final} is damaged ({why}); preparing it again")
        try:
            shutil.rmtree(final)
        except OSError as e:
            raise cache_write_error(final.parent, e) from None
        found = [False]
    if d.world > 1:  # one decision for all ranks, even if another job finishes this folder meanwhile
        import torch.distributed as dist

        dist.broadcast_object_list(found, src=0)
        # Several ranks on one machine: each its share of the cores for the tokenizer's threads
        # (read when they first start, so before any batched call).
        local = int(os.environ.get("LOCAL_WORLD_SIZE", d.world))
        os.environ.setdefault("RAYON_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // local)))
    if found[0]:
        _wait_for([final / "meta.json"], within=VISIBLE_WITHIN_S)
        return 0.0
    t0 = time.perf_counter()
    if d.main:
        stale = sorted(final.parent.glob(f"{final.name}.tmp-*"))
        for folder in _left_by_the_dead(stale):
            shutil.rmtree(folder, ignore_errors=True)
            stale.remove(folder)
            print(f"note: removed {folder}, an unfinished preparation of this data whose process is gone")
        if stale:
            print(f"note: {len(stale)} unfinished preparation(s) of this data in {final.parent} "
                  f"({stale[0].name}...): running now elsewhere, or interrupted on another machine; delete them "
                  f"when not")
    tmp, fd = _temporary_folder(final, d)
    try:
        return _prepare_into(tmp, final, d, load, encode, merge, parts, names, t0)
    except OSError as e:  # a full or read-only disk, on this rank (the others stop with it under torchrun)
        if e.errno in (errno.EROFS, errno.ENOSPC, errno.EDQUOT) or str(final.parent) in str(e.filename):
            raise cache_write_error(final.parent, e) from None
        raise
    finally:
        if d.main:  # a failed preparation leaves nothing behind (the other ranks' shards are inside)
            shutil.rmtree(tmp, ignore_errors=True)
        if fd is not None:
            os.close(fd)


def cache_write_error(root: Path, e: OSError) -> DataCacheError:
    return DataCacheError(f"--data_cache: cannot write to {root} ({e.strerror or e}); give a writable folder with "
                          f"room as --data_cache=DIR, or --data_cache=off (every rank encodes the data in memory)")


def _views(final: Path, parts: dict, names: Sequence[str]) -> dict[str, str]:
    """What this rank sees of each data file (its size and sha256), then of everything else that
    makes the fingerprint (tokenizer, settings, code), as agree compares them."""
    views, i = {}, 0
    for key in ("data", "eval_data"):
        for src in parts.get(key) or []:
            i += 1  # names: each source as given, then its files
            for identity in src["files"]:
                path = Path(names[i]) if i < len(names) else None
                size = f"{path.stat().st_size} bytes, " if path is not None and path.is_file() else ""
                views[f"--{key} file {path}"] = f"{size}contents {identity.removeprefix('hub:')[:16]}"
                i += 1
    views["the prepared data's fingerprint (tokenizer, settings, code)"] = final.name
    return views


def damage(folder: Path) -> Optional[str]:
    """What makes a prepared folder unusable, or None: its meta.json or a split.json unreadable or
    not its own, an array that does not load, tokens.bin or mask.bin not as long as docs.npy says
    (a copy cut short, a meta file edited by hand)."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        if meta.get("fingerprint") != folder.name or not isinstance(meta.get("data_summary"), str):
            return "meta.json is not this folder's"
        for split in [folder / "train"] + ([folder / "eval"] if (folder / "eval").is_dir() else []):
            info = json.loads((split / "split.json").read_text())
            arrays = {f.name: np.load(f, mmap_mode="r") for f in sorted(split.glob("*.npy"))}  # (a short one fails)
            docs = arrays["docs.npy"]
            if len(docs) == 0 or docs[0] != 0 or (np.diff(docs) < 0).any():
                return f"{split.name}/docs.npy holds no offsets"
            for name, itemsize in (("tokens.bin", np.dtype(info["token_dtype"]).itemsize), ("mask.bin", 1)):
                have, want = (split / name).stat().st_size, int(docs[-1]) * itemsize
                if have != want:
                    return f"{split.name}/{name} is {have} bytes, not the {want} its docs.npy and split.json say"
            if "rows.npy" in arrays and not (arrays["rows.npy"][-1] == len(arrays["row_docs.npy"]) and
                                             len(arrays["row_targets.npy"]) == len(arrays["rows.npy"]) - 1):
                return f"{split.name}: rows.npy, row_docs.npy and row_targets.npy do not match"
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def _prepare_into(tmp: Path, final: Path, d: Dist, load, encode, merge, parts: dict, names: Sequence[str],
                  t0: float) -> float:
    """prepare_folder's work in its temporary folder `tmp`, renamed to `final` last."""
    train, evals, data_summary = load()
    t_load = time.perf_counter()
    splits = {"train": train, "eval": evals} if evals else {"train": train}
    for split, items in splits.items():
        lo, hi = len(items) * d.rank // d.world, len(items) * (d.rank + 1) // d.world
        encode(items[lo:hi], tmp / "shards" / split / f"{d.rank:05d}")
    t_encode = time.perf_counter()
    if d.main:
        for split in splits:
            shards = [tmp / "shards" / split / f"{r:05d}" for r in range(d.world)]
            _wait_for([s / "done" for s in shards])
            merge(shards, tmp / split)
        shutil.rmtree(tmp / "shards")
        # Rank 0's phases: reading the records (every rank reads them all), encoding its share,
        # waiting for the other shards and laying out the rows.
        t_end = time.perf_counter()
        seconds = {"load": t_load - t0, "encode": t_encode - t_load, "merge": t_end - t_encode, "world": d.world}
        (tmp / "owner.json").unlink()
        (tmp / "meta.json").write_text(json.dumps({"fingerprint": final.name, "parts": parts,
                                                   "data_summary": _without_names(data_summary, list(names)),
                                                   "prepare_seconds": seconds}, indent=2, default=str))
        try:
            tmp.rename(final)  # last: only a complete preparation carries the fingerprint's name
        except OSError:  # another job finished the same folder first: theirs is the same
            if not final.is_dir():
                raise
            shutil.rmtree(tmp)
    _wait_for([final / "meta.json"])
    return time.perf_counter() - t0
