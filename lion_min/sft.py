"""Stage 1: supervised fine-tuning with packing and loss masking.

Conversations are rendered with the chat template and tokenized once (chat.encode_chat), then
packed into rows of seq_len tokens (packing.pack): each document keeps its own positions and
attends only to itself, and only the assistant replies (with their end-of-turn token) are
targets unless loss_mask is off. The objective is the token mean of -log p over every target of
the global batch (losses.sft_loss), whatever the micro-batching or world size.
"""

from dataclasses import dataclass
from typing import Optional

import torch

from lion_min.chat import ChatEncoding, encode_chat, get_template
from lion_min.config import ConfigError, DataConfig, check_values, format_config
from lion_min.data import load_conversations, train_eval_split
from lion_min.losses import sft_loss
from lion_min.packing import Packed, pack
from lion_min.parallel import init_distributed
from lion_min.prepare import prepare_sft
from lion_min.run_dir import claim
from lion_min.stage import check_seq_len, export_dtype, load_policy, opening_summary, resolve_dtype, with_system
from lion_min.train import Batches, TrainResult, eval_size, row_batches, train


@dataclass
class SFTConfig(DataConfig):
    """`data` holds conversations (schema messages | sharegpt | prompt_response)."""

    STAGE = "sft"
    GROUP = "sft"

    out_dir: str = "out/sft"
    # -- sft
    columns: Optional[str] = None
    """Column mapping for the schema's fields, e.g. 'prompt=query,response=response' (MetaMathQA)."""
    seq_len: int = 2048
    """Tokens per packed row (LION: 8192; 2048 fits a 2B-8B model on one GPU without tuning)."""
    packing: bool = True
    """True: bin-pack conversations into rows; False: one conversation per row, padded."""
    isolate_documents: bool = True
    """False: the paper's ablation of naive packing: packed conversations attend to each other and
    positions run on across the row (packing.pack isolate=False)."""
    loss_mask: bool = True
    """True: train on assistant replies only; False: on every token (the paper's ablation)."""
    train_on: str = "assistant"
    """With loss_mask: 'assistant' (every reply) or 'last' (only the last reply)."""
    overflow: str = "truncate"
    """Conversations longer than seq_len: 'truncate' or 'drop' (both counted)."""


def check_config(cfg: SFTConfig):
    """The flags' ranges and choices (again, for a config built in code), then what SFT needs."""
    check_values(cfg)
    if not cfg.model or not cfg.data:
        raise ConfigError(f"--{'model' if not cfg.model else 'data'} is required "
                          f"(run with no flags at all for the built-in demo)")


def parse_columns(spec: Optional[str]) -> Optional[dict[str, str]]:
    if not spec:
        return None
    try:
        return dict(part.split("=", 1) for part in spec.split(","))
    except ValueError:
        raise ConfigError(f"--columns={spec}: expected field=column pairs separated by commas") from None


def encode_conversations(convs, tokenizer, template: str, train_on: str, system_prompt=None) -> list[ChatEncoding]:
    return [encode_chat(tokenizer, with_system(c, system_prompt), template, train_on=train_on) for c in convs]


def sft_rows(convs, tokenizer, cfg: SFTConfig, what: str = "--data") -> Packed:
    """Conversations -> packed (or padded) rows, as the config says. Rows with nothing to train on
    are refused, saying how many conversations lost their replies and why."""
    train_on = cfg.train_on if cfg.loss_mask else "all"
    examples = encode_conversations(convs, tokenizer, cfg.chat_template, train_on, cfg.system_prompt)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    packed = pack(examples, cfg.seq_len, pad_id, mode="pack" if cfg.packing else "pad", overflow=cfg.overflow,
                  isolate=cfg.isolate_documents)
    check_targets(packed, cfg, what)
    return packed


def check_targets(packed: Packed, cfg: SFTConfig, what: str = "--data"):
    """Rows with nothing to train on are refused, saying how many conversations lost their replies."""
    if packed.target_tokens == 0:
        why = "dropped by --overflow=drop" if cfg.overflow == "drop" else "cut off by truncation"
        raise ConfigError(f"{what}: no target tokens to train on: {packed.num_examples} of {packed.num_examples} "
                          f"conversations have no reply token within --seq_len={cfg.seq_len} ({why}; "
                          f"{packed.num_dropped} dropped, {packed.num_truncated} truncated); raise --seq_len")


def sft_objective(model, micro: dict, norm: float):
    """Token-mean cross-entropy over the global batch (norm = its number of target tokens)."""
    logp = model(micro["tokens"], micro["positions"], micro["doc_ids"], targets=micro["targets"])  # (B, T)
    return sft_loss(logp, micro["targets"], norm), {"loss": -logp.detach().sum()}


def eval_batches(rows, cfg: SFTConfig, d) -> Batches:
    """All eval rows (Packed.rows or prepare.PreparedRows) in one pass, in order; rows beyond a
    multiple of micro_batch_size * world are left out (a batch of n takes the first n)."""
    n = eval_size(len(rows["tokens"]) if isinstance(rows, dict) else len(rows), cfg.micro_batch_size, d, "rows")
    return row_batches(rows, n, cfg.micro_batch_size, 1, 0, d, shuffle=False)


def packing_line(p: Packed, num_rows: int, seq_len: int) -> str:
    """The packing summary in one line (the counters of a Packed); python -m lion_min.prepare prints it."""
    return (f"packed {p.num_examples} conversations into {num_rows} rows of {seq_len} tokens: efficiency "
            f"{p.efficiency:.3f}, {p.target_tokens} target tokens, {p.num_truncated} truncated, "
            f"{p.num_dropped} dropped")


def load_sft_data(cfg: SFTConfig) -> tuple[list, list, str]:
    """(train conversations, eval conversations, the LoadStats summary) as the config says."""
    columns = parse_columns(cfg.columns)
    convs, stats = load_conversations(cfg.data, schema=cfg.schema, columns=columns, skip_bad=cfg.skip_bad,
                                      seed=cfg.seed)
    if cfg.eval_data:
        eval_convs, _ = load_conversations(cfg.eval_data, schema=cfg.schema, columns=columns,
                                           skip_bad=cfg.skip_bad, seed=cfg.seed)
    else:
        convs, eval_convs = train_eval_split(convs, cfg.eval_fraction, cfg.seed)
    return convs, eval_convs, stats.summary()


def run(cfg: SFTConfig) -> TrainResult:
    check_config(cfg)
    d = init_distributed(cfg.device)
    torch.manual_seed(cfg.seed)
    dtype = resolve_dtype(cfg.dtype, d.device)
    if d.main:
        print(f"config:\n{format_config(cfg)}")
    model, args, tokenizer, folder = load_policy(cfg, d, dtype)
    check_seq_len(cfg.seq_len, args, default=SFTConfig.seq_len)
    exported = export_dtype(cfg, folder)

    if cfg.data_cache == "off":  # every rank encodes and packs everything, in memory
        convs, eval_convs, data_summary = load_sft_data(cfg)
        packed = sft_rows(convs, tokenizer, cfg)
        rows, num_rows = packed.rows, len(packed.rows["tokens"])
        eval_rows = sft_rows(eval_convs, tokenizer, cfg, "eval data").rows if eval_convs else None
    else:  # prepared once on disk (or now, every rank its share); each rank reads its rows
        prep = prepare_sft(cfg, tokenizer, d, load=lambda: load_sft_data(cfg))
        packed, rows = prep.train.counts, prep.train
        num_rows, eval_rows, data_summary = len(prep.train), prep.eval, prep.data_summary
        check_targets(packed, cfg)
        if d.main:
            print(f"data: {prep.how()}")
    batches = row_batches(rows, cfg.batch_size, cfg.micro_batch_size, cfg.epochs, cfg.seed, d)
    evals = eval_batches(eval_rows, cfg, d) if eval_rows is not None else None
    summary = {
        "data": data_summary,
        "conversations": packed.num_examples, "rows": num_rows,
        "packing_efficiency": packed.efficiency, "truncated": packed.num_truncated, "dropped": packed.num_dropped,
        "target_tokens": packed.target_tokens, "rows_dropped_last_batch": batches.dropped_items,
    }
    if d.main:
        print(opening_summary(cfg, batches, "rows", {
            "data": data_summary.removeprefix("data: "),
            "rows": f"{num_rows} rows of {cfg.seq_len} tokens from {packed.num_examples} "
                    f"conversations ({packed.num_truncated} truncated, {packed.num_dropped} dropped), "
                    f"packing efficiency {packed.efficiency:.3f}",
            "target tokens": f"{packed.target_tokens:,}",
        }, eval_items=evals.num_items if evals else 0, export_dtype=exported))
    inputs = {"--model": folder, "--data": cfg.data, "--eval_data": cfg.eval_data}
    with claim(cfg, d, inputs) as record:
        return train(cfg, model, sft_objective, batches, d, eval_batches=evals, tokenizer=tokenizer,
                     chat_template=get_template(cfg.chat_template).jinja, seq_len=cfg.seq_len,
                     export_dtype=exported, summary=summary, run_record=record)


if __name__ == "__main__":  # python -m lion_min.sft, as train_sft.py
    from lion_min.cli import run_cli, sft_main

    run_cli(sft_main)
