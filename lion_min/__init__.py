"""lion_min: a minimal, readable reference for the LION alignment pipeline (SFT, DPO, online DPO)."""

import os

# On a shared CPU machine, OpenMP threads that spin while waiting for each other can make every
# small matmul take milliseconds (measured: 5.4 s vs 0.8 s per training step and 5.4 vs 559
# sampled tokens/s, bench/README.md). It must be set before torch starts its thread pool, so it
# is set here, the first thing any `import lion_min...` runs; an explicit setting in the
# environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from lion_min.checkpoint import load_model, save_model  # noqa: E402
from lion_min.model import ModelArgs, Transformer  # noqa: E402
from lion_min.tokenizer import Tokenizer  # noqa: E402

__version__ = "0.2.0"  # as pyproject.toml
__all__ = ["load_model", "save_model", "ModelArgs", "Transformer", "Tokenizer"]
