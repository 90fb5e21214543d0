"""Prepared data: conversations encoded and packed once, kept on disk, memory-mapped by every rank.

    python -m lion_min.prepare sft --model=M --data=D [the SFT flags]     # ahead, on a CPU machine
    torchrun --nproc_per_node=8 -m lion_min.prepare sft ...               # the same, 8 processes

The stages call `prepare_sft` themselves, so a run with an unprepared data set prepares it first
(every rank encoding its share) and a later run, or a resume, reuses it.

Where: --data_cache=DIR (default `auto`: $XDG_CACHE_HOME/lion_min/data, else
~/.cache/lion_min/data), one folder per fingerprint: the sha256 of everything that changes the
tokens (`sft_fingerprint`): each data file's bytes (a hub file: its repo, commit and path, fixed by
the commit), the mixture spec, schema, columns, skip_bad, the eval split, the seed where it samples,
the tokenizer.json and special tokens, the chat template, the system prompt, seq_len, packing,
loss mask / train_on, overflow, and the source of the code that encodes and packs. With several
ranks (or nodes) the folder must be one that every rank sees. `--data_cache=off` is the old path:
every rank encodes and packs everything in memory.

Preparation writes into `<fingerprint>.tmp-<id>/` and renames it to `<fingerprint>/` last, so an
interrupted preparation never looks complete; it is redone by the next run (the stale temporary
folder can be deleted). With N ranks, rank r encodes the r-th contiguous 1/N of the conversations
and writes them as a shard; rank 0 waits for every shard, lays out the rows and renames; the others
wait for the folder. The waits poll the file system (no collective: a long preparation cannot hit
a process-group timeout).

The format of one split (train/, eval/), all flat arrays:

    tokens.bin    the kept tokens of every conversation, in conversation order (uint16 when the
                  vocabulary fits, else uint32); a truncated conversation keeps its first seq_len
    mask.bin      one byte per token: the loss mask of chat.encode_chat
    docs.npy      (conversations + 1,) int64 token offsets; a dropped conversation is empty
    rows.npy      (rows + 1,) int64 offsets into row_docs.npy
    row_docs.npy  the conversations of each row, in the order pack() lays them out
    row_targets.npy  (rows,) int64 target tokens of each row: the global normaliser of a step
                  without reading the rows

From these `PreparedRows.take(rows)` builds, per micro-batch, exactly what packing.pack() gives
for those rows (it calls pack() on each row's conversations), so host memory grows with the batch,
not with the data set: 5 bytes per token on disk (4 + 1) instead of 32 in memory.
"""

import dataclasses
import hashlib
import json
import os
import re
import shutil
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from lion_min.chat import ChatEncoding, encode_chats
from lion_min.data import parse_mixture, resolve_files
from lion_min.packing import FIELDS, Packed, best_fit_decreasing, pack
from lion_min.parallel import Dist
from lion_min.stage import with_system
from lion_min.tokenizer import Tokenizer

FORMAT = 1
"""Bumped when the layout on disk changes."""
ENCODE_BATCH = 1024
"""Conversations per batched tokenizer call."""
CODE = ("chat.py", "packing.py", "prepare.py", "data.py", "schemas.py")
"""The modules whose source is part of the fingerprint: they decide the tokens and the rows."""
_HUB_FILE = re.compile(r"datasets--[^/]+/snapshots/[0-9a-f]{40}/.+$")


def cache_root(setting: str) -> Path:
    """--data_cache: 'auto' -> $XDG_CACHE_HOME/lion_min/data (else ~/.cache/lion_min/data)."""
    if setting == "auto":
        return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lion_min" / "data"
    return Path(setting).expanduser()


# --- the fingerprint -------------------------------------------------------------------------------


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
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
            "pad_id": tokenizer.pad_id}


def _samples(cfg) -> bool:
    """Whether cfg.seed changes which records are used (a mixture that samples, a random split)."""
    sampled = any(s.fraction not in (None, 1.0) or s.weight is not None for s in parse_mixture(cfg.data))
    return sampled or (not cfg.eval_data and cfg.eval_fraction > 0)


def fingerprint(parts: dict) -> str:
    code = {name: _sha256_file(Path(__file__).parent / name) for name in CODE}
    blob = json.dumps(parts | {"format": FORMAT, "code": code}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def sft_fingerprint(cfg, tokenizer: Tokenizer) -> tuple[str, dict]:
    """(fingerprint, the parts it hashes) of an SFT config's prepared rows."""
    parts = {
        "stage": "sft", "data": data_identity(cfg.data), "eval_data": data_identity(cfg.eval_data),
        "eval_fraction": cfg.eval_fraction, "schema": cfg.schema, "columns": cfg.columns, "skip_bad": cfg.skip_bad,
        "seed": cfg.seed if _samples(cfg) else None, "tokenizer": tokenizer_identity(tokenizer),
        "chat_template": cfg.chat_template, "system_prompt": cfg.system_prompt, "seq_len": cfg.seq_len,
        "packing": cfg.packing, "train_on": cfg.train_on if cfg.loss_mask else "all", "overflow": cfg.overflow,
    }
    return fingerprint(parts), parts


# --- reading ---------------------------------------------------------------------------------------


def _memmap(path: Path, dtype) -> np.ndarray:
    return np.memmap(path, dtype=dtype, mode="r") if path.stat().st_size else np.zeros(0, dtype)


class PreparedRows:
    """One split's packed rows on disk, memory-mapped (see the module docstring)."""

    def __init__(self, folder: Path):
        meta = json.loads((folder / "split.json").read_text())
        self.folder, self.seq_len, self.pad_id = folder, meta["seq_len"], meta["pad_id"]
        self.counts = Packed(rows={}, **meta["counts"])
        """pack()'s counters for these rows (its rows stay on disk)."""
        self.tokens = _memmap(folder / "tokens.bin", np.dtype(meta["token_dtype"]))
        self.mask = _memmap(folder / "mask.bin", np.uint8)
        self.docs = np.load(folder / "docs.npy")
        self.row_offsets = np.load(folder / "rows.npy")
        self.row_docs = np.load(folder / "row_docs.npy")
        self.row_targets = np.load(folder / "row_targets.npy")

    def __len__(self) -> int:
        return len(self.row_targets)

    def example(self, i: int) -> ChatEncoding:
        a, b = self.docs[i], self.docs[i + 1]
        return ChatEncoding(self.tokens[a:b].tolist(), self.mask[a:b].astype(bool).tolist())

    def take(self, sel) -> dict[str, np.ndarray]:
        """The rows `sel` as (len(sel), seq_len) int64 arrays: pack()'s rows[k][sel] (FIELDS)."""
        out = []
        for r in sel:
            docs = self.row_docs[self.row_offsets[r] : self.row_offsets[r + 1]]
            # The row's conversations fill one bin, in the given order: pack() lays them out as the
            # full packing did; only the doc ids are local (0, 1, ...) and are mapped back.
            row = pack([self.example(i) for i in docs], self.seq_len, self.pad_id).rows
            row["doc_ids"] = np.where(row["doc_ids"] >= 0, docs[np.maximum(row["doc_ids"], 0)], -1)
            out.append(row)
        if not out:
            return {k: np.zeros((0, self.seq_len), np.int64) for k in FIELDS}
        return {k: np.concatenate([row[k] for row in out]) for k in FIELDS}


@dataclass
class Prepared:
    folder: Path
    train: PreparedRows
    eval: Optional[PreparedRows]
    data_summary: str
    """LoadStats.summary() of the records read when it was prepared."""
    seconds: float
    """Time spent preparing (0 when the cache was reused)."""


def open_prepared(folder: Path, seconds: float = 0.0) -> Prepared:
    meta = json.loads((folder / "meta.json").read_text())
    return Prepared(folder, PreparedRows(folder / "train"),
                    PreparedRows(folder / "eval") if (folder / "eval").is_dir() else None,
                    meta["data_summary"], seconds)


# --- writing ---------------------------------------------------------------------------------------


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def encode_shard(convs: list, out: Path, tokenizer: Tokenizer, template: str, train_on: str, system_prompt,
                 seq_len: int, overflow: str) -> None:
    """Encode `convs` (encode_chats, in batches) into out/: tokens.bin, mask.bin and lengths.npz
    (per conversation: kept tokens, full length, target tokens), then the marker out/done."""
    out.mkdir(parents=True)
    dtype = token_dtype(tokenizer.vocab_size)
    kept, full, targets = [], [], []
    with open(out / "tokens.bin", "wb") as ft, open(out / "mask.bin", "wb") as fm:
        for s in range(0, len(convs), ENCODE_BATCH):
            batch = [with_system(c, system_prompt) for c in convs[s : s + ENCODE_BATCH]]
            b = encode_chats(tokenizer, batch, template, train_on)
            n = np.diff(b.starts)  # (conversations,) full lengths
            limit = np.where(n > seq_len, 0 if overflow == "drop" else seq_len, n)
            doc = np.repeat(np.arange(len(n)), n)  # (tokens,) conversation of each token
            pos = np.arange(len(doc)) - b.starts[doc]  # position within its conversation
            keep = pos < limit[doc]
            ft.write(b.input_ids[keep].astype(dtype).tobytes())
            fm.write(b.loss_mask[keep].astype(np.uint8).tobytes())
            # Token t is a target when it trains and is not its conversation's first (nothing
            # predicts that one), as pack() counts them.
            kept.append(limit)
            full.append(n)
            targets.append(np.bincount(doc[keep & (pos >= 1) & b.loss_mask], minlength=len(n)))
    cat = (lambda xs: np.concatenate(xs) if xs else np.zeros(0, np.int64))
    np.savez(out / "lengths.npz", kept=cat(kept), full=cat(full), targets=cat(targets))
    (out / "done").touch()


def _wait_for(paths: list[Path]) -> None:
    """Poll until every path exists (a rank that fails ends the job under torchrun)."""
    t0 = time.perf_counter()
    while not all(p.exists() for p in paths):
        time.sleep(0.2 if time.perf_counter() - t0 < 60 else 2.0)


def merge_shards(shards: list[Path], out: Path, seq_len: int, packing: bool, overflow: str, pad_id: int,
                 dtype: np.dtype) -> dict:
    """The shards (in order) -> one split folder: tokens and masks concatenated, the rows laid out
    as pack() lays them out (best_fit_decreasing, or one conversation per row). Returns its counters."""
    out.mkdir(parents=True)
    for name in ("tokens.bin", "mask.bin"):
        with open(out / name, "wb") as f:
            for shard in shards:
                with open(shard / name, "rb") as part:
                    shutil.copyfileobj(part, f, 1 << 24)
    lengths = [np.load(s / "lengths.npz") for s in shards]
    kept, full, targets = (np.concatenate([x[k] for x in lengths]) for k in ("kept", "full", "targets"))
    docs = np.concatenate([[0], np.cumsum(kept)]).astype(np.int64)
    examples = np.flatnonzero(kept > 0)  # dropped conversations have no tokens
    if packing:
        row_list = [examples[b] for b in best_fit_decreasing(kept[examples].tolist(), seq_len)]
    else:
        row_list = [examples[i : i + 1] for i in range(len(examples))]
    rows = np.concatenate([[0], np.cumsum([len(r) for r in row_list])]).astype(np.int64)
    row_docs = np.concatenate(row_list).astype(np.int64) if row_list else np.zeros(0, np.int64)
    cum = np.concatenate([[0], np.cumsum(targets[row_docs])])
    row_targets = (cum[rows[1:]] - cum[rows[:-1]]).astype(np.int64)
    for name, arr in (("docs", docs), ("rows", rows), ("row_docs", row_docs), ("row_targets", row_targets)):
        np.save(out / f"{name}.npy", arr)
    counts = {
        "num_examples": len(kept), "num_packed": len(examples),
        "num_truncated": int((full > seq_len).sum()) if overflow == "truncate" else 0,
        "num_dropped": int((full > seq_len).sum()) if overflow == "drop" else 0,
        "real_tokens": int(kept.sum()), "row_tokens": (len(rows) - 1) * seq_len,
        "target_tokens": int(row_targets.sum()),
    }
    meta = {"seq_len": seq_len, "pad_id": pad_id, "token_dtype": dtype.name, "counts": counts}
    (out / "split.json").write_text(json.dumps(meta, indent=2))
    return meta


def _job_id(d: Dist) -> str:
    """A name all ranks of this run agree on for the temporary folder."""
    name = [uuid.uuid4().hex[:12]]
    if d.world > 1:
        import torch.distributed as dist

        dist.broadcast_object_list(name, src=0)
    return name[0]


def prepare_sft(cfg, tokenizer: Tokenizer, d: Dist, load: Callable[[], tuple[list, list, str]]) -> Prepared:
    """The prepared rows of an SFT config: from the cache, or prepared now (every rank its share).

    load() -> (train conversations, eval conversations, LoadStats summary); called only when the
    cache misses."""
    fp, parts = sft_fingerprint(cfg, tokenizer)
    root = cache_root(cfg.data_cache)
    final = root / fp
    if d.world > 1:  # one decision for all ranks, even if another job finishes this folder meanwhile
        import torch.distributed as dist

        found = [final.is_dir()]
        dist.broadcast_object_list(found, src=0)
        if found[0]:
            _wait_for([final / "meta.json"])  # (waits forever if rank 0's folder is not visible here)
            return open_prepared(final)
    elif final.is_dir():
        return open_prepared(final)

    t0 = time.perf_counter()
    tmp = root / f"{fp}.tmp-{_job_id(d)}"
    train_on = cfg.train_on if cfg.loss_mask else "all"
    dtype = token_dtype(tokenizer.vocab_size)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    convs, eval_convs, data_summary = load()
    t_load = time.perf_counter()
    splits = {"train": convs, "eval": eval_convs} if eval_convs else {"train": convs}
    for split, items in splits.items():
        lo, hi = len(items) * d.rank // d.world, len(items) * (d.rank + 1) // d.world
        encode_shard(items[lo:hi], tmp / "shards" / split / f"{d.rank:05d}", tokenizer, cfg.chat_template,
                     train_on, cfg.system_prompt, cfg.seq_len, cfg.overflow)
    t_encode = time.perf_counter()
    if d.main:
        for split in splits:
            shards = [tmp / "shards" / split / f"{r:05d}" for r in range(d.world)]
            _wait_for([s / "done" for s in shards])
            merge_shards(shards, tmp / split, cfg.seq_len, cfg.packing, cfg.overflow, pad_id, dtype)
        shutil.rmtree(tmp / "shards")
        # Rank 0's phases: reading the records (every rank reads them all), encoding its share,
        # waiting for the other shards and laying out the rows.
        t_end = time.perf_counter()
        seconds = {"load": t_load - t0, "encode": t_encode - t_load, "merge": t_end - t_encode, "world": d.world}
        (tmp / "meta.json").write_text(json.dumps({"fingerprint": fp, "parts": parts, "data_summary": data_summary,
                                                   "prepare_seconds": seconds}, indent=2, default=str))
        try:
            tmp.rename(final)  # last: only a complete preparation carries the fingerprint's name
        except OSError:  # another job finished the same folder first: theirs is the same
            if not final.is_dir():
                raise
            shutil.rmtree(tmp)
    _wait_for([final / "meta.json"])
    return open_prepared(final, time.perf_counter() - t0)


# --- python -m lion_min.prepare --------------------------------------------------------------------


def main(argv: Optional[list[str]] = None) -> None:
    """python -m lion_min.prepare [sft] --model=... --data=... [the stage's flags]"""
    from lion_min import demo, sft
    from lion_min.checkpoint import resolve_path
    from lion_min.config import ConfigError, parse_cli, recipe_presets
    from lion_min.parallel import init_distributed

    argv = sys.argv[1:] if argv is None else list(argv)
    stage = argv.pop(0) if argv and not argv[0].startswith("-") else "sft"
    if stage != "sft":
        raise ConfigError(f"python -m lion_min.prepare {stage}: expected sft")
    cfg = parse_cli(sft.SFTConfig, demo.presets("sft") | recipe_presets("sft"), argv, doc=__doc__)
    if not cfg.model or not cfg.data:
        raise ConfigError("--model (for its tokenizer) and --data are required")
    if cfg.data_cache == "off":
        raise ConfigError("--data_cache=off: nothing to prepare (give a folder, or auto)")
    d = init_distributed("cpu")
    tokenizer = Tokenizer.from_dir(resolve_path(cfg.model, cfg.revision))
    t0 = time.perf_counter()
    prep = prepare_sft(cfg, tokenizer, d, load=lambda: sft.load_sft_data(cfg))
    if d.main:
        print(prep.data_summary)
        print(sft.packing_line(prep.train.counts, len(prep.train), cfg.seq_len))
        if prep.eval is not None:
            print("eval: " + sft.packing_line(prep.eval.counts, len(prep.eval), cfg.seq_len))
        how = f"prepared in {prep.seconds:.1f}s by {d.world} process(es)" if prep.seconds else "already prepared"
        print(f"{how} ({time.perf_counter() - t0:.1f}s in all): {prep.folder}")


if __name__ == "__main__":
    from lion_min.config import run_cli

    run_cli(main)
