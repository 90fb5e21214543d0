"""Online DPO's method, one round: sample from the current policy, judge, best vs worst, pairs.

Each rank samples n_samples responses for its share of the prompts (sample.generate, a batched
KV-cache sampler); the judge scores them (core/judge.py); a prompt whose samples are all
identical, or whose best and worst scores tie, is dropped; otherwise chosen = best and
rejected = worst, as the sampled tokens themselves (no re-tokenization of their text). The pairs
then train with offline DPO's objective (core/dpo.py) from the policy that sampled them.
"""

import torch.distributed as dist

from lion_min.core.chat import ChatEncoding, encode_prompt, stop_token_ids, with_system
from lion_min.core.dpo import EncodedPair, truncate
from lion_min.core.judge import Judge
from lion_min.core.parallel import Dist
from lion_min.core.sample import generate


def gather(items: list, d: Dist) -> list:
    """Concatenate every rank's list, in rank order."""
    if d.world == 1:
        return items
    out = [None] * d.world
    dist.all_gather_object(out, items)
    return [x for part in out for x in part]


def sample_and_judge(model, tokenizer, prompts: list, judge: Judge, cfg, d: Dist, seed: int) -> list[dict]:
    """Every prompt's samples (tokens and text) and scores; each rank does prompts[rank::world].
    Prompts longer than cfg.max_prompt_len tokens are cut to it (record["prompt_truncated"])."""
    stop = stop_token_ids(tokenizer, cfg.chat_template)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    mine = list(range(d.rank, len(prompts), d.world))
    records = []
    for start in range(0, len(mine), cfg.sample_batch_size):
        idx = mine[start : start + cfg.sample_batch_size]
        turns = [[{"role": "user", "content": prompts[i]}] if isinstance(prompts[i], str) else prompts[i] for i in idx]
        messages = [with_system(t, cfg.system_prompt) for t in turns]
        full = [encode_prompt(tokenizer, m, cfg.chat_template) for m in messages]
        # A prompt longer than max_prompt_len keeps its BOS and its end (as DPO's truncate does).
        ids = [p if len(p) <= cfg.max_prompt_len else p[:1] + p[len(p) - cfg.max_prompt_len + 1 :] for p in full]
        rows = [p for p in ids for _ in range(cfg.n_samples)]
        out = generate(model, rows, cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                       top_k=cfg.top_k, stop_ids=stop, pad_id=pad_id, seed=seed * 100003 + d.rank * 1009 + start)
        for j, i in enumerate(idx):
            samples = out[j * cfg.n_samples : (j + 1) * cfg.n_samples]
            texts = [tokenizer.decode([t for t in s if t not in stop]) for s in samples]
            records.append({"index": i, "messages": messages[j], "prompt_ids": ids[j], "samples": samples,
                            "texts": texts, "scores": judge.score(turns[j], texts),  # (the prompt as given)
                            "prompt_truncated": len(full[j]) > cfg.max_prompt_len})
    return sorted(gather(records, d), key=lambda r: r["index"])


def choose_pair(record: dict) -> str:
    """Set record["chosen"]/["rejected"] (indices of best / worst) or return why the prompt is dropped."""
    samples, scores = record["samples"], record["scores"]
    if all(s == samples[0] for s in samples):
        return "all samples identical"
    best = max(range(len(scores)), key=lambda k: scores[k])  # first index among equal scores
    worst = min(range(len(scores)), key=lambda k: scores[k])
    if scores[best] == scores[worst]:
        return "best and worst scores tie"
    record["chosen"], record["rejected"] = best, worst
    return ""


def to_pair(record: dict, max_len: int, max_prompt_len: int) -> EncodedPair:
    """The sampled tokens themselves (not a re-tokenization of their text) are scored."""
    sides = []
    for k in (record["chosen"], record["rejected"]):
        ids = record["prompt_ids"] + record["samples"][k]
        mask = [False] * len(record["prompt_ids"]) + [True] * len(record["samples"][k])
        sides.append(ChatEncoding(*truncate(ids, mask, max_len, max_prompt_len)[:2]))
    return EncodedPair(chosen=sides[0], rejected=sides[1])


def mean_score(records: list[dict]) -> float:
    """Mean judged reward of all samples. Meaningless for a pairwise judge (judge.relative: PairRM's
    scores of a prompt's samples sum to 0), where it is reported but not compared across rounds."""
    scores = [s for r in records for s in r["scores"]]
    return sum(scores) / max(len(scores), 1)
