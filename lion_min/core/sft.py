"""SFT's method: conversations -> tokens with a loss mask -> packed rows -> the token-mean loss.

Conversations are rendered with the chat template and tokenized once (chat.encode_chat), then
packed into rows of seq_len tokens (packing.pack): each document keeps its own positions and
attends only to itself, and only the assistant replies (with their end-of-turn token) are targets
unless the loss mask is off. The objective is the token mean of -log p over every target of the
global batch (losses.sft_loss), whatever the micro-batching or world size.
"""

from lion_min.core.chat import ChatEncoding, encode_chat, with_system
from lion_min.core.losses import sft_loss
from lion_min.core.packing import Packed, pack


def encode_conversations(convs, tokenizer, template: str, train_on: str, system_prompt=None) -> list[ChatEncoding]:
    """Each conversation (after the system prompt, if one is set) -> token ids and the loss mask."""
    return [encode_chat(tokenizer, with_system(c, system_prompt), template, train_on=train_on) for c in convs]


def pack_conversations(convs, tokenizer, cfg) -> Packed:
    """Conversations -> rows of cfg.seq_len tokens: packed (best fit, each document its own positions
    and attention) or one per row (cfg.packing off); the loss mask off trains on every token."""
    train_on = cfg.train_on if cfg.loss_mask else "all"
    examples = encode_conversations(convs, tokenizer, cfg.chat_template, train_on, cfg.system_prompt)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    return pack(examples, cfg.seq_len, pad_id, mode="pack" if cfg.packing else "pad", overflow=cfg.overflow,
                isolate=cfg.isolate_documents)


def sft_objective(model, micro: dict, norm: float):
    """Token-mean cross-entropy over the global batch (norm = its number of target tokens)."""
    logp = model(micro["tokens"], micro["positions"], micro["doc_ids"], targets=micro["targets"])  # (B, T)
    return sft_loss(logp, micro["targets"], norm), {"loss": -logp.detach().sum()}
