"""A real run around the method's loop (lion_min/core/train.py:steps): the rerun rule and resume,
metrics.jsonl and one progress line per logged step, eval, checkpoints, SIGTERM / SIGINT at a step
boundary, and the Hugging Face export with summary.json, which marks the run finished.

Resumable checkpoints are lion_min/run/resume.py; the Hugging Face folder lion_min/formats/hf.py.
"""

import json
import os
import resource
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from lion_min.core.parallel import Dist
from lion_min.core.train import Objective, evaluate, make_optimizer, steps
from lion_min.formats.hf import save_model
from lion_min.run.batches import Batches
from lion_min.run.config import ConfigError, TrainConfig, config_to_json, read_json
from lion_min.run.faults import raise_if_any
from lion_min.run.flops import document_lengths, mfu, mfu_useful, peak_flops
from lion_min.run.report import Reporter
from lion_min.run.resume import (
    WRITE_ERRORS,
    CheckpointWriteError,
    load_checkpoint,
    one_line,
    resolve_resume,
    save_checkpoint,
)
from lion_min.run.run_folder import continue_command, overwrite_flag

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
    `run_record` (run_folder.claim's) goes into every checkpoint; a resume must match it.
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
    report = Reporter(cfg, d.main, start)  # --report_to: metrics.jsonl's lines, live (lion_min/run/report.py)
    stop = StopSignals()
    peak = peak_flops(d.device)
    t_start = time.perf_counter()
    try:
        for s in steps(model, objective, optimizer, batches, cfg, d, start, total, lambda: stop.received is not None):
            step = s.step
            tokens_seen, skipped = tokens_seen + s.real_tokens, skipped + s.skipped
            line = {"step": step + 1, **s.metrics, "lr": s.lr, "grad_norm": s.grad_norm, "tokens": tokens_seen,
                    "tokens_per_s": s.real_tokens / s.seconds, "step_time_s": s.seconds, "skipped_steps": skipped}
            if peak and seq_len:  # per rank: this rank's rows against its own peak (lion_min/run/flops.py)
                line["mfu"] = mfu(model.args, sum(m["tokens"].numel() for m in s.micros), seq_len, s.seconds, peak)
                lengths = [n for m in s.micros for n in document_lengths(m["doc_ids"].cpu())]
                line["mfu_useful"] = mfu_useful(model.args, lengths, s.seconds, peak)
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
            if s.stop and step + 1 < total:
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
    from lion_min.run.run_folder import differences

    saved = json.loads((checkpoint / "trainer_state.json").read_text())
    run = saved.get("run") or {"config": saved.get("config", {}), "inputs": {}}
    refused, noted = differences(run["config"], run.get("inputs", {}), cfg, (run_record or {}).get("inputs", {}))
    if refused:
        raise ConfigError(f"--resume: {checkpoint} belongs to another run: {', '.join(refused)} differ "
                          f"(start a new run in another --out_dir, or resume with the same settings)")
    if verbose and Path(cfg.out_dir).resolve() not in checkpoint.resolve().parents:  # else claim said so
        for k, was in noted.items():
            print(f"note: resuming {checkpoint} with {k}={getattr(cfg, k)!r} (was {was!r})")


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
