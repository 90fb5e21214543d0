"""DPO pieces shared by the offline (train_dpo.py) and online (train_online.py) stages.

A preference pair becomes two token sequences, prompt + chosen and prompt + rejected, rendered by
the chat template; only the final response and its end-of-turn token are scored. The pairs of a
micro-batch are packed together into rows (chosen = example 2i, rejected = 2i + 1), so one policy
forward scores both sides with no padding waste, and `sequence_logps` sums each side's tokens.
"""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lion_min.chat import encode_chat
from lion_min.losses import dpo_loss, sequence_logps
from lion_min.packing import pack
from lion_min.parallel import Dist, all_reduce_sum
from lion_min.stage import with_system
from lion_min.train import Batches


@dataclass
class EncodedPair:
    chosen: tuple[list[int], list[bool]]
    rejected: tuple[list[int], list[bool]]


@dataclass
class PairStats:
    pairs: int = 0
    prompt_truncated: int = 0
    response_truncated: int = 0
    dropped: int = 0
    """Pairs whose response would keep no scored token (e.g. an empty reply after truncation)."""


def truncate(ids: list[int], mask: list[bool], max_len: int, max_prompt_len: int):
    """Keep the END of the prompt (and its BOS) and the START of the response.

    The prompt is everything before the first scored token. Returns (ids, mask, prompt_cut, response_cut).
    """
    start = mask.index(True)
    prompt, p_mask, resp, r_mask = ids[:start], mask[:start], ids[start:], mask[start:]
    prompt_cut = len(prompt) > max_prompt_len
    if prompt_cut:  # BOS stays first: a sequence without it is out of distribution
        prompt, p_mask = prompt[:1] + prompt[len(prompt) - max_prompt_len + 1 :], [False] * max_prompt_len
    room = max_len - len(prompt)
    response_cut = len(resp) > room
    resp, r_mask = resp[:room], r_mask[:room]
    return prompt + resp, p_mask + r_mask, prompt_cut, response_cut


def encode_pairs(prefs, tokenizer, template: str, max_len: int, max_prompt_len: int,
                 system_prompt: Optional[str] = None) -> tuple[list[EncodedPair], PairStats]:
    """Preference records -> token sequences with the final response (and end-of-turn) scored."""
    if max_prompt_len >= max_len:
        raise ValueError(f"max_prompt_len={max_prompt_len} must be smaller than max_len={max_len}")
    out, st = [], PairStats()
    for p in prefs:
        sides = []
        for response in (p.chosen, p.rejected):
            enc = encode_chat(tokenizer, with_system(list(p.prompt) + list(response), system_prompt), template,
                              train_on="last")
            ids, mask, p_cut, r_cut = truncate(enc.input_ids, enc.loss_mask, max_len, max_prompt_len)
            sides.append((ids, mask, p_cut, r_cut))
        st.pairs += 1
        if not all(any(s[1]) for s in sides):
            st.dropped += 1
            continue
        st.prompt_truncated += any(s[2] for s in sides)
        st.response_truncated += any(s[3] for s in sides)
        out.append(EncodedPair(chosen=sides[0][:2], rejected=sides[1][:2]))
    return out, st


def pair_micro(pairs: list[EncodedPair], sel: np.ndarray, max_len: int, pad_id: int, device,
               ref_logps: Optional[torch.Tensor] = None) -> dict:
    """The pairs `sel` packed into rows of max_len: example 2i = chosen, 2i + 1 = rejected."""
    examples = [side for i in sel for side in (pairs[i].chosen, pairs[i].rejected)]
    packed = pack(examples, max_len, pad_id, mode="pack", loss_mask=True, overflow="drop")
    micro = {k: torch.from_numpy(v).to(device) for k, v in packed.rows.items()}
    micro["num_pairs"] = len(sel)
    if ref_logps is not None:  # (num_pairs_total, 2) precomputed: chosen, rejected
        micro["ref_logps"] = ref_logps[torch.as_tensor(sel)].to(device)
    return micro


def pair_batches(pairs, batch_size, micro_batch_size, epochs, seed, d: Dist, max_len, pad_id,
                 ref_logps=None, shuffle=True) -> Batches:
    """DPO batches: batch_size pairs per optimizer step; the normaliser is the number of pairs."""
    return Batches(len(pairs), batch_size, micro_batch_size, epochs, seed, d,
                   make_micro=lambda sel: pair_micro(pairs, sel, max_len, pad_id, d.device, ref_logps),
                   norm=lambda sel: float(len(sel)), shuffle=shuffle)


def pair_logps(model, micro: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) summed log-probs of the scored tokens, each (num_pairs,), fp32."""
    logp = model(micro["tokens"], micro["positions"], micro["doc_ids"], targets=micro["targets"])  # (B, T)
    seq = sequence_logps(logp, micro["doc_ids"], 2 * micro["num_pairs"])  # (2 * pairs,)
    return seq[0::2], seq[1::2]


def make_dpo_objective(beta: float, label_smoothing: float, loss_type: str, ref_model=None):
    """objective(model, micro, norm) for the shared loop: the global mean of the DPO loss over
    pairs, and the sums of the logged metrics. The reference is `ref_model` (frozen, run without
    gradients) or the micro-batch's precomputed `ref_logps`."""

    def objective(model, micro: dict, norm: float):
        pc, pr = pair_logps(model, micro)
        if ref_model is not None:
            with torch.no_grad():
                rc, rr = pair_logps(ref_model, micro)
        else:
            rc, rr = micro["ref_logps"][:, 0], micro["ref_logps"][:, 1]
        losses, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, rc, rr, beta, label_smoothing, loss_type)
        sums = {
            "loss": losses.sum().item(),
            "rewards/chosen": chosen_rewards.sum().item(),
            "rewards/rejected": rejected_rewards.sum().item(),
            "rewards/margins": (chosen_rewards - rejected_rewards).sum().item(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().sum().item(),
            "logps/chosen": pc.detach().sum().item(),
            "logps/rejected": pr.detach().sum().item(),
            # How far the policy has moved from the reference on each side (log pi - log pi_ref):
            # the paper watches the chosen log-probability fall while the margin grows.
            "logratios/chosen": (pc - rc).detach().sum().item(),
            "logratios/rejected": (pr - rr).detach().sum().item(),
        }
        return losses.sum() / norm, sums

    return objective


# --- precomputed reference ------------------------------------------------------------------------


def fingerprint(pairs: list[EncodedPair], ref_folder: Path, template: str) -> str:
    """sha256 of the scored sequences (so data, tokenizer, template and truncation), the template
    name, and the reference checkpoint's config and weight files (every byte)."""
    h = hashlib.sha256()
    h.update(template.encode())
    for p in pairs:
        for ids, mask in (p.chosen, p.rejected):
            h.update(np.asarray(ids, dtype=np.int64).tobytes())
            h.update(np.asarray(mask, dtype=np.bool_).tobytes())
    for f in sorted(ref_folder.glob("*.safetensors")) + [ref_folder / "config.json"]:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()


def compute_ref_logps(ref_model, pairs, d: Dist, micro_batch_size: int, max_len: int, pad_id: int) -> torch.Tensor:
    """(num_pairs, 2) reference log-probs, each rank scoring its share, then summed over ranks."""
    out = torch.zeros(len(pairs), 2, dtype=torch.float64)
    mine = np.arange(len(pairs))[d.rank :: d.world]
    # Every rank runs the same number of forwards (FSDP all-gathers in each one).
    n_micro = -(-len(pairs) // (d.world * micro_batch_size))
    ref_model.eval()
    with torch.no_grad():
        for k in range(n_micro):
            sel = mine[k * micro_batch_size : (k + 1) * micro_batch_size]
            if len(sel) == 0:
                sel = np.arange(1)  # a dummy forward keeps the collectives in step; result unused
                pair_logps(ref_model, pair_micro(pairs, sel, max_len, pad_id, d.device))
                continue
            c, r = pair_logps(ref_model, pair_micro(pairs, sel, max_len, pad_id, d.device))
            out[torch.as_tensor(sel), 0] = c.double().cpu()
            out[torch.as_tensor(sel), 1] = r.double().cpu()
    if d.world > 1:
        flat = all_reduce_sum(out.flatten().tolist(), d)
        out = torch.tensor(flat, dtype=torch.float64).view(-1, 2)
    return out.float()


def load_or_compute_ref_logps(path: Path, fp: str, compute, d: Dist) -> torch.Tensor:
    """Reuse `path` only if its fingerprint matches; refuse a stale one rather than overwrite it."""
    if path.is_file():
        with safe_open(str(path), "pt") as f:
            stored = (f.metadata() or {}).get("fingerprint")
            if stored != fp:
                raise ValueError(f"{path}: reference log-probs were computed for other data, reference model or "
                                 f"template (fingerprint {stored} != {fp}); delete the file to recompute")
            return f.get_tensor("ref_logps")
    ref = compute()
    if d.main:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file({"ref_logps": ref.contiguous()}, str(tmp), metadata={"fingerprint": fp})
        tmp.rename(path)
    return ref


def write_jsonl(path: Path, rows: list[dict]):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.rename(path)
