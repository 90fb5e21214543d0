"""Losses: hidden states -> per-token log-probs (chunked), the SFT objective, and the DPO family.

Everything here is a pure function of tensors. The one IGNORE_INDEX marks a position whose next
token is not a training target (prompt tokens, the last token of a document, padding).
"""

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lion_min.core.choices import DPO_LOSS_TYPES

IGNORE_INDEX = -100


def softcap_logits(logits: torch.Tensor, softcap: Optional[float]) -> torch.Tensor:
    """Gemma-2's output soft-cap: softcap * tanh(logits / softcap) (None: logits unchanged)."""
    return logits if softcap is None else torch.tanh(logits / softcap) * softcap


def _chunk_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                    softcap: Optional[float] = None) -> torch.Tensor:
    """hidden (n, D), weight (V, D) fp32, targets (n,) -> (n,) fp32 log p(target), 0.0 where ignored."""
    logits = softcap_logits(F.linear(hidden.float(), weight), softcap)  # (n, V) fp32
    picked = logits.gather(1, targets.clamp(min=0)[:, None]).squeeze(1)  # (n,); ignored ones read id 0
    logp = picked - torch.logsumexp(logits, dim=-1)  # log_softmax at the target only
    return torch.where(targets != IGNORE_INDEX, logp, 0.0)


def _mm_wide(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (n, k) @ b (k, m) with products in the inputs' dtype and sums and output in fp32 (or wider)."""
    wide = torch.promote_types(a.dtype, torch.float32)
    if a.is_cuda and a.dtype != wide:  # (out_dtype= from torch 2.8, pytorch#150812)
        return torch.mm(a, b, out_dtype=wide)  # cuBLAS: bf16 tensor cores, fp32 accumulation and output
    # CPU has no mm with out_dtype. The same numbers: a product of two bf16 (or fp16) values is exact in fp32.
    return torch.mm(a.to(wide), b.to(wide))


def _slice_stats(logits: torch.Tensor, lse: torch.Tensor, local: torch.Tensor):
    """One vocabulary slice of logits (N, Vc) fp32 -> (running logsumexp (N,), logit of the target
    where it lies in this slice, else 0 (N,)); `local` is the target's column in the slice."""
    inside = (local >= 0) & (local < logits.shape[1])
    picked = logits.gather(1, local.clamp(0, logits.shape[1] - 1)[:, None]).squeeze(1)
    return torch.logaddexp(lse, logits.logsumexp(-1)), torch.where(inside, picked, 0.0)


def _slice_grad(logits: torch.Tensor, lse: torch.Tensor, g: torch.Tensor, local: torch.Tensor, dtype: torch.dtype,
                softcap: Optional[float] = None):
    """d (g . logp) / d logits for one slice: g * (onehot(target) - softmax), rounded to `dtype`.
    With a soft-cap, `logits` are the capped ones, y = c tanh(x / c), and the gradient is taken back
    through the cap to the matmul's x: dy / dx = 1 - (y / c)^2."""
    d_logits = logits.sub(lse[:, None]).exp_().mul_(-g[:, None])  # (N, Vc) fp32
    inside = (local >= 0) & (local < logits.shape[1])
    d_logits.scatter_add_(1, local.clamp(0, logits.shape[1] - 1)[:, None], torch.where(inside, g, 0.0)[:, None])
    if softcap is not None:
        d_logits.mul_(1 - (logits / softcap).square())
    return d_logits.to(dtype)


# On CUDA the elementwise work on each (N, Vc) fp32 slice runs as one fused kernel per helper (read
# the logits once; write bf16 d_logits once) instead of five or six passes over 1 GiB slices; the
# same operations as the eager helpers, which the CPU runs (so CPU numbers do not move). Wrapped at
# the first use: torch.compile imports torch._dynamo (seconds), which a CPU run or --help never needs.
@functools.cache
def _fused(fn):
    return torch.compile(fn, dynamic=True)


class _HalfHeadLogprobs(torch.autograd.Function):
    """log p(target) through the head in the activation dtype with fp32 sums, over vocabulary slices.

    Forward keeps one (N, V_chunk) fp32 logits slice at a time and a running logsumexp; it saves
    only its inputs and the (N,) logsumexp. Backward recomputes each slice, so each slice's weight
    gradient is computed whole (no (V, D) fp32 accumulation across token chunks), while the (N, D)
    hidden gradient is summed over slices in fp32.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, vocab_chunk: int, fused: bool = False, softcap: Optional[float] = None):
        # hidden (N, D) in the activation dtype, weight (V, D) any float dtype, targets (N,) int64
        stats = _fused(_slice_stats) if fused else _slice_stats
        wide = torch.promote_types(hidden.dtype, torch.float32)
        lse = torch.full(targets.shape, float("-inf"), dtype=wide, device=hidden.device)  # (N,)
        picked = torch.zeros(targets.shape, dtype=wide, device=hidden.device)  # (N,)
        for v0 in range(0, weight.shape[0], vocab_chunk):
            w = weight[v0 : v0 + vocab_chunk].to(hidden.dtype)  # (Vc, D)
            logits = softcap_logits(_mm_wide(hidden, w.t()), softcap)  # (N, Vc) fp32
            lse, p = stats(logits, lse, targets - v0)
            picked += p
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.vocab_chunk, ctx.fused, ctx.softcap = vocab_chunk, fused, softcap
        return torch.where(targets != IGNORE_INDEX, picked - lse, 0.0)

    @staticmethod
    def backward(ctx, grad_logp):
        hidden, weight, targets, lse = ctx.saved_tensors
        grad_of = _fused(_slice_grad) if ctx.fused else _slice_grad
        g = torch.where(targets != IGNORE_INDEX, grad_logp, 0.0).to(lse.dtype)  # (N,)
        grad_h = torch.zeros(hidden.shape, dtype=lse.dtype, device=hidden.device) if ctx.needs_input_grad[0] else None
        grad_w = torch.empty(weight.shape, dtype=lse.dtype, device=weight.device) if ctx.needs_input_grad[1] else None
        for v0 in range(0, weight.shape[0], ctx.vocab_chunk):
            w = weight[v0 : v0 + ctx.vocab_chunk].to(hidden.dtype)  # (Vc, D)
            # the gradient matmuls run in the activation dtype too
            logits = softcap_logits(_mm_wide(hidden, w.t()), ctx.softcap)  # (N, Vc) fp32
            d_logits = grad_of(logits, lse, g, targets - v0, hidden.dtype, ctx.softcap)  # (N, Vc)
            if grad_h is not None:
                grad_h += _mm_wide(d_logits, w)  # (N, D)
            if grad_w is not None:
                grad_w[v0 : v0 + ctx.vocab_chunk] = _mm_wide(d_logits.t(), hidden)  # (Vc, D)
        return (grad_h.to(hidden.dtype) if grad_h is not None else None,
                grad_w.to(weight.dtype) if grad_w is not None else None, None, None, None, None)


def token_logprobs(
    hidden: torch.Tensor, head_weight: torch.Tensor, targets: torch.Tensor, chunk_size: int = 1024,
    half_matmul: Optional[bool] = None, softcap: Optional[float] = None,
) -> torch.Tensor:
    """log p(target_t | x_<=t) for every position, in fp32; 0.0 where targets == IGNORE_INDEX.
    softcap (Gemma-2: 30): the logits are soft-capped, softcap * tanh(logits / softcap), first.

    hidden (..., D) in the activation dtype, head_weight (V, D), targets (...) int64 -> (...) fp32.

    Full fp32 logits would be V * N * 4 bytes (256k vocab x 8k tokens = 8 GiB per row), and
    autograd would keep them (and the softmax) for backward. Instead at most chunk_size * V logits
    (1 GiB at the default and V = 256k) exist at once, and backward recomputes them.

    Two ways, the same numbers up to rounding:
    - fp32 (the default off CUDA or for fp32 activations): hidden and head cast to fp32, chunks of
      `chunk_size` tokens, each chunk checkpointed.
    - half_matmul (the default on CUDA for bf16/fp16 activations): the head matmuls run in the
      activation dtype on tensor cores with fp32 accumulation and fp32 logits; log-softmax in fp32
      (_HalfHeadLogprobs). A true fp32 matmul is some 15x slower on an H100, and for Gemma-2b the
      head is about a fifth of the model's FLOPs. half_matmul=True forces it (on CPU it runs in
      fp32 on the bf16-rounded values, which gives the same products).
    """
    D = hidden.shape[-1]
    flat_h, flat_t = hidden.reshape(-1, D), targets.reshape(-1)  # (N, D), (N,)
    if half_matmul is None:
        half_matmul = hidden.is_cuda and hidden.dtype in (torch.bfloat16, torch.float16)
    if half_matmul:
        vocab_chunk = max(1, chunk_size * head_weight.shape[0] // max(flat_h.shape[0], 1))
        out = _HalfHeadLogprobs.apply(flat_h, head_weight, flat_t, vocab_chunk, flat_h.is_cuda, softcap)
    else:
        # The fp32 copy of the head is made once, outside the chunks: its gradient then sums over
        # chunks in fp32 and is rounded to the parameter dtype once. It costs V * D * 4 bytes, far
        # less than the logits whenever there are more tokens than hidden units. No-op for fp32.
        weight = head_weight.float()
        out = torch.cat([
            checkpoint(_chunk_logprobs, h, weight, t, softcap, use_reentrant=False)
            for h, t in zip(flat_h.split(chunk_size), flat_t.split(chunk_size))
        ])
    # A fresh tensor, not a view: FSDP2 warns that in-place ops on a view returned by a wrapped
    # module would skip its pre-backward hook. (N floats: negligible.)
    return out.reshape(targets.shape).clone()


def global_mean(total, global_count: float):
    """`total` (a sum over this micro-batch's items: target tokens for SFT, pairs for DPO) divided by
    the number of items in the WHOLE global batch (every micro-batch on every rank).

    This is the one normalisation of every objective and logged metric. Each micro-batch then
    contributes its exact share of the global mean, so summing losses and gradients over
    micro-batches and ranks gives the same loss and update whatever the accumulation or world
    size. (Dividing by the local count would weight an item by 1 / its micro-batch's count.) A
    global batch with no items gives 0, not 0/0 = NaN.
    """
    return total / max(global_count, 1)


def sft_loss(token_logp: torch.Tensor, targets: torch.Tensor, num_target_tokens: float) -> torch.Tensor:
    """L = -(1 / N_global) * sum over target tokens t of log p(x_t | x_<t).

    token_logp, targets (B, T). num_target_tokens is the count of targets != IGNORE_INDEX over the
    WHOLE global batch, not this micro-batch (see global_mean).
    """
    summed = torch.where(targets != IGNORE_INDEX, token_logp, 0.0).sum()
    return global_mean(-summed, num_target_tokens)


def sequence_logps(token_logp: torch.Tensor, doc_ids: torch.Tensor, num_sequences: int) -> torch.Tensor:
    """Per-example log p(sequence): sum of token_logp over the tokens of each example.

    token_logp (B, T) fp32, doc_ids (B, T) int64 (example index, -1 for padding) -> (num_sequences,).
    Masked positions already hold 0.0, so each sum covers exactly the example's trained tokens;
    an example with no tokens in this batch gets 0.0.
    """
    keep = doc_ids >= 0
    out = token_logp.new_zeros(num_sequences)
    return out.index_add(0, doc_ids[keep], token_logp[keep])


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses and implicit rewards. All inputs (B,) sequence log-probs -> three (B,).

    With h = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)]:

    - "sigmoid" (Rafailov et al. 2023, Eq. 7):  L = -log sigma(beta * h).
      With label_smoothing eps > 0 (conservative DPO, cDPO: the label is flipped with probability
      eps):  L = -(1 - eps) * log sigma(beta * h) - eps * log sigma(-beta * h).
    - "ipo" (Azar et al. 2023, IPO):  L = (h - 1 / (2 * beta))^2, beta playing the role of tau.
      h uses sequence sums as above (some libraries average IPO's log-probs over tokens instead).
    - "hinge" (SLiC-style):  L = relu(1 - beta * h).

    Rewards: beta * (log pi - log pi_ref) for chosen and rejected, detached (for logging only).
    The batch loss is losses.mean() (or a sum over a global count of pairs, as in sft_loss).
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; choose one of {DPO_LOSS_TYPES}")
    if label_smoothing != 0.0 and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing only applies to loss_type='sigmoid', not {loss_type!r}")
    chosen_logratios = policy_chosen_logps - reference_chosen_logps  # (B,)
    rejected_logratios = policy_rejected_logps - reference_rejected_logps  # (B,)
    h = chosen_logratios - rejected_logratios  # (B,)
    if loss_type == "sigmoid":
        # logsigmoid, not log(sigmoid(.)): stays finite for large |beta * h|.
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        losses = torch.relu(1 - beta * h)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()
