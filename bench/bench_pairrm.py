"""PairRM comparisons per second on the CPU, lion_min against transformers, and an estimate (from
FLOPs, not a measurement) of the LION online budget on one GPU.

    python bench/bench_pairrm.py                          # deberta-v3-large shape, ~1 minute here
    python bench/bench_pairrm.py --n_layers=2 --repeats=1 # a quick look

Part 1: a random PairRM with deberta-v3-large's shape (24 layers, dim 1024, 16 heads, 256 position
buckets, vocab 128005) in fp32; `batch` comparison rows of `tokens` tokens each, no padding, under
inference_mode. lion_min's PairRM forward (encoder + head at the prefix positions) against
transformers' DebertaV2Model on the same weights plus the same head written out; timed
alternately after a warm-up, medians of `repeats`, and their logits compared.

Part 2 (ESTIMATE): the paper's online budget, 60k samples = 12k prompts x 5 samples, is
12k x 20 = 240k comparisons. FLOPs per comparison from DebertaEncoder.flops at a given row
length (the rows are at most 1224 + 2 x 412 = 2048 tokens), divided by an assumed fraction of the
GPU's dense bf16 peak.
"""

import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from lion_min.pairrm.deberta import args_from_config, hf_name  # noqa: E402
from lion_min.pairrm.model import DEBERTA_V3_LARGE, PairRM  # noqa: E402
from lion_min.run.flags import parse_cli  # noqa: E402


@dataclass
class BenchConfig:
    n_layers: int = 24
    """deberta-v3-large has 24; fewer for a quick look (part 2 always uses 24)."""
    batch: int = 2
    """Comparison rows per forward."""
    tokens: int = 128
    """Tokens per row on the CPU (real rows are up to 2048; CPU time grows a little faster than linearly)."""
    repeats: int = 3
    threads: int = 0
    """0: torch's default."""
    prompts: int = 12000
    """Part 2: 60k samples / 5 per prompt."""
    samples: int = 5
    est_tokens: str = "512,1024,2048"
    """Part 2: row lengths to estimate for."""
    est_batch: int = 20
    """Part 2: comparison rows per forward (one prompt's 5 x 4)."""
    peak_flops: float = 989e12
    """Part 2: dense bf16 peak (H100 SXM and H200: 989 TFLOP/s)."""
    mfu: float = 0.4
    """Part 2: assumed fraction of the peak reached (an assumption, not measured)."""


def interleaved_medians(fns: list, repeats: int) -> tuple[list[float], list[torch.Tensor]]:
    """Each fn once as a warm-up, then `repeats` rounds of all of them in turn (this machine's load
    drifts, so alternating keeps the comparison fair); median seconds and last output of each."""
    outs = [fn() for fn in fns]
    times = [[] for _ in fns]
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            t = time.perf_counter()
            outs[k] = fn()
            times[k].append(time.perf_counter() - t)
    return [statistics.median(t) for t in times], outs


def cpu_comparison(cfg: BenchConfig):
    import transformers

    arch = dict(DEBERTA_V3_LARGE, num_hidden_layers=cfg.n_layers, vocab_size=128005)
    torch.manual_seed(0)
    hf = transformers.DebertaV2Model(transformers.DebertaV2Config(**arch)).eval()
    with torch.device("meta"):
        ours = PairRM(args_from_config(arch)).eval()
    ours.to_empty(device="cpu")
    with torch.no_grad():
        sd = hf.state_dict()
        for name, p in ours.encoder.named_parameters():
            p.copy_(sd[hf_name(name)])
        for p in [*ours.head1.parameters(), *ours.head2.parameters()]:
            p.normal_(0, 0.02)
    B, T = cfg.batch, cfg.tokens
    ids = torch.randint(5, 128000, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    pos = torch.tensor([[1, T // 3, 2 * T // 3]] * B)

    @torch.inference_mode()
    def run_ours():
        return ours(ids, mask, pos)

    @torch.inference_mode()
    def run_hf():
        h = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        s, a, b = h[torch.arange(B)[:, None], pos].unbind(1)
        return (ours.head(torch.cat([s, a], -1)) - ours.head(torch.cat([s, b], -1))).mean(-1)

    (t_ours, t_hf), (out_ours, out_hf) = interleaved_medians([run_ours, run_hf], cfg.repeats)
    flops = ours.encoder.flops(B, T)
    print(f"part 1 (cpu, fp32, {torch.get_num_threads()} threads): deberta-v3-large shape, {cfg.n_layers} layers, "
          f"{B} comparisons x {T} tokens per forward, median of {cfg.repeats}")
    for name, t in (("lion_min", t_ours), ("transformers", t_hf)):
        print(f"  {name:13s} {t * 1e3:9.1f} ms  {B / t:7.3f} comparisons/s  {flops / t / 1e9:6.1f} GFLOP/s")
    print(f"  ratio (lion_min / transformers comparisons/s): {t_hf / t_ours:.2f}x; "
          f"max |logit difference| {(out_ours - out_hf).abs().max().item():.2e}")


def gpu_estimate(cfg: BenchConfig):
    args = args_from_config(DEBERTA_V3_LARGE)
    from lion_min.pairrm.deberta import DebertaEncoder

    with torch.device("meta"):
        enc = DebertaEncoder(args)
    n = cfg.prompts * cfg.samples * (cfg.samples - 1)
    print(f"part 2 (ESTIMATE from FLOPs, not measured): {cfg.prompts} prompts x {cfg.samples} samples = "
          f"{n} comparisons, at {cfg.mfu:.0%} of {cfg.peak_flops / 1e12:.0f} TFLOP/s")
    for T in (int(t) for t in cfg.est_tokens.split(",")):
        per = enc.flops(cfg.est_batch, T) / cfg.est_batch
        seconds = n * per / (cfg.peak_flops * cfg.mfu)
        print(f"  rows of {T:4d} tokens: {per / 1e12:.3f} TFLOP per comparison, {n * per / 1e15:7.1f} PFLOP, "
              f"~{seconds / 60:5.1f} min on one GPU")


def main(argv=None):
    cfg = parse_cli(BenchConfig, {}, argv)
    print("command: python " + " ".join(["bench/bench_pairrm.py", *(sys.argv[1:] if argv is None else argv)]))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    cpu_comparison(cfg)
    gpu_estimate(cfg)


if __name__ == "__main__":
    main()
