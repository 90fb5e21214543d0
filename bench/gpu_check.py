"""One prepared check of every GPU code path: correctness and speed on one H100 or H200.

    python bench/gpu_check.py --out=gpu_check.txt     # one H100/H200, pip torch + this repository, < 8 min
    python bench/gpu_check.py --smoke                  # the same code paths at tiny shapes on the CPU (a test)
    python bench/gpu_check.py --sections=sft,sample    # a subset

Sections (each prints its own header; a failure is printed and the next section runs):
  attention  sdpa (dense mask), flex and varlen in bf16 against SDPA with the dense mask in fp32,
             packed documents, T = 4096, Gemma-2b heads (8 / 1 kv, head_dim 256), Llama-3-8B
             heads (32 / 8 kv, 128) and Gemma-2-2b heads (8 / 4 kv, 256) with the attention soft-cap
             (50) and a sliding window (256 here, so that it acts on these documents): max error of
             the output and of dq, dk, dv; mask build, forward and forward + backward times; TFLOP/s
             of the useful (document-causal, windowed) work.
  compile    the bf16 FSDP2 (1 rank) + activation checkpointing + compiled-blocks SFT step against
             the eager bf16 FSDP2 step, same init and row: loss, grad norm, cosine of the AdamW
             updates; the eager fp32 step beside them gives the scale of bf16 rounding.
  sft        the SFT step (bf16 FSDP2 + compile, activation checkpointing as auto picks it here, one
             packed 8192-token row with document masks, AdamW) for a Gemma-2b-shaped random model,
             then a Gemma-2-2b-shaped one (flex with the soft-cap score_mod and the 4096 window, the
             final-logit soft-cap in the head):
             tokens/s, MFU in torchtitan's convention (against the datasheet peak and the measured
             matmul ceiling) and useful MFU (lion_min/run/flops.py), peak memory beside the estimate,
             and the head's share of the step (the head and log-probs alone, forward + backward).
  dpo        the DPO step (policy forward + backward, live reference forward, AdamW), and with the
             reference log-probs precomputed, against the SFT step on the same packed row of
             preference pairs (Llama-3.2-1B shape).
  sample     sampler decode tokens/s at batch 64 (compiled CUDA-graph step and eager) against the
             HBM roofline (weights plus the KV cache read once per step).
  (sft and sample also print the kernels that took the most time in one profiled step / generate.)
  pipeline   the debug pipeline end to end under torchrun with compile (train_sft.py, train_dpo.py,
             train_online.py with --preset=debug; the online stage samples with the CUDA-graph
             decode step), each stage under its own timeout.
  cli        the real train_sft.py under torchrun --nproc_per_node=1 on a random-weight Gemma-2b
             folder this script writes (the real config, a character tokenizer with the ChatML
             special tokens), 8192-token packed rows, compile, a few steps: tok/s, MFU and memory
             from its metrics.jsonl.

The last lines are a summary table: every figure beside its target from issue 23. The whole run
keeps to --budget seconds (default 470): a section that no longer fits is skipped and says so, and
the subprocess sections get what is left as their timeout.

Models are random (no download) and built from the package (lion_min.core.model, losses, packing,
parallel) the way the training scripts build them. --smoke runs each section at tiny shapes on
the CPU, where varlen (CUDA only) and FlexAttention's backward (no CPU kernel) are skipped with a
note, and the cli and pipeline sections run without compile. --out=FILE also writes everything
printed to FILE (atomically, at the end).
"""

import argparse
import dataclasses
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from functools import partial
from pathlib import Path
from typing import Optional

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from lion_min.core.args import ModelArgs  # noqa: E402
from lion_min.core.attention import attend, build_mask, resolve_backend  # noqa: E402
from lion_min.core.losses import IGNORE_INDEX, dpo_loss, sequence_logps, sft_loss, token_logprobs  # noqa: E402
from lion_min.core.model import RMSNorm, Transformer  # noqa: E402
from lion_min.core.packing import collate, pack  # noqa: E402
from lion_min.core.parallel import Dist, build_model  # noqa: E402
from lion_min.core.sample import generate  # noqa: E402
from lion_min.formats.hf_config import args_from_config  # noqa: E402
from lion_min.run.flops import (attention_flops_per_pair, causal_pairs, device_peaks,  # noqa: E402
                                document_lengths, matmul_params, mfu, mfu_useful)
from lion_min.run.memory import GiB, choose_checkpointing, step_memory  # noqa: E402

# pipeline before cli: its online stage has never run on a GPU, while cli's MFU repeats sft's
# through the real script; if the budget runs short, cli is the one skipped.
SECTIONS = ("attention", "compile", "sft", "dpo", "sample", "pipeline", "cli")
# Seconds a section needs at least on one H100/H200 (from the 2026-12-04 run, rounded up; sft's
# Gemma-2-2b shape, added since, counted as much again as Gemma-2b's); one that no longer fits in
# what is left of --budget is skipped. --smoke ignores these.
MIN_SECONDS = {"attention": 45, "compile": 40, "sft": 130, "dpo": 30, "sample": 45, "cli": 120, "pipeline": 120}

# issue 23's targets, as (what, target text, check of the measured value)
PEAK_MFU, HEAD_SHARE, FIRST_STEP_S, DECODE_ROOFLINE, DPO_LIVE, DPO_PRE = 0.50, 0.10, 30.0, 0.50, 1.3, 1.0


class Skip(Exception):
    """A kernel this device has no version of (said so, not counted as a failure)."""


class Check:
    """Shapes and repeats for a GPU run or a --smoke run, and the output, tee'd to a file."""

    def __init__(self, smoke: bool, device: torch.device, attn_backend: str = "auto"):
        self.smoke, self.device, self.attn_backend = smoke, device, attn_backend
        self.lines: list[str] = []
        self.failures: list[str] = []
        self.reps = 1 if smoke else 5
        self.peak_flops, self.hbm = device_peaks(device) or (None, None)
        self.ceiling = None  # measured bf16 matmul TFLOP/s (set by main)
        self.deadline = float("inf")
        self.results: list[tuple[str, str, str, str]] = []  # (what, measured, target, verdict)

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def result(self, what: str, measured: str, target: str = "", ok: Optional[bool] = None, speed: bool = True):
        """One row of the closing summary. ok None: no target. A speed target is not judged on the CPU."""
        if self.device.type != "cuda" and ok is not None and speed:
            verdict = "n/a on CPU"
        else:
            verdict = {True: "met", False: "NOT met", None: "-"}[ok]
        self.results.append((what, measured, target, verdict))

    def print(self, *parts):
        line = " ".join(str(p) for p in parts)
        print(line, flush=True)
        self.lines.append(line)

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def timed(self, fn, reps=None) -> float:
        """Median seconds per call of fn, after one warm-up call."""
        fn()
        self.sync()
        times = []
        for _ in range(reps or self.reps):
            t = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    def model_args(self, name: str) -> ModelArgs:
        """The real config (tests/data/configs) or, for --smoke, a tiny model of the same family."""
        args = args_from_config(json.loads((ROOT / "tests/data/configs" / f"{name}.json").read_text()))
        if self.smoke:
            gemma = args.family == "gemma"
            tiny = ModelArgs(family=args.family, vocab_size=512, dim=64, n_layers=2, n_heads=4,
                             n_kv_heads=1 if gemma else 2, head_dim=32 if gemma else 16, hidden_dim=128,
                             tie_embeddings=args.tie_embeddings, rope_scaling=args.rope_scaling, max_seq_len=1024)
            if args.sandwich_norms:  # Gemma-2/3: the same soft-caps, first two layer types, a window that acts at T 256
                tiny = dataclasses.replace(tiny, layer_types=args.layer_types[:2], sliding_window=64,
                                           query_pre_attn_scalar=args.query_pre_attn_scalar, attn_softcap=args.attn_softcap,
                                           final_softcap=args.final_softcap, rope_local_theta=args.rope_local_theta)
            args = tiny
        return args

    def top_kernels(self, label: str, fn, n: int = 8):
        """Profile one call of fn and print the n kernels (CPU ops on the CPU) that took the most time:
        where a step's time goes, for the next session with a GPU to act on."""
        from torch.profiler import ProfilerActivity, profile

        cuda = self.device.type == "cuda"
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            fn()
            self.sync()
        events = prof.key_averages()
        if cuda:  # device_time_total from torch 2.4; cuda_time_total before
            spent = lambda e: getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0))
        else:
            spent = lambda e: e.self_cpu_time_total
        total = sum(spent(e) for e in events) or 1
        self.print(f"  top {n} {'kernels' if cuda else 'ops'} by self time, {label} ({total / 1e3:.1f} ms in all):")
        for e in sorted(events, key=spent, reverse=True)[:n]:
            self.print(f"    {spent(e) / 1e3:8.2f} ms {spent(e) / total:6.1%}  x{e.count:<5d} {e.key[:90]}")

    def peak_memory(self) -> str:
        if self.device.type != "cuda":
            return "n/a on CPU"
        return f"{torch.cuda.max_memory_allocated(self.device) / 2**30:.1f} GiB"

    def reset_memory(self):
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)


def packed_lengths(rng: np.random.Generator, T: int, median: float, fill: float = 0.97) -> list[int]:
    """Log-normal document lengths (sigma 0.8) filling about `fill` of a T-token row."""
    lengths: list[int] = []
    while True:
        n = int(np.clip(round(rng.lognormal(np.log(median), 0.8)), 8, T // 2))
        if sum(lengths) + n > fill * T:
            return lengths
        lengths.append(n)


def packed_row(rng: np.random.Generator, T: int, vocab: int, lengths: list[int], device) -> dict:
    """One (1, T) row from the packer: chat-like documents (first ~30% prompt, not trained)."""
    examples = []
    for n in lengths:
        prompt = max(1, int(0.3 * n))
        examples.append((rng.integers(0, vocab, n).tolist(), [False] * prompt + [True] * (n - prompt)))
    packed = pack(examples, T, pad_id=0)
    assert len(packed.rows["tokens"]) == 1, "the documents were chosen to fit one row"
    return {k: v.to(device) for k, v in collate(packed.rows).items()}


def full(p: torch.Tensor) -> torch.Tensor:
    """A parameter or gradient as one plain tensor (FSDP holds DTensor shards)."""
    return p.full_tensor() if hasattr(p, "full_tensor") else p


# --- attention -------------------------------------------------------------------------------------


def section_attention(c: Check):
    T, B = (200, 2) if c.smoke else (4096, 2)
    # (query heads, kv heads, head_dim, attention soft-cap, sliding window)
    shapes = {"gemma-2b heads": (8, 1, 256, None, None), "llama-3-8b heads": (32, 8, 128, None, None),
              "gemma-2-2b heads, soft-cap 50, window 256": (8, 4, 256, 50.0, 256)}
    if c.smoke:
        shapes = {"gemma-2b heads (tiny)": (4, 1, 32, None, None), "llama-3-8b heads (tiny)": (8, 2, 16, None, None),
                  "gemma-2-2b heads (tiny), soft-cap 50, window 16": (4, 2, 32, 50.0, 16)}
    rng = np.random.default_rng(0)
    doc_ids = torch.full((B, T), -1, dtype=torch.long)
    for b in range(B):
        start = 0
        for i, n in enumerate(packed_lengths(rng, T, median=T / 10)):
            doc_ids[b, start : start + n] = 1000 * b + i
            start += n
    doc_ids = doc_ids.to(c.device)
    lengths = document_lengths(doc_ids)
    c.print(f"B {B} x T {T}, {len(lengths)} documents, {(doc_ids < 0).float().mean():.1%} padding; "
            f"errors: max |bf16 - fp32| of the output, and max |error| / max |reference| of dq, dk, dv")
    for name, (Hq, Hkv, hd, softcap, window) in shapes.items():
        torch.manual_seed(0)
        q = torch.randn(B, Hq, T, hd, device=c.device)
        k, v = torch.randn(B, Hkv, T, hd, device=c.device), torch.randn(B, Hkv, T, hd, device=c.device)
        grad_out = torch.randn(B, Hq, T, hd, device=c.device)
        keep = (doc_ids >= 0)[:, None, :, None]  # padding rows are not compared (nothing reads them)

        def forward(backend, dtype, grad: bool):
            leaves = [x.to(dtype, copy=True).requires_grad_(grad) for x in (q, k, v)]
            mask = build_mask(doc_ids, backend, dtype, window=window, softcap=softcap)
            return leaves, attend(*leaves, mask, softcap=softcap)

        ref_leaves, ref = forward("sdpa", torch.float32, True)
        ref.backward(grad_out)
        ref_grads = [x.grad for x in ref_leaves]
        # model FLOPs of the useful work: forward 4 hd Hq per pair, forward + backward 3 times that;
        # with a window, a query pairs with at most `window` keys of its document
        useful = sum(causal_pairs(n, window) for n in lengths)
        fwd_flops = attention_flops_per_pair(ModelArgs(n_layers=1, n_heads=Hq, n_kv_heads=Hkv, head_dim=hd)) * useful / 3
        c.print(f"{name}: heads {Hq} / kv {Hkv}, head_dim {hd}; {fwd_flops / 1e9:.1f} GFLOP useful forward work")
        c.print(f"  {'backend':8s} {'out err':>8s} {'dq err':>8s} {'dk err':>8s} {'dv err':>8s} {'mask ms':>8s} "
                f"{'fwd ms':>8s} {'fwd TF/s':>8s} {'f+b ms':>8s} {'f+b TF/s':>8s}")
        best = {}
        for backend in ("sdpa", "flex", "varlen"):
            try:
                try:
                    resolve_backend(backend, c.device, torch.bfloat16, softcap, window)
                except ValueError as e:
                    raise Skip(str(e)) from None
                mask_s = c.timed(lambda: build_mask(doc_ids, backend, torch.bfloat16, window=window, softcap=softcap))
                with torch.no_grad():
                    _, out = forward(backend, torch.bfloat16, False)
                    fwd_s = c.timed(lambda: forward(backend, torch.bfloat16, False))
                out_err = ((out.float() - ref) * keep).abs().max().item()
                if c.device.type == "cpu" and backend == "flex":
                    c.print(f"  {backend:8s} {out_err:8.1e} {'-':>8s} {'-':>8s} {'-':>8s} {mask_s * 1e3:8.2f} "
                            f"{fwd_s * 1e3:8.2f} {fwd_flops / fwd_s / 1e12:8.2f}   backward skipped: FlexAttention "
                            f"has no CPU backward")
                    continue
                leaves, out = forward(backend, torch.bfloat16, True)
                out.backward(grad_out.to(torch.bfloat16))
                errs = [((x.grad.float() - r).abs().max() / r.abs().max()).item() for x, r in zip(leaves, ref_grads)]

                def fwd_bwd():
                    _, o = forward(backend, torch.bfloat16, True)
                    o.backward(grad_out.to(torch.bfloat16))

                fb_s = c.timed(fwd_bwd)
                best[backend] = fb_s
                c.print(f"  {backend:8s} {out_err:8.1e} {errs[0]:8.1e} {errs[1]:8.1e} {errs[2]:8.1e} {mask_s * 1e3:8.2f} "
                        f"{fwd_s * 1e3:8.2f} {fwd_flops / fwd_s / 1e12:8.2f} {fb_s * 1e3:8.2f} "
                        f"{3 * fwd_flops / fb_s / 1e12:8.2f}")
            except Skip as e:
                c.print(f"  {backend:8s} skipped: {e}")
            except Exception as e:  # report it and go on with the other kernels
                c.failures.append(f"attention {backend} ({name})")
                c.print(f"  {backend:8s} FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
        auto = resolve_backend("auto", c.device, torch.bfloat16, softcap, window)
        fastest = min(best, key=best.get) if best else "none"
        c.print(f"  auto picks {auto} for bf16 here; fastest forward + backward measured: {fastest}"
                + ("" if auto == fastest or c.device.type == "cpu" else "  <-- auto is not the fastest"))
        c.result(f"attention {name}: fastest f+b", ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in
                                                             sorted(best.items(), key=lambda kv: kv[1])) or "none ran",
                 f"auto ({auto}) is the fastest", auto == fastest if best else None)


# --- compile / AC / FSDP step ----------------------------------------------------------------------


def sft_step(model, opt, row: dict) -> tuple[float, float]:
    """One SFT optimizer step on one row: (loss, grad norm)."""
    n_targets = float((row["targets"] != IGNORE_INDEX).sum())
    logp = model(row["tokens"], row["positions"], row["doc_ids"], targets=row["targets"])
    loss = sft_loss(logp, row["targets"], n_targets)
    loss.backward()
    norm = full(torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf")))
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item(), norm.item()


def wrapped(c: Check, args: ModelArgs, state: dict, dtype: torch.dtype, compile: bool, ac):
    """The model as the training scripts build it (meta init, parallelize, weights from `state`)."""
    model = build_model(args, Dist(0, 1, 0, c.device), load_weights=lambda: state, param_dtype=dtype,
                        activation_checkpointing=ac, compile=compile, attn_backend=c.attn_backend)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)


def init_state(args: ModelArgs) -> dict:
    cpu = Transformer(args)
    cpu.init_weights(seed=0)
    return cpu.state_dict()


def section_compile(c: Check):
    args = c.model_args("llama-3.2-1b")
    if not c.smoke:
        args.n_layers = 4  # the real block shapes, fewer of them: this section compares, it does not time
    T = 256 if c.smoke else 4096
    row = packed_row(np.random.default_rng(1), T, args.vocab_size, packed_lengths(np.random.default_rng(2), T, T / 10),
                     c.device)
    state = init_state(args)
    results = {}
    for name, dtype, compile, ac in (("eager fp32", torch.float32, False, False),
                                     ("eager bf16 FSDP2", torch.bfloat16, False, False),
                                     ("bf16 FSDP2 + AC + compile", torch.bfloat16, True, True)):
        model, opt = wrapped(c, args, state, dtype, compile, ac)
        before = [full(p).detach().float().clone() for p in model.parameters()]
        t = time.perf_counter()
        loss, norm = sft_step(model, opt, row)
        c.sync()
        first = time.perf_counter() - t
        update = [full(p).detach().float() - b for p, b in zip(model.parameters(), before)]
        results[name] = (loss, norm, update)
        c.print(f"  {name:28s} loss {loss:.6f}  grad norm {norm:.6f}  (first step {first:.1f} s, compile included)")
        del model, opt, before
        c.reset_memory()

    def cosine(a, b):
        dot = sum((x * y).sum() for x, y in zip(a, b))
        return (dot / math.sqrt(sum((x * x).sum() for x in a) * sum((y * y).sum() for y in b))).item()

    (l32, n32, u32), (le, ne, ue), (lc, nc, uc) = results.values()
    c.print(f"  compiled vs eager bf16: |loss diff| {abs(lc - le):.2e}, grad norm ratio {nc / ne:.5f}, "
            f"update cosine {cosine(uc, ue):.5f}")
    c.print(f"  (scale) eager bf16 vs fp32: |loss diff| {abs(le - l32):.2e}, grad norm ratio {ne / n32:.5f}, "
            f"update cosine {cosine(ue, u32):.5f}")
    # Compiled kernels round differently, but by no more than bf16 itself does (with some slack).
    bad = abs(lc - le) > 2 * abs(le - l32) + 1e-4 * abs(le) or 1 - cosine(uc, ue) > 2 * (1 - cosine(ue, u32)) + 1e-3
    c.result("compiled vs eager bf16 step", f"loss diff {abs(lc - le):.1e}, cosine {cosine(uc, ue):.4f}",
             "within bf16 rounding", not bad, speed=False)
    if bad:
        raise AssertionError("the compiled step differs from the eager one by more than bf16 rounding explains")


# --- SFT and DPO steps -----------------------------------------------------------------------------


def section_sft(c: Check):
    T = 256 if c.smoke else 8192
    # Gemma-2b (the paper's model) and Gemma-2-2b (soft-caps and windows through flex); the
    # Llama-3.2-1B shape's step is timed in the dpo section, to keep the whole check within its 8 minutes.
    for name in ("gemma-2b", "gemma-2-2b-it"):
        try:
            sft_shape(c, name, T)
        except Exception as e:  # report it and go on with the other shape
            c.failures.append(f"sft {name}")
            c.print(f"{name}: FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
            c.print("".join(traceback.format_exc(limit=-4)).rstrip())
        c.reset_memory()


def sft_shape(c: Check, name: str, T: int):
    """One model shape of the sft section."""
    args = c.model_args(name)
    c.reset_memory()
    # The memory setting a run chooses itself (--activation_checkpointing=auto), as train_sft.py would.
    ac, why = choose_checkpointing("auto", args, T, 1, torch.bfloat16, c.device)
    estimate = sum(step_memory(args, T, 1, torch.bfloat16, ac).values()) / GiB
    model, opt = wrapped(c, args, init_state(args), torch.bfloat16, compile=True, ac=ac)
    lengths = packed_lengths(np.random.default_rng(4), T, min(400, T / 8))  # median 400 tokens at T = 8192
    row = packed_row(np.random.default_rng(3), T, args.vocab_size, lengths, c.device)
    lengths = document_lengths(row["doc_ids"].cpu())
    t = time.perf_counter()
    sft_step(model, opt, row)
    c.sync()
    warm = time.perf_counter() - t
    step_s = c.timed(partial(sft_step, model, opt, row))
    mem = c.peak_memory()
    real = sum(lengths)
    line = (f"{name}-shaped ({args.num_params() / 1e9:.2f}B params), 1 row x {T} tokens, {len(lengths)} documents "
            f"({real} real tokens); attention {resolve_backend(model.attn_backend, c.device, torch.bfloat16, args.attn_softcap, args.sliding_window)}"
            + (f" (soft-caps {args.attn_softcap:g} / {args.final_softcap:g}, window {args.sliding_window})"
               if args.attn_softcap else "") + "; "
            f"first step {warm:.1f} s (compiles unless cached)")
    c.print(line)
    c.print(f"  activation checkpointing {why}")
    c.print(f"  step {step_s * 1e3:.1f} ms, {T / step_s:,.0f} row tok/s, {real / step_s:,.0f} real tok/s, "
            f"peak memory {mem} (estimated {estimate:.1f} GiB for {ac})")
    c.result(f"sft {name}: first step (compile)", f"{warm:.1f} s", f"<= {FIRST_STEP_S:.0f} s", warm <= FIRST_STEP_S)
    # auto chose from the estimate: the step must fit in it (judged on a GPU only; CPU memory is not measured).
    peak = torch.cuda.max_memory_allocated(c.device) / 2**30 if c.device.type == "cuda" else None
    c.result(f"sft {name}: activation checkpointing (auto)", f"{ac}, peak {mem}", f"peak <= estimate {estimate:.1f} GiB",
             None if peak is None else peak <= estimate, speed=False)
    if c.peak_flops:
        step_mfu = mfu(args, T, T, step_s, c.peak_flops)
        c.print(f"  MFU (torchtitan convention) {step_mfu:.1%}, useful MFU "
                f"{mfu_useful(args, lengths, step_s, c.peak_flops):.1%} of {c.peak_flops / 1e12:.0f} TFLOP/s"
                + (f"; {step_mfu * c.peak_flops / c.ceiling:.1%} of the measured matmul ceiling "
                   f"{c.ceiling / 1e12:.0f} TFLOP/s" if c.ceiling else ""))
        vs_ceiling = f", {step_mfu * c.peak_flops / c.ceiling:.1%} of measured" if c.ceiling else ""
        c.result(f"sft {name}: MFU", f"{step_mfu:.1%} of {c.peak_flops / 1e12:.0f}{vs_ceiling}",
                 f">= {PEAK_MFU:.0%} of peak", step_mfu >= PEAK_MFU)
    else:
        c.print("  MFU: n/a (no known peak for this device)")
        c.result(f"sft {name}: MFU", "n/a (no known peak)", f">= {PEAK_MFU:.0%} of peak", None)
    c.top_kernels("one SFT step", partial(sft_step, model, opt, row))
    del model, opt  # free the model before the head is measured alone
    c.reset_memory()
    share = head_share(c, args, T, step_s, row["targets"])
    c.result(f"sft {name}: head + log-probs", f"{share:.1%} of the step", f"<= {HEAD_SHARE:.0%}", share <= HEAD_SHARE)


def head_share(c: Check, args: ModelArgs, T: int, step_s: float, targets: torch.Tensor) -> float:
    """The head and log-probs alone, forward + backward, at the step's shapes: bf16 (the default on
    CUDA, products on tensor cores, fp32 sums) and the fp32 path it replaces."""
    gen = torch.Generator(c.device).manual_seed(0)
    h = torch.randn(1, T, args.dim, device=c.device, generator=gen).bfloat16().requires_grad_()
    w = (torch.randn(args.vocab_size, args.dim, device=c.device, generator=gen) * 0.02).bfloat16().requires_grad_()
    grad = torch.randn(1, T, device=c.device, generator=gen)
    times = {}
    for path, half in (("bf16 products, fp32 sums", True), ("fp32", False)):
        def head():
            token_logprobs(h, w, targets, half_matmul=half, softcap=args.final_softcap).backward(grad)

        times[path] = c.timed(head, reps=1 if path == "fp32" else None)  # fp32 is slow on a GPU: time it once
    default = "bf16 products, fp32 sums" if c.device.type == "cuda" else "fp32"  # token_logprobs' choice
    c.print(f"  head + log-probs alone (forward + backward, {T} tokens, vocab {args.vocab_size}): "
            + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in times.items())
            + f"; the default here ({default}) is {times[default] / step_s:.1%} of the step")
    return times[default] / step_s


def pairs_row(c: Check, T: int, vocab: int) -> tuple[dict, int]:
    """One T-token row of packed preference pairs: example 2i is pair i's chosen, 2i + 1 its rejected."""
    rng = np.random.default_rng(5)
    examples, total = [], 0
    while True:
        # medians 120 / 250 / 250 tokens at T = 8192 (prompt / chosen / rejected), scaled for --smoke
        prompt, chosen, rejected = (int(np.clip(rng.lognormal(np.log(m * T / 8192), 0.6), 4, T // 8))
                                    for m in (120, 250, 250))
        if total + 2 * prompt + chosen + rejected > 0.97 * T:
            break
        ids = rng.integers(0, vocab, prompt).tolist()
        for reply in (chosen, rejected):
            examples.append((ids + rng.integers(0, vocab, reply).tolist(), [False] * prompt + [True] * reply))
        total += 2 * prompt + chosen + rejected
    packed = pack(examples, T, pad_id=0)
    assert len(packed.rows["tokens"]) == 1
    return {k: v.to(c.device) for k, v in collate(packed.rows).items()}, len(examples) // 2


def section_dpo(c: Check):
    T = 256 if c.smoke else 8192
    args = c.model_args("llama-3.2-1b")
    state = init_state(args)
    ac, _ = choose_checkpointing("auto", args, T, 1, torch.bfloat16, c.device, live_ref=True)
    model, opt = wrapped(c, args, state, torch.bfloat16, compile=True, ac=ac)
    # The reference as train_dpo.py builds it: same weights, bf16, no compile, frozen.
    ref_model, _ = wrapped(c, args, state, torch.bfloat16, compile=False, ac=False)
    ref_model.requires_grad_(False).eval()
    row, n_pairs = pairs_row(c, T, args.vocab_size)

    def logps(m):
        logp = m(row["tokens"], row["positions"], row["doc_ids"], targets=row["targets"])
        seq = sequence_logps(logp, row["doc_ids"], 2 * n_pairs)
        return seq[0::2], seq[1::2]

    def reference():
        with torch.no_grad():
            return logps(ref_model)

    def dpo_step(ref=None):
        pc, pr = logps(model)
        rc, rr = reference() if ref is None else ref
        losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.05)
        (losses.sum() / n_pairs).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    stored = reference()  # --precompute_ref: the reference log-probs read from disk, computed once
    times = {"sft step": c.timed(lambda: sft_step(model, opt, row)), "dpo step, live reference": c.timed(dpo_step),
             "dpo step, precomputed ref": c.timed(lambda: dpo_step(stored)), "reference forward alone": c.timed(reference)}
    c.print(f"llama-3.2-1b-shaped, 1 row x {T} tokens holding {n_pairs} pairs (bf16 FSDP2 + compile policy, "
            f"activation checkpointing {ac}; eager bf16 reference)")
    for k, v in times.items():
        c.print(f"  {k:26s} {v * 1e3:8.1f} ms  {v / times['sft step']:5.2f}x the SFT step")
    live, pre = (times[k] / times["sft step"] for k in ("dpo step, live reference", "dpo step, precomputed ref"))
    c.result("dpo step, live reference", f"{live:.2f}x the SFT step", f"<= {DPO_LIVE}x", live <= DPO_LIVE)
    # "1.0x": the same work as an SFT step (policy forward + backward over the same row), within 5%
    c.result("dpo step, precomputed reference", f"{pre:.2f}x the SFT step", f"{DPO_PRE}x (+-5%)",
             abs(pre - DPO_PRE) <= 0.05)


# --- sampler ---------------------------------------------------------------------------------------


def section_sample(c: Check):
    args = c.model_args("llama-3.2-1b")
    B, prompt_len, new = (4, 8, 8) if c.smoke else (64, 128, 256)
    model = Transformer(args)
    model.init_weights(seed=0)
    dtype = torch.bfloat16 if c.device.type == "cuda" else torch.float32
    model = model.to(c.device, dtype).eval()
    model.init_buffers()  # the RoPE frequencies back in fp32, as load_model leaves them
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, args.vocab_size, (prompt_len,), generator=gen).tolist() for _ in range(B)]
    kv_bytes_per_slot = B * args.n_layers * 2 * args.n_kv_heads * args.head_dim * model.tok_embeddings.weight.element_size()
    weight_bytes = matmul_params(args) * model.tok_embeddings.weight.element_size()
    c.print(f"llama-3.2-1b-shaped, {dtype}, batch {B}, prompts of {prompt_len} tokens, {new} new tokens, no stop token")
    decode_tok_s = 0.0
    for compiled in (True, False):
        n = new if compiled else min(new, 64)  # eager is launch-bound: fewer steps suffice to time it
        generate(model, prompts, n, temperature=1.0, seed=0, compile=compiled)  # warm-up (compiles)
        _, stats = generate(model, prompts, n, temperature=1.0, seed=0, compile=compiled, return_stats=True)
        tok_s = B * stats.steps / stats.decode_s
        label = ("compiled (CUDA graph)" if c.device.type == "cuda" else "compiled") if compiled else "eager"
        c.print(f"  {label:22s} decode {tok_s:10,.0f} tok/s "
                f"({stats.decode_s / stats.steps * 1e3:.2f} ms per step), prefill {stats.prefill_s * 1e3:.1f} ms")
        decode_tok_s = tok_s if compiled else decode_tok_s
    c.top_kernels(f"generate, {min(new, 32)} new tokens, compiled",
                  lambda: generate(model, prompts, min(new, 32), temperature=1.0, seed=0, compile=True))
    model.clear_caches()
    if c.hbm:
        # per step: every weight once, plus the cache. The ideal reads the filled slots only (prompt +
        # step on average); this implementation reads all slots of the rounded-up cache.
        ideal = weight_bytes + kv_bytes_per_slot * (prompt_len + new / 2)
        ours = weight_bytes + kv_bytes_per_slot * (-(-(prompt_len + new) // 256) * 256)
        c.print(f"  HBM roofline at {c.hbm / 1e12:.2f} TB/s: {B * c.hbm / ideal:,.0f} tok/s reading the filled cache "
                f"slots, {B * c.hbm / ours:,.0f} tok/s reading the whole cache as this sampler does "
                f"(weights {weight_bytes / 2**30:.2f} GiB + KV {kv_bytes_per_slot / 2**20:.2f} MiB per slot)")
        share = decode_tok_s / (B * c.hbm / ideal)
        c.result(f"decode, batch {B} (compiled)", f"{decode_tok_s:,.0f} tok/s = {share:.0%} of the roofline",
                 f">= {DECODE_ROOFLINE:.0%} of the HBM roofline", share >= DECODE_ROOFLINE)
    else:
        c.print("  HBM roofline: n/a (no known bandwidth for this device)")
        c.result(f"decode, batch {B} (compiled)", f"{decode_tok_s:,.0f} tok/s (no known HBM bandwidth)",
                 f">= {DECODE_ROOFLINE:.0%} of the HBM roofline", None)


# --- the real scripts under torchrun -----------------------------------------------------------------


def run_script(c: Check, label: str, argv: list[str], cwd: Path, cap: float) -> tuple[Optional[int], float, str]:
    """`python -m torch.distributed.run --standalone --nproc_per_node=1 argv` in `cwd`, killed (with its
    workers: a process group of its own) after min(cap, what is left of the budget) seconds.
    Returns (exit code, or None on timeout; seconds; the output)."""
    timeout = max(5.0, min(cap, c.left()))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", *argv]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    log = cwd / f"{label}.log"
    t = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    return rc, time.perf_counter() - t, log.read_text(errors="replace")


def tail(text: str, n: int = 12, errors: bool = True) -> str:
    """The last n lines of a script's output, after its `error:` / Error lines (torchrun's own
    report of a failed worker would otherwise push them out)."""
    lines = text.rstrip().splitlines()
    found = [x for x in lines if x.startswith("error:") or "Error:" in x][-3:] if errors else []
    return "\n".join("    " + line for line in found + lines[-n:])


def write_model_folder(c: Check, args: ModelArgs, folder: Path) -> Path:
    """A Hugging Face folder with random weights (bf16 on CUDA) and the demo's character tokenizer
    (built with `tokenizers`: ChatML markers, BOS, pad and unk as special tokens)."""
    from dataclasses import replace

    from lion_min.demo.task import build_demo_tokenizer
    from lion_min.formats.hf import save_model
    from lion_min.formats.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(build_demo_tokenizer(folder.parent / "tokenizer"))
    args = replace(args, bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    with torch.device(c.device):  # filled on the device: a CPU generator takes minutes for 2.5B numbers
        model = Transformer(args)
    gen = torch.Generator(c.device).manual_seed(0)
    with torch.no_grad():  # Transformer.init_weights' init, drawn on the device
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0.0, 0.02, generator=gen)
    for m in model.modules():
        if isinstance(m, RMSNorm):
            m.reset_parameters()
    model.init_buffers()
    model = model.to(torch.bfloat16 if c.device.type == "cuda" else torch.float32)
    return save_model(model, folder, tokenizer=tokenizer, chat_template="chatml")


def write_chats(path: Path, n: int, median_chars: float, seed: int = 0) -> Path:
    """n conversations (one user turn, one assistant turn) of random printable text, log-normal lengths."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz  ,.0123456789"))
    text = lambda k: "".join(rng.choice(letters, int(k)))
    with open(path, "w") as f:
        for _ in range(n):
            k = np.clip(rng.lognormal(np.log(median_chars), 0.6), 16, 20 * median_chars)
            f.write(json.dumps({"messages": [{"role": "user", "content": text(0.3 * k)},
                                             {"role": "assistant", "content": text(0.7 * k)}]}) + "\n")
    return path


def section_cli(c: Check):
    T, steps, batch = (256, 3, 2) if c.smoke else (8192, 6, 4)
    args = c.model_args("gemma-2b")
    with tempfile.TemporaryDirectory(prefix="gpu_check_cli_") as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        folder = write_model_folder(c, args, tmp / "model")
        # a character tokenizer: about one token per character; rows for steps x batch, and some over
        data = write_chats(tmp / "chats.jsonl", n=(steps + 2) * batch * max(1, T // 1500), median_chars=min(1500, T / 4))
        c.print(f"gemma-2b-shaped random folder ({args.num_params() / 1e9:.2f}B params) and data written in "
                f"{time.perf_counter() - t:.0f} s")
        c.reset_memory()
        argv = [str(ROOT / "train_sft.py"), f"--model={folder}", f"--data={data}", f"--out_dir={tmp / 'run'}",
                f"--seq_len={T}", f"--batch_size={batch}", "--micro_batch_size=1", f"--max_steps={steps}",
                f"--compile={str(not c.smoke).lower()}", "--chat_template=chatml", "--data_cache=off", "--log_every=1",
                "--warmup_ratio=0", "--lr=1e-5", f"--attn_backend={c.attn_backend}"]
        argv += ["--device=cpu"] if c.smoke else []
        c.print("  torchrun --standalone --nproc_per_node=1 " + " ".join(Path(a).name if a.startswith("/") else a
                                                                          for a in argv))
        rc, secs, out = run_script(c, "cli", argv, tmp, cap=300)
        memory_line = next((line for line in out.splitlines() if line.startswith("memory:")), "memory: (not printed)")
        c.print(f"  {memory_line}")
        if rc != 0:
            c.print(f"  FAILED ({'timeout' if rc is None else f'exit {rc}'} after {secs:.0f} s); its last lines:")
            c.print(tail(out))
            c.result("train_sft.py under torchrun, gemma-2b", "FAILED" if rc is not None else "timeout",
                     f"runs; MFU >= {PEAK_MFU:.0%}", False, speed=False)
            raise AssertionError(f"train_sft.py under torchrun: {'timeout' if rc is None else f'exit {rc}'}")
        lines = [json.loads(x) for x in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
        steps_seen = [x for x in lines if "tokens_per_s" in x]
    for x in steps_seen:
        c.print(f"  step {x['step']}: {x['tokens_per_s']:,.0f} tok/s"
                + (f", mfu {x['mfu']:.1%}" if "mfu" in x else "") + f", {x.get('memory_gib', 0):.1f} GiB, "
                f"{x['step_time_s']:.2f} s")
    later = steps_seen[1:] or steps_seen  # the first step compiles
    best_mfu = max((x["mfu"] for x in later if "mfu" in x), default=None)
    tok_s = statistics.median(x["tokens_per_s"] for x in later)
    c.print(f"  whole run {secs:.0f} s; after the first step: median {tok_s:,.0f} tok/s"
            + (f", MFU up to {best_mfu:.1%}" if best_mfu is not None else ", MFU n/a (no known peak)"))
    c.result("train_sft.py under torchrun, gemma-2b", f"{tok_s:,.0f} tok/s, MFU "
             + (f"{best_mfu:.1%}" if best_mfu is not None else "n/a"), f"MFU >= {PEAK_MFU:.0%}",
             None if best_mfu is None else best_mfu >= PEAK_MFU)
    c.result("train_sft.py: activation checkpointing", memory_line.removeprefix("memory: activation checkpointing ")
             .split(" (")[0], "chosen by the run")


def section_pipeline(c: Check):
    """The debug preset's three stages in a fresh folder (they write out/debug/... under it)."""
    compile_flag = f"--compile={str(not c.smoke).lower()}"
    with tempfile.TemporaryDirectory(prefix="gpu_check_pipeline_") as tmp:
        tmp = Path(tmp)
        for stage in ("sft", "dpo", "online"):
            argv = [str(ROOT / f"train_{stage}.py"), "--preset=debug", compile_flag]
            # --smoke: two steps a stage (the CPU test's time); on the GPU the preset's own steps
            argv += ["--device=cpu", "--max_steps=2"] if c.smoke else [f"--attn_backend={c.attn_backend}"]
            rc, secs, out = run_script(c, stage, argv, tmp, cap=150)
            last = next((line for line in reversed(out.splitlines()) if line.startswith("step ")), "")
            status = "ok" if rc == 0 else ("timeout" if rc is None else f"exit {rc}")
            c.print(f"  {stage:7s} {status:8s} {secs:5.0f} s  {last[:110]}")
            c.result(f"debug pipeline: {stage}", f"{status}, {secs:.0f} s", "runs to the end", rc == 0, speed=False)
            if rc != 0:
                c.print(tail(out))
                raise AssertionError(f"debug pipeline stage {stage}: {status}")


def matmul_ceiling(c: Check) -> Optional[float]:
    """Measured bf16 matmul FLOP/s (8192^3 on random data), the realistic ceiling beside the datasheet peak."""
    if c.device.type != "cuda":
        return None
    a, b = (torch.randn(8192, 8192, device=c.device, dtype=torch.bfloat16) for _ in range(2))
    secs = c.timed(lambda: a @ b, reps=10)
    c.print(f"bf16 matmul 8192^3 on random data: {2 * 8192**3 / secs / 1e12:.0f} TFLOP/s (the measured ceiling)")
    return 2 * 8192**3 / secs


def print_summary(c: Check):
    """Every figure beside its target (issue 23), as the last lines of the output."""
    c.print("\n== summary " + "=" * 53)
    rows = [("what", "measured", "target", "verdict")] + c.results
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        c.print("  " + "  ".join(x.ljust(w) for x, w in zip(r, widths)).rstrip())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (the test suite runs this)")
    parser.add_argument("--out", default="", help="also write the output to this file")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--attn_backend", default="auto", choices=("auto", "sdpa", "flex", "varlen"),
                        help="attention in the compile, sft, dpo, cli and pipeline sections (to rerun them with another kernel)")
    parser.add_argument("--budget", type=float, default=470.0,
                        help="seconds for the whole run: a section that no longer fits is skipped (default 470)")
    opts = parser.parse_args(argv)
    sections = [s for s in opts.sections.split(",") if s]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"--sections: unknown {unknown}; choose from {SECTIONS}")
    if not opts.smoke and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU, or use --smoke for the CPU run at tiny shapes")
    device = torch.device("cpu" if opts.smoke else "cuda")
    c = Check(opts.smoke, device, opts.attn_backend)
    if opts.smoke:
        torch.set_num_threads(1)
    t_start = time.perf_counter()
    c.deadline = t_start + opts.budget
    c.print("command: python bench/gpu_check.py " + " ".join(sys.argv[1:] if argv is None else argv))
    c.print(f"torch {torch.__version__}, device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}"
            + (f", peak {c.peak_flops / 1e12:.0f} TFLOP/s bf16, HBM {c.hbm / 1e12:.2f} TB/s" if c.peak_flops else ""))
    c.ceiling = matmul_ceiling(c)
    skipped = []
    try:
        for name in sections:
            c.print(f"\n== {name} " + "=" * (60 - len(name)))
            if not c.smoke and c.left() < MIN_SECONDS[name]:
                skipped.append(name)
                c.print(f"skipped: {c.left():.0f} s of the --budget={opts.budget:.0f} left, the section needs "
                        f"about {MIN_SECONDS[name]} s (rerun it alone with --sections={name})")
                c.result(f"{name} section", "skipped (time budget)")
                continue
            t = time.perf_counter()
            try:
                globals()[f"section_{name}"](c)
            except Exception as e:  # keep going: one run should report every section
                c.failures.append(name)
                c.print(f"FAILED: {type(e).__name__}: {e}")
                c.print("".join(traceback.format_exc(limit=-4)).rstrip())
            c.print(f"({name}: {time.perf_counter() - t:.0f} s)")
            c.reset_memory()
        print_summary(c)
        c.print(f"\ntotal {time.perf_counter() - t_start:.0f} s; "
                + (f"FAILED sections: {', '.join(c.failures)}" if c.failures else "every section ran")
                + (f"; skipped for time: {', '.join(skipped)}" if skipped else ""))
    finally:
        if opts.out:
            out = Path(opts.out)
            tmp = out.with_name(out.name + ".tmp")
            tmp.write_text("\n".join(c.lines) + "\n")
            os.replace(tmp, out)
    return 1 if c.failures else 0


if __name__ == "__main__":
    sys.exit(main())
