"""Cost of a DPO step relative to an SFT step on the same tokens.

    python bench/bench_dpo.py
    python bench/bench_dpo.py --rows=4 --repeats=7

Random preference pairs (shared prompt, chosen and rejected replies of log-normal lengths) are packed
by lion_min.core.dpo.pair_micro (chosen = example 2i, rejected = 2i + 1). The SFT rows are pack() of the
very same examples list, so both objectives see identical tokens, positions, doc_ids and targets
(only the replies are targets); the script checks that. Each timed step is objective, backward,
AdamW step, zero_grad on the same random lion_min model (fp32, CPU):

  sft              lion_min.core.sft.sft_objective
  dpo, live ref    make_dpo_objective(ref_model=...): policy forward + backward, plus a reference
                   forward under no_grad
  dpo, precomputed make_dpo_objective() with the micro-batch's ref_logps from compute_ref_logps:
                   policy only

plus the reference forward alone (no_grad), which is what the live reference adds. Expected: live
~1.3-1.5x an SFT step (one forward on top of forward + backward), precomputed ~1.0x. All variants run
interleaved after a warm-up; medians are reported.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP; see bench_sft.py

import copy  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
from bench_sft import CPUBench, header, interleaved, lognormal_lengths  # noqa: E402

from lion_min.core.args import ModelArgs  # noqa: E402
from lion_min.core.dpo import EncodedPair, compute_ref_logps, make_dpo_objective, pair_logps, pair_micro  # noqa: E402
from lion_min.core.model import Transformer  # noqa: E402
from lion_min.core.packing import pack  # noqa: E402
from lion_min.core.parallel import Dist  # noqa: E402
from lion_min.core.sft import sft_objective  # noqa: E402
from lion_min.core.train import make_optimizer  # noqa: E402
from lion_min.run.config import TrainConfig  # noqa: E402
from lion_min.run.flags import parse_cli  # noqa: E402


@dataclass
class BenchConfig(CPUBench):
    fill: float = 0.95
    """Pairs are drawn until their tokens fill this fraction of `rows` rows (pack() may need one row more)."""
    prompt_median: int = 60
    reply_median: int = 50
    """Median lengths (log-normal, sigma 0.6; the prompt is in both sides): ~220 tokens per pair."""
    beta: float = 0.1


def make_pairs(cfg: BenchConfig) -> list[EncodedPair]:
    rng = np.random.default_rng(0)
    pairs, total, misses = [], 0, 0
    while misses < 50:  # draw until 50 pairs in a row would overfill
        p, c, r = (lognormal_lengths(rng, 1, m, 0.6, 4, cfg.seq_len // 3)[0]
                   for m in (cfg.prompt_median, cfg.reply_median, cfg.reply_median))
        if total + 2 * p + c + r > cfg.fill * cfg.rows * cfg.seq_len:
            misses += 1
            continue
        total += 2 * p + c + r
        prompt = rng.integers(0, cfg.vocab_size, p).tolist()
        side = lambda n: (prompt + rng.integers(0, cfg.vocab_size, n).tolist(), [False] * p + [True] * n)
        pairs.append(EncodedPair(chosen=side(c), rejected=side(r)))
    return pairs


def main(argv=None):
    cfg = parse_cli(BenchConfig, {}, argv)
    torch.set_num_threads(cfg.threads)
    header("bench/bench_dpo.py", argv)
    device = torch.device("cpu")
    args = ModelArgs(family="llama", vocab_size=cfg.vocab_size, dim=cfg.dim, n_layers=cfg.n_layers,
                     n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.dim // cfg.n_heads,
                     hidden_dim=cfg.hidden_dim)
    policy = Transformer(args)
    policy.init_weights(seed=0)
    policy.train()
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    opt = make_optimizer(policy, TrainConfig(lr=cfg.lr))

    pairs = make_pairs(cfg)
    sel = np.arange(len(pairs))
    ref_logps = compute_ref_logps(ref, pairs, Dist(0, 1, 0, device), len(pairs), cfg.seq_len, pad_id=0)  # (pairs, 2)
    dpo_micro = pair_micro(pairs, sel, cfg.seq_len, 0, device, ref_logps=ref_logps)
    examples = [side for p in pairs for side in (p.chosen, p.rejected)]
    packed = pack(examples, cfg.seq_len, pad_id=0, mode="pack", overflow="drop")
    sft_micro = {k: torch.from_numpy(v) for k, v in packed.rows.items()}
    for k, v in sft_micro.items():
        assert torch.equal(v, dpo_micro[k]), f"SFT and DPO rows differ in {k}"
    n_targets = float(packed.target_tokens)
    B, T = sft_micro["tokens"].shape

    def step(objective, micro, norm):
        loss, _ = objective(policy, micro, norm)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    live = make_dpo_objective(cfg.beta, 0.0, "sigmoid", ref_model=ref)
    precomputed = make_dpo_objective(cfg.beta, 0.0, "sigmoid")

    def ref_forward():
        with torch.no_grad():
            pair_logps(ref, dpo_micro)

    times = interleaved({
        "sft": lambda: step(sft_objective, sft_micro, n_targets),
        "dpo, live reference": lambda: step(live, dpo_micro, float(len(pairs))),
        "dpo, precomputed reference": lambda: step(precomputed, dpo_micro, float(len(pairs))),
        "reference forward alone (no_grad)": ref_forward,
    }, cfg.repeats)

    print(f"\nDPO vs SFT step (cpu, fp32): random Llama-shaped lion_min model, dim {cfg.dim}, {cfg.n_layers} layers, "
          f"{cfg.n_heads} heads / {cfg.n_kv_heads} kv, mlp {cfg.hidden_dim}, vocab {cfg.vocab_size} "
          f"({args.num_params() / 1e6:.1f}M params)")
    print(f"  {len(pairs)} pairs packed by pair_micro into {B} rows x {T} tokens ({packed.efficiency:.1%} full), "
          f"{packed.target_tokens} scored tokens; the SFT rows are identical (checked); beta {cfg.beta}, sigmoid loss; "
          f"1 warm-up + {cfg.repeats} interleaved steps per variant")
    t_sft = statistics.median(times["sft"])
    print(f"  {'variant':36s} {'median ms':>10s} {'min ms':>8s} {'vs sft step':>12s}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:36s} {med * 1e3:10.1f} {min(ts) * 1e3:8.1f} {med / t_sft:11.2f}x")


if __name__ == "__main__":
    main()
