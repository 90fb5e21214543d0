"""The numbers that describe one decoder (ModelArgs), read from a config.json by formats/hf_config.py
and built into a module by model.py. No torch here: a checkpoint folder's config is checked in a
fraction of a second, before torch loads (stages/preflight.py)."""

from dataclasses import dataclass, field
from typing import Optional

FAMILIES = ("llama", "gemma", "gemma2", "gemma3_text")  # the config.json model_type
LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass
class ModelArgs:
    family: str = "llama"
    """'llama', 'gemma', 'gemma2' or 'gemma3_text' (config.json's model_type); every Gemma switches
    the three documented differences (norm, embedding scale, GELU), Gemma-2/3 add sandwich norms and
    Gemma-3 QK-norm; the tied head is `tie_embeddings`."""
    vocab_size: int = 256
    dim: int = 64
    """hidden_size"""
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    """< n_heads: grouped-query attention; 1: multi-query (gemma-2b)."""
    head_dim: int = 16
    hidden_dim: int = 128
    """intermediate_size of the gated MLP."""
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None
    """Llama-3.1/3.2 'llama3' rescaling: factor, low_freq_factor, high_freq_factor,
    original_max_position_embeddings; or Gemma-3's 'linear' (factor), on its global layers only."""
    rope_local_theta: Optional[float] = None
    """Gemma-3: the RoPE base of the sliding-window layers (rope_local_base_freq, 10k), unscaled;
    None: every layer uses rope_theta."""
    layer_types: Optional[tuple] = None
    """Per layer 'full_attention' or 'sliding_attention' (Gemma-2: alternating, starting local;
    Gemma-3: five local then one global). None: all full."""
    sliding_window: Optional[int] = None
    """Tokens a query of a sliding layer sees, itself included (Gemma-2 4096, Gemma-3 512/1024)."""
    query_pre_attn_scalar: Optional[float] = None
    """Gemma-2/3: attention scale is this ** -0.5 (None: head_dim ** -0.5)."""
    attn_softcap: Optional[float] = None
    """Gemma-2: attention logits become cap * tanh(logits / cap) (50)."""
    final_softcap: Optional[float] = None
    """Gemma-2: output logits become cap * tanh(logits / cap) (30)."""
    max_seq_len: int = 8192
    tie_embeddings: bool = False
    bos_token_id: Optional[int] = None
    eos_token_id: object = None
    pad_token_id: Optional[int] = None
    hf_config: dict = field(default_factory=dict, repr=False)
    """The config.json this was read from, kept so an export writes back every key it had."""
    hf_generation_config: dict = field(default_factory=dict, repr=False)
    """The generation_config.json beside it (sampling defaults, stop ids), written back on export."""

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"unknown model family {self.family!r}; expected one of {FAMILIES}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.layer_types is not None:
            self.layer_types = tuple(self.layer_types)
            if len(self.layer_types) != self.n_layers or not set(self.layer_types) <= set(LAYER_TYPES):
                raise ValueError(f"layer_types must name {self.n_layers} layers, each one of {LAYER_TYPES}")
            if "sliding_attention" in self.layer_types and not self.sliding_window:
                raise ValueError("sliding_attention layers need a sliding_window")

    @property
    def gemma(self) -> bool:
        return self.family != "llama"

    @property
    def sandwich_norms(self) -> bool:
        return self.family in ("gemma2", "gemma3_text")

    def window(self, layer: int) -> Optional[int]:
        """The sliding window of layer `layer`, None for a global (full attention) layer."""
        local = self.layer_types is not None and self.layer_types[layer] == "sliding_attention"
        return self.sliding_window if local else None

    def num_params(self, embedding: bool = True) -> int:
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        mlp = 3 * self.dim * self.hidden_dim
        per_layer = attn + mlp + (4 if self.sandwich_norms else 2) * self.dim
        per_layer += 2 * self.head_dim if self.family == "gemma3_text" else 0  # QK-norm weights
        emb = self.vocab_size * self.dim
        head = 0 if self.tie_embeddings else emb
        return self.n_layers * per_layer + self.dim + head + (emb if embedding else 0)
