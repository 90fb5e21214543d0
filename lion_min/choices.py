"""Names a flag may take that a kernel module checks too, in one place that does not import torch:
config.py checks the command line against them before torch is loaded; attention.py and losses.py
check their arguments against them."""

ATTN_BACKENDS = ("auto", "sdpa", "flex", "varlen")
"""How packed documents are isolated (lion_min/attention.py:resolve_backend)."""

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")
"""The DPO objectives (lion_min/losses.py:dpo_loss)."""
