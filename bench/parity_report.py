"""Print max |logit difference| between lion_min and transformers on tiny random checkpoints.

    python bench/parity_report.py          (needs transformers; CPU)

Columns: ours vs transformers' eager attention (fp32), vs its default SDPA attention (fp32, bf16),
our bf16 vs our fp32 (the bf16 rounding itself), and the largest logit for scale.
Checkpoints come from tests/conftest.py (real config.json files, sizes scaled down, std 0.2).
"""

import sys
import tempfile
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from conftest import CONFIG_NAMES, make_hf_checkpoint  # noqa: E402

import lion_min  # noqa: E402

transformers.logging.set_verbosity_error()
root = Path(tempfile.mkdtemp())
print(f"{'config':14s} {'fp32 eager':>11s} {'fp32 max|d|':>12s} {'bf16 max|d|':>12s} {'bf16 vs fp32':>13s} {'max|logit|':>11s}")
for name in CONFIG_NAMES:
    path = make_hf_checkpoint(name, root / name)
    x = torch.randint(0, 512, (4, 128), generator=torch.Generator().manual_seed(0))
    out = {}
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):
            hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
            ours = lion_min.load_model(path, dtype=dtype)
            out[dtype] = (hf(x).logits.float(), ours(x).float())
        eager = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
        eager_diff = (eager(x).logits - out[torch.float32][1]).abs().max()
    (h32, o32), (h16, o16) = out[torch.float32], out[torch.bfloat16]
    print(f"{name:14s} {eager_diff:11.2e} {(h32 - o32).abs().max():12.2e} {(h16 - o16).abs().max():12.2e} "
          f"{(o16 - o32).abs().max():13.2e} {h32.abs().max():11.2f}")
