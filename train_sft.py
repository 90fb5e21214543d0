"""Stage 1: supervised fine-tuning with packing and loss masking (lion_min/sft.py).

    python train_sft.py                                   # the built-in demo (CPU, a few minutes)
    python train_sft.py --model=google/gemma-2b --data=chats.jsonl --out_dir=out/my-sft
    torchrun --nproc_per_node=8 train_sft.py --preset=lion-llama3-8b --data=...
    python train_sft.py --help                            # every flag, and the presets
"""

import lion_min  # noqa: F401  (first: it sets OMP_WAIT_POLICY before torch starts)
from lion_min import demo, sft
from lion_min.config import parse_cli, recipe_presets, run_cli


def main(argv=None):
    presets = demo.presets("sft") | recipe_presets("sft")
    cfg = parse_cli(sft.SFTConfig, presets, argv, default_preset=demo.wanted("sft"), doc=__doc__)
    if cfg.preset in ("demo", "debug"):
        return demo.run_stage("sft", cfg, sft.run)
    return sft.run(cfg)


if __name__ == "__main__":
    run_cli(main)
