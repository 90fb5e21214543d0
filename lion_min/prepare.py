"""Prepared data: conversations encoded and packed once, kept on disk, memory-mapped by every rank.

    python -m lion_min.prepare sft --model=M --data=D [the SFT flags]     # ahead, on a CPU machine
    torchrun --nproc_per_node=8 -m lion_min.prepare sft ...               # the same, 8 processes
    python -m lion_min.prepare dpo --model=M --data=D [the DPO flags]     # preference pairs

The stages call `prepare_sft` / `prepare_dpo` themselves, so a run with an unprepared data set
prepares it first (every rank encoding its share) and a later run, or a resume, reuses it.

Where: --data_cache=DIR (default `auto`: $XDG_CACHE_HOME/lion_min/data, else
~/.cache/lion_min/data), one folder per fingerprint: the sha256 of everything that changes the
tokens (`sft_fingerprint`): each data file's bytes (a hub file: its repo, commit and path, fixed by
the commit; not the path: a copy is the same data), each source's fraction, weight, schema and
columns, skip_bad, the eval split, the seed where it samples,
the tokenizer.json and special tokens, the chat template, the system prompt, seq_len, packing,
loss mask / train_on, overflow, and the source of the code that encodes and packs. With several
ranks (or nodes) the folder must be one that every rank sees. `--data_cache=off` is the old path:
every rank encodes and packs everything in memory.

Preparation writes into `<fingerprint>.tmp-<id>/` and renames it to `<fingerprint>/` last, so an
interrupted preparation never looks complete; it is redone by the next run (the stale temporary
folder can be deleted). With N ranks, rank r encodes the r-th contiguous 1/N of the conversations
and writes them as a shard; rank 0 waits for every shard, lays out the rows and renames; the others
wait for the folder. The waits poll the file system (no collective: a long preparation cannot hit
a process-group timeout); a rank that does not see rank 0's temporary folder within a minute stops
with an error asking for a shared --data_cache.

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

DPO (`prepare_dpo`): the same tokens.bin, mask.bin and docs.npy hold each kept pair's chosen then
rejected sequence as dpo.encode_pairs made them (truncated, final reply scored), and split.json
its PairStats; `PreparedPairs[i]` is pair i, read from disk when a micro-batch needs it.
"""

import collections.abc
import dataclasses
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import tokenizers

from lion_min.chat import ChatEncoding, encode_chats
from lion_min.checkpoint import hash_files
from lion_min.data import parse_mixture, resolve_files
from lion_min.packing import FIELDS, Packed, best_fit_decreasing, pack
from lion_min.parallel import Dist
from lion_min.stage import with_system
from lion_min.tokenizer import Tokenizer

FORMAT = 1
"""Bumped when the layout on disk changes."""
ENCODE_BATCH = 1024
"""Conversations per batched tokenizer call."""
CODE = ("chat.py", "packing.py", "prepare.py", "data.py", "schemas.py", "tokenizer.py", "stage.py")
"""The modules whose source is part of the fingerprint: they decide the tokens and the rows (for
DPO also dpo.py, which truncates the pairs; tokenizer.py calls the tokenizer, stage.py inserts the
system turn). The tokenizers library's version is hashed too."""
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


def _samples(cfg) -> bool:
    """Whether cfg.seed changes which records are used (a mixture that samples, a random split)."""
    sampled = any(s.fraction not in (None, 1.0) or s.weight is not None for s in parse_mixture(cfg.data))
    return sampled or (not cfg.eval_data and cfg.eval_fraction > 0)


def fingerprint(parts: dict, code_files: tuple[str, ...] = CODE) -> str:
    code = {name: _sha256_file(Path(__file__).parent / name) for name in code_files}
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


def dpo_fingerprint(cfg, tokenizer: Tokenizer) -> tuple[str, dict]:
    """(fingerprint, the parts it hashes) of a DPO config's encoded pairs."""
    parts = {
        "stage": "dpo", "data": data_identity(cfg.data), "eval_data": data_identity(cfg.eval_data),
        "eval_fraction": cfg.eval_fraction, "schema": cfg.schema, "skip_bad": cfg.skip_bad,
        "seed": cfg.seed if _samples(cfg) else None, "tokenizer": tokenizer_identity(tokenizer),
        "chat_template": cfg.chat_template, "system_prompt": cfg.system_prompt, "max_len": cfg.max_len,
        "max_prompt_len": cfg.max_prompt_len,
    }
    return fingerprint(parts, CODE + ("dpo.py",)), parts


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


class PreparedRows(Sequences):
    """One split's packed SFT rows on disk (see the module docstring)."""

    def __init__(self, folder: Path):
        super().__init__(folder)
        self.seq_len, self.pad_id = self.meta["seq_len"], self.meta["pad_id"]
        self.isolate = True
        """--isolate_documents: decided when rows are taken (the stored tokens are the same either way)."""
        self.counts = Packed(rows={}, **self.meta["counts"])
        """pack()'s counters for these rows (its rows stay on disk)."""
        self.row_offsets = np.load(folder / "rows.npy")
        self.row_docs = np.load(folder / "row_docs.npy")
        self.row_targets = np.load(folder / "row_targets.npy")

    def __len__(self) -> int:
        return len(self.row_targets)

    def take(self, sel) -> dict[str, np.ndarray]:
        """The rows `sel` as (len(sel), seq_len) int64 arrays: pack()'s rows[k][sel] (FIELDS)."""
        out = []
        for r in sel:
            docs = self.row_docs[self.row_offsets[r] : self.row_offsets[r + 1]]
            # The row's conversations fill one bin, in the given order: pack() lays them out as the
            # full packing did; only the doc ids are local (0, 1, ...) and are mapped back.
            row = pack([self.example(i) for i in docs], self.seq_len, self.pad_id, isolate=self.isolate).rows
            row["doc_ids"] = np.where(row["doc_ids"] >= 0, docs[np.maximum(row["doc_ids"], 0)], -1)
            out.append(row)
        if not out:
            return {k: np.zeros((0, self.seq_len), np.int64) for k in FIELDS}
        return {k: np.concatenate([row[k] for row in out]) for k in FIELDS}


class PreparedPairs(Sequences, collections.abc.Sequence):
    """One split's DPO pairs on disk: pairs[i] is dpo.EncodedPair(sequence 2i, sequence 2i + 1), as
    dpo.encode_pairs made them; a list of those for a slice."""

    def __init__(self, folder: Path):
        super().__init__(folder)
        self.stats = self.meta["stats"]
        """dpo.PairStats of the encoding, as a dict."""

    def __len__(self) -> int:
        return (len(self.docs) - 1) // 2

    def __getitem__(self, i):
        from lion_min.dpo import EncodedPair

        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(f"pair {i} of {len(self)}")
        i = int(i) % len(self)
        return EncodedPair(chosen=self.example(2 * i), rejected=self.example(2 * i + 1))


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


def open_prepared(folder: Path, kind: type, seconds: float = 0.0) -> Prepared:
    meta = json.loads((folder / "meta.json").read_text())
    return Prepared(folder, kind(folder / "train"), kind(folder / "eval") if (folder / "eval").is_dir() else None,
                    meta["data_summary"], seconds)


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


def _concat_shards(shards: list[Path], out: Path) -> dict[str, np.ndarray]:
    """The shards' tokens.bin and mask.bin, in order, into out/; their lengths.npz arrays joined."""
    out.mkdir(parents=True)
    for name in ("tokens.bin", "mask.bin"):
        with open(out / name, "wb") as f:
            for shard in shards:
                with open(shard / name, "rb") as part:
                    shutil.copyfileobj(part, f, 1 << 24)
    parts = [np.load(s / "lengths.npz") for s in shards]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0].files}


def encode_shard(convs: list, out: Path, tokenizer: Tokenizer, template: str, train_on: str, system_prompt,
                 seq_len: int, overflow: str) -> None:
    """Encode `convs` (encode_chats, in batches) into a shard: their kept tokens and masks, and per
    conversation the kept tokens, the full length and the target tokens."""
    w = ShardWriter(out, token_dtype(tokenizer.vocab_size))
    kept, full, targets = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for s in range(0, len(convs), ENCODE_BATCH):
        batch = [with_system(c, system_prompt) for c in convs[s : s + ENCODE_BATCH]]
        b = encode_chats(tokenizer, batch, template, train_on)
        n = np.diff(b.starts)  # (conversations,) full lengths
        limit = np.where(n > seq_len, 0 if overflow == "drop" else seq_len, n)
        doc = np.repeat(np.arange(len(n)), n)  # (tokens,) conversation of each token
        pos = np.arange(len(doc)) - b.starts[doc]  # position within its conversation
        keep = pos < limit[doc]
        w.write(b.input_ids[keep], b.loss_mask[keep])
        # Token t is a target when it trains and is not its conversation's first (nothing
        # predicts that one), as pack() counts them.
        kept.append(limit)
        full.append(n)
        targets.append(np.bincount(doc[keep & (pos >= 1) & b.loss_mask], minlength=len(n)))
    w.close(kept=np.concatenate(kept), full=np.concatenate(full), targets=np.concatenate(targets))


def merge_shards(shards: list[Path], out: Path, seq_len: int, packing: bool, overflow: str, pad_id: int,
                 dtype: np.dtype) -> dict:
    """The shards (in order) -> one split folder: tokens and masks concatenated, the rows laid out
    as pack() lays them out (best_fit_decreasing, or one conversation per row). Returns its meta."""
    lengths = _concat_shards(shards, out)
    kept, full, targets = lengths["kept"], lengths["full"], lengths["targets"]
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


def encode_pair_shard(prefs: list, out: Path, tokenizer: Tokenizer, template: str, max_len: int,
                      max_prompt_len: int, system_prompt) -> None:
    """dpo.encode_pairs on `prefs` (in chunks) into a shard: each kept pair's chosen then rejected
    sequence, their lengths, and the pair counts."""
    from lion_min.dpo import PairStats, encode_pairs

    w = ShardWriter(out, token_dtype(tokenizer.vocab_size))
    lengths, total = [], PairStats()
    for s in range(0, len(prefs), ENCODE_BATCH):
        pairs, st = encode_pairs(prefs[s : s + ENCODE_BATCH], tokenizer, template, max_len, max_prompt_len,
                                 system_prompt)
        sides = [side for p in pairs for side in (p.chosen, p.rejected)]
        w.write(list(chain.from_iterable(x.input_ids for x in sides)), list(chain.from_iterable(x.loss_mask for x in sides)))
        lengths += [len(x.input_ids) for x in sides]
        total = PairStats(*(a + b for a, b in zip(dataclasses.astuple(total), dataclasses.astuple(st))))
    w.close(lengths=np.asarray(lengths, dtype=np.int64), stats=np.asarray(dataclasses.astuple(total), dtype=np.int64))


def merge_pair_shards(shards: list[Path], out: Path, dtype: np.dtype) -> dict:
    from lion_min.dpo import PairStats

    arrays = _concat_shards(shards, out)
    np.save(out / "docs.npy", np.concatenate([[0], np.cumsum(arrays["lengths"])]).astype(np.int64))
    names = [f.name for f in dataclasses.fields(PairStats)]
    stats = dict(zip(names, map(int, arrays["stats"].reshape(-1, len(names)).sum(0))))
    meta = {"token_dtype": dtype.name, "stats": stats}
    (out / "split.json").write_text(json.dumps(meta, indent=2))
    return meta


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


def _temporary_folder(final: Path, d: Dist) -> Path:
    """The temporary folder of this preparation, made by rank 0 and named for all ranks; every rank
    checks that it sees it (so a cache folder that is not shared fails now, not after the work)."""
    name = [f"{final.name}.tmp-{uuid.uuid4().hex[:12]}"]
    if d.main:
        (final.parent / name[0]).mkdir(parents=True)
    if d.world > 1:
        import torch.distributed as dist

        dist.broadcast_object_list(name, src=0)
        _wait_for([final.parent / name[0]], within=VISIBLE_WITHIN_S)
    return final.parent / name[0]


def _prepare(final: Path, d: Dist, load: Callable[[], tuple[list, list, str]],
             encode: Callable[[list, Path], None], merge: Callable[[list[Path], Path], None], parts: dict) -> float:
    """Make the folder `final` unless it exists: every rank encodes its share of each split into a
    shard, rank 0 merges them and renames the temporary folder last. Returns the seconds spent
    (0 when the folder existed)."""
    found = [final.is_dir()]
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
        if stale:
            print(f"note: {len(stale)} unfinished preparation(s) of this data in {final.parent} "
                  f"({stale[0].name}...): interrupted, or running now elsewhere; delete them when not")
    tmp = _temporary_folder(final, d)
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
        (tmp / "meta.json").write_text(json.dumps({"fingerprint": final.name, "parts": parts,
                                                   "data_summary": data_summary, "prepare_seconds": seconds},
                                                  indent=2, default=str))
        try:
            tmp.rename(final)  # last: only a complete preparation carries the fingerprint's name
        except OSError:  # another job finished the same folder first: theirs is the same
            if not final.is_dir():
                raise
            shutil.rmtree(tmp)
    _wait_for([final / "meta.json"])
    return time.perf_counter() - t0


def prepare_sft(cfg, tokenizer: Tokenizer, d: Dist, load: Callable[[], tuple[list, list, str]]) -> Prepared:
    """The prepared rows of an SFT config (PreparedRows): from the cache, or prepared now (every
    rank its share). load() -> (train conversations, eval conversations, LoadStats summary), called
    only when the cache misses."""
    fp, parts = sft_fingerprint(cfg, tokenizer)
    final = cache_root(cfg.data_cache) / fp
    train_on = cfg.train_on if cfg.loss_mask else "all"
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    seconds = _prepare(
        final, d, load,
        encode=lambda convs, out: encode_shard(convs, out, tokenizer, cfg.chat_template, train_on, cfg.system_prompt,
                                               cfg.seq_len, cfg.overflow),
        merge=lambda shards, out: merge_shards(shards, out, cfg.seq_len, cfg.packing, cfg.overflow, pad_id,
                                               token_dtype(tokenizer.vocab_size)),
        parts=parts)
    prepared = open_prepared(final, PreparedRows, seconds)
    for split in (prepared.train, prepared.eval):
        if split is not None:
            split.isolate = cfg.isolate_documents
    return prepared


def prepare_dpo(cfg, tokenizer: Tokenizer, d: Dist, load: Callable[[], tuple[list, list, str]]) -> Prepared:
    """The encoded pairs of a DPO config (PreparedPairs), as prepare_sft; load() gives preferences."""
    fp, parts = dpo_fingerprint(cfg, tokenizer)
    final = cache_root(cfg.data_cache) / fp
    seconds = _prepare(
        final, d, load,
        encode=lambda prefs, out: encode_pair_shard(prefs, out, tokenizer, cfg.chat_template, cfg.max_len,
                                                    cfg.max_prompt_len, cfg.system_prompt),
        merge=lambda shards, out: merge_pair_shards(shards, out, token_dtype(tokenizer.vocab_size)),
        parts=parts)
    return open_prepared(final, PreparedPairs, seconds)


if __name__ == "__main__":  # python -m lion_min.prepare: cli.prepare_main (it knows the stages)
    from lion_min.cli import prepare_main, run_cli

    run_cli(prepare_main)
