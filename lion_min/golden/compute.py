"""Making golden numbers (lion_min/golden/compare.py holds their format and the comparison): a model and a
data file through the package's own chat template, packer, model and losses, exactly as the
training scripts compute them, into a golden.Golden (docs/golden.md).

    python -m lion_min golden --model=DIR_OR_HUB_ID --data=FILE --chat_template=chatml --out=DIR
"""

import dataclasses
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

import lion_min
from lion_min.core.chat import ChatFormatError, get_template
from lion_min.core.choices import DPO_LOSS_TYPES
from lion_min.core.dpo import encode_pairs
from lion_min.core.losses import IGNORE_INDEX, dpo_loss, sequence_logps, sft_loss
from lion_min.core.packing import collate, pack
from lion_min.core.sft import encode_conversations
from lion_min.core.train import make_optimizer
from lion_min.formats.data import load_conversations, load_preferences, parse_mixture
from lion_min.formats.data_files import DataError, resolve_files
from lion_min.formats.hf import hash_files, hf_name, load_model
from lion_min.formats.hf_config import resolve_path, weight_files
from lion_min.formats.tokenizer import Tokenizer
from lion_min.golden.compare import FORMAT, Golden
from lion_min.run.config import DTYPES, ConfigError


@dataclass
class GoldenConfig:
    RANGES = {"lr": "[0, inf)"}  # 0 = no optimizer step
    CHOICES = {"chat_template": ("llama3", "gemma", "chatml")}  # named: a golden vector states its template

    model: str = ""
    """Checkpoint folder or hub id; the tokenizer is read from the same folder."""
    revision: Optional[str] = None
    data: str = ""
    """Conversations (SFT) or preference pairs (DPO), told apart by the records' keys (lion_min/formats/data.py)."""
    schema: Optional[str] = None
    chat_template: str = "chatml"
    system_prompt: Optional[str] = None
    """Inserted as the system turn when a conversation has none."""
    out: str = ""
    """Output folder: golden.json and golden.safetensors (it may hold nothing else)."""
    overwrite: bool = False
    """Replace the golden numbers an --out folder already holds."""
    seq_len: int = 2048
    """Row length. SFT: a longer conversation is truncated (or dropped: overflow). DPO: the max_len
    each side (prompt + response) is truncated to."""
    packing: bool = True
    """Several examples per row (per-document positions and attention); false: one per row."""
    loss_mask: bool = True
    """SFT: train on assistant replies only; false: on every token after BOS."""
    train_on: str = "assistant"
    """SFT with loss_mask: 'assistant' (every reply) or 'last'."""
    overflow: str = "truncate"
    """SFT: 'truncate' or 'drop' a conversation longer than seq_len."""
    max_prompt_len: int = 512
    """DPO: keep the last max_prompt_len tokens of a longer prompt (its BOS kept)."""
    dtype: str = "float32"
    """Compute dtype: float32 or bfloat16 (the optimizer step always runs on float32 weights)."""
    device: str = "cpu"
    micro_batch_size: int = 8
    """Rows (SFT) or pairs (DPO) per forward: memory only; the numbers agree to float rounding."""

    ref_model: str = ""
    """DPO reference checkpoint ('' = the model itself)."""
    beta: float = 0.1
    loss_type: str = "sigmoid"
    """sigmoid, ipo or hinge; sigmoid with label_smoothing > 0 is cDPO."""
    label_smoothing: float = 0.0

    lr: float = 0.0
    """> 0: also take one AdamW step at this lr (no clipping, no schedule) and record each tensor's
    change. AdamW's first step is lr * g / (|g| + eps) elementwise, so it checks lr, weight decay
    and which entries get a gradient at all, more than the gradient's size."""
    beta1: float = 0.9
    beta2: float = 0.999
    weight_decay: float = 0.0
    """Decoupled, on matrices only (lion_min.core.train.make_optimizer); AdamW eps is torch's 1e-8."""


# --- fingerprints --------------------------------------------------------------------------------


def sha256_files(files: list[Path]) -> str:
    """sha256 over each file's name and bytes, in the order given."""
    h = hashlib.sha256()
    hash_files(h, files)
    return h.hexdigest()


def _model_files(folder: Path) -> list[Path]:
    return [folder / "config.json", *weight_files(folder)]


def _tokenizer_files(folder: Path) -> list[Path]:
    return [f for f in (folder / "tokenizer.json", folder / "tokenizer_config.json") if f.is_file()]


# --- computing -----------------------------------------------------------------------------------


def _check(cfg: GoldenConfig) -> None:
    for key in ("model", "data"):
        if not getattr(cfg, key):
            raise ConfigError(f"--{key} is required")
    if cfg.dtype not in DTYPES:
        raise ConfigError(f"--dtype={cfg.dtype}: expected float32 or bfloat16")
    if cfg.loss_type not in DPO_LOSS_TYPES:
        raise ConfigError(f"--loss_type={cfg.loss_type}: expected one of {', '.join(DPO_LOSS_TYPES)}")
    if cfg.train_on not in ("assistant", "last"):
        raise ConfigError(f"--train_on={cfg.train_on}: expected assistant or last (use --loss_mask=false for all)")
    if cfg.overflow not in ("truncate", "drop"):
        raise ConfigError(f"--overflow={cfg.overflow}: expected truncate or drop")
    if cfg.beta <= 0:
        raise ConfigError(f"--beta={cfg.beta} must be positive")
    if cfg.seq_len < 2 or cfg.micro_batch_size < 1:
        raise ConfigError("--seq_len must be at least 2 and --micro_batch_size at least 1")
    get_template(cfg.chat_template)


def _load_records(cfg: GoldenConfig) -> tuple[str, list]:
    """("sft", conversations) or ("dpo", preference pairs), whichever the records are."""
    try:
        return "sft", load_conversations(cfg.data, schema=cfg.schema)[0]
    except DataError as as_conversations:
        try:
            return "dpo", load_preferences(cfg.data, schema=cfg.schema)[0]
        except DataError as as_pairs:
            if str(as_pairs) == str(as_conversations):  # not about the records (a missing file, say)
                raise as_pairs from None
            raise DataError(f"{cfg.data}: neither conversations ({as_conversations}) nor preference pairs "
                            f"({as_pairs})") from None


def _rows(examples: list, seq_len: int, pad_id: int, mode: str, overflow: str):
    """The packed rows (with the training targets) and, for the same layout (packing depends only on
    lengths), targets at every next token of each document: (R, T) int64."""
    packed = pack(examples, seq_len, pad_id, mode=mode, overflow=overflow)
    unmasked = [(ids, [False] + [True] * (len(ids) - 1)) for ids, _ in examples]  # as train_on="all"
    every = pack(unmasked, seq_len, pad_id, mode=mode, overflow=overflow)
    return packed, every.rows["targets"]


def _score(model, rows: dict, all_targets: np.ndarray, device):
    """Rows on the device, and log p (R, T) fp32 of every next token; the objective reads only the
    training targets, the per-token output all of them."""
    b = collate(rows, device)
    logp = model(b["tokens"], b["positions"], b["doc_ids"], targets=torch.from_numpy(all_targets).to(device))
    return b, logp


def _per_example(rows: dict, logp: torch.Tensor, example_ids: list[int], out: dict, name: str = "token_logps"):
    """Cut the rows back into examples: ids, effective loss mask and per-token log-probs, where
    entry j of an example is about token j (so position j - 1 of the row)."""
    lp = logp.detach().float().cpu().numpy()
    for r in range(rows["tokens"].shape[0]):
        docs = rows["doc_ids"][r]
        for d in np.unique(docs[docs >= 0]):
            span = np.nonzero(docs == d)[0]
            s, e = int(span[0]), int(span[-1]) + 1
            k = example_ids[d]
            values = np.zeros(e - s, dtype=np.float32)
            values[1:] = lp[r, s : e - 1]
            out[f"{name}.{k}"] = torch.from_numpy(values)
            if name == "token_logps":
                mask = np.zeros(e - s, dtype=np.uint8)
                mask[1:] = rows["targets"][r, s : e - 1] != IGNORE_INDEX
                out[f"input_ids.{k}"] = torch.from_numpy(rows["tokens"][r, s:e].copy())
                out[f"loss_mask.{k}"] = torch.from_numpy(mask)


def _sft(cfg, model, tokenizer, convs, pad_id, mode) -> tuple[dict, dict]:
    train_on = cfg.train_on if cfg.loss_mask else "all"
    examples = encode_conversations(convs, tokenizer, cfg.chat_template, train_on, cfg.system_prompt)
    packed, all_targets = _rows(examples, cfg.seq_len, pad_id, mode, cfg.overflow)
    n_targets, n_rows = packed.target_tokens, len(packed.rows["tokens"])
    tensors, loss = {}, 0.0
    for start in range(0, n_rows, cfg.micro_batch_size):
        sl = slice(start, start + cfg.micro_batch_size)
        rows = {k: v[sl] for k, v in packed.rows.items()}
        b, logp = _score(model, rows, all_targets[sl], cfg.device)
        # The SFT objective over the whole file: each micro-batch divides by the file's target count.
        part = sft_loss(logp, b["targets"], n_targets)
        part.backward()
        loss += part.item()
        _per_example(rows, logp, range(len(examples)), tensors)
    scalars = {"sft_loss": loss, "num_target_tokens": n_targets, "num_examples": packed.num_packed,
               "num_truncated": packed.num_truncated, "num_dropped": packed.num_dropped}
    return scalars, tensors


def _dpo(cfg, model, ref, tokenizer, prefs, pad_id, mode) -> tuple[dict, dict]:
    pairs, st = encode_pairs(prefs, tokenizer, cfg.chat_template, cfg.seq_len, cfg.max_prompt_len, cfg.system_prompt)
    if not pairs:
        raise DataError(f"{cfg.data}: no pair keeps a scored token at --seq_len={cfg.seq_len}")
    P = len(pairs)
    tensors = {}
    policy, reference, losses = torch.zeros(P, 2), torch.zeros(P, 2), torch.zeros(P)
    for start in range(0, P, cfg.micro_batch_size):
        sel = list(range(start, min(P, start + cfg.micro_batch_size)))
        examples = [side for i in sel for side in (pairs[i].chosen, pairs[i].rejected)]
        example_ids = [2 * i + s for i in sel for s in (0, 1)]
        packed, all_targets = _rows(examples, cfg.seq_len, pad_id, mode, "drop")  # sides fit: truncated above
        b, logp = _score(model, packed.rows, all_targets, cfg.device)
        scored = torch.where(b["targets"] != IGNORE_INDEX, logp, 0.0)
        seq = sequence_logps(scored, b["doc_ids"], len(examples))  # (2k,): chosen, rejected, ...
        if ref is None:  # the reference is the model itself: the same forward, without gradient
            ref_logp = logp.detach()
        else:
            with torch.no_grad():
                ref_logp = _score(ref, packed.rows, all_targets, cfg.device)[1]
        ref_seq = sequence_logps(torch.where(b["targets"] != IGNORE_INDEX, ref_logp, 0.0), b["doc_ids"], len(examples))
        part, _, _ = dpo_loss(seq[0::2], seq[1::2], ref_seq[0::2], ref_seq[1::2], cfg.beta, cfg.label_smoothing,
                              cfg.loss_type)
        (part.sum() / P).backward()  # the mean over every pair of the file
        policy[sel] = seq.detach().float().cpu().view(-1, 2)
        reference[sel] = ref_seq.float().cpu().view(-1, 2)
        losses[sel] = part.detach().float().cpu()
        _per_example(packed.rows, logp, example_ids, tensors)
        _per_example(packed.rows, ref_logp, example_ids, tensors, name="ref_token_logps")
    _, chosen_r, rejected_r = dpo_loss(policy[:, 0], policy[:, 1], reference[:, 0], reference[:, 1], cfg.beta,
                                       cfg.label_smoothing, cfg.loss_type)
    tensors |= {"policy_logps": policy, "reference_logps": reference, "dpo_losses": losses}
    scalars = {
        "dpo_loss": losses.double().mean().item(),
        "rewards_chosen": chosen_r.double().mean().item(),
        "rewards_rejected": rejected_r.double().mean().item(),
        "reward_margin": (chosen_r - rejected_r).double().mean().item(),
        "reward_accuracy": (chosen_r > rejected_r).double().mean().item(),
        "num_pairs": P,
        "num_pairs_dropped": st.dropped,
        "num_prompts_truncated": st.prompt_truncated,
        "num_responses_truncated": st.response_truncated,
    }
    return scalars, tensors


def compute(cfg: GoldenConfig) -> Golden:
    """The golden numbers of cfg.model on cfg.data (see the module docstring)."""
    _check(cfg)
    folder = resolve_path(cfg.model, cfg.revision)
    tokenizer = Tokenizer.from_dir(folder)
    kind, records = _load_records(cfg)
    dtype = getattr(torch, cfg.dtype)
    model = load_model(folder, dtype=dtype, device=cfg.device)
    if model.args.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"{folder}: the tokenizer has {tokenizer.vocab_size} ids, the model only "
                          f"{model.args.vocab_size}")
    if cfg.seq_len > model.args.max_seq_len:
        raise ConfigError(f"--seq_len={cfg.seq_len} is above the model's max_position_embeddings "
                          f"({model.args.max_seq_len})")
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    mode = "pack" if cfg.packing else "pad"
    model.train()  # no dropout in either family; train() only so nothing differs from training
    data_files = [f for src in parse_mixture(cfg.data) for f in resolve_files(src.path, src.revision)]
    fingerprints = {"model": sha256_files(_model_files(folder)), "tokenizer": sha256_files(_tokenizer_files(folder)),
                    "template": hashlib.sha256(get_template(cfg.chat_template).jinja.encode()).hexdigest(),
                    "data": sha256_files(data_files)}
    ref = None
    if kind == "dpo" and cfg.ref_model:
        ref_folder = resolve_path(cfg.ref_model, cfg.revision)
        fingerprints["ref_model"] = sha256_files(_model_files(ref_folder))
        ref = load_model(ref_folder, dtype=dtype, device=cfg.device).requires_grad_(False)
    try:
        if kind == "sft":
            scalars, tensors = _sft(cfg, model, tokenizer, records, pad_id, mode)
        else:
            scalars, tensors = _dpo(cfg, model, ref, tokenizer, records, pad_id, mode)
    except ChatFormatError as e:  # say which file the template refused
        raise ChatFormatError(f"{cfg.data}: {e}") from None

    grads = {hf_name(n, model.args.sandwich_norms): p.grad.float() for n, p in model.named_parameters()
             if p.grad is not None}
    per_tensor = {n: g.norm().item() for n, g in grads.items()}
    meta = {
        "format": FORMAT,
        "kind": kind,
        "versions": {"lion_min": getattr(lion_min, "__version__", "unversioned"), "torch": torch.__version__},
        "settings": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "overwrite"},  # how, not what
        "fingerprints": fingerprints,
        "scalars": scalars,
        "grad_norm": {"total": math.sqrt(sum(v * v for v in per_tensor.values())), "per_tensor": per_tensor},
    }
    if cfg.lr > 0:
        meta["update_norm"] = _one_step(cfg, folder, model)
    return Golden(meta=meta, tensors={k: v.contiguous() for k, v in sorted(tensors.items())})


def _one_step(cfg: GoldenConfig, folder: Path, model) -> dict[str, float]:
    """||p_after - p_before|| per tensor after one AdamW step on the float32 weights.

    A bf16 run steps the checkpoint's float32 weights with its gradients cast to float32, as FSDP's
    mixed precision keeps float32 master weights. (Its gradients add up over micro-batches in bf16.)"""
    master = model
    if next(model.parameters()).dtype != torch.float32:
        master = load_model(folder, dtype=torch.float32, device=cfg.device)
        for p32, p in zip(master.parameters(), model.parameters()):
            p32.grad = None if p.grad is None else p.grad.float()
    before = {n: p.detach().clone() for n, p in master.named_parameters()}
    make_optimizer(master, cfg).step()
    sandwich = master.args.sandwich_norms
    return {hf_name(n, sandwich): (p.detach() - before[n]).norm().item() for n, p in master.named_parameters()}
