"""The paper's first experiments in miniature: the demo task, on CPU, minutes each.

    python -m lion_min.experiments demo      # the README's demo, every stage, over seeds
    python -m lion_min.experiments packing   # SFT: padding / naive packing / packing, with and without loss masking
    python -m lion_min.experiments dpo       # offline DPO: the beta sweep and the choice of reference model
    python -m lion_min.experiments online    # online vs offline DPO at a matched number of preference pairs
    python -m lion_min.experiments margins   # each pair's chosen and rejected log-prob change under DPO
    python -m lion_min.experiments all

Every arm runs over --seeds seeds (default 3) through the real stages (sft.run, dpo.run,
online.run) on the demo's data (lion_min/demo.py), in out/experiments/NAME/ARM/seed_S. A finished
run (its result.json) is reused, so an interrupted experiment continues where it stopped, and the
SFT models that the DPO experiments start from are trained once per seed (out/experiments/sft/).
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
import sys
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable, Optional

import torch

from lion_min import demo
from lion_min.config import ConfigError, check_values, read_json
from lion_min.flags import parse_cli

# --- sizes ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Size:
    """How much each run does. "full" is what docs/experiments.md reports; "tiny" runs every code
    path in seconds (the test suite)."""

    sft_conversations: int
    """SFT conversations of the packing experiment (the demo's SFT models see all 16000, twice)."""
    max_steps: int
    """0 = the settings' epochs; otherwise exactly this many steps per run (tiny)."""
    test_prompts: int
    """Held-out problems for greedy accuracy."""
    eval_pairs: int
    """Held-out preference pairs for the DPO figures: the last of the demo's pairs file, a multiple
    of the micro-batch so that the training loop's own eval scores every one of them."""
    online_prompts: int
    online_rounds: int
    batch_size: int = 0
    """0 = the settings' batch sizes; otherwise every run's (tiny: a few prompts must fill a batch)."""
    judge: str = "demo"
    """The online judge: the demo's rule, or "length" where the model is untrained (tiny: every
    reply would be wrong, and all scores would tie)."""


SIZES = {
    "full": Size(sft_conversations=8000, max_steps=0, test_prompts=demo.N_TEST, eval_pairs=192, online_prompts=256,
                 online_rounds=4),
    "tiny": Size(sft_conversations=64, max_steps=2, test_prompts=8, eval_pairs=8, online_prompts=8, online_rounds=1,
                 batch_size=2, judge="length"),
}


@dataclass
class ExperimentConfig:
    RANGES = {"seeds": "[1, 100]"}
    CHOICES = {"size": tuple(SIZES)}

    seeds: int = 3
    """Seeds per arm (each seed: its own starting model, data order and sampling)."""
    out: str = "out/experiments"
    size: str = "full"
    """full (docs/experiments.md) or tiny (a few steps per run: checks the code, measures nothing)."""


# --- running one arm ------------------------------------------------------------------------------


class Context:
    """The experiment's shared files: the demo data (written once), one starting model per seed,
    a held-out split of the pairs file, and the stage settings every run starts from."""

    def __init__(self, cfg: ExperimentConfig):
        self.root, self.size, self.seeds = Path(cfg.out), SIZES[cfg.size], range(cfg.seeds)
        meta = read_json(self.root / "data" / "meta.json")
        if meta is not None and meta.get("version") != demo.DATA_VERSION:  # refused before anything is rewritten
            raise ConfigError(f"{self.root / 'data' / 'meta.json'}: these runs were made from version "
                              f"{meta.get('version')} of the demo's data (now {demo.DATA_VERSION}): use another "
                              f"--out, or remove {self.root}")
        self.paths = demo.write_demo_data(self.root / "data", seed=0)
        self.test = demo.read_test(self.paths["test"])[: self.size.test_prompts]
        self.dpo_train, self.dpo_eval = self._split_pairs()

    def _split_pairs(self) -> tuple[Path, Path]:
        """The demo's pairs file cut into training pairs and `eval_pairs` held-out ones (the last)."""
        train, held = self.root / "data" / "dpo_train.jsonl", self.root / "data" / "dpo_eval.jsonl"
        lines = self.paths["dpo"].read_text().splitlines(keepends=True)
        n = self.size.eval_pairs
        for path, part in ((train, lines[:-n]), (held, lines[-n:])):
            if not path.is_file() or path.read_text() != "".join(part):
                path.write_text("".join(part))
        return train, held

    @cached_property
    def right_answers(self) -> Path:
        """The held-out problems with their right worked answers, as conversations (for reply_loss)."""
        path = self.root / "data" / "test_right_answers.jsonl"
        rows = [{"messages": [{"role": "user", "content": p},
                              {"role": "assistant", "content": demo.worked_answer(*demo.parse_problem(p))}]}
                for p in self.test]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path

    def run_dir(self, name: str, arm: str, seed: int) -> Path:
        """Where `sweep` runs an arm of an experiment for a seed."""
        return self.root / name / slug(arm) / f"seed_{seed}"

    def init_model(self, seed: int) -> Path:
        return demo.init_model(self.root / "data" / f"init_model_seed_{seed}", self.paths["tokenizer"], seed)

    def settings(self, stage: str, folder: Path, seed: int, **over) -> dict:
        """The demo's settings for the stage, in `folder`, with `over` on top."""
        s = demo.SETTINGS[stage] | dict(out_dir=str(folder), seed=seed, overwrite=True, device="cpu", log_every=1000)
        s |= over
        if self.size.max_steps:
            s |= dict(max_steps=self.size.max_steps)
        if self.size.batch_size:
            s |= dict(batch_size=self.size.batch_size, micro_batch_size=self.size.batch_size)
        return s

    def accuracy(self, folder: Path) -> dict:
        from lion_min.checkpoint import load_model
        from lion_min.tokenizer import Tokenizer

        acc = demo.evaluate_accuracy(load_model(str(folder)), Tokenizer.from_dir(folder), self.test)
        return {"accuracy": acc.final, "strict_accuracy": acc.strict}

    def sft_model(self, seed: int) -> Path:
        """The demo's SFT model for this seed (demo settings, from this seed's starting model)."""
        return run_once(self.root / "sft" / f"seed_{seed}", lambda folder: self._sft(folder, seed))

    def _sft(self, folder: Path, seed: int) -> dict:
        from lion_min.sft import SFTConfig, run

        run(SFTConfig(**self.settings("sft", folder, seed, model=str(self.init_model(seed)),
                                      data=str(self.paths["sft"]), eval_data=str(self.paths["sft_eval"]))))
        return self.accuracy(folder)


def run_once(folder: Path, make: Callable[[Path], dict]) -> Path:
    """Run `make(folder)` unless folder/result.json exists (a finished run); returns the folder.
    A run made from another version of the demo's data is refused, not reused."""
    done = read_json(folder / "result.json")
    if done is not None and done.get("data_version") != demo.DATA_VERSION:
        made = f"version {done['data_version']}" if "data_version" in done else f"a version before {demo.DATA_VERSION}"
        raise ConfigError(f"{folder / 'result.json'}: a run made from {made} of the demo's data (now "
                          f"{demo.DATA_VERSION}): use another --out, or remove {folder}")
    if done is None:
        result = make(folder) | {"data_version": demo.DATA_VERSION}
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / "result.json.tmp"
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        tmp.rename(folder / "result.json")
    return folder


def head(source: Path, n: int, dest: Path) -> Path:
    """Write the first n lines of `source` to `dest` (a smaller data or prompts file); returns dest."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text("".join(source.read_text().splitlines(keepends=True)[:n]))
    return dest


def result(folder: Path) -> dict:
    return json.loads((folder / "result.json").read_text())


def sweep(ctx: Context, name: str, arms: dict[str, Callable[[Path, int], dict]]) -> list[dict]:
    """Every arm over every seed, in out/NAME/ARM/seed_S; returns one row per run."""
    rows = []
    for arm, make in arms.items():
        for seed in ctx.seeds:
            folder = ctx.run_dir(name, arm, seed)
            print(f"== {name}: {arm}, seed {seed}", flush=True)
            rows.append({"arm": arm, "seed": seed} | result(run_once(folder, lambda f: make(f, seed))))
    return rows


def slug(arm: str) -> str:
    return "".join(c if c.isalnum() or c in "._=" else "_" for c in arm)


# --- summaries ------------------------------------------------------------------------------------


def spread(values: list[float]) -> dict:
    """mean, sample standard deviation (0 for one value), min and max."""
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "sd": sd, "min": min(values), "max": max(values), "n": n}


def table(rows: list[dict], metrics: dict[str, str]) -> str:
    """A markdown table: one line per arm, each metric as mean ± sd [min, max] over the seeds."""
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    lines = ["| arm | seeds | " + " | ".join(metrics.values()) + " |", "|---|---:|" + "---:|" * len(metrics)]
    for arm in arms:
        mine = [r for r in rows if r["arm"] == arm]
        cells = []
        for key in metrics:
            s = spread([r[key] for r in mine])
            cells.append(f"{s['mean']:.3f} ± {s['sd']:.3f} [{s['min']:.3f}, {s['max']:.3f}]")
        lines.append(f"| {arm} | {len(mine)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(ctx: Context, name: str, rows: list[dict], metrics: dict[str, str], extra: str = ""):
    folder = ctx.root / name
    (folder / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    text = f"# {name}\n\n{table(rows, metrics)}" + (f"\n{extra}" if extra else "")
    (folder / "table.md").write_text(text)
    print(f"\n{text}\nwrote {folder / 'results.json'} and {folder / 'table.md'}")


def bar_chart(ctx: Context, name: str, rows: list[dict], metrics: dict[str, str]) -> Optional[Path]:
    """One panel per metric: each arm's mean with its seeds as dots."""
    plt = pyplot()
    if plt is None:
        return None
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    n_rows = math.ceil(len(metrics) / 3)  # at most 3 panels a row, the rows as even as they go
    cols = math.ceil(len(metrics) / n_rows)
    fig, axes = plt.subplots(n_rows, cols, figsize=(4.5 * cols, 4 * n_rows), squeeze=False)
    for ax in axes.flat[len(metrics):]:
        ax.set_visible(False)
    for ax, (key, label) in zip(axes.flat, metrics.items()):
        for i, arm in enumerate(arms):
            vals = [r[key] for r in rows if r["arm"] == arm]
            ax.bar(i, sum(vals) / len(vals), color="#9ecae1")
            ax.plot([i] * len(vals), vals, "k.", ms=6)
        ax.set_xticks(range(len(arms)), arms, rotation=30, ha="right", fontsize=8)
        ax.set_title(label, fontsize=10)
    return save(fig, ctx.root / name / f"{name}.png")


def pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        return plt
    except ImportError:
        print("matplotlib is not installed: no figure (pip install -r requirements-plot.txt)")
        return None


def save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    fig.clf()
    print(f"wrote {path}")
    return path


# --- 1. SFT: padding vs packing, loss masking -----------------------------------------------------

PAD_LEN = 64
"""Padded rows: one conversation each, and the longest demo conversation fits (checked below)."""


def reply_loss(folder: Path, conversations: Path) -> float:
    """The common yardstick of the SFT arms: mean -log p per reply token (and end-of-turn) of the
    held-out conversations, each scored alone with its own positions, whatever the arm trained on."""
    from lion_min.chat import encode_chat
    from lion_min.checkpoint import load_model
    from lion_min.data import load_conversations
    from lion_min.packing import collate, pack
    from lion_min.tokenizer import Tokenizer

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
    from lion_min.sft import SFTConfig, run

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


def dpo_arm(ctx: Context, beta: float, reference: str = "sft") -> Callable:
    """Offline DPO from the seed's SFT model on the demo's pairs (less the held-out ones); the
    reference is the SFT model or ("start") the model SFT started from."""
    from lion_min.dpo import DPOConfig, run

    def make(folder: Path, seed: int) -> dict:
        sft = ctx.sft_model(seed)
        ref = str(ctx.init_model(seed)) if reference == "start" else ""
        run(DPOConfig(**ctx.settings("dpo", folder, seed, model=str(sft), ref_model=ref, beta=beta, lr=SWEEP_LR,
                                     data=str(ctx.dpo_train), eval_data=str(ctx.dpo_eval), save_every=0)))
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
    from lion_min.online import OnlineConfig, run

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
    from lion_min.dpo import DPOConfig, run

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
    from lion_min.checkpoint import load_model
    from lion_min.data import load_preferences
    from lion_min.dpo import encode_pairs, pair_logps, pair_micro
    from lion_min.tokenizer import Tokenizer

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


# --- 0. the demo itself, over seeds ------------------------------------------------------------------


def pipeline_arms(ctx: Context) -> dict[str, Callable]:
    """The README's demo, stage by stage, at its own settings (demo.SETTINGS): SFT from the seed's
    starting model, offline DPO on the demo's pairs, online DPO with the demo's rule as judge."""
    from lion_min.dpo import DPOConfig
    from lion_min.dpo import run as run_dpo
    from lion_min.online import OnlineConfig
    from lion_min.online import run as run_online

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
    from lion_min.chat import encode_chat
    from lion_min.checkpoint import load_model
    from lion_min.tokenizer import Tokenizer

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

EXPERIMENTS = {"demo": pipeline, "packing": packing, "dpo": dpo, "online": online, "margins": margins}


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


if __name__ == "__main__":
    from lion_min.cli import run_cli

    run_cli(main)
