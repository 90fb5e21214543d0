"""The train step and the plain loop every stage shares.

A stage supplies two things:
- `batches`: which rows each rank sees at each step (`micro_batches(step) -> (micros, norm)`, see
  lion_min/run/batches.py), where `norm` is the step's global normaliser (target tokens for SFT,
  pairs for DPO) that every rank knows without communicating, because every rank builds the same
  deterministic plan;
- `objective(model, micro, norm) -> (loss, sums)`: the micro-batch's share of the global mean,
  `losses.global_mean(its sum, norm)`, and the raw sums of the metrics to log.

Because each micro-batch loss is divided by the *global* count, summing gradients over
micro-batches and ranks gives exactly the gradient of the global mean: the loss and the update do
not depend on gradient accumulation or world size (losses.global_mean says why in full; the
logged metrics are the same global means of their sums).

What a real run adds around `steps()` (metrics.jsonl, progress lines, checkpoints, resume,
signals, the export) is lion_min/run/loop.py.
"""

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from lion_min.core.losses import global_mean
from lion_min.core.parallel import Dist, all_reduce_sum, all_reduce_tensor

Objective = Callable[[torch.nn.Module, dict, float], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def lr_at(step: int, total: int, cfg) -> float:
    """Linear warmup over warmup_ratio of the steps, then cosine / linear decay or constant."""
    warmup = math.ceil(cfg.warmup_ratio * total)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.lr_schedule == "constant":
        return cfg.lr
    progress = (step - warmup) / max(1, total - warmup)
    lo = cfg.min_lr_ratio * cfg.lr
    if cfg.lr_schedule == "linear":
        return lo + (cfg.lr - lo) * (1 - progress)
    if cfg.lr_schedule == "cosine":
        return lo + (cfg.lr - lo) * 0.5 * (1 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr_schedule {cfg.lr_schedule!r} (cosine, linear, constant)")


def make_optimizer(model: torch.nn.Module, cfg) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]  # norm weights
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def evaluate(model, objective: Objective, batches, d: Dist) -> dict[str, float]:
    """Exact global mean of every metric over all eval steps (sums divided by the total normaliser)."""
    model.eval()
    totals: dict[str, float] = {}
    norm_total = 0.0
    with torch.no_grad():
        for step in range(batches.num_steps):
            micros, norm = batches.micro_batches(step)
            norm_total += norm
            for micro in micros:
                _, sums = objective(model, micro, norm)
                for k, v in sums.items():
                    totals[k] = totals.get(k, 0.0) + v.double()
    model.train()
    keys = sorted(totals)
    reduced = all_reduce_sum([float(totals[k]) for k in keys], d)
    return {k: global_mean(v, norm_total) for k, v in zip(keys, reduced)}


def train_step(model, objective: Objective, optimizer, micros: list[dict], norm: float, cfg, d: Dist,
               stop_requested: Callable[[], bool], step: int) -> tuple[dict[str, float], float, int, bool, bool]:
    """Forward and backward over the step's micro-batches, one reduction, clip, update.
    stop_requested(): whether this rank was told to stop (a signal); the reduction tells every rank.
    Returns (metrics as global means, grad norm, real tokens of the global batch, whether any rank
    was told to stop, whether the update was skipped as non-finite)."""
    sums: dict[str, torch.Tensor] = {}  # on the device, float64: no host sync per micro-batch
    real_tokens = torch.zeros((), dtype=torch.float64, device=d.device)
    for micro in micros:
        loss, micro_sums = objective(model, micro, norm)
        # FSDP averages gradients over ranks; the loss is already a share of the global mean,
        # so undo that average by scaling with the world size.
        (loss * d.world).backward()
        for k, v in micro_sums.items():
            sums[k] = sums.get(k, 0.0) + v.double()
        real_tokens += (micro["doc_ids"] >= 0).sum()
    keys = sorted(sums)
    # One reduction carries the metrics, the token count and whether any rank was told to stop;
    # with the gradient norm it reaches the host in the step's one sync.
    stop_flag = torch.tensor(float(stop_requested()), dtype=torch.float64, device=d.device)
    reduced = all_reduce_tensor(torch.stack([sums[k] for k in keys] + [real_tokens, stop_flag]), d)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    *host, grad_norm = torch.cat([reduced, grad_norm.double().reshape(1)]).tolist()
    metrics = {k: global_mean(v, norm) for k, v in zip(keys, host)}
    finite = math.isfinite(grad_norm) and all(math.isfinite(v) for v in metrics.values())
    if not finite and not cfg.skip_nonfinite:
        raise FloatingPointError(f"step {step + 1}: non-finite loss or gradient (loss={metrics.get('loss')}, "
                                 f"grad_norm={grad_norm}); rerun with --skip_nonfinite=true to skip such steps")
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if d.device.type == "cuda":
        torch.cuda.synchronize()
    return metrics, grad_norm, int(host[-2]), host[-1] > 0, not finite


@dataclass
class Step:
    """What one optimizer step did (yielded by steps())."""
    step: int  # 0-based; the log calls it step + 1
    lr: float
    metrics: dict[str, float]  # global means of the objective's sums
    grad_norm: float
    real_tokens: int  # of the global batch
    stop: bool  # some rank was told to stop
    skipped: bool  # non-finite, not applied (--skip_nonfinite)
    seconds: float
    micros: list[dict]  # this rank's micro-batches (for MFU)


def steps(model, objective: Objective, optimizer, batches, cfg, d: Dist, start: int, total: int,
          stop_requested: Callable[[], bool] = lambda: False) -> Iterator[Step]:
    """The loop: steps start..total-1 of the schedule, each a train_step at its learning rate.
    --max_steps beyond one pass cycles the data, epoch after epoch (batches.micro_batches)."""
    model.train()
    for step in range(start, total):
        t0 = time.perf_counter()
        lr = lr_at(step, total, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micros, norm = batches.micro_batches(step)
        metrics, grad_norm, real_tokens, stop, skipped = train_step(
            model, objective, optimizer, micros, norm, cfg, d, stop_requested, step)
        yield Step(step, lr, metrics, grad_norm, real_tokens, stop, skipped, time.perf_counter() - t0, micros)
