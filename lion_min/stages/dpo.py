"""Stage 2: offline DPO on preference pairs (and the DPO run each online round reuses).

A preference pair becomes two token sequences, prompt + chosen and prompt + rejected, rendered by
the chat template; only the final response and its end-of-turn token are scored. The pairs of a
micro-batch are packed together into rows (chosen = example 2i, rejected = 2i + 1), so one policy
forward scores both sides with little padding, and `sequence_logps` sums each side's tokens.

The reference is the starting model (or --ref_model): either a frozen copy kept in memory, or
(--precompute_ref=true, the LION recipe) its log-probabilities computed once up front and stored
in out_dir, after which no reference model is held. The loss is losses.dpo_loss (DPO Eq. 7,
cDPO, IPO, hinge), averaged over the pairs of the global batch.
"""

import collections.abc
import dataclasses
import hashlib
import json
from collections.abc import Sequence
from itertools import chain
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lion_min.core.chat import export_jinja
from lion_min.core.dpo import EncodedPair, PairStats, compute_ref_logps, encode_pairs, make_dpo_objective, pair_micro
from lion_min.core.parallel import Dist
from lion_min.formats.data import load_preferences, train_eval_split
from lion_min.formats.hf import hash_files
from lion_min.formats.hf_config import read_config, resolve_path
from lion_min.formats.tokenizer import Tokenizer
from lion_min.run.batches import Batches, eval_size, opening_summary
from lion_min.run.config import ConfigError, DPOConfig, check_values, format_config
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
from lion_min.run.faults import raise_if_any
from lion_min.run.loop import TrainResult, train
from lion_min.run.model_checks import ModelFolder, check_same_architecture, check_seq_len, read_model_folder
from lion_min.run.policy import build_from_folder, export_dtype, load_policy
from lion_min.run.resume import WRITE_ERRORS, CheckpointWriteError, one_line
from lion_min.run.run_folder import claim, start_run


def check_config(cfg: DPOConfig):
    """The flags' ranges and choices (again, for a config built in code), then what DPO needs."""
    check_values(cfg)
    if not cfg.model:
        raise ConfigError("--model is required (run with no flags at all for the built-in demo)")


# --- prepared data: the encoded pairs in the data cache (lion_min/run/data_cache.py) --------------------


def dpo_cache_key(cfg, tokenizer: Tokenizer) -> tuple[str, dict]:
    """(fingerprint, the parts it hashes) of a DPO config's encoded pairs."""
    parts = {
        "stage": "dpo", "data": data_identity(cfg.data), "eval_data": data_identity(cfg.eval_data),
        "eval_fraction": cfg.eval_fraction, "schema": cfg.schema, "skip_bad": cfg.skip_bad,
        "seed": cfg.seed if uses_seed(cfg) else None, "tokenizer": tokenizer_identity(tokenizer),
        "chat_template": cfg.chat_template, "system_prompt": cfg.system_prompt, "max_len": cfg.max_len,
        "max_prompt_len": cfg.max_prompt_len,
    }
    return cache_key(parts, CODE + ("stages/dpo.py", "core/dpo.py")), parts


class PreparedPairs(Sequences, collections.abc.Sequence):
    """One split's DPO pairs on disk: pairs[i] is EncodedPair(sequence 2i, sequence 2i + 1), as
    encode_pairs made them; a list of those for a slice."""

    def __init__(self, folder: Path):
        super().__init__(folder)
        self.stats = self.meta["stats"]
        """PairStats of the encoding, as a dict."""

    def __len__(self) -> int:
        return (len(self.docs) - 1) // 2

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(f"pair {i} of {len(self)}")
        i = int(i) % len(self)
        return EncodedPair(chosen=self.example(2 * i), rejected=self.example(2 * i + 1))


def encode_pair_shard(prefs: list, out: Path, tokenizer: Tokenizer, template: str, max_len: int,
                      max_prompt_len: int, system_prompt) -> None:
    """encode_pairs on `prefs` (in chunks) into a shard: each kept pair's chosen then rejected
    sequence, their lengths, and the pair counts."""
    w = ShardWriter(out, token_dtype(tokenizer.vocab_size))
    lengths, total = [], PairStats()
    for s in range(0, len(prefs), SHARD_CHUNK):
        pairs, st = encode_pairs(prefs[s : s + SHARD_CHUNK], tokenizer, template, max_len, max_prompt_len,
                                 system_prompt)
        sides = [side for p in pairs for side in (p.chosen, p.rejected)]
        w.write(list(chain.from_iterable(x.input_ids for x in sides)), list(chain.from_iterable(x.loss_mask for x in sides)))
        lengths += [len(x.input_ids) for x in sides]
        total = PairStats(*(a + b for a, b in zip(dataclasses.astuple(total), dataclasses.astuple(st))))
    w.close(lengths=np.asarray(lengths, dtype=np.int64), stats=np.asarray(dataclasses.astuple(total), dtype=np.int64))


def merge_pair_shards(shards: list[Path], out: Path, dtype: np.dtype) -> dict:
    arrays = concat_shards(shards, out)
    np.save(out / "docs.npy", np.concatenate([[0], np.cumsum(arrays["lengths"])]).astype(np.int64))
    names = [f.name for f in dataclasses.fields(PairStats)]
    stats = dict(zip(names, map(int, arrays["stats"].reshape(-1, len(names)).sum(0))))
    meta = {"token_dtype": dtype.name, "stats": stats}
    (out / "split.json").write_text(json.dumps(meta, indent=2))
    return meta


def prepare_dpo(cfg, tokenizer: Tokenizer, d: Dist, load: Callable[[], tuple[list, list, str]]) -> Prepared:
    """The encoded pairs of a DPO config (PreparedPairs), as prepare_sft; load() gives preferences."""
    fp, parts = dpo_cache_key(cfg, tokenizer)
    final = cache_root(cfg.data_cache) / fp
    seconds = prepare_folder(
        final, d, load,
        encode=lambda prefs, out: encode_pair_shard(prefs, out, tokenizer, cfg.chat_template, cfg.max_len,
                                                    cfg.max_prompt_len, cfg.system_prompt),
        merge=lambda shards, out: merge_pair_shards(shards, out, token_dtype(tokenizer.vocab_size)),
        parts=parts, names=input_names(cfg))
    return open_prepared(final, PreparedPairs, seconds, input_names(cfg))


def pair_batches(pairs, batch_size, micro_batch_size, epochs, seed, d: Dist, max_len, pad_id,
                 ref_logps=None, shuffle=True) -> Batches:
    """DPO batches: batch_size pairs per optimizer step; the normaliser is the number of pairs."""
    return Batches(len(pairs), batch_size, micro_batch_size, epochs, seed, d,
                   make_micro=lambda sel: pair_micro(pairs, sel, max_len, pad_id, d.device, ref_logps),
                   norm=lambda sel: float(len(sel)), shuffle=shuffle, unit="pairs")


# --- precomputed reference ------------------------------------------------------------------------


def reference_fingerprint(pairs: Sequence[EncodedPair], ref_folder: Path, template: str) -> str:
    """sha256 of the scored sequences (so data, tokenizer, template and truncation), the template
    name, and the reference checkpoint's config and weight files (every byte)."""
    h = hashlib.sha256()
    h.update(template.encode())
    for p in pairs:
        for ids, mask in (p.chosen, p.rejected):
            h.update(np.asarray(ids, dtype=np.int64).tobytes())
            h.update(np.asarray(mask, dtype=np.bool_).tobytes())
    hash_files(h, sorted(ref_folder.glob("*.safetensors")) + [ref_folder / "config.json"])
    return h.hexdigest()


def load_or_compute_ref_logps(path: Path, fp: str, compute, d: Dist) -> torch.Tensor:
    """Reuse `path` only if its fingerprint matches; refuse a stale one rather than overwrite it.
    An unreadable one (cut short by a crash or a full disk) is computed again, with a note."""
    if path.is_file():
        try:
            with safe_open(str(path), "pt") as f:
                stored = (f.metadata() or {}).get("fingerprint")
                ref = f.get_tensor("ref_logps") if stored == fp else None
        except (SafetensorError, OSError) as e:
            if d.main:
                print(f"note: {path} is unreadable ({one_line(e)}); computing the reference log-probs again")
        else:
            if stored != fp:
                raise ValueError(f"{path}: reference log-probs were computed for other data, reference model or "
                                 f"template (fingerprint {stored} != {fp}); delete the file to recompute")
            return ref
    ref = compute()
    error = None
    if d.main:
        tmp = path.with_name(path.name + ".tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({"ref_logps": ref.contiguous()}, str(tmp), metadata={"fingerprint": fp})
            tmp.rename(path)
        except WRITE_ERRORS as e:
            tmp.unlink(missing_ok=True)
            error = CheckpointWriteError(f"{path}: cannot write the reference log-probs ({one_line(e)})")
    raise_if_any(error, d)
    return ref


# --- the stage ------------------------------------------------------------------------------------


def reference(cfg: DPOConfig, d, args, dtype, ref_folder: Path, pad_id: int, pairs: Sequence[EncodedPair],
              eval_pairs: Sequence[EncodedPair], policy=None):
    """(frozen reference model, None, None), or with --precompute_ref (None, its log-probs of the
    training pairs, of the eval pairs), computed once and stored in out_dir under a fingerprint.

    Step 1 compares policy and reference on the same rows through the same code: the reference is
    built as the policy is (compiled when it is), the precomputed one scores the training pairs in
    the micro-batches of the first epoch (Batches.first_pass), and when the reference is the starting
    model, `policy` (not yet trained) scores them itself. On the CPU in fp32 step 1's rewards are then
    exactly 0 (README "Offline DPO" says where they cannot be)."""

    built = []  # the reference model, built at most once (and only when a log-prob file is missing)

    def make_ref():
        if not built:
            built.append(build_from_folder(ref_folder, args, d, dtype, attn_backend=cfg.attn_backend,
                                           compile=cfg.compile).requires_grad_(False).eval())
        return built[0]

    if not cfg.precompute_ref:
        return make_ref(), None, None

    def precomputed(which: Sequence[EncodedPair], name: str) -> torch.Tensor:
        def compute():
            mine = None  # (the eval pairs: in their own order)
            if which is pairs:
                mine = pair_batches(pairs, cfg.batch_size, cfg.micro_batch_size, cfg.epochs, cfg.seed, d, cfg.max_len,
                                    pad_id).first_pass()
            scorer = policy if policy is not None else make_ref()
            try:
                return compute_ref_logps(scorer, which, d, cfg.micro_batch_size, cfg.max_len, pad_id, mine)
            finally:
                scorer.train(policy is not None)  # (the policy trains next)

        fp = reference_fingerprint(which, ref_folder, cfg.chat_template)
        return load_or_compute_ref_logps(Path(cfg.out_dir) / name, fp, compute, d)

    ref_logps = precomputed(pairs, "reference_logps.safetensors")
    eval_ref = precomputed(eval_pairs, "reference_logps_eval.safetensors") if eval_pairs else None
    return None, ref_logps, eval_ref


def train_pairs(cfg: DPOConfig, d, pairs: Sequence[EncodedPair], eval_pairs: Sequence[EncodedPair], dtype,
                summary: dict, inputs: dict, start: Optional[ModelFolder] = None) -> TrainResult:
    """Policy, reference, batches, then the shared loop. The online stage calls it for each round.
    `inputs` (flag -> path) are what the run folder must not overlap and what a resume must match;
    `start`: --model's folder, when the caller has read it (load_policy)."""
    model, args, tokenizer, folder, cfg = load_policy(cfg, d, dtype, start)
    check_seq_len(cfg.max_len, args, "max_len", default=DPOConfig.max_len)
    exported = export_dtype(cfg, folder)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    ref_folder = resolve_path(cfg.ref_model, cfg.revision) if cfg.ref_model else folder
    if ref_folder != folder:  # against --model's own config: both grow alike for new chat tokens (load_policy)
        check_same_architecture(ref_folder, read_config(folder))
    with claim(cfg, d, inputs | {"--model": folder, "--ref_model": ref_folder}) as record:
        ref_model, ref_logps, eval_ref = reference(cfg, d, args, dtype, ref_folder, pad_id, pairs, eval_pairs,
                                                   policy=model if ref_folder == folder else None)
        batches = pair_batches(pairs, cfg.batch_size, cfg.micro_batch_size, cfg.epochs, cfg.seed, d, cfg.max_len,
                               pad_id, ref_logps)
        eval_batches = None
        n_eval = eval_size(len(eval_pairs), cfg.micro_batch_size, d, "pairs") if eval_pairs else 0
        if n_eval:
            eval_batches = pair_batches(eval_pairs[:n_eval], n_eval, cfg.micro_batch_size, 1, 0, d, cfg.max_len,
                                        pad_id, eval_ref[:n_eval] if eval_ref is not None else None, shuffle=False)
        objective = make_dpo_objective(cfg.beta, cfg.label_smoothing, cfg.loss_type, ref_model)
        summary = summary | {"pairs": len(pairs), "pairs_dropped_last_batch": batches.dropped_items}
        if d.main:
            scored = sum(sum(p.chosen.loss_mask) + sum(p.rejected.loss_mask) for p in pairs)
            pairs_line = f"{len(pairs)} pairs"
            if "prompt_truncated" in summary:  # offline DPO (an online round has printed its own)
                pairs_line += (f" ({summary['prompt_truncated']} with the prompt truncated, "
                               f"{summary['response_truncated']} with a response truncated, {summary['dropped']} "
                               f"dropped: nothing left to score, {summary['identical']} dropped: chosen == rejected)")
            lines = {"data": summary["data"].removeprefix("data: ")} if "data" in summary else {}
            print(opening_summary(cfg, batches, "pairs", lines | {
                "pairs": pairs_line, "target tokens": f"{scored:,} scored response tokens (chosen + rejected)",
            }, eval_items=n_eval, export_dtype=exported, tokenizer=tokenizer))
        return train(cfg, model, objective, batches, d, eval_batches=eval_batches, tokenizer=tokenizer,
                     chat_template=export_jinja(cfg.chat_template, cfg.system_prompt), seq_len=cfg.max_len,
                     export_dtype=exported, summary=summary, run_record=record)


def run(cfg: DPOConfig) -> TrainResult:
    check_config(cfg)
    if not cfg.data:
        raise ConfigError("--data is required (run with no flags at all for the built-in demo)")
    d, dtype = start_run(cfg)
    if d.main:
        print(f"config:\n{format_config(cfg)}")
    start = read_model_folder(cfg)
    tokenizer = start.tokenizer
    cfg = dataclasses.replace(cfg, chat_template=start.template)  # --chat_template=auto named
    if cfg.data_cache == "off":  # every rank encodes everything, in memory
        prefs, eval_prefs, data_summary = load_dpo_data(cfg)
        pairs, pst = encode_pairs(prefs, tokenizer, cfg.chat_template, cfg.max_len, cfg.max_prompt_len,
                                  cfg.system_prompt)
        eval_pairs, _ = encode_pairs(eval_prefs, tokenizer, cfg.chat_template, cfg.max_len, cfg.max_prompt_len,
                                     cfg.system_prompt)
    else:  # encoded once on disk (or now, every rank its share); each micro-batch reads its pairs
        prep = prepare_dpo(cfg, tokenizer, d, load=lambda: load_dpo_data(cfg))
        pairs, eval_pairs, data_summary = prep.train, prep.eval or [], prep.data_summary
        pst = PairStats(**prep.train.stats)
        if d.main:
            print(f"data: {prep.how()}")
    check_enough_pairs(len(pairs), pst, cfg)
    return train_pairs(cfg, d, pairs, eval_pairs, dtype, {"data": data_summary, **dataclasses.asdict(pst)},
                       inputs={"--data": cfg.data, "--eval_data": cfg.eval_data}, start=start)


def check_enough_pairs(kept: int, st: PairStats, cfg: DPOConfig):
    """Fewer pairs kept than one batch because encoding dropped them: say why they were dropped."""
    why = [f"{n} pairs dropped: {reason}" for n, reason in ((st.identical, "identical sides (chosen == rejected)"),
                                                            (st.dropped, "nothing left to score after truncation"))
           if n]
    if kept < cfg.batch_size and why:
        raise ConfigError(f"--data={cfg.data}: only {kept} of {st.pairs} pairs kept for --batch_size={cfg.batch_size}; "
                          f"{', '.join(why)}")


def load_dpo_data(cfg: DPOConfig) -> tuple[list, list, str]:
    """(train preferences, eval preferences, the LoadStats summary) as the config says."""
    prefs, stats = load_preferences(cfg.data, schema=cfg.schema, skip_bad=cfg.skip_bad, seed=cfg.seed)
    if cfg.eval_data:
        eval_prefs, _ = load_preferences(cfg.eval_data, schema=cfg.schema, skip_bad=cfg.skip_bad, seed=cfg.seed)
    else:
        prefs, eval_prefs = train_eval_split(prefs, cfg.eval_fraction, cfg.seed)
    return prefs, eval_prefs, stats.summary()
