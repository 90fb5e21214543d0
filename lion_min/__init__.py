"""lion_min: a minimal, readable reference for the LION alignment pipeline (SFT, DPO, online DPO)."""

from lion_min.checkpoint import load_model, save_model
from lion_min.model import ModelArgs, Transformer

__all__ = ["load_model", "save_model", "ModelArgs", "Transformer"]
