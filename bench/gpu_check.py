"""One prepared check of every GPU code path: correctness and speed on one H100 or H200.

    python bench/gpu_check.py --out=gpu_check.txt     # one H100/H200, pip torch + this repository, < 8 min
    python bench/gpu_check.py --smoke                  # the same code paths at tiny shapes on the CPU (a test)
    python bench/gpu_check.py --sections=sft,sample    # a subset

Sections (each prints its own header; a failure is printed and the next section runs):
  attention  sdpa (dense mask), flex and varlen in bf16 against SDPA with the dense mask in fp32,
             packed documents, T = 4096, Gemma-2b heads (8 / 1 kv, head_dim 256) and Llama-3-8B
             heads (32 / 8 kv, 128): max error of the output and of dq, dk, dv; mask build, forward
             and forward + backward times; TFLOP/s of the useful (document-causal) work.
  compile    the bf16 FSDP2 (1 rank) + activation checkpointing + compiled-blocks SFT step against
             the eager bf16 FSDP2 step, same init and row: loss, grad norm, cosine of the AdamW
             updates; the eager fp32 step beside them gives the scale of bf16 rounding.
  sft        the SFT step (bf16 FSDP2 + AC + compile, one packed 8192-token row with document
             masks, AdamW) for a Gemma-2b- and a Llama-3.2-1B-shaped random model: tokens/s, MFU
             in torchtitan's convention and useful MFU (lion_min/flops.py), peak memory, and the
             head's share of the step (the head and log-probs alone, forward + backward).
  dpo        the DPO step (policy forward + backward, live reference forward, AdamW) against the
             SFT step on the same packed row of preference pairs (Llama-3.2-1B shape).
  sample     sampler decode tokens/s at batch 64 (compiled CUDA-graph step and eager) against the
             HBM roofline (weights plus the KV cache read once per step).

Models are random (no download) and built from the package (lion_min.model, losses, packing,
parallel) the way the training scripts build them. --smoke runs each section at tiny shapes on
the CPU, where varlen (CUDA only) and FlexAttention's backward (no CPU kernel) are skipped with a
note. --out=FILE also writes everything printed to FILE (atomically, at the end).
"""

import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback
from functools import partial
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from lion_min.attention import attend, build_mask, resolve_backend  # noqa: E402
from lion_min.checkpoint import args_from_config  # noqa: E402
from lion_min.flops import (attention_flops_per_pair, device_peaks, document_lengths, matmul_params, mfu,  # noqa: E402
                            mfu_useful)
from lion_min.losses import IGNORE_INDEX, dpo_loss, sequence_logps, sft_loss, token_logprobs  # noqa: E402
from lion_min.model import ModelArgs, Transformer  # noqa: E402
from lion_min.packing import collate, pack  # noqa: E402
from lion_min.parallel import Dist, build_model  # noqa: E402
from lion_min.sample import generate  # noqa: E402

SECTIONS = ("attention", "compile", "sft", "dpo", "sample")


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
            args = ModelArgs(family=args.family, vocab_size=512, dim=64, n_layers=2, n_heads=4,
                             n_kv_heads=1 if gemma else 2, head_dim=32 if gemma else 16, hidden_dim=128,
                             tie_embeddings=args.tie_embeddings, rope_scaling=args.rope_scaling, max_seq_len=1024)
        return args

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
    shapes = {"gemma-2b heads": (8, 1, 256), "llama-3-8b heads": (32, 8, 128)}
    if c.smoke:
        shapes = {"gemma-2b heads (tiny)": (4, 1, 32), "llama-3-8b heads (tiny)": (8, 2, 16)}
    rng = np.random.default_rng(0)
    doc_ids = torch.full((B, T), -1, dtype=torch.long)
    for b in range(B):
        start = 0
        for i, n in enumerate(packed_lengths(rng, T, median=T / 10)):
            doc_ids[b, start : start + n] = 1000 * b + i
            start += n
    doc_ids = doc_ids.to(c.device)
    pairs = sum(n * (n + 1) // 2 for n in document_lengths(doc_ids))
    c.print(f"B {B} x T {T}, {len(document_lengths(doc_ids))} documents, {(doc_ids < 0).float().mean():.1%} padding; "
            f"errors: max |bf16 - fp32| of the output, and max |error| / max |reference| of dq, dk, dv")
    for name, (Hq, Hkv, hd) in shapes.items():
        torch.manual_seed(0)
        q = torch.randn(B, Hq, T, hd, device=c.device)
        k, v = torch.randn(B, Hkv, T, hd, device=c.device), torch.randn(B, Hkv, T, hd, device=c.device)
        grad_out = torch.randn(B, Hq, T, hd, device=c.device)
        keep = (doc_ids >= 0)[:, None, :, None]  # padding rows are not compared (nothing reads them)

        def forward(backend, dtype, grad: bool):
            leaves = [x.to(dtype, copy=True).requires_grad_(grad) for x in (q, k, v)]
            return leaves, attend(*leaves, build_mask(doc_ids, backend, dtype))

        ref_leaves, ref = forward("sdpa", torch.float32, True)
        ref.backward(grad_out)
        ref_grads = [x.grad for x in ref_leaves]
        # model FLOPs of the useful work: forward 4 hd Hq per pair, forward + backward 3 times that
        fwd_flops = attention_flops_per_pair(ModelArgs(n_layers=1, n_heads=Hq, n_kv_heads=Hkv, head_dim=hd)) * pairs / 3
        c.print(f"{name}: heads {Hq} / kv {Hkv}, head_dim {hd}; {fwd_flops / 1e9:.1f} GFLOP useful forward work")
        c.print(f"  {'backend':8s} {'out err':>8s} {'dq err':>8s} {'dk err':>8s} {'dv err':>8s} {'mask ms':>8s} "
                f"{'fwd ms':>8s} {'fwd TF/s':>8s} {'f+b ms':>8s} {'f+b TF/s':>8s}")
        best = {}
        for backend in ("sdpa", "flex", "varlen"):
            try:
                try:
                    resolve_backend(backend, c.device, torch.bfloat16)
                except ValueError as e:
                    raise Skip(str(e)) from None
                mask_s = c.timed(lambda: build_mask(doc_ids, backend, torch.bfloat16))
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
        auto = resolve_backend("auto", c.device, torch.bfloat16)
        fastest = min(best, key=best.get) if best else "none"
        c.print(f"  auto picks {auto} for bf16 here; fastest forward + backward measured: {fastest}"
                + ("" if auto == fastest or c.device.type == "cpu" else "  <-- auto is not the fastest"))


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


def wrapped(c: Check, args: ModelArgs, state: dict, dtype: torch.dtype, compile: bool, ac: bool):
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
    if abs(lc - le) > 2 * abs(le - l32) + 1e-4 * abs(le) or 1 - cosine(uc, ue) > 2 * (1 - cosine(ue, u32)) + 1e-3:
        raise AssertionError("the compiled step differs from the eager one by more than bf16 rounding explains")


# --- SFT and DPO steps -----------------------------------------------------------------------------


def section_sft(c: Check):
    T = 256 if c.smoke else 8192
    for name in ("gemma-2b", "llama-3.2-1b"):
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
    model, opt = wrapped(c, args, init_state(args), torch.bfloat16, compile=True, ac=True)
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
            f"({real} real tokens); attention {resolve_backend(model.attn_backend, c.device, torch.bfloat16)}; "
            f"first step {warm:.1f} s (compiles unless cached)")
    c.print(line)
    c.print(f"  step {step_s * 1e3:.1f} ms, {T / step_s:,.0f} row tok/s, {real / step_s:,.0f} real tok/s, "
            f"peak memory {mem}")
    if c.peak_flops:
        c.print(f"  MFU (torchtitan convention) {mfu(args, T, T, step_s, c.peak_flops):.1%}, useful MFU "
                f"{mfu_useful(args, lengths, step_s, c.peak_flops):.1%} of {c.peak_flops / 1e12:.0f} TFLOP/s")
    else:
        c.print("  MFU: n/a (no known peak for this device)")
    del model, opt  # free the model before the head is measured alone
    c.reset_memory()
    head_share(c, args, T, step_s, row["targets"])


def head_share(c: Check, args: ModelArgs, T: int, step_s: float, targets: torch.Tensor):
    """The head and log-probs alone, forward + backward, at the step's shapes: bf16 (the default on
    CUDA, products on tensor cores, fp32 sums) and the fp32 path it replaces."""
    gen = torch.Generator(c.device).manual_seed(0)
    h = torch.randn(1, T, args.dim, device=c.device, generator=gen).bfloat16().requires_grad_()
    w = (torch.randn(args.vocab_size, args.dim, device=c.device, generator=gen) * 0.02).bfloat16().requires_grad_()
    grad = torch.randn(1, T, device=c.device, generator=gen)
    times = {}
    for path, half in (("bf16 products, fp32 sums", True), ("fp32", False)):
        def head():
            token_logprobs(h, w, targets, half_matmul=half).backward(grad)

        times[path] = c.timed(head, reps=1 if path == "fp32" else None)  # fp32 is slow on a GPU: time it once
    default = "bf16 products, fp32 sums" if c.device.type == "cuda" else "fp32"  # token_logprobs' choice
    c.print(f"  head + log-probs alone (forward + backward, {T} tokens, vocab {args.vocab_size}): "
            + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in times.items())
            + f"; the default here ({default}) is {times[default] / step_s:.1%} of the step")


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
    model, opt = wrapped(c, args, state, torch.bfloat16, compile=True, ac=True)
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

    def dpo_step():
        pc, pr = logps(model)
        rc, rr = reference()
        losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.05)
        (losses.sum() / n_pairs).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = {"sft step": c.timed(lambda: sft_step(model, opt, row)), "dpo step, live reference": c.timed(dpo_step),
             "reference forward alone": c.timed(reference)}
    c.print(f"llama-3.2-1b-shaped, 1 row x {T} tokens holding {n_pairs} pairs (bf16 FSDP2 + AC + compile policy, "
            f"eager bf16 reference)")
    for k, v in times.items():
        c.print(f"  {k:26s} {v * 1e3:8.1f} ms  {v / times['sft step']:5.2f}x the SFT step")
    c.print("  (with the reference log-probs precomputed, the paper's setup, a DPO step costs an SFT step)")


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
    for compiled in (True, False):
        n = new if compiled else min(new, 64)  # eager is launch-bound: fewer steps suffice to time it
        generate(model, prompts, n, temperature=1.0, seed=0, compile=compiled)  # warm-up (compiles)
        _, stats = generate(model, prompts, n, temperature=1.0, seed=0, compile=compiled, return_stats=True)
        tok_s = B * stats.steps / stats.decode_s
        label = ("compiled (CUDA graph)" if c.device.type == "cuda" else "compiled") if compiled else "eager"
        c.print(f"  {label:22s} decode {tok_s:10,.0f} tok/s "
                f"({stats.decode_s / stats.steps * 1e3:.2f} ms per step), prefill {stats.prefill_s * 1e3:.1f} ms")
    model.clear_caches()
    if c.hbm:
        # per step: every weight once, plus the cache. The ideal reads the filled slots only (prompt +
        # step on average); this implementation reads all slots of the rounded-up cache.
        ideal = weight_bytes + kv_bytes_per_slot * (prompt_len + new / 2)
        ours = weight_bytes + kv_bytes_per_slot * (-(-(prompt_len + new) // 256) * 256)
        c.print(f"  HBM roofline at {c.hbm / 1e12:.2f} TB/s: {B * c.hbm / ideal:,.0f} tok/s reading the filled cache "
                f"slots, {B * c.hbm / ours:,.0f} tok/s reading the whole cache as this sampler does "
                f"(weights {weight_bytes / 2**30:.2f} GiB + KV {kv_bytes_per_slot / 2**20:.2f} MiB per slot)")
    else:
        c.print("  HBM roofline: n/a (no known bandwidth for this device)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (the test suite runs this)")
    parser.add_argument("--out", default="", help="also write the output to this file")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--attn_backend", default="auto", choices=("auto", "sdpa", "flex", "varlen"),
                        help="attention in the compile, sft and dpo sections (e.g. to rerun them with another kernel)")
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
    c.print("command: python bench/gpu_check.py " + " ".join(sys.argv[1:] if argv is None else argv))
    c.print(f"torch {torch.__version__}, device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}"
            + (f", peak {c.peak_flops / 1e12:.0f} TFLOP/s bf16, HBM {c.hbm / 1e12:.2f} TB/s" if c.peak_flops else ""))
    try:
        for name in sections:
            c.print(f"\n== {name} " + "=" * (60 - len(name)))
            t = time.perf_counter()
            try:
                globals()[f"section_{name}"](c)
            except Exception as e:  # keep going: one run should report every section
                c.failures.append(name)
                c.print(f"FAILED: {type(e).__name__}: {e}")
                c.print("".join(traceback.format_exc(limit=-4)).rstrip())
            c.print(f"({name}: {time.perf_counter() - t:.0f} s)")
            c.reset_memory()
        c.print(f"\ntotal {time.perf_counter() - t_start:.0f} s; "
                + (f"FAILED sections: {', '.join(c.failures)}" if c.failures else "every section ran"))
    finally:
        if opts.out:
            out = Path(opts.out)
            tmp = out.with_name(out.name + ".tmp")
            tmp.write_text("\n".join(c.lines) + "\n")
            os.replace(tmp, out)
    return 1 if c.failures else 0


if __name__ == "__main__":
    sys.exit(main())
