"""DPO's method: preference pairs -> token sequences -> policy and reference log-probs -> loss.

A pair is the prompt with the chosen reply and the prompt with the rejected reply, encoded with
the chat template so that only the final reply (and its end-of-turn token) is scored. Both sides
of every pair of a micro-batch are packed into the same rows (example 2i chosen, 2i + 1 rejected)
and run in one forward, each side attending only to itself. The reference's log-probs come from a
frozen model run without gradients, or precomputed once (compute_ref_logps) and read per
micro-batch. The loss is losses.dpo_loss, averaged over the global batch's pairs.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from lion_min.core.chat import ChatEncoding, encode_chats, with_system
from lion_min.core.losses import dpo_loss, global_mean, sequence_logps
from lion_min.core.packing import collate, pack
from lion_min.core.parallel import Dist, all_reduce_sum


@dataclass
class EncodedPair:
    chosen: ChatEncoding
    rejected: ChatEncoding


PAIRS_PER_CALL = 512
"""Pairs per batched tokenizer call."""


@dataclass
class PairStats:
    pairs: int = 0
    prompt_truncated: int = 0
    response_truncated: int = 0
    dropped: int = 0
    """Pairs whose response would keep no scored token (e.g. an empty reply after truncation)."""
    identical: int = 0
    """Pairs whose chosen and rejected sequences are the same tokens (nothing to prefer): dropped."""


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
    for start in range(0, len(prefs), PAIRS_PER_CALL):
        chunk = prefs[start : start + PAIRS_PER_CALL]
        # Both sides of every pair of the chunk in one batched call (chat.encode_chats, identical
        # to encode_chat per side): sequence 2k is pair k's chosen side, 2k + 1 its rejected one.
        enc = encode_chats(tokenizer, [with_system(list(p.prompt) + list(r), system_prompt)
                                       for p in chunk for r in (p.chosen, p.rejected)], template, train_on="last")
        for k in range(len(chunk)):
            sides = [truncate(enc.input_ids[a:b].tolist(), enc.loss_mask[a:b].tolist(), max_len, max_prompt_len)
                     for a, b in zip(enc.starts[2 * k : 2 * k + 2], enc.starts[2 * k + 1 : 2 * k + 3])]
            st.pairs += 1
            if not all(any(s[1]) for s in sides):
                st.dropped += 1
                continue
            if sides[0][:2] == sides[1][:2]:  # nothing to prefer
                st.identical += 1
                continue
            st.prompt_truncated += any(s[2] for s in sides)
            st.response_truncated += any(s[3] for s in sides)
            out.append(EncodedPair(chosen=ChatEncoding(*sides[0][:2]), rejected=ChatEncoding(*sides[1][:2])))
    return out, st


def pair_micro(pairs: Sequence[EncodedPair], sel: np.ndarray, max_len: int, pad_id: int, device,
               ref_logps: Optional[torch.Tensor] = None) -> dict:
    """The pairs `sel` packed into rows of max_len: example 2i = chosen, 2i + 1 = rejected."""
    examples = [side for i in sel for side in (pairs[i].chosen, pairs[i].rejected)]
    packed = pack(examples, max_len, pad_id, mode="pack", overflow="drop")
    micro = collate(packed.rows, device)
    micro["num_pairs"] = len(sel)
    if ref_logps is not None:  # (num_pairs_total, 2) precomputed: chosen, rejected
        micro["ref_logps"] = ref_logps[torch.as_tensor(sel)].to(device)
    return micro


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
        # Sums as device tensors (the loop moves them to the host once per step).
        sums = {
            "loss": losses.detach().sum(),
            "rewards/chosen": chosen_rewards.sum(),
            "rewards/rejected": rejected_rewards.sum(),
            "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().sum(),
            "logps/chosen": pc.detach().sum(),
            "logps/rejected": pr.detach().sum(),
            # How far the policy has moved from the reference on each side (log pi - log pi_ref):
            # the paper watches the chosen log-probability fall while the margin grows.
            "logratios/chosen": (pc - rc).detach().sum(),
            "logratios/rejected": (pr - rr).detach().sum(),
        }
        return global_mean(losses.sum(), norm), sums

    return objective


def compute_ref_logps(ref_model, pairs, d: Dist, micro_batch_size: int, max_len: int, pad_id: int,
                      mine: Optional[np.ndarray] = None) -> torch.Tensor:
    """(num_pairs, 2) reference log-probs, each rank scoring its share (`mine`, in micro-batches of
    micro_batch_size; default every world-th pair), then summed over ranks."""
    out = torch.zeros(len(pairs), 2, dtype=torch.float64)
    mine = np.arange(len(pairs))[d.rank :: d.world] if mine is None else mine
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
