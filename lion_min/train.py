"""The training loop all three stages share.

A stage supplies two things:
- `batches` (lion_min/batches.py): which rows each rank sees at each step (`micro_batches(step)`), plus the global
  normaliser of that step (target tokens for SFT, pairs for DPO) that every rank knows without
  communicating, because every rank builds the same deterministic plan;
- `objective(model, micro, norm) -> (loss, sums)`: the micro-batch's share of the global mean,
  `losses.global_mean(its sum, norm)`, and the raw sums of the metrics to log.

Because each micro-batch loss is divided by the *global* count, summing gradients over
micro-batches and ranks gives exactly the gradient of the global mean: the loss and the update do
not depend on gradient accumulation or world size (losses.global_mean says why in full; the
logged metrics are the same global means of their sums).

Resumable checkpoints live in lion_min/train_state.py; the Hugging Face export in checkpoint.py.
"""

import json
import math
import os
import resource
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from lion_min.batches import Batches
from lion_min.checkpoint import save_model
from lion_min.config import ConfigError, TrainConfig, config_to_json, read_json
from lion_min.losses import global_mean
from lion_min.flops import document_lengths, mfu, mfu_useful, peak_flops
from lion_min.parallel import Dist, all_reduce_sum, all_reduce_tensor, raise_if_any
from lion_min.report import Reporter
from lion_min.run_dir import continue_command, overwrite_flag
from lion_min.train_state import (WRITE_ERRORS, CheckpointWriteError, load_checkpoint, resolve_resume,
                                  save_checkpoint, one_line)

Objective = Callable[[torch.nn.Module, dict, float], tuple[torch.Tensor, dict[str, float]]]


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
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


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]  # norm weights
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


# --- throughput ----------------------------------------------------------------------------------

def memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (peak RSS)


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """Every parameter gathered to full size on CPU (a collective under FSDP: all ranks call it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not any(hasattr(p, "full_tensor") for p in model.parameters()):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# --- the loop ------------------------------------------------------------------------------------


def fmt_time(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


@dataclass
class TrainResult:
    steps: int
    eval_loss: Optional[float]


def evaluate(model, objective: Objective, batches: Batches, d: Dist) -> dict[str, float]:
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


def resume_point(cfg: TrainConfig, out_dir: Path, total: int, model, optimizer, d: Dist,
                 run_record: Optional[dict]) -> tuple[int, int, int, Optional[Path]]:
    """(first step, tokens seen, skipped steps, checkpoint) of this run: 0s and None for a fresh one.
    A resume must be of the same run (check_same_run) and have something left to do."""
    summary_file = out_dir / "summary.json"
    resume_from = resolve_resume(cfg, out_dir, d.main)
    if cfg.resume and resume_from is None and summary_file.is_file():
        raise ConfigError(f"--resume={cfg.resume}: {out_dir} holds this run, finished, but no checkpoint to continue "
                          f"from (--save_every=0); {overwrite_flag(cfg)} runs it again from step 0")
    if resume_from is None:
        return 0, 0, 0, None
    check_same_run(resume_from, cfg, run_record, verbose=d.main)
    state = load_checkpoint(resume_from, model, optimizer, d)
    if state["step"] > total:
        raise ConfigError(f"--resume: {resume_from} is at step {state['step']}, but this run has {total} steps "
                          f"(--max_steps={cfg.max_steps}): nothing to train")
    return state["step"], state.get("tokens", 0), state.get("skipped_steps", 0), resume_from


def train_step(model, objective: Objective, optimizer, micros: list[dict], norm: float, cfg: TrainConfig, d: Dist,
               stop: "StopSignals", step: int) -> tuple[dict[str, float], float, int, bool, bool]:
    """Forward and backward over the step's micro-batches, one reduction, clip, update.
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
    stop_flag = torch.tensor(float(stop.received is not None), dtype=torch.float64, device=d.device)
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


def train(
    cfg: TrainConfig,
    model,
    objective: Objective,
    batches: Batches,
    d: Dist,
    *,
    eval_batches: Optional[Batches] = None,
    tokenizer=None,
    chat_template: Optional[str] = None,
    seq_len: int = 0,
    export_dtype: Optional[torch.dtype] = None,
    summary: Optional[dict] = None,
    run_record: Optional[dict] = None,
) -> TrainResult:
    """Run the optimizer over `batches`, log, evaluate, checkpoint, and export a Hugging Face folder
    (weights in `export_dtype`, default: as trained).

    `model` is the parallelized module; its `.args` describe the architecture for MFU and export.
    `run_record` (run_dir.claim's) goes into every checkpoint; a resume must match it.
    SIGTERM / SIGINT stop the run at the next step boundary with a checkpoint (StopRequested).
    --max_steps, when given, is the number of steps (the data is cycled as needed, epoch after
    epoch, as in the Hugging Face Trainer); otherwise every epoch is run.
    """
    out_dir = Path(cfg.out_dir)
    total = cfg.max_steps or batches.num_steps
    if total <= 0:
        raise ValueError("no optimizer steps to run: the data gives fewer rows than one batch")
    done = read_json(out_dir / "summary.json") or {}
    if cfg.resume and done.get("steps") == total:  # the rerun rule: same run, finished -> nothing to do
        if d.main:
            print(f"{out_dir} holds this run, finished ({total} steps) and exported: nothing to do (a larger "
                  f"--max_steps or --epochs continues it; {overwrite_flag(cfg)} runs it again)")
        return TrainResult(total, done.get("eval_loss"))
    optimizer = make_optimizer(model, cfg)
    start, tokens_seen, skipped, resume_from = resume_point(cfg, out_dir, total, model, optimizer, d, run_record)
    metrics_path = out_dir / "metrics.jsonl"
    if d.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "train_config.json").write_text(config_to_json(cfg))
        kept = metrics_until(metrics_path, start, drop_final_eval=start == total)
        metrics_path.write_text("".join(ln + "\n" for ln in kept))
        if start == total:  # killed (or out of disk) during the export: only the export is left to do
            print(f"{resume_from} is the run's last step: exporting")
        else:
            print(f"training {total} steps from step {start}" + (f" (resumed from {resume_from})" if resume_from else ""))
    report = Reporter(cfg, d.main, start)  # --report_to: metrics.jsonl's lines, live (lion_min/report.py)
    stop = StopSignals()
    peak = peak_flops(d.device)
    t_start = time.perf_counter()
    model.train()
    try:
        for step in range(start, total):
            t0 = time.perf_counter()
            lr = lr_at(step, total, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            micros, norm = batches.micro_batches(step)
            metrics, grad_norm, real_tokens, stop_now, was_skipped = train_step(
                model, objective, optimizer, micros, norm, cfg, d, stop, step)
            dt = time.perf_counter() - t0
            tokens_seen, skipped = tokens_seen + real_tokens, skipped + was_skipped
            line = {"step": step + 1, **metrics, "lr": lr, "grad_norm": grad_norm, "tokens": tokens_seen,
                    "tokens_per_s": real_tokens / dt, "step_time_s": dt, "skipped_steps": skipped}
            if peak and seq_len:  # per rank: this rank's rows against its own peak (lion_min/flops.py)
                line["mfu"] = mfu(model.args, sum(m["tokens"].numel() for m in micros), seq_len, dt, peak)
                lengths = [n for m in micros for n in document_lengths(m["doc_ids"].cpu())]
                line["mfu_useful"] = mfu_useful(model.args, lengths, dt, peak)
            line["memory_gib"] = memory_gib(d.device)
            if eval_batches is not None and cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < total:
                line |= {f"eval/{k}": v for k, v in evaluate(model, objective, eval_batches, d).items()}
            if d.main:
                with metrics_path.open("a") as f:
                    f.write(json.dumps(line) + "\n")
                report.sync()
                if (step + 1) % cfg.log_every == 0 or step == start or step + 1 == total:
                    print(progress_line(line, total, eta=(time.perf_counter() - t_start) / (step + 1 - start)
                                        * (total - step - 1)), flush=True)
            counters = {"tokens": tokens_seen, "skipped_steps": skipped, "run": run_record}
            if stop_now and step + 1 < total:
                path = save_checkpoint(out_dir, step + 1, model, optimizer, cfg, d, counters)
                raise StopRequested(f"stopped by {stop.received or 'a signal on another rank'} after step "
                                    f"{step + 1}: checkpoint {path}; continue with {continue_command(cfg)}",
                                    code=130 if stop.received == "SIGINT" else 143)
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < total:
                save_checkpoint(out_dir, step + 1, model, optimizer, cfg, d, counters)
    finally:
        stop.restore()
    if cfg.save_every and start < total:  # the end state too, so a longer --max_steps can continue from it
        save_checkpoint(out_dir, total, model, optimizer, cfg, d,
                        {"tokens": tokens_seen, "skipped_steps": skipped, "run": run_record})
    eval_loss = finish(cfg, model, objective, eval_batches, d, total, tokenizer, chat_template, export_dtype, summary)
    report.sync()  # (the final eval line; each sync flushes, so a run that stops early has sent its lines)
    report.close()
    return TrainResult(total, eval_loss)


def finish(cfg: TrainConfig, model, objective: Objective, eval_batches: Optional[Batches], d: Dist, total: int,
           tokenizer, chat_template: Optional[str], export_dtype: Optional[torch.dtype],
           summary: Optional[dict]) -> Optional[float]:
    """The final eval, the Hugging Face export (never of non-finite weights) and summary.json;
    returns the eval loss."""
    out_dir = Path(cfg.out_dir)
    eval_loss = None
    if eval_batches is not None:
        ev = evaluate(model, objective, eval_batches, d)
        eval_loss = ev.get("loss")
        if d.main:
            with (out_dir / "metrics.jsonl").open("a") as f:
                f.write(json.dumps({"step": total, **{f"eval/{k}": v for k, v in ev.items()}}) + "\n")
            print(f"eval after step {total}: " + " | ".join(f"{k} {v:.4f}" for k, v in ev.items()))
    sd = full_state_dict(model)
    error = None
    if d.main:  # rank 0 writes; the others learn whether it failed instead of waiting for it
        try:
            export(cfg, model, sd, total, eval_loss, tokenizer, chat_template, export_dtype, summary)
        except (FloatingPointError, CheckpointWriteError) as e:
            error = e
    raise_if_any(error, d)
    return eval_loss


def export(cfg: TrainConfig, model, sd: dict, total: int, eval_loss: Optional[float], tokenizer,
           chat_template: Optional[str], export_dtype: Optional[torch.dtype], summary: Optional[dict]) -> None:
    """Rank 0: the Hugging Face folder from the full state dict `sd` (never of non-finite weights),
    then summary.json, which marks the run finished."""
    out_dir = Path(cfg.out_dir)
    for k, v in sd.items():
        if not torch.isfinite(v).all():
            raise FloatingPointError(f"final weights contain NaN/inf in {k}; not exported")
    try:
        save_model(model, out_dir, tokenizer=tokenizer, dtype=export_dtype, state_dict=sd, chat_template=chat_template)
        if summary is not None:  # written aside and moved in too: a summary.json is whole or absent
            summary |= {"steps": total, "eval_loss": eval_loss}
            (out_dir / "summary.json.tmp").write_text(json.dumps(summary, indent=2))
            os.replace(out_dir / "summary.json.tmp", out_dir / "summary.json")
    except WRITE_ERRORS as e:  # disk full, say: the export is written aside and moved in, so nothing half-made stays
        (out_dir / "summary.json.tmp").unlink(missing_ok=True)
        raise CheckpointWriteError(f"{out_dir}: cannot write the Hugging Face export ({one_line(e)}); "
                                   f"the last checkpoint, if any, can be resumed") from e
    print(f"wrote the Hugging Face folder {out_dir}")


class StopRequested(Exception):
    """The run stopped on SIGTERM / SIGINT after saving a checkpoint (run_cli: one line, exit 128 + signal)."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


class StopSignals:
    """While training: SIGTERM (a cluster's preemption) and SIGINT (Ctrl-C) only record that they
    came; the loop agrees on it across ranks and stops at the step boundary with a checkpoint."""

    def __init__(self):
        self.received: Optional[str] = None
        self._old = {}
        if threading.current_thread() is threading.main_thread():  # signal handlers live there only
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._record)

    def _record(self, signum, frame):
        if self.received == "SIGINT" and signum == signal.SIGINT:  # a second Ctrl-C: stop now
            self.restore()
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def restore(self):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old = {}


def metrics_until(path: Path, step: int, drop_final_eval: bool = False) -> list[str]:
    """The lines of metrics.jsonl that a resume from `step` keeps (0: none); a torn last line (a
    crash mid-write) is dropped with a warning. With drop_final_eval (`step` is the run's last: its
    export never finished) so is the eval's line (eval keys only) at `step`, since finish() evaluates
    again; a run continued past its end keeps it."""
    if step == 0 or not path.is_file():
        return []
    kept = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            record = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            print(f"warning: {path}: line {n} is not complete JSON (a crash mid-write?); dropped")
            continue
        final_eval = drop_final_eval and record is not None and record.get("step") == step and all(
            k == "step" or k.startswith("eval/") for k in record)
        if record is not None and record.get("step", 0) <= step and not final_eval:
            kept.append(line)
    return kept


def check_same_run(checkpoint: Path, cfg, run_record: Optional[dict], verbose: bool = True):
    """Resume only the same run: the checkpoint's settings and input fingerprints must match."""
    from lion_min.run_dir import differences

    saved = json.loads((checkpoint / "trainer_state.json").read_text())
    run = saved.get("run") or {"config": saved.get("config", {}), "inputs": {}}
    refused, noted = differences(run["config"], run.get("inputs", {}), cfg, (run_record or {}).get("inputs", {}))
    if refused:
        raise ConfigError(f"--resume: {checkpoint} belongs to another run: {', '.join(refused)} differ "
                          f"(start a new run in another --out_dir, or resume with the same settings)")
    if verbose and Path(cfg.out_dir).resolve() not in checkpoint.resolve().parents:  # else claim said so
        for k in noted:
            print(f"note: resuming {checkpoint} with {k}={getattr(cfg, k)!r} (was {run['config'].get(k)!r})")


# The progress line: these keys, in this order. The rejected reward is left to metrics.jsonl and
# the curves (it is chosen - margin), so a DPO line stays under ~160 characters.
PROGRESS = [("loss", "loss", "{:.4f}"), ("rewards/accuracies", "acc", "{:.3f}"),
            ("rewards/margins", "margin", "{:.3f}"), ("rewards/chosen", "chosen", "{:+.3f}")]


def progress_line(line: dict, total: int, eta: float) -> str:
    """One line per logged step: step, the stage's metrics, lr, grad norm, tokens/s, (MFU,) memory, eta;
    on an eval step a second line with the eval metrics."""
    parts = [f"step {line['step']}/{total}"]
    parts += [f"{short} {fmt.format(line[key])}" for key, short, fmt in PROGRESS if key in line]
    parts += [f"lr {line['lr']:.2e}", f"gnorm {line['grad_norm']:.3f}", f"{line['tokens_per_s']:,.0f} tok/s"]
    if "mfu" in line:
        parts.append(f"mfu {100 * line['mfu']:.1f}%")
    parts += [f"mem {line['memory_gib']:.1f}GiB", f"eta {fmt_time(eta)}"]
    evals = [f"{short} {fmt.format(line['eval/' + key])}" for key, short, fmt in PROGRESS if "eval/" + key in line]
    return " | ".join(parts) + ("\n  eval: " + " | ".join(evals) if evals else "")
