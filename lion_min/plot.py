"""Loss and reward curves of the three stages in one PNG, read from the runs' metrics files.

    python -m lion_min.plot --sft=out/demo/sft --dpo=out/demo/dpo --online=out/demo/online --out=out/curves.png

train_online.py draws it at the end of the demo. matplotlib is an optional extra
(`pip install -r requirements-plot.txt`); without it the plot is skipped with a message.

Panels: SFT loss (train per step, eval points); DPO loss and the implicit rewards (chosen,
rejected, margin) over offline DPO and then each online round, one continuous step axis with a
line where each round starts; the mean judged reward of the policy sampled before each round and
after the last.
"""

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

REWARD_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margins")
PANELS = {"sft": "sft", "dpo": "dpo", "rewards": "dpo", "judged": "judged"}
"""Each panel, left to right, and the series of collect_curves() it draws."""


def read_metrics(folder: Path) -> tuple[list[dict], list[dict]]:
    """(training lines, eval lines) of folder/metrics.jsonl, as train.py writes them."""
    path = Path(folder) / "metrics.jsonl"
    train, evals = [], []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {i}: not JSON ({e.msg})") from None
        if "loss" in row:
            train.append(row)
        if "eval/loss" in row:
            evals.append(row)
    return train, evals


def round_folders(online: Path) -> list[Path]:
    """online/round_0, round_1, ... in order, as long as each one has its metrics."""
    out = []
    while (Path(online) / f"round_{len(out)}" / "metrics.jsonl").is_file():
        out.append(Path(online) / f"round_{len(out)}")
    return out


def earlier_runs(folder: Path) -> dict[str, Path]:
    """{"sft": folder, "dpo": folder}: the runs trained here that `folder` descends from, newest
    of each kind, found by following each run's train_config.json "model" back."""
    runs: dict[str, Path] = {}
    for _ in range(16):  # a chain longer than this is not a pipeline (and guards against a cycle)
        if folder is None or not (Path(folder) / "metrics.jsonl").is_file():
            break
        cfg = json.loads((Path(folder) / "train_config.json").read_text())
        runs.setdefault("dpo" if "beta" in cfg else "sft", Path(folder))
        folder = Path(cfg["model"]) if cfg.get("model") else None
    return runs


def collect_curves(sft: Optional[Path] = None, dpo: Optional[Path] = None, online: Optional[Path] = None) -> dict:
    """The series to draw. Stages that are None are left out.

    Returns {"sft": {"step", "loss", "eval_step", "eval_loss"},
             "dpo": {"step", "loss", *REWARD_KEYS, "starts": [(step, label)]},
             "judged": {"round", "mean_reward"}}; DPO steps run on across offline DPO and the rounds.
    """
    curves: dict = {}
    if sft is not None:
        train, evals = read_metrics(sft)
        curves["sft"] = {"step": [r["step"] for r in train], "loss": [r["loss"] for r in train],
                         "eval_step": [r["step"] for r in evals], "eval_loss": [r["eval/loss"] for r in evals]}
    segments = ([("offline DPO", dpo)] if dpo is not None else [])
    segments += [(f"round {k}", f) for k, f in enumerate(round_folders(online))] if online is not None else []
    if segments:
        d = {"step": [], "loss": [], **{k: [] for k in REWARD_KEYS}, "starts": []}
        offset = 0
        for label, folder in segments:
            train, _ = read_metrics(folder)
            d["starts"].append((offset, label))
            d["step"] += [offset + r["step"] for r in train]
            for k in ("loss",) + REWARD_KEYS:
                d[k] += [r[k] for r in train]
            offset += train[-1]["step"] if train else 0
        curves["dpo"] = d
    if online is not None and (Path(online) / "summary.json").is_file():
        s = json.loads((Path(online) / "summary.json").read_text())
        rewards = [r["mean_reward"] for r in s.get("rounds", [])] + [s["mean_reward_final"]]
        curves["judged"] = {"round": list(range(len(rewards))), "mean_reward": rewards}
    return curves


def plot_pipeline(out_png: Path, sft: Optional[Path] = None, dpo: Optional[Path] = None,
                  online: Optional[Path] = None) -> Optional[Path]:
    """Write the PNG (to a temporary name, then renamed) and return its path; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no screen needed
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -r requirements-plot.txt): skipping the plot of "
              "loss and reward curves")
        return None
    curves = collect_curves(sft, dpo, online)
    panels = [panel for panel, series in PANELS.items() if series in curves]
    if not panels:
        raise ValueError("no metrics to plot: give at least one of --sft, --dpo, --online")
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, name in zip(axes[0], panels):
        if name == "sft":
            c = curves["sft"]
            ax.plot(c["step"], c["loss"], lw=1, label="train")
            if c["eval_step"]:
                ax.plot(c["eval_step"], c["eval_loss"], "o-", label="eval")
            ax.set(title="SFT loss", xlabel="step", ylabel="loss (assistant tokens)")
        elif name in ("dpo", "rewards"):
            c = curves["dpo"]
            if name == "dpo":
                ax.plot(c["step"], c["loss"], lw=1)
                ax.set(title="DPO loss", xlabel="step (offline, then online rounds)", ylabel="loss")
            else:
                for k in REWARD_KEYS:
                    ax.plot(c["step"], c[k], lw=1, label=k.split("/")[1])
                ax.axhline(0, color="grey", lw=0.5)
                ax.set(title="DPO implicit rewards", xlabel="step (offline, then online rounds)",
                       ylabel="beta * log(pi / pi_ref)")
            for step, label in c["starts"][1:]:
                ax.axvline(step, color="grey", ls=":", lw=1)
                ax.text(step, 0.98, f" {label}", transform=ax.get_xaxis_transform(), rotation=90, va="top",
                        fontsize=7, color="grey")
        else:
            c = curves["judged"]
            ax.plot(c["round"], c["mean_reward"], "o-")
            ax.set(title="Online: mean judged reward", xlabel="policy after round (0 = start)",
                   ylabel="mean judge score")
            ax.set_xticks(c["round"])
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_png.with_name(out_png.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out_png)
    return out_png


@dataclass
class PlotConfig:
    sft: str = ""
    """An SFT run's out_dir ('' = leave out)."""
    dpo: str = ""
    """An offline DPO run's out_dir."""
    online: str = ""
    """An online DPO run's out_dir (its round_K folders and summary.json)."""
    out: str = "curves.png"


def main(argv=None):
    from lion_min.config import parse_cli

    cfg = parse_cli(PlotConfig, {}, argv, doc=__doc__)
    paths = {k: Path(v) for k, v in dataclasses.asdict(cfg).items() if k != "out" and v}
    for k, p in paths.items():
        if not ((p / "metrics.jsonl").is_file() or (p / "round_0" / "metrics.jsonl").is_file()):
            raise FileNotFoundError(f"--{k}={p}: no metrics.jsonl there")
    out = plot_pipeline(Path(cfg.out), **paths)
    if out is not None:
        print(f"wrote {out}")


if __name__ == "__main__":
    from lion_min.config import run_cli

    run_cli(main)
