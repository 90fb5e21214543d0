"""Sampler throughput: lion_min.core.sample.generate against transformers' generate, and (on CUDA) decode
against the HBM-bandwidth ceiling.

    python bench/bench_sampler.py                        # CPU comparison (+ the CUDA part if a GPU is there)
    python bench/bench_sampler.py --roofline=true --roofline_shape=tiny --device=cpu   # smoke-run part 2
    OMP_WAIT_POLICY=PASSIVE python bench/bench_sampler.py --transformers=false --roofline=false  # short: lion_min only

Part 1, on the CPU: one random Llama-shaped checkpoint (dim 256, 4 layers, vocab 2048 by default),
a batch of prompts of different lengths, greedy, no stop tokens, so both sides produce exactly
batch x new_tokens tokens; best of `repeats` timed runs after a warm-up. The two outputs are also
compared token for token.

Part 2, on CUDA: a random Gemma-2b-shaped model in bf16 at batch 64. Each decode step must read every
weight once (the tied head reads the whole embedding) plus the KV cache; bytes / HBM bandwidth is the
fastest a step can be, and batch / that time the ceiling in tokens/s. Our cache is preallocated and
attention reads all of it every step (masked), so the full cache is counted.
"""

import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# As given, before torch loads OpenMP (importing lion_min afterwards sets PASSIVE too late to matter).
WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY", "unset")
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from lion_min.core.args import ModelArgs  # noqa: E402
from lion_min.core.model import Transformer  # noqa: E402
from lion_min.core.sample import generate  # noqa: E402
from lion_min.formats.hf import load_model  # noqa: E402
from lion_min.run.flags import parse_cli  # noqa: E402


@dataclass
class BenchConfig:
    dim: int = 256
    n_layers: int = 4
    vocab_size: int = 2048
    batch: int = 8
    new_tokens: int = 64
    repeats: int = 3
    transformers: bool = True
    """False: time lion_min alone (the short mode, e.g. to compare OMP_WAIT_POLICY settings)."""
    roofline: bool = True
    """Run part 2 (needs CUDA unless --device=cpu for a smoke run)."""
    roofline_shape: str = "gemma-2b"
    """'gemma-2b' or 'tiny' (a quick check of the part-2 code on any device)."""
    roofline_batch: int = 64
    roofline_prompt: int = 128
    roofline_new_tokens: int = 128
    device: str = "auto"
    """Device for part 2: 'auto' (cuda if available, else part 2 is skipped), 'cuda' or 'cpu'."""
    hbm_bytes_per_s: float = 0.0
    """0: from the GPU name (H100 SXM 3.35e12, H200 4.8e12), else 3.35e12."""


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def cpu_comparison(cfg: BenchConfig):
    import transformers

    transformers.logging.set_verbosity_error()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, OMP_WAIT_POLICY {WAIT_POLICY}, "
          f"1-min load average {os.getloadavg()[0]:.1f}")
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, num_hidden_layers=cfg.n_layers, num_attention_heads=8,
        num_key_value_heads=2, intermediate_size=4 * cfg.dim, max_position_embeddings=4096, pad_token_id=0,
        bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32).eval()
    folder = Path(tempfile.mkdtemp()) / "model"
    hf.save_pretrained(folder)
    ours = load_model(folder)
    hf.generation_config.eos_token_id = None  # run all new_tokens on both sides

    g = torch.Generator().manual_seed(0)
    lens = torch.randint(16, 49, (cfg.batch,), generator=g).tolist()
    prompts = [torch.randint(3, cfg.vocab_size, (n,), generator=g).tolist() for n in lens]
    T = max(lens)
    ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    mask = (torch.arange(T)[None] >= torch.tensor([T - n for n in lens])[:, None]).long()

    results = {}

    def run_ours():
        results["ours"] = generate(ours, prompts, cfg.new_tokens, temperature=0)

    @torch.no_grad()
    def run_hf():
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=cfg.new_tokens, do_sample=False,
                          pad_token_id=0)
        results["hf"] = out[:, T:].tolist()

    n = cfg.batch * cfg.new_tokens
    t_ours = best_time(run_ours, cfg.repeats)
    print(f"part 1 (cpu, fp32, {torch.get_num_threads()} threads): dim {cfg.dim}, {cfg.n_layers} layers, "
          f"vocab {cfg.vocab_size}, batch {cfg.batch}, prompts {min(lens)}-{max(lens)} tokens, "
          f"{cfg.new_tokens} new tokens, greedy, best of {cfg.repeats}")
    print(f"  lion_min      {t_ours * 1e3:8.1f} ms  {n / t_ours:9.1f} tok/s")
    if not cfg.transformers:
        return
    t_hf = best_time(run_hf, cfg.repeats)
    print(f"  transformers  {t_hf * 1e3:8.1f} ms  {n / t_hf:9.1f} tok/s")
    print(f"  ratio (lion_min / transformers tok/s): {t_hf / t_ours:.2f}x; "
          f"same tokens: {results['ours'] == results['hf']}")


def roofline(cfg: BenchConfig, device: torch.device):
    if cfg.roofline_shape == "gemma-2b":  # google/gemma-2b's config.json
        args = ModelArgs(family="gemma", vocab_size=256000, dim=2048, n_layers=18, n_heads=8, n_kv_heads=1,
                         head_dim=256, hidden_dim=16384, norm_eps=1e-6, tie_embeddings=True)
    else:
        args = ModelArgs(family="gemma", vocab_size=1024, dim=128, n_layers=2, n_heads=4, n_kv_heads=1,
                         head_dim=32, hidden_dim=256, tie_embeddings=True)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device=device)
    model.init_weights(std=0.02, seed=0)
    model.to(dtype).eval()

    B, P, N = cfg.roofline_batch, cfg.roofline_prompt, cfg.roofline_new_tokens
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, args.vocab_size, (P,), generator=g).tolist() for _ in range(B)]
    generate(model, prompts, 4, temperature=0)  # warm-up
    _, stats = generate(model, prompts, N, temperature=1.0, seed=0, return_stats=True)

    elt = torch.finfo(dtype).bits // 8
    weight_bytes = args.num_params(embedding=True) * elt  # tied: the embedding is counted once
    kv_bytes = args.n_layers * 2 * B * args.n_kv_heads * (P + N) * args.head_dim * elt  # whole cache
    bw = cfg.hbm_bytes_per_s
    if not bw:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
        bw = 4.8e12 if "H200" in name else 3.35e12
    step_floor = (weight_bytes + kv_bytes) / bw
    decode_tps = B * stats.steps / stats.decode_s  # tokens produced by the decode steps
    ceiling = B / step_floor
    print(f"part 2 ({device}, {dtype}): {cfg.roofline_shape}-shaped random model, "
          f"{args.num_params() / 1e9:.2f}B params, batch {B}, prompt {P}, {N} new tokens, temperature 1")
    print(f"  per step: weights {weight_bytes / 1e9:.2f} GB + KV cache {kv_bytes / 1e9:.3f} GB "
          f"at {bw / 1e12:.2f} TB/s -> floor {step_floor * 1e3:.2f} ms")
    print(f"  prefill {stats.prefill_s * 1e3:.1f} ms; decode {stats.decode_s / max(stats.steps, 1) * 1e3:.2f} ms/step, "
          f"{decode_tps:.0f} tok/s vs ceiling {ceiling:.0f} tok/s ({decode_tps / ceiling:.0%})")


def main(argv=None):
    cfg = parse_cli(BenchConfig, {}, argv)
    print("command: python " + " ".join(["bench/bench_sampler.py", *(sys.argv[1:] if argv is None else argv)]))
    cpu_comparison(cfg)
    if not cfg.roofline:
        return
    if cfg.device == "auto" and not torch.cuda.is_available():
        print("part 2 skipped: no CUDA device (smoke-run it with --roofline_shape=tiny --device=cpu)")
        return
    roofline(cfg, torch.device("cuda" if cfg.device == "auto" else cfg.device))


if __name__ == "__main__":
    main()
