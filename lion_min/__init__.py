"""lion_min: a minimal, readable reference for the LION alignment pipeline (SFT, DPO, online DPO)."""

import os

# On a shared CPU machine, OpenMP threads that spin while waiting for each other can make every
# small matmul take milliseconds (bench/README.md, "Sampler on a loaded CPU"). It must be set before
# torch starts its thread pool, so it is set here, the first thing any `import lion_min...` runs;
# an explicit setting in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.2.0"  # as pyproject.toml

# The public names, each from the module that defines it, imported at first use (PEP 562): a
# command line parses its flags and prints --help without loading torch (lion_min/cli.py).
_HOMES = {"load_model": "formats.hf", "save_model": "formats.hf", "ModelArgs": "core.args",
          "Transformer": "core.model", "Tokenizer": "formats.tokenizer"}
__all__ = list(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'lion_min' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"lion_min.{_HOMES[name]}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
