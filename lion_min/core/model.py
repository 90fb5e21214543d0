"""One decoder for Llama-3 (3.0, 3.1, 3.2), Gemma (2b, 7b), Gemma-2 and Gemma-3 (text).

The families differ in a handful of places, each marked `# Gemma:` where it acts:
RMSNorm scales by (1 + w), the embeddings are multiplied by sqrt(dim), and the MLP gate is
tanh-GELU instead of SiLU (`family`); the output head is tied to the embedding when the config
says so (`tie_embeddings`: Gemma's default, and Llama-3.2's). Llama-3.1/3.2 add the "llama3"
RoPE frequency rescaling; Llama-3.2 ties the head too. head_dim is always explicit (Gemma-7b has
head_dim 256 while dim / n_heads is 192).

Gemma-2 and Gemma-3 add, each marked `# Gemma-2:` / `# Gemma-3:` where it acts: a norm after the
attention and after the MLP (sandwich norms), the attention scale query_pre_attn_scalar**-0.5,
local layers that attend within a sliding window (`layer_types`), and
- Gemma-2: attention logits soft-capped, cap * tanh(s / cap) with cap 50, inside the kernel
  (attention.py), and the output logits soft-capped at 30 (here and in losses.token_logprobs);
- Gemma-3: RMS-normalised queries and keys (per head, before RoPE), and a RoPE base per layer type
  (10k local, 1M global), the global layers' with the config's scaling ("linear" for 4b and up).

Nothing here reads files or data: formats/hf_config.py reads the ModelArgs (args.py) from a
config.json and formats/hf.py fills the weights. For training, forward(..., targets=) returns
log p(target) per token through losses.token_logprobs (inside forward, so FSDP2 has the head
gathered while it runs), and each block can recompute its activations in backward (activation
checkpointing).
"""

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lion_min.core.args import ModelArgs
from lion_min.core.attention import AttnMask, attend, build_mask, dense_mask
from lion_min.core.losses import softcap_logits, token_logprobs


def checkpointing_mode(value) -> str:
    """An activation checkpointing setting as 'off' | 'selective' | 'full' (the booleans it once was:
    True = full, False = off)."""
    return ("full" if value else "off") if isinstance(value, bool) else value


def rope_inv_freq(args: ModelArgs, local: bool = False) -> torch.Tensor:
    """(head_dim / 2,) fp32 inverse frequencies, with the Llama-3.1 rescaling when configured;
    local=True: Gemma-3's sliding layers (rope_local_theta, never scaled)."""
    exponents = torch.arange(0, args.head_dim, 2, dtype=torch.int64).float() / args.head_dim
    inv_freq = 1.0 / ((args.rope_local_theta if local else args.rope_theta)**exponents)
    s = args.rope_scaling
    if not s or local:
        return inv_freq
    if s["rope_type"] == "linear":  # Gemma-3 (4b and up), global layers: positions divided by factor
        return inv_freq / s["factor"]
    # llama3: long wavelengths (beyond the original context / low_freq_factor) are slowed down by
    # `factor`, short ones (below context / high_freq_factor) are kept, and the band in between
    # is interpolated linearly in 1 / wavelength.
    factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_ctx = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_ctx / lo, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_ctx / hi) & (wavelen <= old_ctx / lo)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """positions (B, T) -> cos, sin (B, 1, T, head_dim), computed in fp32 then cast, as HF does."""
    freqs = positions[..., None].float() * inv_freq  # (B, T, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # half-split layout: both HF families use rotate_half
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos + rotated * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, gemma: bool):
        super().__init__()
        self.eps, self.gemma = eps, gemma
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 whatever the activation dtype: a bf16 mean of squares loses bits.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.gemma:
            # Gemma: stored weight is an offset from 1, applied in fp32 before the cast back.
            return (h * (1.0 + self.weight.float())).type_as(x)
        # Llama: cast back first, then scale in the weight's dtype.
        return self.weight * h.type_as(x)

    def reset_parameters(self):
        # Both start as the identity map: Gemma's (1 + w) needs w = 0, Llama's w needs 1.
        nn.init.zeros_(self.weight) if self.gemma else nn.init.ones_(self.weight)


class KVCache(nn.Module):
    """Preallocated keys/values for one layer, plus the doc id written in each slot.

    Sampling left-pads prompts of different lengths; padding slots get doc id -1 and real tokens 0,
    so the same block-diagonal rule as packing keeps real tokens from attending to padding.
    """

    def __init__(self, batch: int, max_len: int, n_kv_heads: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        # A CUDA graph of the decode step (sample.py) writes these in place: tell torch.compile their
        # addresses are fixed, so that it neither copies them nor declines to capture (no guard: a new
        # cache of the same shape re-records the graph instead of recompiling).
        torch._dynamo.mark_static_address(self.k)
        torch._dynamo.mark_static_address(self.v)

    def update(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        self.k[:, :, slots] = k  # (B, Hkv, T, hd) written at `slots`
        self.v[:, :, slots] = v
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        # Gemma-3: queries and keys RMS-normalised per head (Gemma's 1 + w) before RoPE.
        qk_norm = args.family == "gemma3_text"
        self.q_norm = RMSNorm(args.head_dim, args.norm_eps, gemma=True) if qk_norm else None
        self.k_norm = RMSNorm(args.head_dim, args.norm_eps, gemma=True) if qk_norm else None
        # Gemma-2/3: scale by query_pre_attn_scalar ** -0.5 (Gemma-2-27b: not head_dim); others 1/sqrt(hd).
        qpas = args.query_pre_attn_scalar
        self.scale = None if qpas is None else qpas**-0.5
        self.softcap = args.attn_softcap  # Gemma-2: 50, applied inside attend() to the scaled logits
        self.cache: Optional[KVCache] = None

    def forward(self, x, cos, sin, mask: AttnMask, cache_slots: Optional[torch.Tensor] = None):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, Hq, T, hd)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:  # Gemma-3: QK-norm
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache_slots is not None:  # a forward without slots ignores the cache (scoring, training)
            k, v = self.cache.update(cache_slots, k, v)  # (B, Hkv, max_len, hd)
        y = attend(q, k, v, mask, scale=self.scale, softcap=self.softcap)  # (B, Hq, T, hd)
        return self.wo(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=False)  # gate_proj
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)  # down_proj
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=False)  # up_proj
        # Gemma: config says "gelu", which in the original code means the tanh approximation.
        self.act = (lambda g: F.gelu(g, approximate="tanh")) if args.gemma else F.silu

    def forward(self, x):
        return self.w2(self.act(self.w1(x)) * self.w3(x))


def project(h: torch.Tensor, weight: torch.Tensor, targets: Optional[torch.Tensor] = None,
            chunk: int = 1024, softcap: Optional[float] = None) -> torch.Tensor:
    """The output head: h (B, T, dim) -> logits (B, T, vocab) in h's dtype, or, given targets, the
    per-token log p(target) (B, T) fp32 without ever holding the full fp32 logits (losses.py).
    softcap (Gemma-2: 30): logits become softcap * tanh(logits / softcap), on both paths."""
    if targets is None:
        return softcap_logits(F.linear(h, weight), softcap)
    return token_logprobs(h, weight, targets, chunk_size=chunk, softcap=softcap)


class Head(nn.Linear):
    """The untied output projection. A module rather than a bare weight so that FSDP can make it a
    unit of its own with the final norm (parallel.py): FSDP gathers a unit's weights in its forward."""

    def forward(self, h: torch.Tensor, targets: Optional[torch.Tensor] = None, chunk: int = 1024,
                softcap: Optional[float] = None) -> torch.Tensor:
        return project(h, self.weight, targets, chunk, softcap)


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps, args.gemma)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps, args.gemma)
        self.feed_forward = FeedForward(args)
        # Gemma-2/3: sandwich norms, on the attention's and the MLP's outputs before each residual add.
        sandwich = args.sandwich_norms
        self.post_attention_norm = RMSNorm(args.dim, args.norm_eps, True) if sandwich else None
        self.post_ffn_norm = RMSNorm(args.dim, args.norm_eps, True) if sandwich else None

    def forward(self, x, cos, sin, mask: AttnMask, cache_slots=None):
        h = self.attention(self.attention_norm(x), cos, sin, mask, cache_slots)
        x = x + (h if self.post_attention_norm is None else self.post_attention_norm(h))
        h = self.feed_forward(self.ffn_norm(x))
        return x + (h if self.post_ffn_norm is None else self.post_ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps, args.gemma)
        # Gemma and Llama-3.2: the head reuses the embedding matrix (no separate parameter).
        self.output = None if args.tie_embeddings else Head(args.dim, args.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(args), persistent=False)
        # Gemma-3: the sliding layers' RoPE base (10k, unscaled) beside the global layers' (1M).
        local = rope_inv_freq(args, local=True) if args.rope_local_theta is not None else None
        self.register_buffer("inv_freq_local", local, persistent=False)
        # The doc id written in each KV-cache slot while caches are set up (setup_caches); a buffer,
        # like the caches, so that torch.compile sees it as module state rather than a loose input.
        self.register_buffer("cache_doc", None, persistent=False)
        self.attn_backend = "auto"
        """'auto' | 'sdpa' | 'flex' | 'varlen': how doc_ids become a mask (see attention.py)."""
        self.activation_checkpointing = "off"
        """'off' | 'selective' (every other block) | 'full' (every block): recompute those blocks in
        backward instead of keeping their activations (training only; True / False mean full / off)."""

    @property
    def head_weight(self) -> torch.Tensor:
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    def init_weights(self, std: float = 0.02, seed: Optional[int] = None):
        """Random init for training from scratch; also (re)computes the RoPE buffer after to_empty()."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                continue
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen) * std)
        for m in self.modules():
            if isinstance(m, RMSNorm):
                m.reset_parameters()
        self.init_buffers()

    def init_buffers(self):
        self.inv_freq = rope_inv_freq(self.args).to(self.tok_embeddings.weight.device)
        if self.inv_freq_local is not None:
            self.inv_freq_local = rope_inv_freq(self.args, local=True).to(self.inv_freq.device)

    def forward(
        self,
        tokens: torch.Tensor,
        positions: Optional[torch.Tensor] = None,
        doc_ids: Optional[torch.Tensor] = None,
        targets: Optional[torch.Tensor] = None,
        cache_slots: Optional[torch.Tensor] = None,
        logits_chunk: int = 1024,
    ) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, vocab), or per-token log p(target) (B, T) fp32 if targets.

        The log-prob path lives inside forward so that FSDP has the head unsharded while it runs,
        and it never materialises the full fp32 logits (see losses.token_logprobs).
        """
        h = self.hidden(tokens, positions, doc_ids, cache_slots)
        cap = self.args.final_softcap  # Gemma-2: output logits soft-capped at 30
        if self.output is not None:
            return self.output(h, targets, logits_chunk, cap)
        return project(h, self.tok_embeddings.weight, targets, logits_chunk, cap)  # tied: the embedding matrix

    def hidden(
        self,
        tokens: torch.Tensor,
        positions: Optional[torch.Tensor] = None,
        doc_ids: Optional[torch.Tensor] = None,
        cache_slots: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """tokens (B, T) -> final normalised hidden states (B, T, dim).

        positions (B, T): RoPE positions (default 0..T-1). doc_ids (B, T): document of each token for
        block-diagonal attention in packed rows (default: one document per row). cache_slots (T,):
        KV-cache slots these tokens are written to, when caches are set up (setup_caches).
        """
        B, T = tokens.shape
        if positions is None:
            start = 0 if cache_slots is None else cache_slots[0]
            positions = (torch.arange(T, device=tokens.device) + start).expand(B, T)
        h = self.tok_embeddings(tokens)  # (B, T, dim)
        if self.args.gemma:
            # Gemma: scale by sqrt(dim), the factor first rounded to the activation dtype (as trained).
            h = h * torch.tensor(self.args.dim**0.5, dtype=h.dtype)
        # Gemma-2/3: local (sliding-window) layers see only the last `sliding_window` tokens of their
        # own document, so they get a mask of their own (keyed by window, None = global); Gemma-3's
        # also their own RoPE base.
        global_rope = rope_cos_sin(self.inv_freq, positions, h.dtype)
        local_rope = global_rope if self.inv_freq_local is None else rope_cos_sin(self.inv_freq_local, positions, h.dtype)
        windows = {self.args.window(i) for i in range(len(self.layers))}
        if cache_slots is not None:
            masks = {w: self._cache_mask(doc_ids, cache_slots, B, w) for w in windows}
        else:
            masks = {w: build_mask(doc_ids, self.attn_backend, h.dtype, window=w, softcap=self.args.attn_softcap,
                                   rows=(B, T, tokens.device)) for w in windows}
        ac = checkpointing_mode(self.activation_checkpointing)
        for i, layer in enumerate(self.layers):
            window = self.args.window(i)
            (cos, sin), mask = global_rope if window is None else local_rope, masks[window]
            # selective: blocks 0, 2, 4, ... (torchtitan's layer-wise selective AC at frequency 2 takes
            # 1, 3, 5, ...: the same number of blocks for an even number of layers)
            if torch.is_grad_enabled() and (ac == "full" or (ac == "selective" and i % 2 == 0)):
                h = checkpoint(layer, h, cos, sin, mask, cache_slots, use_reentrant=False)
            else:
                h = layer(h, cos, sin, mask, cache_slots)
        return self.norm(h)

    # --- KV cache for generation ---------------------------------------------------------------

    def setup_caches(self, batch: int, max_len: int, dtype=None):
        """Allocate a KV cache per layer; forward then writes at `cache_slots`.

        Caches of the same shape already set up are reused, only marked empty: a step captured in a
        CUDA graph (sample.py) reads the caches at fixed addresses. Stale keys are never attended:
        their slots' doc id is -2, which no query has."""
        w = self.tok_embeddings.weight
        dtype = dtype or w.dtype
        cache = self.layers[0].attention.cache
        if cache is not None and cache.k.shape[0] == batch and cache.k.shape[2] == max_len and cache.k.dtype == dtype:
            self.cache_doc.fill_(-2)
            return
        for layer in self.layers:
            layer.attention.cache = KVCache(batch, max_len, self.args.n_kv_heads, self.args.head_dim, dtype, w.device)
        self.cache_doc = torch.full((batch, max_len), -2, dtype=torch.long, device=w.device)
        torch._dynamo.mark_static_address(self.cache_doc)  # as KVCache's k and v

    def clear_caches(self):
        for layer in self.layers:
            layer.attention.cache = None
        self.cache_doc = None

    def _cache_mask(self, doc_ids, cache_slots, batch, window: Optional[int] = None) -> AttnMask:
        """The dense mask of queries at `cache_slots` over the whole cache. A row's real tokens fill
        consecutive slots, so a sliding window over slots is the window over positions, in prefill
        and in every decode step past the window."""
        q_doc = doc_ids if doc_ids is not None else cache_slots.new_zeros(batch, len(cache_slots))
        self.cache_doc[:, cache_slots] = q_doc
        k_slots = torch.arange(self.cache_doc.shape[1], device=cache_slots.device)
        return AttnMask("sdpa", dense=dense_mask(q_doc, cache_slots, self.cache_doc, k_slots, window))
