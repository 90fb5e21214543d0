"""The machinery every experiment of lion_min/demo/experiments.py shares: the sizes, the shared files
(Context: the demo data, one starting and one SFT model per seed, the held-out pairs), running an
arm once per seed and reusing a finished run (run_once, sweep), and the summaries (spread, table,
write_outputs, bar_chart). The experiments themselves are in lion_min/demo/experiments.py.
"""

import copy
import json
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable, Optional

from lion_min.demo import task as demo
from lion_min.run.config import ConfigError, read_json

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
    scaling_steps: int = 192
    """Steps of every run of the scaling experiment (1.7 epochs of all the training pairs at 16 a step)."""
    scaling_every: int = 32
    """The scaling experiment reads each run's accuracy every this many steps (each read is a greedy
    pass over the held-out problems: 32 keeps the experiment within ~40 minutes on 2 shared cores)."""


SIZES = {
    "full": Size(sft_conversations=8000, max_steps=0, test_prompts=demo.N_TEST, eval_pairs=192, online_prompts=256,
                 online_rounds=4),
    "tiny": Size(sft_conversations=64, max_steps=2, test_prompts=8, eval_pairs=8, online_prompts=8, online_rounds=1,
                 batch_size=2, judge="length", scaling_steps=4, scaling_every=2),
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

    def only_seed(self, seed: int) -> "Context":
        """The same context, its sweeps run for this one seed (a calibration)."""
        one = copy.copy(self)
        one.seeds = range(seed, seed + 1)
        return one

    def run_dir(self, name: str, arm: str, seed: int) -> Path:
        """Where `sweep` runs an arm of an experiment for a seed."""
        return self.root / name / slug(arm) / f"seed_{seed}"

    def init_model(self, seed: int) -> Path:
        return demo.init_model(self.root / "data" / f"init_model_seed_{seed}", self.paths["tokenizer"], seed)

    def settings(self, stage: str, folder: Path, seed: int, **over) -> dict:
        """The demo's settings for the stage, in `folder`, with `over` on top (a max_steps in `over`
        stands at every size)."""
        s = demo.SETTINGS[stage] | dict(out_dir=str(folder), seed=seed, overwrite=True, device="cpu", log_every=1000)
        s |= over
        if self.size.max_steps and "max_steps" not in over:
            s |= dict(max_steps=self.size.max_steps)
        if self.size.batch_size:
            s |= dict(batch_size=self.size.batch_size, micro_batch_size=self.size.batch_size)
        return s

    def accuracy(self, folder: Path, model=None) -> dict:
        """Greedy accuracy on the held-out problems of the model in `folder` (or of `model`, with
        the folder's tokenizer)."""
        from lion_min.formats.hf import load_model
        from lion_min.formats.tokenizer import Tokenizer

        model = load_model(str(folder)) if model is None else model
        acc = demo.evaluate_accuracy(model, Tokenizer.from_dir(folder), self.test)
        return {"accuracy": acc.final, "strict_accuracy": acc.strict}

    def sft_model(self, seed: int) -> Path:
        """The demo's SFT model for this seed (demo settings, from this seed's starting model)."""
        return run_once(self.root / "sft" / f"seed_{seed}", lambda folder: self._sft(folder, seed))

    def _sft(self, folder: Path, seed: int) -> dict:
        from lion_min.run.config import SFTConfig
        from lion_min.stages.sft import run

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
