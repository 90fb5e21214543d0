"""The paper's experiments in miniature: the demo task, on CPU, minutes each.

    python -m lion_min experiments demo      # the README's demo, every stage, over seeds
    python -m lion_min experiments packing   # SFT: padding / naive packing / packing, with and without loss masking
    python -m lion_min experiments dpo       # offline DPO: the beta sweep and the choice of reference model
    python -m lion_min experiments online    # online vs offline DPO at a matched number of preference pairs
    python -m lion_min experiments margins   # each pair's chosen and rejected log-prob change under DPO
    python -m lion_min experiments scaling   # offline DPO: accuracy against steps for 1/8 .. all of the pairs
    python -m lion_min experiments margins_by_loss   # the margin analysis for IPO, hinge and cDPO beside DPO
    python -m lion_min experiments all

Every arm runs over --seeds seeds (default 3) through the real stages (sft.run, dpo.run,
online.run) on the demo's data (lion_min/demo/task.py), in out/experiments/NAME/ARM/seed_S (the shared
machinery is lion_min/demo/experiment_runs.py). A finished run (its result.json) is reused, so an
interrupted experiment continues where it stopped, and the SFT models that the DPO experiments
start from are trained once per seed (out/experiments/sft/).
Reuse compares only the demo's data version (a run on other data is refused), not the settings:
after changing demo.SETTINGS or this file, use another --out.
Each experiment writes NAME/results.json (every run's figures), NAME/table.md (mean, spread and
range per arm) and NAME/NAME.png (with matplotlib). docs/experiments.md sets the measured tables
next to what the paper reports.

What a run measures: greedy accuracy on the demo's 500 held-out problems (final answer, and the
whole worked answer: demo.Accuracy), plus per experiment the reply loss (SFT) or the DPO figures
on 192 held-out preference pairs (implicit reward margin, per-pair log-prob changes); the demo
adds each model's carry decision per units sum (carry_logodds: demo/carry.json, demo_carry.png).
"""

import json
import math
import shutil
import sys
from pathlib import Path
from typing import Callable, Optional

import torch

from lion_min.demo import task as demo
from lion_min.demo.experiment_runs import (  # noqa: F401
    SIZES,
    Context,
    ExperimentConfig,
    Size,
    bar_chart,
    head,
    pyplot,
    result,
    run_once,
    save,
    slug,
    spread,
    sweep,
    table,
    write_outputs,
)
from lion_min.run.config import ConfigError, check_values
from lion_min.run.flags import parse_cli

# --- 1. SFT: padding vs packing, loss masking -----------------------------------------------------

PAD_LEN = 64
"""Padded rows: one conversation each, and the longest demo conversation fits (checked below)."""


def reply_loss(folder: Path, conversations: Path) -> float:
    """The common yardstick of the SFT arms: mean -log p per reply token (and end-of-turn) of the
    held-out conversations, each scored alone with its own positions, whatever the arm trained on."""
    from lion_min.core.chat import encode_chat
    from lion_min.core.packing import collate, pack
    from lion_min.formats.data import load_conversations
    from lion_min.formats.hf import load_model
    from lion_min.formats.tokenizer import Tokenizer

    model, tokenizer = load_model(str(folder)).eval(), Tokenizer.from_dir(folder)
    convs, _ = load_conversations(str(conversations))
    examples = [encode_chat(tokenizer, c, "chatml") for c in convs]
    rows = collate(pack(examples, PAD_LEN, tokenizer.pad_id, mode="pad").rows)
    with torch.no_grad():
        logp = model(rows["tokens"], rows["positions"], rows["doc_ids"], targets=rows["targets"])
    scored = rows["targets"] != -100
    return -(logp[scored].sum() / scored.sum()).item()


def packing_arms(ctx: Context) -> dict[str, Callable]:
    """Six arms at the same tokens per optimizer step (12 rows of 256 = 48 padded rows of 64) and
    the same conversations (one epoch of sft_conversations): padding, naive packing (documents
    attend to each other, positions run on), packing with per-document attention; each with the
    loss on the replies only and on every token."""
    from lion_min.run.config import SFTConfig
    from lion_min.stages.sft import run

    n = ctx.size.sft_conversations
    data = head(ctx.paths["sft"], n, ctx.root / "data" / f"sft_{n}.jsonl")
    layouts = {
        "padding": dict(packing=False, seq_len=PAD_LEN, batch_size=48, micro_batch_size=48, overflow="drop"),
        "naive packing": dict(packing=True, isolate_documents=False),
        "packing": dict(packing=True, isolate_documents=True),
    }

    def arm(layout: dict, loss_mask: bool):
        def make(folder: Path, seed: int) -> dict:
            over = dict(model=str(ctx.init_model(seed)), data=str(data), eval_data="", epochs=1,
                        loss_mask=loss_mask) | layout
            res = run(SFTConfig(**ctx.settings("sft", folder, seed, **over)))
            summary = json.loads((folder / "summary.json").read_text())
            if summary["dropped"]:  # padding must see the same conversations as packing
                raise ValueError(f"{folder}: {summary['dropped']} conversations longer than {PAD_LEN} tokens")
            return ctx.accuracy(folder) | {"reply_loss": reply_loss(folder, ctx.paths["sft_eval"]),
                                           "steps": res.steps}
        return make

    return {f"{name}, {'reply' if mask else 'all-token'} loss": arm(layout, mask)
            for name, layout in layouts.items() for mask in (True, False)}


def packing(ctx: Context):
    rows = sweep(ctx, "packing", packing_arms(ctx))
    metrics = {"accuracy": "accuracy (final answer)", "strict_accuracy": "accuracy (worked answer)",
               "reply_loss": "held-out reply loss"}
    write_outputs(ctx, "packing", rows, metrics)
    bar_chart(ctx, "packing", rows, metrics)


# --- 2. DPO: beta and the reference ----------------------------------------------------------------

BETAS = (0.01, 0.05, 0.1, 0.5)
SWEEP_LR = 7e-5
"""The beta sweep's learning rate: the demo's before it moved to beta 0.5 and lr 3.5e-5 (which
this sweep is the evidence for); high enough that the betas part ways within one epoch."""


def dpo_arm(ctx: Context, beta: float, reference: str = "sft", **loss) -> Callable:
    """Offline DPO from the seed's SFT model on the demo's pairs (less the held-out ones); the
    reference is the SFT model or ("start") the model SFT started from. `loss`: the DPO stage's
    loss_type and label_smoothing (default: the sigmoid loss, no smoothing)."""
    from lion_min.run.config import DPOConfig
    from lion_min.stages.dpo import run

    def make(folder: Path, seed: int) -> dict:
        sft = ctx.sft_model(seed)
        ref = str(ctx.init_model(seed)) if reference == "start" else ""
        run(DPOConfig(**ctx.settings("dpo", folder, seed, model=str(sft), ref_model=ref, beta=beta, lr=SWEEP_LR,
                                     data=str(ctx.dpo_train), eval_data=str(ctx.dpo_eval), save_every=0, **loss)))
        last = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines() if "eval/loss" in x][-1]
        changes = logp_changes(folder, sft, ctx.dpo_eval, keep=folder / "logp_changes.jsonl")
        return ctx.accuracy(folder) | {
            "reward_margin": last["eval/rewards/margins"], "reward_accuracy": last["eval/rewards/accuracies"],
            # The reward margin is beta x the log-ratio margin; the latter compares across betas.
            "logratio_margin": last["eval/rewards/margins"] / beta,
            "chosen_change": changes["chosen"], "rejected_change": changes["rejected"],
            "chosen_fell": changes["chosen_fell"], "pairs": changes["pairs"]}

    return make


def dpo_arms(ctx: Context) -> dict[str, Callable]:
    arms = {f"beta={b}": dpo_arm(ctx, b) for b in BETAS}
    arms["beta=0.1, reference = starting model"] = dpo_arm(ctx, 0.1, reference="start")
    return arms


def dpo(ctx: Context):
    rows = sweep(ctx, "dpo", dpo_arms(ctx))
    metrics = {"accuracy": "accuracy (final answer)", "strict_accuracy": "accuracy (worked answer)",
               "reward_margin": "reward margin (held-out)", "logratio_margin": "log-ratio margin (held-out)",
               "reward_accuracy": "reward accuracy (held-out)"}
    write_outputs(ctx, "dpo", rows, metrics)
    bar_chart(ctx, "dpo", rows, metrics)


# --- 3. online vs offline at a matched number of pairs ----------------------------------------------


ONLINE_OPTIMIZER = ("lr", "lr_schedule", "warmup_ratio", "beta")
"""Taken from the demo's online settings by both arms (constant lr 5e-5, beta 0.5)."""


def matched_figures(ctx: Context, folder: Path, pairs: int) -> dict:
    """Greedy accuracy, and the smooth figure beside it: the loss of the right worked answers of
    the held-out problems (lower = the right answer more likely), which moves before greedy does."""
    return ctx.accuracy(folder) | {"right_answer_loss": reply_loss(folder, ctx.right_answers), "pairs": pairs}


def online_arm(ctx: Context) -> Callable:
    """Online DPO from the seed's SFT model: online_rounds rounds of online_prompts prompts,
    5 samples each, best vs worst by the demo's rule."""
    from lion_min.run.config import OnlineConfig
    from lion_min.stages.online import run

    def make(folder: Path, seed: int) -> dict:
        n = ctx.size.online_prompts
        prompts = head(ctx.paths["prompts"], n, ctx.root / "data" / f"prompts_{n}.jsonl")
        cfg = OnlineConfig(**ctx.settings("online", folder, seed, model=str(ctx.sft_model(seed)), prompts=str(prompts),
                                          judge=ctx.size.judge, rounds=ctx.size.online_rounds))
        history = run(cfg, judge=demo.make_demo_judge(ctx.size.judge))
        return matched_figures(ctx, folder, sum(h["pairs"] for h in history))

    return make


def offline_arm(ctx: Context, online_folder: Callable[[int], Path]) -> Callable:
    """Offline DPO from the same SFT model on as many of the demo's pairs as the online run of the
    same seed trained on, in as many steps, with the online stage's optimizer settings."""
    from lion_min.run.config import DPOConfig
    from lion_min.stages.dpo import run

    def make(folder: Path, seed: int) -> dict:
        n = result(online_folder(seed))["pairs"]
        data = head(ctx.dpo_train, n, folder.parent / f"pairs_seed_{seed}.jsonl")
        optimizer = {k: demo.SETTINGS["online"][k] for k in ONLINE_OPTIMIZER}
        run(DPOConfig(**ctx.settings("dpo", folder, seed, model=str(ctx.sft_model(seed)), data=str(data), **optimizer)))
        return matched_figures(ctx, folder, n)

    return make


def online(ctx: Context):
    arms = {"online DPO": online_arm(ctx)}
    arms["offline DPO, same number of pairs"] = offline_arm(ctx, lambda seed: ctx.run_dir("online", "online DPO", seed))
    rows = sweep(ctx, "online", arms)
    metrics = {"accuracy": "accuracy (final answer)", "strict_accuracy": "accuracy (worked answer)",
               "right_answer_loss": "loss of the right answers (held-out)", "pairs": "preference pairs trained on"}
    write_outputs(ctx, "online", rows, metrics)
    bar_chart(ctx, "online", rows, metrics)


# --- 4. the probability margin: what DPO does to each side of a pair ---------------------------------


def logp_changes(policy: Path, start: Path, pairs_file: Path, keep: Path) -> dict:
    """For each held-out pair: log pi(y) - log pi_start(y) for the chosen and the rejected reply
    (the change DPO made to each side's log-probability), every pair's two changes written to
    `keep` as JSON lines. Returns the means and the share of pairs whose chosen log-prob fell."""
    from lion_min.core.dpo import encode_pairs, pair_logps, pair_micro
    from lion_min.formats.data import load_preferences
    from lion_min.formats.hf import load_model
    from lion_min.formats.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(policy)
    prefs, _ = load_preferences(str(pairs_file))
    pairs, _ = encode_pairs(prefs, tokenizer, "chatml", 2048, 512)
    sel = torch.arange(len(pairs)).numpy()
    micro = pair_micro(pairs, sel, 2048, tokenizer.pad_id, "cpu")
    out = {}
    for name, folder in (("policy", policy), ("start", start)):
        with torch.no_grad():
            out[name] = pair_logps(load_model(str(folder)).eval(), micro)
    dc = (out["policy"][0] - out["start"][0]).tolist()
    dr = (out["policy"][1] - out["start"][1]).tolist()
    keep.write_text("".join(json.dumps({"chosen": c, "rejected": r}) + "\n" for c, r in zip(dc, dr)))
    return {"chosen": sum(dc) / len(dc), "rejected": sum(dr) / len(dr),
            "chosen_fell": sum(c < 0 for c in dc) / len(dc), "pairs": len(dc)}


def margins(ctx: Context):
    """The beta=0.1 arm of the DPO experiment (run here if it has not been): the change of each
    held-out pair's chosen and rejected log-prob from the SFT model, as that run kept them
    (logp_changes.jsonl), against each other; and the training batches' mean changes
    (metrics.jsonl logratios/*) over the steps."""
    arm = "beta=0.1"
    rows = sweep(ctx, "dpo", {arm: dpo_arm(ctx, 0.1)})
    folder = ctx.root / "margins"
    folder.mkdir(parents=True, exist_ok=True)
    per_pair, curves = {}, {}
    for seed in ctx.seeds:
        run_dir = ctx.run_dir("dpo", arm, seed)
        per_pair[seed] = [json.loads(x) for x in (run_dir / "logp_changes.jsonl").read_text().splitlines()]
        steps = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        curves[seed] = [(m["step"], m["logratios/chosen"], m["logratios/rejected"]) for m in steps if "loss" in m]
    metrics = {"chosen_change": "chosen: change of log p", "rejected_change": "rejected: change of log p",
               "chosen_fell": "share of pairs whose chosen log p fell"}
    write_outputs(ctx, "margins", [r | {"arm": "DPO beta=0.1 (held-out pairs)"} for r in rows], metrics)
    (folder / "curves.json").write_text(json.dumps(curves) + "\n")
    plot_margins(folder / "margins.png", per_pair, curves)


def plot_margins(path: Path, per_pair: dict, curves: dict) -> Optional[Path]:
    plt = pyplot()
    if plt is None:
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4.2))
    for seed, pts in per_pair.items():
        a.scatter([p["chosen"] for p in pts], [p["rejected"] for p in pts], s=8, alpha=0.5, label=f"seed {seed}")
    lo = min(min(p["chosen"], p["rejected"]) for pts in per_pair.values() for p in pts)
    hi = max(max(p["chosen"], p["rejected"]) for pts in per_pair.values() for p in pts)
    a.plot([lo, hi], [lo, hi], "k:", lw=1)
    a.axhline(0, color="grey", lw=0.5)
    a.axvline(0, color="grey", lw=0.5)
    a.set_xlabel("chosen: log p(policy) - log p(SFT)")
    a.set_ylabel("rejected: log p(policy) - log p(SFT)")
    a.set_title("each held-out pair after DPO (beta 0.1)", fontsize=10)
    a.legend(fontsize=8)
    for seed, pts in curves.items():
        steps = [p[0] for p in pts]
        b.plot(steps, [p[1] for p in pts], color="tab:green", alpha=0.7, label="chosen" if seed == 0 else None)
        b.plot(steps, [p[2] for p in pts], color="tab:red", alpha=0.7, label="rejected" if seed == 0 else None)
    b.axhline(0, color="grey", lw=0.5)
    b.set_xlabel("DPO step")
    b.set_ylabel("batch mean of log p(policy) - log p(SFT)")
    b.set_title("over training (each seed one line)", fontsize=10)
    b.legend(fontsize=8)
    return save(fig, path)


# --- 5. scaling offline DPO: accuracy against steps for more or fewer pairs --------------------------

SCALING_SHARES = (8, 4, 2, 1)
"""The preference-set sizes: 1/8, 1/4, 1/2 and all of the training pairs (the first n of them)."""
SATURATION_TOL = 0.02
"""A curve has saturated at the first step whose accuracy is within this of the curve's best."""


def saturation(curve: list[list[float]], tol: float = SATURATION_TOL) -> dict:
    """Where an accuracy curve [[step, accuracy], ...] saturates: the first step whose accuracy is
    at least its best minus `tol`; with the best accuracy, and whether that step is the curve's
    last (still rising at the end of the budget)."""
    best = max(acc for _, acc in curve)
    step = next(s for s, acc in curve if acc >= best - tol)
    return {"saturation_step": step, "best_accuracy": best, "last_step": step == curve[-1][0]}


def mean_curve(curves: list[list[list[float]]]) -> list[list[float]]:
    """The mean of curves read at the same steps: [[step, mean], ...]."""
    return [[points[0][0], sum(p[1] for p in points) / len(points)] for points in zip(*curves)]


def step_accuracy(ctx: Context, run: Path, step_dir: Path) -> dict:
    """Greedy accuracy of the weights in a resumable checkpoint of `run` (the model part of it,
    read into the run's exported model, which has the same architecture)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    from lion_min.formats.hf import load_model
    from lion_min.run.resume import quiet_dcp

    model = load_model(str(run))
    state = {"model": get_model_state_dict(model)}
    with quiet_dcp():
        dcp.load(state, checkpoint_id=str(step_dir))
    set_model_state_dict(model, state["model"])
    return ctx.accuracy(run, model=model)


def scaling_arm(ctx: Context, n_pairs: int) -> Callable:
    """Offline DPO from the seed's SFT model on the first n_pairs training pairs, for the same
    number of steps whatever n_pairs (the data cycled epoch after epoch), with the online stage's
    optimizer settings (constant lr 5e-5, no warmup, beta 0.5: no schedule that ends the curves
    for them). Greedy accuracy every scaling_every steps, read from the run's checkpoints
    (removed once read), and the loop's own held-out reward accuracy at the same steps."""
    from lion_min.run.config import DPOConfig
    from lion_min.run.resume import checkpoint_dirs
    from lion_min.stages.dpo import run

    def make(folder: Path, seed: int) -> dict:
        sft = ctx.sft_model(seed)
        data = head(ctx.dpo_train, n_pairs, folder.parent / "pairs.jsonl")
        steps, every = ctx.size.scaling_steps, ctx.size.scaling_every
        optimizer = {k: demo.SETTINGS["online"][k] for k in ONLINE_OPTIMIZER}
        cfg = DPOConfig(**ctx.settings("dpo", folder, seed, model=str(sft), data=str(data), eval_data=str(ctx.dpo_eval),
                                       max_steps=steps, save_every=every, keep_checkpoints=0, eval_every=every,
                                       **optimizer))
        run(cfg)
        curve, strict = [[0, result(sft)["accuracy"]]], [[0, result(sft)["strict_accuracy"]]]
        for step_dir in checkpoint_dirs(folder):
            step = int(step_dir.name.removeprefix("step_"))
            acc = ctx.accuracy(folder) if step == steps else step_accuracy(ctx, folder, step_dir)
            curve.append([step, acc["accuracy"]])
            strict.append([step, acc["strict_accuracy"]])
        shutil.rmtree(folder / "checkpoints")
        metrics = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
        held = [[m["step"], m["eval/rewards/accuracies"]] for m in metrics if "eval/rewards/accuracies" in m]
        return {"accuracy": curve[-1][1], "strict_accuracy": strict[-1][1], "pairs": n_pairs,
                "epochs": steps * cfg.batch_size / n_pairs, "curve": curve,
                "strict_curve": strict, "reward_accuracy_curve": held}

    return make


def scaling_arms(ctx: Context) -> dict[str, Callable]:
    n_all = len(ctx.dpo_train.read_text().splitlines())
    return {f"{n_all // k} pairs" + (f" (1/{k})" if k > 1 else " (all)"): scaling_arm(ctx, n_all // k)
            for k in SCALING_SHARES}


def scaling(ctx: Context):
    """Accuracy against DPO steps for each preference-set size; where each curve saturates."""
    rows = [r | saturation(r["curve"]) | {f"reward_{k}": v for k, v in saturation(r["reward_accuracy_curve"]).items()}
            for r in sweep(ctx, "scaling", scaling_arms(ctx))]
    metrics = {"accuracy": "accuracy at the last step", "best_accuracy": "best accuracy along the curve",
               "saturation_step": f"saturation step (first within {SATURATION_TOL} of the best)",
               "reward_best_accuracy": "held-out reward accuracy: best",
               "reward_saturation_step": "held-out reward accuracy: saturation step",
               "epochs": "passes over the pairs"}
    steps = [s for s, _ in rows[0]["curve"]]
    lines = ["| arm | " + " | ".join(map(str, steps)) + " |", "|---|" + "---:|" * len(steps)]
    summary = []
    for arm in dict.fromkeys(r["arm"] for r in rows):
        curves = [r["curve"] for r in rows if r["arm"] == arm]
        mean = mean_curve(curves)
        lines.append(f"| {arm} | " + " | ".join(f"{a:.3f}" for _, a in mean) + " |")
        held = saturation(mean_curve([r["reward_accuracy_curve"] for r in rows if r["arm"] == arm]))
        sat = saturation(mean)
        ends = sum(r["last_step"] for r in rows if r["arm"] == arm)
        summary.append(f"- {arm}: the mean accuracy curve saturates at step {sat['saturation_step']} (best "
                       f"{sat['best_accuracy']:.3f}, last {mean[-1][1]:.3f}), the mean held-out reward accuracy at "
                       f"step {held['saturation_step']} (best {held['best_accuracy']:.3f}); {ends} of {len(curves)} "
                       f"seeds' accuracy saturates only at the last step")
    extra = ("Mean accuracy (final answer) over the seeds at each step (step 0: the SFT model):\n\n"
             + "\n".join(lines) + "\n\n" + "\n".join(summary) + "\n")
    write_outputs(ctx, "scaling", rows, metrics, extra=extra)
    plot_scaling(ctx.root / "scaling" / "scaling.png", rows)


def plot_scaling(path: Path, rows: list[dict]) -> Optional[Path]:
    plt = pyplot()
    if plt is None:
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, arm in enumerate(dict.fromkeys(r["arm"] for r in rows)):
        mine = [r for r in rows if r["arm"] == arm]
        color = f"C{i}"
        for ax, key in ((a, "curve"), (b, "reward_accuracy_curve")):
            for r in mine:
                ax.plot(*zip(*r[key]), color=color, alpha=0.3, lw=0.8)
            ax.plot(*zip(*mean_curve([r[key] for r in mine])), color=color, lw=2, label=arm)
        a.axvline(saturation(mean_curve([r["curve"] for r in mine]))["saturation_step"], color=color, ls=":", lw=1)
    a.set_xlabel("DPO step")
    a.set_ylabel("greedy accuracy (final answer), 500 held-out problems")
    a.set_title(f"thin: seeds; dotted: where the mean saturates (within {SATURATION_TOL} of its best)", fontsize=9)
    a.legend(fontsize=8)
    b.set_xlabel("DPO step")
    b.set_ylabel("reward accuracy, held-out pairs")
    b.set_title("the DPO loop's own held-out eval", fontsize=9)
    return save(fig, path)


# --- 6. the margin analysis for each loss of the DPO family -------------------------------------------

LOSSES = {
    "IPO": (dict(loss_type="ipo"), (0.05, 0.1, 0.2, 0.3, 0.5)),
    "hinge": (dict(loss_type="hinge"), (0.1, 0.25, 0.5)),
    "cDPO eps=0.1": (dict(loss_type="sigmoid", label_smoothing=0.1), (0.1, 0.5)),
}
"""Each loss and the betas its calibration tries (on seed 0). IPO's beta sets its target
log-ratio margin 1 / (2 beta) (10 to 1 nats; 0.3 was added after 0.2 and 0.5 gave 0.996 and
0.800), the hinge's margin is 1 / beta (10 to 2 nats); cDPO is the sigmoid loss with labels
flipped with probability 0.1 (its loss is lowest at a log-ratio margin of log(9) / beta: 22 and
4.4 nats)."""
ANCHOR = 0.1
"""Sigmoid DPO at this beta (experiment 4's arm) is the strength the other losses are matched to."""


def curve_shape(xs: list[float], ys: list[float]) -> dict:
    """A quadratic fitted to a curve (least squares): y ~ a x^2 + b x + c; its curvature a (< 0:
    bends down, a cap) and where the fitted parabola is highest on the curve's x range. A curve of
    two points (a tiny run) gets a line: curvature 0."""
    import numpy as np

    a, b, c = np.polyfit(xs, ys, 2) if len(xs) > 2 else (0.0, *np.polyfit(xs, ys, 1))
    lo, hi = min(xs), max(xs)
    candidates = [lo, hi] + ([-b / (2 * a)] if a < 0 and lo < -b / (2 * a) < hi else [])
    return {"curvature": float(a), "peak": float(max(candidates, key=lambda x: a * x * x + b * x + c))}


def training_curves(run: Path) -> dict[str, list]:
    """The training batches' mean chosen and rejected log-prob change (log pi - log pi_SFT) at each
    step of a DPO run (its metrics.jsonl), with x the share of training done (step / steps)."""
    steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in steps if "loss" in m]
    total = steps[-1]["step"]
    return {"x": [m["step"] / total for m in steps], "chosen": [m["logratios/chosen"] for m in steps],
            "rejected": [m["logratios/rejected"] for m in steps]}


def calibrate(ctx: Context, name: str) -> tuple[str, Callable, list[dict]]:
    """The loss `name`'s betas run on seed 0; returns the arm whose accuracy is closest to sigmoid
    DPO's at beta ANCHOR on seed 0 (its name and run), and every tried arm's row."""
    target = sweep(ctx.only_seed(0), "dpo", {f"beta={ANCHOR}": dpo_arm(ctx, ANCHOR)})[0]["accuracy"]
    loss, betas = LOSSES[name]
    grid = {f"{name}, beta={b}": dpo_arm(ctx, b, **loss) for b in betas}
    tried = sweep(ctx.only_seed(0), "margins_by_loss", grid)
    best = min(tried, key=lambda r: abs(r["accuracy"] - target))["arm"]
    return best, grid[best], tried


def margins_by_loss(ctx: Context):
    """Experiment 4's margin analysis for IPO, hinge and cDPO beside sigmoid DPO, each at a beta
    whose seed-0 accuracy is closest to sigmoid DPO's at beta 0.1 (same data, steps and lr)."""
    anchor_arm = {f"beta={ANCHOR}": dpo_arm(ctx, ANCHOR)}
    target = sweep(ctx.only_seed(0), "dpo", anchor_arm)[0]["accuracy"]
    calibration, chosen = [], {}
    for name in LOSSES:
        best, make, tried = calibrate(ctx, name)
        chosen[best] = make
        calibration += [f"| {r['arm']} | {r['accuracy']:.3f} | {'chosen' if r['arm'] == best else ''} |"
                        for r in tried]
    found = [(r | {"arm": f"DPO (sigmoid), beta={ANCHOR}"}, ctx.run_dir("dpo", r["arm"], r["seed"]))
             for r in sweep(ctx, "dpo", anchor_arm)]
    found += [(r, ctx.run_dir("margins_by_loss", r["arm"], r["seed"])) for r in sweep(ctx, "margins_by_loss", chosen)]
    rows, runs = [r for r, _ in found], {r["arm"]: [] for r, _ in found}
    for r, folder in found:
        curves = training_curves(folder)
        margin = [c - j for c, j in zip(curves["chosen"], curves["rejected"])]
        shape_m, shape_c = curve_shape(curves["x"], margin), curve_shape(curves["x"], curves["chosen"])
        r |= {"margin_curvature": shape_m["curvature"], "margin_peak": shape_m["peak"],
              "chosen_curvature": shape_c["curvature"], "chosen_peak": shape_c["peak"]}
        per_pair = [json.loads(x) for x in (folder / "logp_changes.jsonl").read_text().splitlines()]
        runs[r["arm"]].append({"seed": r["seed"], "per_pair": per_pair} | curves)
    metrics = {"accuracy": "accuracy (final answer)", "chosen_change": "chosen: change of log p",
               "rejected_change": "rejected: change of log p", "chosen_fell": "share of pairs whose chosen log p fell",
               "margin_curvature": "margin curve: x² coefficient", "margin_peak": "margin curve: peak at",
               "chosen_curvature": "chosen curve: x² coefficient", "chosen_peak": "chosen curve: peak at"}
    extra = (f"Calibration on seed 0 (sigmoid DPO at beta {ANCHOR}: accuracy {target:.3f}; the beta whose "
             "accuracy is closest is chosen):\n\n| loss, beta | accuracy (seed 0) | |\n|---|---:|---|\n"
             + "\n".join(calibration) + "\n")
    write_outputs(ctx, "margins_by_loss", rows, metrics, extra=extra)
    (ctx.root / "margins_by_loss" / "curves.json").write_text(json.dumps(runs) + "\n")
    plot_margins_by_loss(ctx.root / "margins_by_loss" / "margins_by_loss.png", runs)


def plot_margins_by_loss(path: Path, runs: dict[str, list[dict]]) -> Optional[Path]:
    import numpy as np

    plt = pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(2, len(runs), figsize=(4.2 * len(runs), 8), squeeze=False)
    for (arm, seeds), top, bottom in zip(runs.items(), axes[0], axes[1]):
        for s in seeds:
            top.scatter([p["chosen"] for p in s["per_pair"]], [p["rejected"] for p in s["per_pair"]], s=6, alpha=0.4)
            margin = [c - r for c, r in zip(s["chosen"], s["rejected"])]
            bottom.plot(s["x"], s["chosen"], color="tab:green", alpha=0.6, lw=0.8)
            bottom.plot(s["x"], s["rejected"], color="tab:red", alpha=0.6, lw=0.8)
            bottom.plot(s["x"], margin, color="k", alpha=0.4, lw=0.8)
            fit = np.polyfit(s["x"], margin, min(2, len(margin) - 1))
            bottom.plot(s["x"], np.polyval(fit, s["x"]), "k--", lw=1.2)
        top.axhline(0, color="grey", lw=0.5)
        top.axvline(0, color="grey", lw=0.5)
        top.set_title(arm, fontsize=10)
        top.set_xlabel("chosen: change of log p (held-out pair)")
        bottom.axhline(0, color="grey", lw=0.5)
        bottom.set_xlabel("share of training done")
    axes[0][0].set_ylabel("rejected: change of log p")
    axes[1][0].set_ylabel("batch mean change: chosen (green), rejected (red),\nmargin (black; dashed: quadratic fit)")
    return save(fig, path)


# --- 0. the demo itself, over seeds ------------------------------------------------------------------


def pipeline_arms(ctx: Context) -> dict[str, Callable]:
    """The README's demo, stage by stage, at its own settings (demo.SETTINGS): SFT from the seed's
    starting model, offline DPO on the demo's pairs, online DPO with the demo's rule as judge."""
    from lion_min.run.config import DPOConfig, OnlineConfig
    from lion_min.stages.dpo import run as run_dpo
    from lion_min.stages.online import run as run_online

    def sft(folder: Path, seed: int) -> dict:  # the shared SFT model of the seed (its result, repeated here)
        return result(ctx.sft_model(seed))

    def dpo(folder: Path, seed: int) -> dict:
        run_dpo(DPOConfig(**ctx.settings("dpo", folder, seed, model=str(ctx.sft_model(seed)),
                                         data=str(ctx.paths["dpo"]))))
        return ctx.accuracy(folder)

    def online(folder: Path, seed: int) -> dict:
        cfg = OnlineConfig(**ctx.settings("online", folder, seed, model=str(ctx.run_dir("demo", "offline DPO", seed)),
                                          prompts=str(ctx.paths["prompts"]), judge=ctx.size.judge))
        run_online(cfg, judge=demo.make_demo_judge(ctx.size.judge))
        summary = json.loads((folder / "summary.json").read_text())
        return ctx.accuracy(folder) | {"reward_start": summary["mean_reward_start"],
                                       "reward_final": summary["mean_reward_final"]}

    return {"SFT": sft, "offline DPO": dpo, "online DPO": online}


def carry_logodds(folder: Path, prompts: list[str]) -> dict[int, float]:
    """Per units sum (10..18): the mean log-odds the model gives to writing the carry, log p("+")
    - log p("="), at the tens step of the right worked answer ("7+8=15, 4+3" -> "+1" or "="), over
    the held-out carry problems. Negative: greedy forgets the carry (the teacher's habit)."""
    from lion_min.core.chat import encode_chat
    from lion_min.formats.hf import load_model
    from lion_min.formats.tokenizer import Tokenizer

    model, tokenizer = load_model(str(folder)).eval(), Tokenizer.from_dir(folder)
    plus, equals = tokenizer.token_id("+"), tokenizer.token_id("=")
    problems = [ab for ab in map(demo.parse_problem, prompts) if demo.carries(*ab)]
    if not problems:
        return {}
    # The right worked answer up to its carry ("7+8=15, 4+3+1=8, so 85" -> "7+8=15, 4+3"): the last
    # "+1=" is the tens step's, since the units step of a carry problem may hold one too ("9+1=10").
    rows = [encode_chat(tokenizer, [{"role": "user", "content": demo.problem_text(a, b)}], "chatml",
                        add_generation_prompt=True).input_ids
            + tokenizer.encode(demo.worked_answer(a, b).rsplit("+1=", 1)[0]) for a, b in problems]
    with torch.no_grad():  # two-digit operands: every row has the same length, no padding
        logits = model(torch.tensor(rows))[:, -1]
    by_sum: dict[int, list[float]] = {}
    for (a, b), lo in zip(problems, (logits[:, plus] - logits[:, equals]).tolist()):
        by_sum.setdefault(demo.units_sum(a, b), []).append(lo)
    return {units: sum(v) / len(v) for units, v in sorted(by_sum.items())}


def teacher_logodds(units: int) -> float:
    """The carry's log-odds in the SFT teacher's answers for a units sum (demo.forget_rate)."""
    forget = demo.forget_rate(units)
    return math.log((1 - forget) / forget)


def logodds_table(ctx: Context, models: dict[str, list[Path]]) -> tuple[str, dict]:
    """The carry log-odds per units sum of each arm's models (one per seed), their mean as markdown;
    and the values."""
    values = {arm: [carry_logodds(folder, ctx.test) for folder in folders] for arm, folders in models.items()}
    sums = sorted({u for runs in values.values() for run in runs for u in run})
    n_test = [sum(demo.units_sum(*demo.parse_problem(p)) == u for p in ctx.test) for u in sums]
    lines = ["| units sum | " + " | ".join(map(str, sums)) + " |", "|---|" + "---:|" * len(sums),
             "| held-out problems | " + " | ".join(map(str, n_test)) + " |",
             "| the SFT teacher's | " + " | ".join(f"{teacher_logodds(u):+.2f}" for u in sums) + " |"]
    for arm, runs in values.items():
        means = mean_by_sum(runs)
        lines.append(f"| {arm} | " + " | ".join(f"{means[u]:+.2f}" if u in means else "" for u in sums) + " |")
    return "\n".join(lines) + "\n", values


def mean_by_sum(runs: list[dict[int, float]]) -> dict[int, float]:
    """Per units sum, the mean over the runs (seeds) that have problems with that sum."""
    sums = sorted({u for r in runs for u in r})
    return {u: sum(r[u] for r in runs if u in r) / sum(u in r for r in runs) for u in sums}


def logodds_chart(ctx: Context, name: str, values: dict[str, list[dict[int, float]]]) -> Optional[Path]:
    """The carry log-odds against the units sum: each arm's seeds as dots, their mean as a line."""
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arm, runs in values.items():
        means = mean_by_sum(runs)
        (line,) = ax.plot(list(means), list(means.values()), "-", label=arm)
        for r in runs:
            ax.plot(list(r), list(r.values()), ".", color=line.get_color(), ms=4)
    units = list(range(10, 19))
    ax.plot(units, [teacher_logodds(u) for u in units], "--", color="gray", label="the SFT teacher's")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xlabel("units sum of the problem")
    ax.set_ylabel('log p("+") - log p("="): the carry\'s log-odds')
    ax.set_title("above 0, greedy writes the carry (held-out carry problems)", fontsize=10)
    ax.legend(fontsize=8)
    return save(fig, ctx.root / name / f"{name}_carry.png")


def pipeline(ctx: Context):
    """Every stage's accuracy over the seeds, and whether each stage gained on every seed."""
    rows = sweep(ctx, "demo", pipeline_arms(ctx))
    metrics = {"accuracy": "accuracy (final answer)", "strict_accuracy": "accuracy (worked answer)"}
    by = {(r["arm"], r["seed"]): r for r in rows}
    lines = []
    for key, label in metrics.items():
        for before, after in (("SFT", "offline DPO"), ("offline DPO", "online DPO")):
            gains = [by[after, s][key] - by[before, s][key] for s in ctx.seeds]
            lines.append(f"- {label}, {before} -> {after}: gain {spread(gains)['mean']:+.3f} on average, "
                         f"from {min(gains):+.3f} to {max(gains):+.3f}; higher on {sum(g > 0 for g in gains)} "
                         f"of {len(gains)} seeds")
    online = [by["online DPO", s] for s in ctx.seeds]
    lines.append(f"- mean judged reward of the samples, first round -> final policy: "
                 f"{spread([r['reward_start'] for r in online])['mean']:.3f} -> "
                 f"{spread([r['reward_final'] for r in online])['mean']:.3f}, higher on "
                 f"{sum(r['reward_final'] > r['reward_start'] for r in online)} of {len(online)} seeds")
    models = {arm: [ctx.sft_model(s) if arm == "SFT" else ctx.run_dir("demo", arm, s) for s in ctx.seeds]
              for arm in dict.fromkeys(r["arm"] for r in rows)}
    logodds, values = logodds_table(ctx, models)
    write_outputs(ctx, "demo", rows, metrics, extra="\n".join(lines) + "\n\nThe carry's log-odds at the tens step "
                  "(`carry_logodds`), mean over the seeds:\n\n" + logodds)
    carry = ctx.root / "demo" / "carry.json"  # every model's values, seed by seed
    carry.write_text(json.dumps({arm: {f"seed_{s}": run for s, run in zip(ctx.seeds, runs)}
                                 for arm, runs in values.items()}, indent=1) + "\n")
    print(f"wrote {carry}")
    logodds_chart(ctx, "demo", values)


# --- the command line --------------------------------------------------------------------------------

EXPERIMENTS = {"demo": pipeline, "packing": packing, "dpo": dpo, "online": online, "margins": margins,
               "scaling": scaling, "margins_by_loss": margins_by_loss}


def main(argv: Optional[list[str]] = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    names = [a for a in argv if not a.startswith("-")]
    flags = [a for a in argv if a.startswith("-")]
    cfg = parse_cli(ExperimentConfig, {}, flags, doc=__doc__)
    if len(names) != 1 or names[0] not in (*EXPERIMENTS, "all"):
        raise ConfigError(f"name one experiment: {', '.join(EXPERIMENTS)} or all (got {' '.join(names) or 'none'})")
    check_values(cfg)
    ctx = Context(cfg)
    for name in EXPERIMENTS if names[0] == "all" else names:
        EXPERIMENTS[name](ctx)
