"""Stage 1: supervised fine-tuning with packing and loss masking (lion_min/stages/sft.py).

    python train_sft.py                                   # the built-in demo (CPU, a few minutes)
    python train_sft.py --model=google/gemma-2b --data=chats.jsonl --out_dir=out/my-sft
    torchrun --nproc_per_node=8 train_sft.py --preset=lion-llama3-8b --data=...
    python train_sft.py --help                            # every flag, and the presets
"""

import lion_min  # noqa: F401  (first: it sets OMP_WAIT_POLICY before torch starts)
from lion_min.cli import run_cli, stage_main
from lion_min.run.config import SFTConfig


def main(argv=None):
    return stage_main(SFTConfig, argv, __doc__)


if __name__ == "__main__":
    run_cli(main)
