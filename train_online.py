"""Stage 3: online DPO: sample, judge, train on best vs worst, repeat (lion_min/online.py).

    python train_online.py                                # the demo: continues from out/demo/dpo
    python train_online.py --model=out/my-dpo --prompts=prompts.jsonl --judge=RM_DIR --out_dir=out/my-online
    torchrun --nproc_per_node=8 train_online.py --preset=lion-llama3-8b --prompts=... --judge=...
    python train_online.py --help                         # every flag, and the presets
"""

import lion_min  # noqa: F401  (first: it sets OMP_WAIT_POLICY before torch starts)
from lion_min import demo, online
from lion_min.config import parse_cli, recipe_presets, run_cli


def main(argv=None):
    presets = demo.presets("online") | recipe_presets("online")
    cfg = parse_cli(online.OnlineConfig, presets, argv, default_preset=demo.wanted("online"), doc=__doc__)
    if cfg.preset in ("demo", "debug"):
        return demo.run_stage("online", cfg, online.run)
    return online.run(cfg)


if __name__ == "__main__":
    run_cli(main)
