"""A tiny random checkpoint of a named family with a real tokenizer: the README's real recipe, tried
end to end on a CPU in minutes, without downloading a model.

    python -m lion_min tiny --family=llama3 --tokenizer=DIR --out=DIR [--layers=2 --dim=64 --seed=0]

--tokenizer is a folder holding the family's real tokenizer.json (and tokenizer_config.json: its
BOS, EOS and chat template). Its weights are random; every other key is the family's
(--family=llama3: Meta-Llama-3-8B's RoPE theta, grouped-query attention and 128,256-token
vocabulary; llama3.2: Llama-3.2-1B's llama3 RoPE scaling and tied head; gemma: gemma-2b's
multi-query attention, head_dim larger than hidden / heads, tied head and 256,000-token
vocabulary), so every quirk the real model has is exercised. The folder is a Hugging Face
checkpoint: transformers loads it, and --model takes it in every stage.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from lion_min.run.config import ConfigError
from lion_min.run.flags import parse_cli

# Each family's real keys; sizes (dim, layers, heads) are the command's. vocab_size: the real
# checkpoint's embedding rows (at least the tokenizer's ids).
FAMILIES = {
    "llama3": dict(family="llama", vocab_size=128256, n_heads=4, n_kv_heads=2, norm_eps=1e-5, rope_theta=500000.0,
                   max_seq_len=8192, tie_embeddings=False),
    "llama3.2": dict(family="llama", vocab_size=128256, n_heads=4, n_kv_heads=2, norm_eps=1e-5, rope_theta=500000.0,
                     max_seq_len=131072, tie_embeddings=True,
                     rope_scaling={"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 8192, "rope_type": "llama3"}),
    "gemma": dict(family="gemma", vocab_size=256000, n_heads=4, n_kv_heads=1, norm_eps=1e-6, rope_theta=10000.0,
                  max_seq_len=8192, tie_embeddings=True),
}


@dataclass
class TinyConfig:
    family: str = "llama3"
    """llama3 | llama3.2 | gemma: whose keys the checkpoint has (module docstring)."""
    tokenizer: str = ""
    """Folder with the family's tokenizer.json (and tokenizer_config.json)."""
    out: str = ""
    """The checkpoint folder to write (new or empty)."""
    layers: int = 2
    dim: int = 64
    """hidden_size; heads as the family has them, head_dim = dim / 4 (gemma: dim / 2, its quirk)."""
    seed: int = 0
    std: float = 0.02
    """Standard deviation of the random weights (norm weights are random too, around the family's 1 or 0)."""

    CHOICES = {"family": tuple(FAMILIES)}
    RANGES = {"layers": "[1, inf)", "dim": "[8, inf)", "std": "(0, inf)"}


def main(argv: Optional[list[str]] = None) -> int:
    """Write the checkpoint (the command line of the module docstring); returns the exit status (0)."""
    cfg = parse_cli(TinyConfig, {}, argv, doc=__doc__)
    if not cfg.tokenizer or not cfg.out:
        raise ConfigError("--tokenizer=DIR and --out=DIR are required")
    out = Path(cfg.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out={cfg.out}: exists and is not an empty folder; name a new one")
    import torch

    from lion_min.core.args import ModelArgs
    from lion_min.core.model import Transformer
    from lion_min.formats.hf import save_model
    from lion_min.formats.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(cfg.tokenizer)
    keys = dict(FAMILIES[cfg.family])
    keys["vocab_size"] = max(keys["vocab_size"], tokenizer.vocab_size)
    heads = keys["n_heads"]
    head_dim = cfg.dim // heads * (2 if keys["family"] == "gemma" else 1)  # gemma-7b's and -2b's head_dim > dim / heads
    args = ModelArgs(**keys, dim=cfg.dim, n_layers=cfg.layers, head_dim=head_dim, hidden_dim=3 * cfg.dim,
                     bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device="cpu")
    model.init_weights(std=cfg.std, seed=cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    with torch.no_grad():  # random norm weights, so a mistake in a norm shows in the outputs
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn(p.shape, generator=gen) * 0.5)
    save_model(model, out, tokenizer=tokenizer, dtype=torch.float32)
    print(f"wrote a random {cfg.family} checkpoint ({args.num_params() / 1e6:.1f}M parameters, vocabulary "
          f"{args.vocab_size:,}) with the tokenizer of {cfg.tokenizer} to {out}")
    return 0

