"""Stage 1: supervised fine-tuning with packing and loss masking.

Conversations are rendered with the chat template and tokenized once (chat.encode_chat), then
packed into rows of seq_len tokens (packing.pack): each document keeps its own positions and
attends only to itself, and only the assistant replies (with their end-of-turn token) are
targets unless loss_mask is off. The objective is the token mean of -log p over every target of
the global batch (losses.sft_loss), whatever the micro-batching or world size.
"""

import dataclasses
import json
from pathlib import Path
from typing import Callable

import numpy as np

from lion_min.core.chat import encode_chats, export_jinja, with_system
from lion_min.core.packing import FIELDS, Packed, kept_lengths, pack, plan_rows
from lion_min.core.parallel import Dist
from lion_min.core.sft import pack_conversations, sft_objective
from lion_min.formats.data import load_conversations, train_eval_split
from lion_min.formats.tokenizer import Tokenizer
from lion_min.run.batches import Batches, eval_size, opening_summary, row_batches
from lion_min.run.config import ConfigError, SFTConfig, check_values, format_config, parse_columns
from lion_min.run.data_cache import (
    CODE,
    SHARD_CHUNK,
    Prepared,
    Sequences,
    ShardWriter,
    cache_key,
    cache_root,
    concat_shards,
    data_identity,
    input_names,
    open_prepared,
    prepare_folder,
    token_dtype,
    tokenizer_identity,
    uses_seed,
)
from lion_min.run.loop import TrainResult, train
from lion_min.run.model_checks import check_seq_len, read_model_folder
from lion_min.run.policy import export_dtype, load_policy
from lion_min.run.run_folder import claim, start_run


def check_config(cfg: SFTConfig):
    """The flags' ranges and choices (again, for a config built in code), then what SFT needs."""
    check_values(cfg)
    if not cfg.model or not cfg.data:
        raise ConfigError(f"--{'model' if not cfg.model else 'data'} is required "
                          f"(run with no flags at all for the built-in demo)")


def sft_rows(convs, tokenizer, cfg: SFTConfig, what: str = "--data") -> Packed:
    """Conversations -> packed (or padded) rows, as the config says (core/sft.py:pack_conversations).
    Rows with nothing to train on are refused, saying how many conversations lost their replies and why."""
    packed = pack_conversations(convs, tokenizer, cfg)
    check_targets(packed, cfg, what)
    return packed


def check_targets(packed: Packed, cfg: SFTConfig, what: str = "--data"):
    """Rows with nothing to train on are refused, saying how many conversations lost their replies."""
    if packed.target_tokens == 0:
        why = "dropped by --overflow=drop" if cfg.overflow == "drop" else "cut off by truncation"
        raise ConfigError(f"{what}: no target tokens to train on: {packed.num_examples} of {packed.num_examples} "
                          f"conversations have no reply token within --seq_len={cfg.seq_len} ({why}; "
                          f"{packed.num_dropped} dropped, {packed.num_truncated} truncated); raise --seq_len")


def eval_batches(rows, cfg: SFTConfig, d) -> Batches:
    """All eval rows (Packed.rows or prepare.PreparedRows) in one pass, in order; rows beyond a
    multiple of micro_batch_size * world are left out (a batch of n takes the first n)."""
    n = eval_size(len(rows["tokens"]) if isinstance(rows, dict) else len(rows), cfg.micro_batch_size, d, "rows")
    return row_batches(rows, n, cfg.micro_batch_size, 1, 0, d, shuffle=False)


def packing_line(p: Packed, num_rows: int, seq_len: int) -> str:
    """The packing summary in one line (the counters of a Packed); python -m lion_min prepare prints it."""
    return (f"packed {p.num_examples} conversations into {num_rows} rows of {seq_len} tokens: efficiency "
            f"{p.efficiency:.3f}, {p.target_tokens} target tokens, {p.num_truncated} truncated, "
            f"{p.num_dropped} dropped")


def load_sft_data(cfg: SFTConfig) -> tuple[list, list, str]:
    """(train conversations, eval conversations, the LoadStats summary) as the config says."""
    columns = parse_columns(cfg.columns)
    convs, stats = load_conversations(cfg.data, schema=cfg.schema, columns=columns, skip_bad=cfg.skip_bad,
                                      seed=cfg.seed)
    if cfg.eval_data:
        eval_convs, _ = load_conversations(cfg.eval_data, schema=cfg.schema, columns=columns,
                                           skip_bad=cfg.skip_bad, seed=cfg.seed)
    else:
        convs, eval_convs = train_eval_split(convs, cfg.eval_fraction, cfg.seed)
    return convs, eval_convs, stats.summary()


# --- prepared data: the packed rows in the data cache (lion_min/run/data_cache.py) ----------------------


def sft_cache_key(cfg, tokenizer: Tokenizer) -> tuple[str, dict]:
    """(fingerprint, the parts it hashes) of an SFT config's prepared rows."""
    parts = {
        "stage": "sft", "data": data_identity(cfg.data), "eval_data": data_identity(cfg.eval_data),
        "eval_fraction": cfg.eval_fraction, "schema": cfg.schema, "columns": cfg.columns, "skip_bad": cfg.skip_bad,
        "seed": cfg.seed if uses_seed(cfg) else None, "tokenizer": tokenizer_identity(tokenizer),
        "chat_template": cfg.chat_template, "system_prompt": cfg.system_prompt, "seq_len": cfg.seq_len,
        "packing": cfg.packing, "train_on": cfg.train_on if cfg.loss_mask else "all", "overflow": cfg.overflow,
    }
    return cache_key(parts, CODE + ("stages/sft.py",)), parts


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


def encode_shard(convs: list, out: Path, tokenizer: Tokenizer, template: str, train_on: str, system_prompt,
                 seq_len: int, overflow: str) -> None:
    """Encode `convs` (encode_chats, in batches) into a shard: their kept tokens and masks, and per
    conversation the kept tokens, the full length and the target tokens."""
    w = ShardWriter(out, token_dtype(tokenizer.vocab_size))
    kept, full, targets = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for s in range(0, len(convs), SHARD_CHUNK):
        batch = [with_system(c, system_prompt) for c in convs[s : s + SHARD_CHUNK]]
        b = encode_chats(tokenizer, batch, template, train_on)
        n = np.diff(b.starts)  # (conversations,) full lengths
        limit = kept_lengths(n, seq_len, overflow)  # as pack() keeps them
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
    by pack()'s own plan (packing.plan_rows) from the conversations' lengths. Returns its meta."""
    lengths = concat_shards(shards, out)
    kept, full, targets = lengths["kept"], lengths["full"], lengths["targets"]
    docs = np.concatenate([[0], np.cumsum(kept)]).astype(np.int64)
    row_list, _, truncated, dropped = plan_rows(full, seq_len, "pack" if packing else "pad", overflow)
    rows = np.concatenate([[0], np.cumsum([len(r) for r in row_list])]).astype(np.int64)
    row_docs = np.concatenate(row_list).astype(np.int64) if row_list else np.zeros(0, np.int64)
    cum = np.concatenate([[0], np.cumsum(targets[row_docs])])
    row_targets = (cum[rows[1:]] - cum[rows[:-1]]).astype(np.int64)
    for name, arr in (("docs", docs), ("rows", rows), ("row_docs", row_docs), ("row_targets", row_targets)):
        np.save(out / f"{name}.npy", arr)
    counts = {
        "num_examples": len(kept), "num_packed": len(row_docs),
        "num_truncated": truncated, "num_dropped": dropped,
        "real_tokens": int(kept.sum()), "row_tokens": (len(rows) - 1) * seq_len,
        "target_tokens": int(row_targets.sum()),
    }
    meta = {"seq_len": seq_len, "pad_id": pad_id, "token_dtype": dtype.name, "counts": counts}
    (out / "split.json").write_text(json.dumps(meta, indent=2))
    return meta


def prepare_sft(cfg, tokenizer: Tokenizer, d: Dist, load: Callable[[], tuple[list, list, str]]) -> Prepared:
    """The prepared rows of an SFT config (PreparedRows): from the cache, or prepared now (every
    rank its share). load() -> (train conversations, eval conversations, LoadStats summary), called
    only when the cache misses."""
    fp, parts = sft_cache_key(cfg, tokenizer)
    final = cache_root(cfg.data_cache) / fp
    train_on = cfg.train_on if cfg.loss_mask else "all"
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    seconds = prepare_folder(
        final, d, load,
        encode=lambda convs, out: encode_shard(convs, out, tokenizer, cfg.chat_template, train_on, cfg.system_prompt,
                                               cfg.seq_len, cfg.overflow),
        merge=lambda shards, out: merge_shards(shards, out, cfg.seq_len, cfg.packing, cfg.overflow, pad_id,
                                               token_dtype(tokenizer.vocab_size)),
        parts=parts, names=input_names(cfg))
    prepared = open_prepared(final, PreparedRows, seconds, input_names(cfg))
    for split in (prepared.train, prepared.eval):
        if split is not None:
            split.isolate = cfg.isolate_documents
    return prepared


def run(cfg: SFTConfig) -> TrainResult:
    check_config(cfg)
    d, dtype = start_run(cfg)
    if d.main:
        print(f"config:\n{format_config(cfg)}")
    # The data before the weights (as in DPO): a bad record deep in a file, or too little data, is
    # found without waiting for the model to load. Encoding needs only the tokenizer.
    start = read_model_folder(cfg)
    check_seq_len(cfg.seq_len, start.args, default=SFTConfig.seq_len)
    tokenizer = start.tokenizer
    cfg = dataclasses.replace(cfg, chat_template=start.template)  # --chat_template=auto named
    if cfg.data_cache == "off":  # every rank encodes and packs everything, in memory
        convs, eval_convs, data_summary = load_sft_data(cfg)
        packed = sft_rows(convs, tokenizer, cfg)
        rows, num_rows = packed.rows, len(packed.rows["tokens"])
        eval_rows = sft_rows(eval_convs, tokenizer, cfg, "eval data").rows if eval_convs else None
    else:  # prepared once on disk (or now, every rank its share); each rank reads its rows
        prep = prepare_sft(cfg, tokenizer, d, load=lambda: load_sft_data(cfg))
        packed, rows = prep.train.counts, prep.train
        num_rows, eval_rows, data_summary = len(prep.train), prep.eval, prep.data_summary
        check_targets(packed, cfg)
        if d.main:
            print(f"data: {prep.how()}")
    batches = row_batches(rows, cfg.batch_size, cfg.micro_batch_size, cfg.epochs, cfg.seed, d)
    evals = eval_batches(eval_rows, cfg, d) if eval_rows is not None else None
    model, _, tokenizer, folder, cfg = load_policy(cfg, d, dtype, start)
    exported = export_dtype(cfg, folder)
    summary = {
        "data": data_summary,
        "conversations": packed.num_examples, "rows": num_rows,
        "packing_efficiency": packed.efficiency, "truncated": packed.num_truncated, "dropped": packed.num_dropped,
        "target_tokens": packed.target_tokens, "rows_dropped_last_batch": batches.dropped_items,
    }
    if d.main:
        print(opening_summary(cfg, batches, "rows", {
            "data": data_summary.removeprefix("data: "),
            "rows": f"{num_rows} rows of {cfg.seq_len} tokens from {packed.num_examples} "
                    f"conversations ({packed.num_truncated} truncated, {packed.num_dropped} dropped), "
                    f"packing efficiency {packed.efficiency:.3f}",
            "target tokens": f"{packed.target_tokens:,}",
        }, eval_items=evals.num_items if evals else 0, export_dtype=exported, tokenizer=tokenizer))
    inputs = {"--model": folder, "--data": cfg.data, "--eval_data": cfg.eval_data}
    with claim(cfg, d, inputs) as record:
        return train(cfg, model, sft_objective, batches, d, eval_batches=evals, tokenizer=tokenizer,
                     chat_template=export_jinja(cfg.chat_template, cfg.system_prompt), seq_len=cfg.seq_len,
                     export_dtype=exported, summary=summary, run_record=record)
