"""Attention with document boundaries: the one place where packing becomes a mask.

A packed row holds several documents. The packer marks each token with `doc_ids` (the index of
the document it belongs to, -1 for padding); a token may attend to an earlier token of the same
document only. That block-diagonal causal rule is turned into whatever the kernel wants here:

- "sdpa":  a dense (B, 1, Tq, Tk) boolean mask for F.scaled_dot_product_attention. Works
           everywhere, O(T^2) memory; the reference the others are checked against.
- "flex":  a FlexAttention BlockMask (skips fully masked 128 x 128 tiles). Always the compiled
           kernel (see below); it has no backward on CPU.
- "varlen": cu_seqlens for torch.nn.attention.varlen.varlen_attn (FlashAttention-2: CUDA, bf16/fp16
           only; rows are flattened into one sequence, documents must be contiguous in the row).
           Its signature differs between torch releases, so what the installed function accepts
           is read once, at import (`varlen_api`; the releases are listed in bench/README.md).
           Without varlen in torch, "auto" never picks it and asking for it is an error. Grouped or
           multi-query K/V are repeated per query head where the kernel has no `enable_gqa`.

"auto" picks, per device and activation dtype: CPU -> sdpa (flex has no CPU backward, varlen no
CPU kernel); CUDA -> flex, in bf16 and fp32, the faster of the two measured on a GPU
(bench/README.md, "GPU check"); bench/gpu_check.py prints the fastest kernel per head shape and
whether auto agrees.

Without doc_ids the mask is plain causal and SDPA's `is_causal` fast path is used. With a KV cache
the key side is the cache: its slots carry the doc id of the token written there, so left-padded
prompts in a sampling batch are just documents with id -1 (see sample.py).

Gemma-2/3 sliding-window layers (`window`): a token attends to the last `window` tokens of its own
document, itself included (slot distance < window, the rule of transformers' sliding-window mask);
documents are contiguous in a row, so this is the window over each document's positions, never one
across the row. Gemma-2's attention-logit soft-cap (`softcap`), cap * tanh(scaled logits / cap)
before the mask and softmax, acts inside the kernel: a FlexAttention score_mod, and for "sdpa" (SDPA
has no score modification) the dense reference written out (`_dense_softcapped`, which holds the
(B, H, T, T) scores: fine for tests and the CPU, a reason to keep flex, auto's choice, on a GPU). The varlen
kernel has neither a soft-cap nor, here, a window: it is refused for such models, and "auto" never
picks it.
"""

import functools
import inspect
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from lion_min.core.choices import ATTN_BACKENDS

HALF_DTYPES = (torch.bfloat16, torch.float16)

# Compiled once per process and used whether or not the model's blocks are compiled (torchtitan
# does the same): eager flex_attention is an unfused reference that materialises the (B, H, T, T)
# scores, and eager create_block_mask builds the dense (B, T, T) mask before reducing it to tiles.
# Inside a compiled block, flex_attention is traced into the block's graph. Wrapped at the first
# call: torch.compile imports torch._dynamo (seconds), which a run on SDPA, or --help, never needs.
@functools.cache
def _compiled(fn):
    return torch.compile(fn)


@dataclass(frozen=True)
class VarlenAPI:
    """What the installed varlen_attn accepts, read from its signature."""

    fn: Callable
    causal: dict  # the keyword that makes it causal: {"is_causal": True} or {"window_size": (-1, 0)}
    gqa: bool  # takes enable_gqa= (fewer K/V heads than query heads)


def varlen_api(fn: Optional[Callable] = None) -> Optional[VarlenAPI]:
    """The installed torch's varlen_attn (or `fn`, for tests) and how to call it; None without one
    or with a signature that has no way to ask for causal attention."""
    if fn is None:
        try:
            from torch.nn.attention.varlen import varlen_attn as fn
        except ImportError:  # torch < 2.10
            return None
    params = inspect.signature(fn).parameters
    if "window_size" in params:  # torch >= 2.11: (left, right) = (-1, 0) is causal
        causal = {"window_size": (-1, 0)}
    elif "is_causal" in params:  # torch 2.10
        causal = {"is_causal": True}
    else:
        return None
    return VarlenAPI(fn, causal, "enable_gqa" in params)


VARLEN = varlen_api()  # read once per process


def varlen_problem(device_type: str, dtype: torch.dtype) -> Optional[str]:
    """Why attn_backend='varlen' cannot run here, or None when it can."""
    if VARLEN is None:
        return (f"torch {torch.__version__} has no usable torch.nn.attention.varlen.varlen_attn "
                f"(it appeared in torch 2.10)")
    if device_type != "cuda" or dtype not in HALF_DTYPES:
        return (f"FlashAttention's varlen kernel runs on CUDA in bfloat16/float16 only, not "
                f"{device_type} {str(dtype).replace('torch.', '')} (torch {torch.__version__})")
    return None


@dataclass
class AttnMask:
    """What the attention call needs for one forward pass, built once and shared by all layers."""

    backend: str  # "causal" | "sdpa" | "flex" | "varlen"
    dense: Optional[torch.Tensor] = None  # (B, 1, Tq, Tk) bool, True = may attend
    block_mask: object = None  # flex BlockMask
    cu_seqlens: Optional[torch.Tensor] = None  # (n_docs + 1,) int32, for varlen
    max_seqlen: int = 0


def varlen_model_problem(softcap: Optional[float], window: Optional[int]) -> Optional[str]:
    """Why the varlen kernel cannot compute this model's attention (Gemma-2/3), or None."""
    if softcap is not None:
        return f"FlashAttention's varlen kernel has no attention-logit soft-capping (Gemma-2's {softcap:g})"
    if window is not None:
        return "lion_min's varlen call has no sliding window (Gemma-2/3 local layers)"
    return None


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype = torch.float32,
                    softcap: Optional[float] = None, window: Optional[int] = None) -> str:
    """The backend to use for activations of `dtype` on `device` (and, for Gemma-2/3, an attention
    soft-cap and a sliding window); ValueError if it cannot run there."""
    if backend not in ATTN_BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {ATTN_BACKENDS}")
    problem = (varlen_problem(device.type, dtype) or varlen_model_problem(softcap, window)) if backend == "varlen" else None
    if problem:
        raise ValueError(f"attn_backend='varlen': {problem}; use attn_backend='flex' or 'sdpa'")
    if backend != "auto":
        return backend
    # By measurement (see the module docstring): flex on CUDA until varlen is shown faster.
    return "flex" if device.type == "cuda" else "sdpa"


def dense_mask(q_doc: torch.Tensor, q_slot: torch.Tensor, k_doc: torch.Tensor, k_slot: torch.Tensor,
               window: Optional[int] = None) -> torch.Tensor:
    """(B, 1, Tq, Tk) bool: same document and key slot <= query slot (and, with a sliding window,
    query slot - key slot < window).

    q_doc (B, Tq), k_doc (B, Tk): document ids; q_slot (Tq,), k_slot (Tk,): positions in the row (or
    in the KV cache). Every query sees at least itself, so no row of the mask is empty (no NaNs).
    """
    same_doc = q_doc[:, :, None] == k_doc[:, None, :]  # (B, Tq, Tk)
    causal = k_slot[None, :] <= q_slot[:, None]  # (Tq, Tk)
    if window is not None:  # Gemma-2/3 local layers
        causal = causal & (q_slot[:, None] - k_slot[None, :] < window)
    return (same_doc & causal)[:, None]


def varlen_seqlens(doc_ids: torch.Tensor) -> torch.Tensor:
    """doc_ids (B, T) -> cu_seqlens (n + 1,) int32 of the flattened rows: 0, the start of every run of
    equal doc ids (a new row always starts one), B * T. Padding runs count as documents of their own,
    which is harmless: nothing reads their outputs. One host sync (nonzero's output size)."""
    B, T = doc_ids.shape
    starts = torch.ones_like(doc_ids, dtype=torch.bool)  # (B, T)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    idx = torch.nonzero(starts.reshape(-1)).flatten()
    return torch.cat([idx, idx.new_tensor([B * T])]).to(torch.int32)


def build_mask(doc_ids: Optional[torch.Tensor], backend: str = "auto", dtype: torch.dtype = torch.float32,
               window: Optional[int] = None, softcap: Optional[float] = None, rows: Optional[tuple] = None) -> AttnMask:
    """Mask for a training/scoring forward over (B, T) rows without a KV cache; `dtype` is the
    activation dtype (it decides "auto" and whether varlen can run). `window`: a sliding-window layer
    (Gemma-2/3); `softcap`: the attention soft-cap the kernel must apply (Gemma-2), which rules out
    varlen. Without doc_ids every row is one document (`rows`: (B, T, device) then)."""
    if doc_ids is None:
        if window is None and softcap is None:
            return AttnMask("causal")
        B, T, device = rows  # one document per row, through the kernels that apply a window or cap
        doc_ids = torch.zeros((B, T), dtype=torch.long, device=device)
    backend = resolve_backend(backend, doc_ids.device, dtype, softcap, window)
    B, T = doc_ids.shape
    if backend == "sdpa":
        slots = torch.arange(T, device=doc_ids.device)
        return AttnMask("sdpa", dense=dense_mask(doc_ids, slots, doc_ids, slots, window))
    if backend == "flex":

        def document_causal(b, h, q_idx, kv_idx):
            same = (doc_ids[b, q_idx] == doc_ids[b, kv_idx]) & (kv_idx <= q_idx)
            return same if window is None else same & (q_idx - kv_idx < window)  # Gemma-2/3 local layers

        block_mask = _compiled(create_block_mask)(document_causal, B, None, T, T, device=doc_ids.device)
        return AttnMask("flex", block_mask=block_mask)
    # varlen: max_seqlen only sizes the kernel's grid (tiles past a document's end return at once),
    # so the row length T, an upper bound known without reading the data, saves a host sync.
    return AttnMask("varlen", cu_seqlens=varlen_seqlens(doc_ids), max_seqlen=T)


@functools.cache
def _softcap_mod(softcap: float):
    """Gemma-2's attention soft-cap as a FlexAttention score_mod, on the already scaled logits. One
    function per cap value, so that a compiled graph sees the same object every call."""

    def softcap_score(score, b, h, q_idx, kv_idx):
        return torch.tanh(score / softcap) * softcap

    return softcap_score


def _dense_softcapped(q, k, v, allowed: torch.Tensor, scale: float, softcap: float) -> torch.Tensor:
    """The soft-capped attention written out (SDPA has no score modification), rounded where
    transformers' eager Gemma-2 attention rounds: scores and cap in the activation dtype, softmax in
    fp32, cast back. allowed (B|1, 1, Tq, Tk)."""
    k, v = (x.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for x in (k, v))  # SDPA's enable_gqa order
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, Hq, Tq, Tk)
    scores = torch.tanh(scores / softcap) * softcap  # Gemma-2: cap before the mask
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttnMask, scale: Optional[float] = None,
           softcap: Optional[float] = None) -> torch.Tensor:
    """q (B, Hq, Tq, hd), k/v (B, Hkv, Tk, hd) -> (B, Hq, Tq, hd); scale defaults to 1/sqrt(hd).
    softcap (Gemma-2): scaled logits become softcap * tanh(logits / softcap) before mask and softmax.

    Grouped/multi-query K/V are passed with their own head count (enable_gqa), not repeated per head,
    except to a varlen_attn without enable_gqa.
    """
    gqa = q.shape[1] != k.shape[1]
    if mask.backend == "flex":
        score_mod = None if softcap is None else _softcap_mod(softcap)
        return _compiled(flex_attention)(q, k, v, score_mod=score_mod, block_mask=mask.block_mask, scale=scale,
                                         enable_gqa=gqa)
    if softcap is not None and mask.backend in ("causal", "sdpa"):
        Tq, Tk = q.shape[2], k.shape[2]
        causal = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(Tk - Tq)[None, None]
        allowed = mask.dense if mask.backend == "sdpa" else causal
        return _dense_softcapped(q, k, v, allowed, scale or q.shape[-1] ** -0.5, softcap)
    if mask.backend == "causal":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    if mask.backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense, scale=scale, enable_gqa=gqa)
    if mask.backend == "varlen":
        if softcap is not None or scale is not None:  # Gemma-2/3, refused earlier (resolve_backend): never dropped
            raise ValueError("attn_backend='varlen': no attention soft-cap or query_pre_attn_scalar scale in this "
                             "call; use flex or sdpa")
        return _varlen(q, k, v, mask)
    raise ValueError(f"unknown attention mask kind {mask.backend!r}")


def _varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttnMask) -> torch.Tensor:
    """attend() through varlen_attn, called the way the installed torch's signature asks."""
    api = VARLEN
    if api is None:
        raise ValueError(f"attn_backend='varlen': {varlen_problem('cuda', torch.bfloat16)}")
    B, H, T, hd = q.shape
    gqa = {}
    if H != k.shape[1]:
        if api.gqa:
            gqa = {"enable_gqa": True}
        else:  # query head h reads K/V head h // (H / Hkv), as SDPA's enable_gqa does
            k, v = (x.repeat_interleave(H // k.shape[1], dim=1) for x in (k, v))
    flat = lambda x: x.transpose(1, 2).reshape(B * T, x.shape[1], hd)  # (B*T, heads, hd)
    out = api.fn(flat(q), flat(k), flat(v), mask.cu_seqlens, mask.cu_seqlens, mask.max_seqlen, mask.max_seqlen,
                 **api.causal, **gqa)
    return out.reshape(B, T, H, hd).transpose(1, 2)
