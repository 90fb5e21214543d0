"""Stage 3: online DPO: sample, judge, train on best vs worst, repeat (lion_min/stages/online.py).

    python train_online.py                                # the demo: continues from out/demo/dpo
    python train_online.py --model=out/my-dpo --prompts=prompts.jsonl --judge=RM_DIR --out_dir=out/my-online
    torchrun --nproc_per_node=8 train_online.py --preset=lion-llama3-8b --prompts=... --judge=...
    python train_online.py --help                         # every flag, and the presets
"""

import lion_min  # noqa: F401  (first: it sets OMP_WAIT_POLICY before torch starts)
from lion_min.cli import run_cli, stage_main
from lion_min.run.config import OnlineConfig


def main(argv=None):
    return stage_main(OnlineConfig, argv, __doc__)


if __name__ == "__main__":
    run_cli(main)
