"""Packing: tokenized examples -> fixed-length rows for the model and the losses.

Each example is the chat template's `ChatEncoding(input_ids, loss_mask)` (or any such pair);
loss_mask[i] says token i is a training target, i.e. is predicted from position i - 1 (so
loss_mask[0] is never used). A row is seq_len tokens holding one or more whole examples
("documents") followed by padding, as four (num_rows, seq_len) int64 arrays:

    tokens     the token ids; pad_id after the last document
    positions  RoPE positions, restarting at 0 for each document; 0 on padding
    doc_ids    index of the example in the list given to pack(); -1 on padding
    targets    the next token of the same document where it trains, else IGNORE_INDEX; the last
               token of a document and all padding are IGNORE_INDEX, so nothing is ever predicted
               across a document boundary

Attention keeps documents apart using doc_ids (attention.py), so packed documents do not see
each other and the result matches running each example on its own.
"""

import bisect
from dataclasses import dataclass

import numpy as np
import torch

from lion_min.core.chat import ChatEncoding
from lion_min.core.losses import IGNORE_INDEX

FIELDS = ("tokens", "positions", "doc_ids", "targets")


@dataclass
class Packed:
    rows: dict[str, np.ndarray]
    """FIELDS -> (num_rows, seq_len) int64 arrays (see the module docstring)."""
    num_examples: int
    """Examples given to pack()."""
    num_packed: int
    """Examples placed in rows (truncated ones included); num_packed + num_dropped == num_examples."""
    num_truncated: int
    """Examples longer than seq_len cut to their first seq_len tokens (overflow="truncate")."""
    num_dropped: int
    """Examples longer than seq_len left out (overflow="drop")."""
    real_tokens: int
    """Example tokens in the rows (everything but padding)."""
    row_tokens: int
    """num_rows * seq_len."""
    target_tokens: int
    """Positions whose target is not IGNORE_INDEX."""

    @property
    def efficiency(self) -> float:
        """Fraction of row tokens that are real (not padding)."""
        return self.real_tokens / self.row_tokens if self.row_tokens else 0.0


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of item indices, each bin's lengths summing to <= capacity (every length <= capacity).

    Longest item first; each item goes into the bin with the least space left that still fits it
    (ties: the bin opened first), or a new bin. Deterministic for a given input: the sort is stable
    (equal lengths keep input order). Each bin lists its items in input order.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (space left, bin index); full bins leave the list
    for i in order:
        j = bisect.bisect_left(free, (lengths[i], -1))  # first bin with space >= length
        if j == len(free):
            bins.append([])
            space, b = capacity, len(bins) - 1
        else:
            space, b = free.pop(j)
        bins[b].append(i)
        if space - lengths[i] > 0:
            bisect.insort(free, (space - lengths[i], b))
    return [sorted(b) for b in bins]


def kept_lengths(lengths, seq_len: int, overflow: str) -> np.ndarray:
    """How many tokens of each example go into rows: all, seq_len (overflow="truncate": the first
    seq_len), or 0 (overflow="drop")."""
    if overflow not in ("truncate", "drop"):
        raise ValueError(f"overflow must be 'truncate' or 'drop', not {overflow!r}")
    full = np.asarray(lengths, dtype=np.int64)
    return np.where(full > seq_len, 0 if overflow == "drop" else seq_len, full)


def plan_rows(lengths, seq_len: int, mode: str = "pack", overflow: str = "truncate"):
    """Which examples share which row, from their lengths alone (pack() and the data cache both lay
    rows out by it). Returns (rows: example indices per row in input order, each example's kept
    length (0: dropped), number truncated, number dropped)."""
    if mode not in ("pack", "pad"):
        raise ValueError(f"mode must be 'pack' or 'pad', not {mode!r}")
    kept_len = kept_lengths(lengths, seq_len, overflow)
    too_long = int((np.asarray(lengths, dtype=np.int64) > seq_len).sum())
    kept = np.flatnonzero(kept_len > 0)
    if mode == "pack":
        rows = [kept[b].tolist() for b in best_fit_decreasing(kept_len[kept].tolist(), seq_len)]
    else:
        rows = [[i] for i in kept.tolist()]
    return rows, kept_len, too_long * (overflow == "truncate"), too_long * (overflow == "drop")


def pack(
    examples: list[ChatEncoding],
    seq_len: int,
    pad_id: int,
    mode: str = "pack",
    overflow: str = "truncate",
    isolate: bool = True,
) -> Packed:
    """Lay examples (ids, loss mask) out in rows of exactly seq_len tokens.

    mode: "pack" fills rows with several examples (best-fit-decreasing); "pad" puts one example per
        row, right-padded.
    isolate: False is the paper's ablation, naive packing: the documents of a row share one doc id
        (the row's first), so they attend to the ones before them, and positions run on across
        the row instead of restarting. Targets still never cross a document boundary.
    overflow: what to do with an example longer than seq_len: "truncate" keeps its first seq_len
        tokens (the cut-off token is not a target), "drop" leaves it out. Both are counted.
    """
    for i, (ids, mask) in enumerate(examples):
        if len(ids) != len(mask) or not ids:
            raise ValueError(f"example {i}: {len(ids)} ids and {len(mask)} mask entries (need equal, > 0)")
    row_docs, length, truncated, dropped = plan_rows([len(ids) for ids, _ in examples], seq_len, mode, overflow)

    R = len(row_docs)
    rows = {
        "tokens": np.full((R, seq_len), pad_id, dtype=np.int64),
        "positions": np.zeros((R, seq_len), dtype=np.int64),
        "doc_ids": np.full((R, seq_len), -1, dtype=np.int64),
        "targets": np.full((R, seq_len), IGNORE_INDEX, dtype=np.int64),
    }
    for r, docs in enumerate(row_docs):
        start = 0
        for i in docs:
            n = length[i]
            ids = np.asarray(examples[i][0][:n], dtype=np.int64)  # (n,)
            trains = np.asarray(examples[i][1][1:n], dtype=bool)  # (n-1,)
            span = slice(start, start + n)
            rows["tokens"][r, span] = ids
            # isolate=False (the ablation): one document per row as far as attention and RoPE know.
            rows["positions"][r, span] = np.arange(n) if isolate else np.arange(start, start + n)
            rows["doc_ids"][r, span] = i if isolate else docs[0]
            # Position t predicts token t+1 of the same document; the document's last token
            # keeps IGNORE_INDEX, so no target crosses into the next document or padding.
            rows["targets"][r, start : start + n - 1] = np.where(trains, ids[1:], IGNORE_INDEX)
            start += n

    return Packed(
        rows=rows,
        num_examples=len(examples),
        num_packed=sum(map(len, row_docs)),
        num_truncated=truncated,
        num_dropped=dropped,
        real_tokens=int(length.sum()),
        row_tokens=R * seq_len,
        target_tokens=int((rows["targets"] != IGNORE_INDEX).sum()),
    )


def collate(rows: dict[str, np.ndarray], device=None) -> dict[str, torch.Tensor]:
    """Rows (all of Packed.rows, or a selection like {k: v[idx]}) -> (B, T) int64 tensors on `device`."""
    return {k: torch.from_numpy(np.ascontiguousarray(rows[k])).to(device) for k in FIELDS}
