"""Loss and reward curves of the three stages in one PNG, read from the runs' metrics files.

    python -m lion_min plot --sft=out/demo/sft --dpo=out/demo/dpo --online=out/demo/online --out=out/curves.png

train_online.py draws it at the end of the demo. matplotlib is an optional extra
(`pip install -r requirements-plot.txt`); without it the plot is skipped with a message.

Panels, 2 x 2: SFT loss (train per step, eval points); DPO loss (with eval points) and the
implicit rewards (chosen, rejected, margin) over offline DPO and then each online round, on one
continuous step axis: each segment is named above the panel, every other one shaded, and a red
dashed line marks where the reference model changes (offline DPO scores against the SFT model, the
online rounds against the offline DPO policy); the mean judged reward of the policy sampled before
each round and after the last.
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


def reference_of(folder: Path) -> Optional[str]:
    """The reference model a DPO run scored against (its train_config.json: ref_model, else model)."""
    path = Path(folder) / "train_config.json"
    if not path.is_file():
        return None
    cfg = json.loads(path.read_text())
    ref = cfg.get("ref_model") or cfg.get("model")
    return str(Path(ref)) if ref else None


def collect_curves(sft: Optional[Path] = None, dpo: Optional[Path] = None, online: Optional[Path] = None) -> dict:
    """The series to draw. Stages that are None are left out.

    Returns {"sft": {"step", "loss", "eval_step", "eval_loss"},
             "dpo": {"step", "loss", *REWARD_KEYS, "eval_step", "eval_loss", "starts": [(step, label)],
                     "ref_changes": [step]},
             "judged": {"round", "mean_reward"}}; DPO steps run on across offline DPO and the rounds, and
    ref_changes are the steps where a segment scores against another reference model than the one
    before it (offline DPO's is the SFT model, the online rounds' the offline DPO policy).
    """
    curves: dict = {}
    if sft is not None:
        train, evals = read_metrics(sft)
        curves["sft"] = {"step": [r["step"] for r in train], "loss": [r["loss"] for r in train],
                         "eval_step": [r["step"] for r in evals], "eval_loss": [r["eval/loss"] for r in evals]}
    segments = ([("offline DPO", dpo)] if dpo is not None else [])
    segments += [(f"round {k}", f) for k, f in enumerate(round_folders(online))] if online is not None else []
    if segments:
        d = {"step": [], "loss": [], **{k: [] for k in REWARD_KEYS}, "eval_step": [], "eval_loss": [],
             "starts": [], "ref_changes": []}
        offset, ref = 0, None
        for label, folder in segments:
            train, evals = read_metrics(folder)
            d["starts"].append((offset, label))
            new_ref = reference_of(folder)
            if d["starts"][1:] and new_ref != ref:
                d["ref_changes"].append(offset)
            ref = new_ref
            d["step"] += [offset + r["step"] for r in train]
            for k in ("loss",) + REWARD_KEYS:
                d[k] += [r[k] for r in train]
            d["eval_step"] += [offset + r["step"] for r in evals]
            d["eval_loss"] += [r["eval/loss"] for r in evals]
            offset += train[-1]["step"] if train else 0
        curves["dpo"] = d
    if online is not None and (Path(online) / "summary.json").is_file():
        s = json.loads((Path(online) / "summary.json").read_text())
        rewards = [r["mean_reward"] for r in s.get("rounds", [])] + [s["mean_reward_final"]]
        curves["judged"] = {"round": list(range(len(rewards))), "mean_reward": rewards}
    return curves


def segment_labels(starts: list[tuple[int, str]], end: float, lo: float,
                   step_per_char: float) -> list[tuple[float, str]]:
    """Where to name the DPO segments above a panel whose x axis runs from lo to past `end`: each
    at its middle when every one has room (step_per_char: the steps one character takes at the
    panel's width), else the online rounds under one name ("rounds 0-2") over their span. A label
    never runs past either end of the axis."""
    bounds = [s for s, _ in starts] + [end]
    spans = [(a, b, label) for (a, label), b in zip(starts, bounds[1:])]
    if not all(b - a >= (len(label) + 2) * step_per_char for a, b, label in spans):
        rounds = [(a, b) for a, b, label in spans if label.startswith("round")]
        spans = [s for s in spans if not s[2].startswith("round")]
        if rounds:
            n = len(rounds)
            spans.append((rounds[0][0], rounds[-1][1], "round 0" if n == 1 else f"rounds 0-{n - 1}"))
    out = []
    for a, b, label in spans:
        half = len(label) / 2 * step_per_char
        out.append((min(max((a + b) / 2, lo + half), end - half), label))
    return out


def _mark_segments(ax, c: dict):
    """Name the DPO segments above the panel (off the curves), shade every other one, and draw the
    step where the reference model changes."""
    bounds = [step for step, _ in c["starts"]] + [c["step"][-1] if c["step"] else 0]
    for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
        if i % 2:
            ax.axvspan(a, b, color="0.94", lw=0, zorder=0)
    for k, step in enumerate(c["ref_changes"]):
        ax.axvline(step, color="tab:red", ls="--", lw=1.2, label=None if k else "reference model changes")
    lo, hi = ax.get_xlim()
    width_in = ax.get_position().width * ax.figure.get_figwidth()
    step_per_char = (hi - lo) * (0.6 * 9 / 72) / width_in  # a 9-point character is about 0.6 em wide
    for x, label in segment_labels(c["starts"], bounds[-1], lo, step_per_char):
        ax.text(x, 1.01, label, transform=ax.get_xaxis_transform(), ha="center", va="bottom", fontsize=9,
                color="dimgrey", clip_on=False)


def _step_label(c: dict) -> str:
    online = any(label.startswith("round") for _, label in c["starts"])
    offline = any(label == "offline DPO" for _, label in c["starts"])
    if not online:
        return "step"
    return "step (offline DPO, then online rounds)" if offline else "step (online rounds)"


def plot_pipeline(out_png: Path, sft: Optional[Path] = None, dpo: Optional[Path] = None,
                  online: Optional[Path] = None) -> Optional[Path]:
    """Write the PNG (to a temporary name, then renamed) and return its path; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no screen needed
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        print("matplotlib is not installed (pip install -r requirements-plot.txt): skipping the plot of "
              "loss and reward curves")
        return None
    curves = collect_curves(sft, dpo, online)
    panels = [panel for panel, series in PANELS.items() if series in curves]
    if not panels:
        raise ValueError("no metrics to plot: give at least one of --sft, --dpo, --online")
    cols = min(2, len(panels))
    rows = -(-len(panels) // cols)
    # axes.titlepad leaves room for the DPO segment names between a panel and its title
    with plt.rc_context({"font.size": 11, "axes.titlesize": 13, "axes.titlepad": 16, "legend.fontsize": 9}):
        fig, axes = plt.subplots(rows, cols, figsize=(6.4 * cols, 4.6 * rows), squeeze=False)
        for ax in axes.flat[len(panels):]:
            ax.set_visible(False)
        for ax, name in zip(axes.flat, panels):
            if name == "sft":
                c = curves["sft"]
                ax.plot(c["step"], c["loss"], lw=1.2, label="train")
                if c["eval_step"]:
                    ax.plot(c["eval_step"], c["eval_loss"], "o--", ms=6, label="eval (held out)")
                ax.set(title="SFT loss", xlabel="step", ylabel="loss (assistant tokens)")
            elif name in ("dpo", "rewards"):
                c = curves["dpo"]
                if name == "dpo":
                    ax.plot(c["step"], c["loss"], lw=1, label="train")
                    if c["eval_step"]:
                        ax.plot(c["eval_step"], c["eval_loss"], "o", ms=6, label="eval (held out)")
                    ax.set(title="DPO loss", ylabel="loss")
                else:
                    for k in REWARD_KEYS:
                        ax.plot(c["step"], c[k], lw=1, label=k.split("/")[1])
                    ax.axhline(0, color="grey", lw=0.6)
                    ax.set(title="DPO implicit rewards", ylabel="beta * log(pi / pi_ref)")
                ax.set_xlabel(_step_label(c))
                _mark_segments(ax, c)
            else:
                c = curves["judged"]
                ax.plot(c["round"], c["mean_reward"], "o-")
                ax.set(title="Online: mean judged reward", ylabel="mean judge score of samples")
                ax.set_xticks(c["round"], ["start"] + [f"after round {k}" for k in c["round"][:-1]],
                              rotation=30 if len(c["round"]) > 4 else 0)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(framealpha=0.9, **(dict(ncols=2, loc="upper left") if name == "rewards" else {}))
            if name != "judged":
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
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
    from lion_min.run.flags import parse_cli

    cfg = parse_cli(PlotConfig, {}, argv, doc=__doc__)
    paths = {k: Path(v) for k, v in dataclasses.asdict(cfg).items() if k != "out" and v}
    for k, p in paths.items():
        if not ((p / "metrics.jsonl").is_file() or (p / "round_0" / "metrics.jsonl").is_file()):
            raise FileNotFoundError(f"--{k}={p}: no metrics.jsonl there")
    out = plot_pipeline(Path(cfg.out), **paths)
    if out is not None:
        print(f"wrote {out}")
