"""Attention with document boundaries: the one place where packing becomes a mask.

A packed row holds several documents. The packer marks each token with `doc_ids` (the index of
the document it belongs to, -1 for padding); a token may attend to an earlier token of the same
document only. That block-diagonal causal rule is turned into whatever the kernel wants here:

- "sdpa":  a dense (B, 1, Tq, Tk) boolean mask for F.scaled_dot_product_attention. Works
           everywhere, O(T^2) memory; the reference the others are checked against.
- "flex":  a FlexAttention BlockMask (skips fully masked tiles; needs CUDA + compile to be fast,
           and has no backward on CPU).
- "varlen": cu_seqlens for torch.nn.attention.varlen.varlen_attn (CUDA only; needs B == 1
           after flattening, which we do here, and documents that are contiguous in the row).

Without doc_ids the mask is plain causal and SDPA's `is_causal` fast path is used. With a KV cache
the key side is the cache: its slots carry the doc id of the token written there, so left-padded
prompts in a sampling batch are just documents with id -1 (see sample.py).
"""

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "sdpa", "flex", "varlen")


@dataclass
class AttnMask:
    """What the attention call needs for one forward pass, built once and shared by all layers."""

    backend: str  # "causal" | "sdpa" | "flex" | "varlen"
    dense: Optional[torch.Tensor] = None  # (B, 1, Tq, Tk) bool, True = may attend
    block_mask: object = None  # flex BlockMask
    cu_seqlens: Optional[torch.Tensor] = None  # (n_docs + 1,) int32, for varlen
    max_seqlen: int = 0


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    if backend != "auto":
        return backend
    # FlexAttention has no CPU backward, so the dense SDPA mask is the CPU path.
    return "flex" if device.type == "cuda" else "sdpa"


def dense_mask(q_doc: torch.Tensor, q_slot: torch.Tensor, k_doc: torch.Tensor, k_slot: torch.Tensor) -> torch.Tensor:
    """(B, 1, Tq, Tk) bool: same document and key slot <= query slot.

    q_doc (B, Tq), k_doc (B, Tk): document ids; q_slot (Tq,), k_slot (Tk,): positions in the row (or
    in the KV cache). Every query sees at least itself, so no row of the mask is empty (no NaNs).
    """
    same_doc = q_doc[:, :, None] == k_doc[:, None, :]  # (B, Tq, Tk)
    causal = k_slot[None, :] <= q_slot[:, None]  # (Tq, Tk)
    return (same_doc & causal)[:, None]


def build_mask(doc_ids: Optional[torch.Tensor], backend: str = "auto") -> AttnMask:
    """Mask for a training/scoring forward over (B, T) rows without a KV cache."""
    if doc_ids is None:
        return AttnMask("causal")
    backend = resolve_backend(backend, doc_ids.device)
    B, T = doc_ids.shape
    if backend == "sdpa":
        slots = torch.arange(T, device=doc_ids.device)
        return AttnMask("sdpa", dense=dense_mask(doc_ids, slots, doc_ids, slots))
    if backend == "flex":
        from torch.nn.attention.flex_attention import create_block_mask

        def document_causal(b, h, q_idx, kv_idx):
            return (doc_ids[b, q_idx] == doc_ids[b, kv_idx]) & (kv_idx <= q_idx)

        block_mask = create_block_mask(document_causal, B, None, T, T, device=doc_ids.device)
        return AttnMask("flex", block_mask=block_mask)
    # varlen: rows are flattened into one long sequence; a new document starts wherever the doc id
    # changes (padding runs count as their own documents, which is harmless: nothing reads them).
    flat = doc_ids.reshape(-1)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1]
    starts[torch.arange(0, B * T, T, device=flat.device)] = True  # rows never share a document
    idx = torch.nonzero(starts).flatten()
    cu = torch.cat([idx, idx.new_tensor([B * T])]).to(torch.int32)
    return AttnMask("varlen", cu_seqlens=cu, max_seqlen=int((cu[1:] - cu[:-1]).max()))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttnMask) -> torch.Tensor:
    """q (B, Hq, Tq, hd), k/v (B, Hkv, Tk, hd) -> (B, Hq, Tq, hd); scale is 1/sqrt(hd).

    Grouped/multi-query K/V are passed with their own head count (enable_gqa), not repeated per head.
    """
    gqa = q.shape[1] != k.shape[1]
    if mask.backend == "causal":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if mask.backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense, enable_gqa=gqa)
    if mask.backend == "flex":
        from torch.nn.attention.flex_attention import flex_attention

        return flex_attention(q, k, v, block_mask=mask.block_mask, enable_gqa=gqa)
    if mask.backend == "varlen":
        from torch.nn.attention.varlen import varlen_attn

        B, H, T, hd = q.shape
        flat = lambda x: x.transpose(1, 2).reshape(B * T, x.shape[1], hd)  # (B*T, H, hd)
        out = varlen_attn(
            flat(q), flat(k), flat(v), mask.cu_seqlens, mask.cu_seqlens, mask.max_seqlen, mask.max_seqlen,
            window_size=(-1, 0), enable_gqa=gqa,  # (-1, 0): causal
        )
        return out.reshape(B, T, H, hd).transpose(1, 2)
    raise ValueError(f"unknown attention mask kind {mask.backend!r}")
