"""Stage 2: offline DPO on preference pairs (lion_min/dpo.py).

    python train_dpo.py                                   # the demo: continues from out/demo/sft
    python train_dpo.py --model=out/my-sft --data=pairs.jsonl --out_dir=out/my-dpo --beta=0.05
    torchrun --nproc_per_node=8 train_dpo.py --preset=lion-llama3-8b --data=...
    python train_dpo.py --help                            # every flag, and the presets
"""

import lion_min  # noqa: F401  (first: it sets OMP_WAIT_POLICY before torch starts)
from lion_min import demo, dpo
from lion_min.config import parse_cli, recipe_presets, run_cli


def main(argv=None):
    presets = demo.presets("dpo") | recipe_presets("dpo")
    cfg = parse_cli(dpo.DPOConfig, presets, argv, default_preset=demo.wanted("dpo"), doc=__doc__)
    if cfg.preset in ("demo", "debug"):
        return demo.run_stage("dpo", cfg, dpo.run)
    return dpo.run(cfg)


if __name__ == "__main__":
    run_cli(main)
