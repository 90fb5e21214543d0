"""Names a flag may take that a kernel module checks too, in one place that does not import torch:
config.py checks the command line against them before torch is loaded; attention.py, losses.py and
parallel.py check their arguments against them."""

ATTN_BACKENDS = ("auto", "sdpa", "flex", "varlen")
"""How packed documents are isolated (lion_min/core/attention.py:resolve_backend)."""

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")
"""The DPO objectives (lion_min/core/losses.py:dpo_loss)."""

AC_MODES = ("auto", "off", "selective", "full")
"""Activation checkpointing; auto chooses from the step's estimated memory (lion_min/core/parallel.py:choose_checkpointing)."""
