"""SFT throughput: lion_min against a plain transformers loop, packing efficiency, and (on CUDA) MFU.

    python bench/bench_sft.py                                  # parts 1 and 2 on the CPU (+ 3 if CUDA)
    python bench/bench_sft.py --rows=4 --repeats=7 --packing=false   # part 1 only, bigger batch
    python bench/bench_sft.py --gpu_shape=tiny --gpu_device=cpu --gpu_compile=false --gpu_tokens=512  # smoke part 3

Part 1 (CPU, fp32): one random Llama-shaped checkpoint written by tests/conftest.py's
make_hf_checkpoint and loaded by both sides, so the weights are identical. Each step is forward,
loss, backward, AdamW step, zero_grad (no clipping on either side) on the same token rows:
  lion_min      packed rows, several documents per row: model(tokens, positions, doc_ids, targets)
                + losses.sft_loss, i.e. lion_min.core.sft.sft_objective (dense block-diagonal SDPA mask);
  transformers  LlamaForCausalLM on the same rows as plain causal rows (it has no document masking
                by default, so lion_min does strictly more work), logits + F.cross_entropy on the
                same targets, summed and divided by the same target count.
Two diagnostic variants of lion_min split the gap: the same step without doc_ids (plain causal,
like transformers) and the same step through full logits + F.cross_entropy instead of the chunked,
checkpointed log-prob path. All variants run interleaved, after a warm-up; medians are reported.

Part 2: packing efficiency of best-fit-decreasing pack() against one conversation per row
(mode="pad") on log-normal conversation lengths (median ~400 tokens, tail past 4k), and pack()'s time.

Part 3 (CUDA): a random Gemma-2b-shaped model (tests/data/configs/gemma-2b.json) built as
lion_min.stages.sft builds it (bf16 compute under FSDP's mixed precision, fp32 master weights), one packed
row of 8192 tokens per step: step time, MFU from lion_min.run.flops.flops_per_token against the 989e12
H100/H200 bf16 peak, peak memory. Then FlexAttention and varlen attention against the dense SDPA
mask on random q/k/v with packed doc_ids, forward and backward.
"""

import os

# OpenMP threads that wait by spinning collapse when another process holds a core: on this 2-core
# machine, with another job running, a tiny-model step took 5.2 s at 2 spinning threads, 0.09 s with
# passive waiting and 0.07 s at 1 thread. Must be set before torch loads the OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from lion_min.core.losses import IGNORE_INDEX, sft_loss  # noqa: E402
from lion_min.core.packing import best_fit_decreasing, collate, pack  # noqa: E402
from lion_min.core.sft import sft_objective  # noqa: E402
from lion_min.core.train import make_optimizer  # noqa: E402
from lion_min.formats.hf import load_model  # noqa: E402
from lion_min.run.config import TrainConfig  # noqa: E402
from lion_min.run.flags import parse_cli  # noqa: E402


@dataclass
class CPUBench:
    """What the CPU step benchmarks share (bench_dpo.py too): threads, model shape, rows, repeats."""

    threads: int = 2
    """torch.set_num_threads."""
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    hidden_dim: int = 688
    vocab_size: int = 8192
    rows: int = 2
    seq_len: int = 512
    repeats: int = 5
    """Timed steps per variant, interleaved; one warm-up step each before."""
    lr: float = 1e-4


@dataclass
class BenchConfig(CPUBench):
    doc_median: int = 100
    """Median document length in part 1's packed rows (log-normal, sigma 0.7): ~4 per 512-token row."""
    diagnose: bool = True
    """Also time the two diagnostic lion_min variants (doubles part 1's time)."""

    packing: bool = True
    """Run part 2."""
    conversations: int = 20000
    conv_median: float = 400.0
    conv_sigma: float = 1.0
    """log-normal sigma: with median 400, ~1% of conversations are longer than 4096 tokens."""
    pack_seq_lens: str = "2048,4096,8192"

    gpu: bool = True
    """Run part 3 (needs CUDA unless --gpu_device=cpu for a smoke run)."""
    gpu_device: str = "auto"
    """'auto' (cuda if available, else part 3 is skipped), 'cuda' or 'cpu'."""
    gpu_shape: str = "gemma-2b"
    """'gemma-2b' or 'tiny' (a quick check of the part-3 code on any device)."""
    gpu_tokens: int = 8192
    gpu_steps: int = 5
    gpu_warmup: int = 3
    """Untimed steps first (compilation happens here)."""
    gpu_compile: bool = True
    gpu_ac: bool = True
    """Activation checkpointing per block (the LION presets use both)."""
    gpu_attn: str = "auto"
    """Attention backend for the MFU run: auto (= flex on CUDA), sdpa, flex, varlen."""
    gpu_attn_len: int = 4096
    """Row length of the attention check (2 rows, gemma-2b heads: 8 query, 1 kv, head_dim 256)."""


def header(script: str, argv):
    args = sys.argv[1:] if argv is None else argv
    print("command: python " + " ".join([script, *args]))
    cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads (OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY')}), {os.cpu_count()} CPUs, 1-min load average {os.getloadavg()[0]:.1f}, "
          f"CUDA device: {cuda}")


def lognormal_lengths(rng: np.random.Generator, n: int, median: float, sigma: float, lo: int, hi: int) -> list[int]:
    return np.clip(np.rint(rng.lognormal(np.log(median), sigma, n)), lo, hi).astype(int).tolist()


def random_docs(rng: np.random.Generator, lengths: list[int], vocab: int) -> list[tuple[list[int], list[bool]]]:
    """Chat-like examples: the first ~30% of each document is prompt (not trained), the rest reply."""
    docs = []
    for n in lengths:
        prompt = max(1, int(0.3 * n))
        docs.append((rng.integers(0, vocab, n).tolist(), [False] * prompt + [True] * (n - prompt)))
    return docs


def interleaved(fns: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each fn: one warm-up each, then `repeats` rounds, the order rotating per round."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            t = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t)
    return times


# --- part 1 ----------------------------------------------------------------------------------------


def part1(cfg: BenchConfig):
    import transformers
    from conftest import make_hf_checkpoint

    transformers.logging.set_verbosity_error()
    folder = make_hf_checkpoint("llama-3-8b", Path(tempfile.mkdtemp()) / "model", std=0.02, vocab_size=cfg.vocab_size,
                                hidden_size=cfg.dim, num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                                num_key_value_heads=cfg.n_kv_heads, intermediate_size=cfg.hidden_dim)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).train()
    ours = load_model(folder).train()

    # Packed rows: log-normal documents adding up to ~97% of the rows, best-fit-decreasing; the fullest rows.
    rng = np.random.default_rng(0)
    lengths = []
    while sum(lengths) < 0.97 * cfg.rows * cfg.seq_len:
        lengths += lognormal_lengths(rng, 1, cfg.doc_median, 0.7, 8, cfg.seq_len)
    packed = pack(random_docs(rng, lengths, cfg.vocab_size), cfg.seq_len, pad_id=0)
    keep = np.sort(np.argsort(-(packed.rows["doc_ids"] >= 0).sum(1), kind="stable")[: cfg.rows])
    docs_per_row = [len(set(r[r >= 0].tolist())) for r in packed.rows["doc_ids"][keep]]
    batch = collate({k: v[keep] for k, v in packed.rows.items()})
    tokens, positions, doc_ids, targets = (batch[k] for k in ("tokens", "positions", "doc_ids", "targets"))
    n_targets = int((targets != IGNORE_INDEX).sum())
    n_real = int((doc_ids >= 0).sum())
    B, T = tokens.shape

    # Same weights: without document masking both sides compute the same loss.
    def hf_loss(model_out):
        logits = model_out.logits  # (B, T, V) fp32
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                               reduction="sum") / n_targets

    with torch.no_grad():
        loss_hf = hf_loss(hf(input_ids=tokens)).item()
        loss_ours = sft_loss(ours(tokens, targets=targets), targets, n_targets).item()
        loss_ours_docs = sft_loss(ours(tokens, positions, doc_ids, targets=targets), targets, n_targets).item()

    opt_ours = make_optimizer(ours, TrainConfig(lr=cfg.lr))
    opt_hf = torch.optim.AdamW(hf.parameters(), lr=cfg.lr, weight_decay=0.0)

    def step(opt, loss_fn):
        loss_fn().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    variants = {
        "lion_min": lambda: step(opt_ours, lambda: sft_objective(ours, batch, n_targets)[0]),
        "transformers": lambda: step(opt_hf, lambda: hf_loss(hf(input_ids=tokens))),
    }
    if cfg.diagnose:
        variants["lion_min, no doc mask"] = lambda: step(
            opt_ours, lambda: sft_loss(ours(tokens, targets=targets), targets, n_targets))
        variants["lion_min, full logits + F.cross_entropy"] = lambda: step(
            opt_ours, lambda: F.cross_entropy(ours(tokens, positions, doc_ids).flatten(0, 1), targets.flatten(),
                                              ignore_index=IGNORE_INDEX, reduction="sum") / n_targets)
    times = interleaved(variants, cfg.repeats)

    print(f"\npart 1: SFT training step (cpu, fp32), Llama-shaped random model, dim {cfg.dim}, {cfg.n_layers} layers, "
          f"{cfg.n_heads} heads / {cfg.n_kv_heads} kv, mlp {cfg.hidden_dim}, vocab {cfg.vocab_size} "
          f"({ours.args.num_params() / 1e6:.1f}M params)")
    print(f"  rows {B} x {T} tokens; documents per row {docs_per_row}; {n_real} real tokens, "
          f"{n_targets} targets; AdamW lr {cfg.lr}; 1 warm-up + {cfg.repeats} interleaved steps per variant")
    print(f"  loss before training, same weights, no document mask: lion_min {loss_ours:.6f}, "
          f"transformers {loss_hf:.6f} (|diff| {abs(loss_ours - loss_hf):.1e}); lion_min with document mask "
          f"{loss_ours_docs:.6f}")
    print("  transformers runs plain causal rows (no document masking): lion_min does strictly more work")
    t_hf = statistics.median(times["transformers"])
    print(f"  {'variant':42s} {'median ms':>10s} {'min ms':>8s} {'row tok/s':>10s} {'vs transformers':>16s}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:42s} {med * 1e3:10.1f} {min(ts) * 1e3:8.1f} {B * T / med:10.0f} {t_hf / med:15.2f}x")
    print(f"  ratio lion_min / transformers tokens/s: {t_hf / statistics.median(times['lion_min']):.2f}")


# --- part 2 ----------------------------------------------------------------------------------------


def part2(cfg: BenchConfig):
    rng = np.random.default_rng(0)
    N = cfg.conversations
    lengths = lognormal_lengths(rng, N, cfg.conv_median, cfg.conv_sigma, 8, 1 << 20)
    # Token lists sliced from one shared list: pack() reads lists, and slices share the int objects.
    base = rng.integers(0, 32000, max(lengths)).tolist()
    examples = [(base[:n], [False] + [True] * (n - 1)) for n in lengths]
    L = np.array(lengths)
    print(f"\npart 2: packing {N} conversations, log-normal lengths: median {np.median(L):.0f}, mean {L.mean():.0f}, "
          f"p90 {np.percentile(L, 90):.0f}, p99 {np.percentile(L, 99):.0f}, max {L.max()}; "
          f"{(L > 4096).sum()} longer than 4096")
    print("  pad = one conversation per row; its figures follow from the lengths (pack(mode='pad') would allocate "
          "4 x conversations x seq_len int64), checked against pack(mode='pad') on the first 1000")
    print(f"  {'seq_len':>7s} {'truncated':>9s} {'pack rows':>9s} {'pack eff':>8s} {'pad rows':>8s} {'pad eff':>7s} "
          f"{'rows saved':>10s} {'pack() s':>8s} {'of which BFD s':>14s}")
    for S in (int(s) for s in cfg.pack_seq_lens.split(",")):
        t = time.perf_counter()
        packed = pack(examples, S, pad_id=0)
        t_pack = time.perf_counter() - t
        t = time.perf_counter()
        best_fit_decreasing(np.minimum(L, S).tolist(), S)
        t_bfd = time.perf_counter() - t
        kept = np.minimum(L, S)
        pad_rows, pad_eff = N, kept.sum() / (N * S)
        check = pack(examples[:1000], S, pad_id=0, mode="pad")
        assert abs(check.efficiency - kept[:1000].sum() / (1000 * S)) < 1e-12 and len(check.rows["tokens"]) == 1000
        rows = len(packed.rows["tokens"])
        print(f"  {S:7d} {packed.num_truncated:9d} {rows:9d} {packed.efficiency:8.4f} {pad_rows:8d} {pad_eff:7.4f} "
              f"{pad_rows / rows:9.1f}x {t_pack:8.2f} {t_bfd:14.2f}")
        del packed


# --- part 3 ----------------------------------------------------------------------------------------


def gpu_model_args(shape: str):
    import json

    from lion_min.core.args import ModelArgs
    from lion_min.formats.hf_config import args_from_config

    if shape == "gemma-2b":
        return args_from_config(json.loads((ROOT / "tests/data/configs/gemma-2b.json").read_text()))
    return ModelArgs(family="gemma", vocab_size=1024, dim=128, n_layers=2, n_heads=4, n_kv_heads=1, head_dim=32,
                     hidden_dim=256, tie_embeddings=True)


def part3_mfu(cfg: BenchConfig, device: torch.device):
    from lion_min.core.parallel import Dist, build_model
    from lion_min.run.flops import flops_per_token, peak_flops

    args = gpu_model_args(cfg.gpu_shape)
    d = Dist(0, 1, 0, device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(args, d, seed=0, param_dtype=dtype, activation_checkpointing=cfg.gpu_ac,
                        compile=cfg.gpu_compile, attn_backend=cfg.gpu_attn)
    opt = make_optimizer(model, TrainConfig(lr=1e-5))
    rng = np.random.default_rng(0)
    T = cfg.gpu_tokens
    median = min(400, T // 8)
    lengths = lognormal_lengths(rng, 8 * T // median, median, 1.0, 8, T)
    packed = pack(random_docs(rng, lengths, args.vocab_size), T, pad_id=0)
    # Best-fit-decreasing puts the longest documents in the first rows: take a typical row instead,
    # the one with the median number of documents among the rows at least 95% full.
    docs = np.array([len(set(r.tolist()) - {-1}) for r in packed.rows["doc_ids"]])
    full = np.flatnonzero((packed.rows["doc_ids"] >= 0).mean(1) >= 0.95)
    r = full[np.argsort(docs[full], kind="stable")[len(full) // 2]]
    row = {k: v.to(device) for k, v in collate({k: v[r : r + 1] for k, v in packed.rows.items()}).items()}
    n_targets = float((row["targets"] != IGNORE_INDEX).sum())
    n_docs = int(docs[r])

    def step():
        logp = model(row["tokens"], row["positions"], row["doc_ids"], targets=row["targets"])
        sft_loss(logp, row["targets"], n_targets).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t = time.perf_counter()
    for _ in range(cfg.gpu_warmup):
        step()
    sync()
    t_warm = time.perf_counter() - t
    times = []
    for _ in range(cfg.gpu_steps):
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    flops = flops_per_token(model.args, T) * T
    peak = peak_flops(device) or 989e12
    mem = f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if device.type == "cuda" else "n/a on CPU"
    print(f"\npart 3a ({device}, {dtype}): {cfg.gpu_shape}-shaped random model, {args.num_params() / 1e9:.2f}B params; "
          f"1 row of {T} tokens, {n_docs} packed documents; compile {cfg.gpu_compile}, activation checkpointing "
          f"{cfg.gpu_ac}, attention {cfg.gpu_attn}; {cfg.gpu_warmup} warm-up steps ({t_warm:.1f} s), median of "
          f"{cfg.gpu_steps}")
    print(f"  step {med * 1e3:.1f} ms, {T / med:,.0f} tok/s, {flops / med / 1e12:.1f} TFLOP/s "
          f"(flops_per_token {flops_per_token(model.args, T) / 1e9:.2f} GFLOP, full-row causal attention counted), "
          f"MFU {flops / med / peak:.1%} of {peak / 1e12:.0f} TFLOP/s; peak memory {mem}")


def part3_attention(cfg: BenchConfig, device: torch.device):
    from lion_min.core.attention import attend, build_mask

    torch.manual_seed(0)
    full = cfg.gpu_shape == "gemma-2b"
    B, Hq, Hkv, hd = (2, 8, 1, 256) if full else (2, 4, 1, 32)
    T = cfg.gpu_attn_len if full else 256
    rng = np.random.default_rng(1)
    doc_ids = torch.full((B, T), -1, dtype=torch.long)
    for b in range(B):  # documents of log-normal length, then ~5% padding
        start, i = 0, 0
        while start < int(0.95 * T):
            n = min(lognormal_lengths(rng, 1, T / 8, 0.8, 4, T)[0], int(0.95 * T) - start)
            doc_ids[b, start : start + n] = 100 * b + i
            start, i = start + n, i + 1
    doc_ids = doc_ids.to(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q = torch.randn(B, Hq, T, hd, device=device)
    k, v = torch.randn(B, Hkv, T, hd, device=device), torch.randn(B, Hkv, T, hd, device=device)
    grad_out = torch.randn(B, Hq, T, hd, device=device)

    def run(backend: str, dt: torch.dtype):
        leaves = [x.to(dt).requires_grad_() for x in (q, k, v)]
        out = attend(*leaves, build_mask(doc_ids, backend, dt))
        out.backward(grad_out.to(dt))
        return [out.float()] + [x.grad.float() for x in leaves]

    ref = run("sdpa", torch.float32)  # dense block-diagonal mask, fp32
    print(f"\npart 3b ({device}): attention over packed documents, B {B}, heads {Hq} / kv {Hkv}, head_dim {hd}, "
          f"T {T}; max |diff| against SDPA with the dense mask in fp32 (out, dq, dk, dv); max |out| "
          f"{ref[0].abs().max():.2f}")
    for backend, dt in (("sdpa", dtype), ("flex", dtype), ("varlen", dtype)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # flex outside torch.compile warns that it is unfused
                got = run(backend, dt)
            diffs = "  ".join(f"{n} {(g - r).abs().max():.2e}" for n, g, r in zip(("out", "dq", "dk", "dv"), got, ref))
            print(f"  {backend:6s} {str(dt):15s} {diffs}")
        except Exception as e:  # e.g. no FlexAttention backward / no varlen kernel on the CPU
            print(f"  {backend:6s} {str(dt):15s} not available here: {type(e).__name__}: {str(e).splitlines()[0][:120]}")


def main(argv=None):
    cfg = parse_cli(BenchConfig, {}, argv)
    torch.set_num_threads(cfg.threads)
    header("bench/bench_sft.py", argv)
    part1(cfg)
    if cfg.packing:
        part2(cfg)
    if not cfg.gpu:
        return
    if cfg.gpu_device == "auto" and not torch.cuda.is_available():
        print("\npart 3 skipped: no CUDA device (smoke-run it with --gpu_shape=tiny --gpu_device=cpu --gpu_compile=false "
              "--gpu_tokens=512)")
        return
    device = torch.device("cuda" if cfg.gpu_device == "auto" else cfg.gpu_device)
    part3_mfu(cfg, device)
    part3_attention(cfg, device)


if __name__ == "__main__":
    main()
