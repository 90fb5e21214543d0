"""Names a flag may take that a kernel module checks too, in one place that does not import torch:
config.py checks the command line against them before torch is loaded; attention.py, losses.py and
parallel.py check their arguments against them. Also the names of the files an export writes, which
the run folder's checks read before torch is loaded."""

ATTN_BACKENDS = ("auto", "sdpa", "flex", "varlen")
"""How packed documents are isolated (lion_min/core/attention.py:resolve_backend)."""

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")
"""The DPO objectives (lion_min/core/losses.py:dpo_loss)."""

AC_MODES = ("auto", "off", "selective", "full")
"""Activation checkpointing; auto chooses from the step's estimated memory (lion_min/run/memory.py:choose_checkpointing)."""

EXPORT_FILES = ("model*.safetensors*", "config.json", "generation_config.json", "tokenizer.json",
                "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json",
                "chat_template.jinja")
"""Files an export writes (checkpoint.save_model). In an existing folder, those the new export lacks
are removed, so that no stale shard or tokenizer file outlives it (a chat_template.jinja would even
win over the config's); --overwrite removes them too (run_folder.RUN_FILES)."""
