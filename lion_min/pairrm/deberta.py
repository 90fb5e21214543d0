"""A DeBERTa-v2/v3 encoder (the backbone of PairRM: microsoft/deberta-v3-large).

Against a plain BERT encoder (post-norm blocks: attention, add & LayerNorm, GELU MLP, add & LayerNorm),
DeBERTa differs in a few places, each marked `# DeBERTa:` where it acts:

- no absolute position embedding in v3 (`position_biased_input: false`): positions enter only
  through the attention scores, as relative distances;
- disentangled attention: score(i, j) = content-to-content q_i.k_j + content-to-position
  q_i.pk[d] (c2p) + position-to-content k_j.pq[d] (p2c), with d the bucketed distance i - j and
  pk, pq the relative embeddings projected by the layer's own key / query projections
  (`share_att_key`); all three terms are divided by sqrt(3 * head_dim) instead of sqrt(head_dim);
- relative distances are bucketed: exact up to position_buckets / 2, then log-spaced up to
  max_relative_positions, then clamped, so any sequence length works;
- one table of relative embeddings for the whole encoder, LayerNorm-ed once (`norm_rel_ebd`);
- the embedding LayerNorm's output is zeroed at padding positions.

Inference only (no dropout). Module names are short (`w1`, `ffn_norm`, ...; the attention keeps
DeBERTa's query_proj / key_proj / value_proj, which c2p and p2c reuse); `hf_name` maps them to
DebertaV2Model's tensor names and `load_encoder_weights` reads a checkpoint through it.
"""

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


class DebertaConfigError(ValueError):
    pass


@dataclass
class DebertaArgs:
    vocab_size: int = 128100
    dim: int = 1024
    """hidden_size"""
    n_layers: int = 24
    n_heads: int = 16
    hidden_dim: int = 4096
    """intermediate_size"""
    norm_eps: float = 1e-7
    max_position_embeddings: int = 512
    position_buckets: int = 256
    """> 0: distances are log-bucketed into [-position_buckets, position_buckets)."""
    max_relative_positions: int = -1
    """< 1 means max_position_embeddings; the distance where log buckets reach the last bucket."""
    pos_att_type: tuple[str, ...] = ("p2c", "c2p")
    share_att_key: bool = True
    """True: c2p / p2c project the relative embeddings with the layer's key / query projections."""
    norm_rel_ebd: bool = True
    """"layer_norm" in config.norm_rel_ebd: LayerNorm on the relative embedding table."""
    position_biased_input: bool = False
    """DeBERTa-v2 style absolute position embeddings added to the input (v3 has none)."""
    type_vocab_size: int = 0
    pad_token_id: int = 0
    hf_config: dict = field(default_factory=dict, repr=False)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def max_relative(self) -> int:
        return self.max_relative_positions if self.max_relative_positions >= 1 else self.max_position_embeddings

    @property
    def span(self) -> int:
        """Half the number of rows of the relative embedding table."""
        return self.position_buckets if self.position_buckets > 0 else self.max_relative


def args_from_config(cfg: dict, source: str = "config.json") -> DebertaArgs:
    """A deberta-v2 config.json (as written by transformers; missing keys take its defaults)."""

    def need(key):
        if key not in cfg:
            raise DebertaConfigError(f"{source}: missing required key {key!r}")
        return cfg[key]

    if cfg.get("model_type") != "deberta-v2":
        raise DebertaConfigError(f"{source}: model_type {cfg.get('model_type')!r}, expected 'deberta-v2'")
    if cfg.get("hidden_act", "gelu") != "gelu":
        raise DebertaConfigError(f"{source}: hidden_act {cfg['hidden_act']!r} is not supported (only exact 'gelu')")
    if cfg.get("conv_kernel_size", 0) > 0:
        raise DebertaConfigError(f"{source}: conv_kernel_size > 0 (deberta-v2-xlarge's conv layer) is not supported")
    if cfg.get("embedding_size", cfg.get("hidden_size")) != cfg.get("hidden_size"):
        raise DebertaConfigError(f"{source}: embedding_size != hidden_size is not supported")
    if not cfg.get("relative_attention", False):
        raise DebertaConfigError(f"{source}: relative_attention=false is not supported")
    dim, heads = need("hidden_size"), need("num_attention_heads")
    if dim % heads or cfg.get("attention_head_size", dim // heads) != dim // heads:
        raise DebertaConfigError(f"{source}: hidden_size {dim} must be num_attention_heads x head size")
    pos = cfg.get("pos_att_type") or []
    if isinstance(pos, str):  # "p2c|c2p" in the released files, a list once transformers rewrote it
        pos = [x.strip() for x in pos.lower().split("|")]
    if set(pos) - {"c2p", "p2c"}:
        raise DebertaConfigError(f"{source}: pos_att_type {pos!r} is not supported (c2p, p2c)")
    norm = [x.strip() for x in str(cfg.get("norm_rel_ebd", "none")).lower().split("|")]
    return DebertaArgs(
        vocab_size=need("vocab_size"),
        dim=dim,
        n_layers=need("num_hidden_layers"),
        n_heads=heads,
        hidden_dim=need("intermediate_size"),
        norm_eps=cfg.get("layer_norm_eps", 1e-7),
        max_position_embeddings=cfg.get("max_position_embeddings", 512),
        position_buckets=cfg.get("position_buckets", -1),
        max_relative_positions=cfg.get("max_relative_positions", -1),
        pos_att_type=tuple(x for x in ("p2c", "c2p") if x in pos),
        share_att_key=bool(cfg.get("share_att_key", False)),
        norm_rel_ebd="layer_norm" in norm,
        position_biased_input=bool(cfg.get("position_biased_input", True)),
        type_vocab_size=cfg.get("type_vocab_size", 0),
        pad_token_id=cfg.get("pad_token_id") or 0,
        hf_config=dict(cfg),
    )


def relative_buckets(T: int, args: DebertaArgs, device=None) -> torch.Tensor:
    """(T, T) long: index into the relative embedding table (2 * span rows) for query i, key j.

    DeBERTa: with mid = position_buckets // 2, d = i - j is kept as is while |d| <= mid; beyond,
    it becomes sign(d) * (mid + ceil(log(|d| / mid) / log((max_rel - 1) / mid) * (mid - 1))), so
    buckets widen logarithmically up to max_relative_positions; d + span is then clamped into the
    table, so any length works. Computed in fp32 exactly as transformers does (ceil() rounds alike).
    """
    pos = torch.arange(T, dtype=torch.long, device=device)
    d = pos[:, None] - pos[None, :]
    if args.position_buckets > 0:
        mid = args.position_buckets // 2
        # |d| < mid would give log(0) below; those entries are replaced by d itself anyway.
        abs_d = torch.where((d < mid) & (d > -mid), torch.tensor(mid - 1, device=device), d.abs())
        log_d = torch.ceil(torch.log(abs_d / mid) / torch.log(torch.tensor((args.max_relative - 1) / mid))
                           * (mid - 1)) + mid
        d = torch.where(abs_d <= mid, d.to(log_d.dtype), log_d * torch.sign(d)).long()
    return torch.clamp(d + args.span, 0, 2 * args.span - 1)


class Attention(nn.Module):
    def __init__(self, args: DebertaArgs):
        super().__init__()
        self.args = args
        # Hugging Face names (attention.self.*_proj), biases everywhere as in BERT.
        self.query_proj = nn.Linear(args.dim, args.dim)
        self.key_proj = nn.Linear(args.dim, args.dim)
        self.value_proj = nn.Linear(args.dim, args.dim)
        if not args.share_att_key:
            if "c2p" in args.pos_att_type:
                self.pos_key_proj = nn.Linear(args.dim, args.dim)
            if "p2c" in args.pos_att_type:
                self.pos_query_proj = nn.Linear(args.dim, args.dim)

    def forward(self, x: torch.Tensor, rel: torch.Tensor, buckets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (B, T, dim); rel (2 * span, dim) normalised relative embeddings; buckets (T, T);
        mask (B, 1, T, T) bool, True = may attend. Returns (B, T, dim) before the output dense."""
        B, T, _ = x.shape
        H, hd = self.args.n_heads, self.args.head_dim
        heads = lambda t: t.view(*t.shape[:-1], H, hd).transpose(-3, -2)  # (..., L, dim) -> (..., H, L, hd)
        q, k, v = heads(self.query_proj(x)), heads(self.key_proj(x)), heads(self.value_proj(x))  # (B, H, T, hd)

        # DeBERTa: c2p and p2c terms join q.k, and the scale counts all terms present.
        scale = 1.0 / math.sqrt(hd * (1 + len(self.args.pos_att_type)))
        # The (B, H, T, T) bias is the largest tensor here (2.7 GB for 20 rows of 2048 in bf16), so
        # it is built once and updated in place.
        bias = torch.zeros(B, H, T, T, dtype=x.dtype, device=x.device)
        idx = buckets.expand(B, H, T, T)
        if "c2p" in self.args.pos_att_type:
            pk = heads(self.key_proj(rel) if self.args.share_att_key else self.pos_key_proj(rel))  # (H, 2S, hd)
            # c2p[i, j] = q_i . pk[bucket(i - j)]
            bias.add_(torch.gather(q @ pk.transpose(-1, -2), -1, idx))  # (B, H, T, 2S) -> (B, H, T, T)
        if "p2c" in self.args.pos_att_type:
            pq = heads(self.query_proj(rel) if self.args.share_att_key else self.pos_query_proj(rel))
            # p2c[i, j] = k_j . pq[bucket(i - j)]: gather along the key's row, then swap back.
            bias.add_(torch.gather(k @ pq.transpose(-1, -2), -1, idx.transpose(-1, -2)).transpose(-1, -2))
        # Masked entries are set to the dtype's minimum, not -inf, as transformers does: a padding
        # query row then attends uniformly instead of producing NaNs that would leak into values.
        bias.mul_(scale).masked_fill_(~mask, torch.finfo(x.dtype).min)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)  # (B, H, T, hd)
        return out.transpose(1, 2).reshape(B, T, -1)


class Block(nn.Module):
    """Post-norm, as BERT: x = LN(x + attn(x)); x = LN(x + mlp(x))."""

    def __init__(self, args: DebertaArgs):
        super().__init__()
        self.attention = Attention(args)
        self.attention_out = nn.Linear(args.dim, args.dim)
        self.attention_norm = nn.LayerNorm(args.dim, eps=args.norm_eps)
        self.w1 = nn.Linear(args.dim, args.hidden_dim)
        self.w2 = nn.Linear(args.hidden_dim, args.dim)
        self.ffn_norm = nn.LayerNorm(args.dim, eps=args.norm_eps)

    def forward(self, x, rel, buckets, mask):
        x = self.attention_norm(x + self.attention_out(self.attention(x, rel, buckets, mask)))
        return self.ffn_norm(x + self.w2(F.gelu(self.w1(x))))


class DebertaEncoder(nn.Module):
    def __init__(self, args: DebertaArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.pos_embeddings = nn.Embedding(args.max_position_embeddings, args.dim) if args.position_biased_input else None
        self.type_embeddings = nn.Embedding(args.type_vocab_size, args.dim) if args.type_vocab_size > 0 else None
        self.embed_norm = nn.LayerNorm(args.dim, eps=args.norm_eps)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        # DeBERTa: one relative-position table shared by every layer.
        self.rel_embeddings = nn.Embedding(2 * args.span, args.dim)
        self.rel_norm = nn.LayerNorm(args.dim, eps=args.norm_eps) if args.norm_rel_ebd else None

    def forward(self, ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """ids (B, T), attention_mask (B, T) 1 = token, 0 = padding -> last hidden states (B, T, dim).

        Padding may sit anywhere, but relative positions count padding slots too, so right-pad to
        get the same numbers as an unpadded row."""
        B, T = ids.shape
        keep = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        h = self.tok_embeddings(ids)
        if self.pos_embeddings is not None:
            h = h + self.pos_embeddings(torch.arange(T, device=ids.device))
        if self.type_embeddings is not None:  # PairRM passes no token types: all type 0
            h = h + self.type_embeddings.weight[0]
        # DeBERTa: the embedding output is zeroed at padding positions.
        h = self.embed_norm(h) * keep[..., None].to(h.dtype)
        # A pair (i, j) may attend when both are real tokens (padding rows attend to nothing,
        # which the min-fill in Attention turns into a harmless uniform average).
        mask = (keep[:, :, None] & keep[:, None, :])[:, None]  # (B, 1, T, T)
        rel = self.rel_embeddings.weight
        if self.rel_norm is not None:
            rel = self.rel_norm(rel)
        buckets = relative_buckets(T, self.args, ids.device)
        for layer in self.layers:
            h = layer(h, rel, buckets, mask)
        return h

    def flops(self, B: int, T: int) -> int:
        """Forward FLOPs for B rows of T tokens: per token and layer 2 x (weight matmuls + q.k and
        p.v over T keys + c2p / p2c against the 2 * span relative rows), plus, once per forward and
        layer, projecting the relative table for c2p / p2c."""
        a = self.args
        per_token = 4 * a.dim * a.dim + 2 * a.dim * a.hidden_dim + 2 * T * a.dim + len(a.pos_att_type) * 2 * a.span * a.dim
        rel_table = len(a.pos_att_type) * 2 * a.span * a.dim * a.dim
        return a.n_layers * 2 * (B * T * per_token + rel_table)


# Our names <- Hugging Face DebertaV2Model names (relative to the model, without a prefix).
_TOP = {
    "tok_embeddings.weight": "embeddings.word_embeddings.weight",
    "pos_embeddings.weight": "embeddings.position_embeddings.weight",
    "type_embeddings.weight": "embeddings.token_type_embeddings.weight",
    "embed_norm.weight": "embeddings.LayerNorm.weight",
    "embed_norm.bias": "embeddings.LayerNorm.bias",
    "rel_embeddings.weight": "encoder.rel_embeddings.weight",
    "rel_norm.weight": "encoder.LayerNorm.weight",
    "rel_norm.bias": "encoder.LayerNorm.bias",
}
_LAYER = {
    "attention.": "attention.self.",
    "attention_out.": "attention.output.dense.",
    "attention_norm.": "attention.output.LayerNorm.",
    "w1.": "intermediate.dense.",
    "w2.": "output.dense.",
    "ffn_norm.": "output.LayerNorm.",
}


def hf_name(name: str) -> str:
    """Our parameter name -> the DebertaV2Model tensor name."""
    if name in _TOP:
        return _TOP[name]
    _, i, rest = name.split(".", 2)  # layers.{i}.{rest}
    for ours, theirs in _LAYER.items():
        if rest.startswith(ours):
            return f"encoder.layer.{i}.{theirs}{rest[len(ours):]}"
    raise KeyError(name)


@torch.no_grad()
def load_encoder_weights(model: DebertaEncoder, get, prefix: str = "") -> set[str]:
    """Copy every parameter from get(hf_tensor_name) (e.g. a safetensors handle's get_tensor);
    returns the set of names read, so the caller can report tensors left over."""
    used = set()
    for name, p in model.named_parameters():
        key = prefix + hf_name(name)
        t = get(key)
        if t.shape != p.shape:
            raise DebertaConfigError(f"tensor {key} has shape {tuple(t.shape)}, the config says {tuple(p.shape)}")
        p.copy_(t)
        used.add(key)
    return used
