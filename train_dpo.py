"""Stage 2: offline DPO on preference pairs (lion_min/stages/dpo.py).

    python train_dpo.py                                   # the demo: continues from out/demo/sft
    python train_dpo.py --model=out/my-sft --data=pairs.jsonl --out_dir=out/my-dpo --beta=0.05
    torchrun --nproc_per_node=8 train_dpo.py --preset=lion-llama3-8b --data=...
    python train_dpo.py --help                            # every flag, and the presets
"""

import lion_min  # noqa: F401  (first: it sets OMP_WAIT_POLICY before torch starts)
from lion_min.cli import run_cli, stage_main
from lion_min.run.config import DPOConfig


def main(argv=None):
    return stage_main(DPOConfig, argv, __doc__)


if __name__ == "__main__":
    run_cli(main)
