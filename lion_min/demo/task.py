"""The built-in demo: two-digit addition taught by a sloppy teacher, fixed by preference tuning.

    python train_sft.py && python train_dpo.py && python train_online.py     # about 4 min on 2 CPU cores

The task is "What is 47+38?" with operands 10..99. The reply works the columns, then answers:
"7+8=15, 4+3+1=8, so 85" (see `worked_answer`). The answer is verifiable, so a rule (`check`)
judges replies and greedy accuracy on 500 held-out problems measures each stage.

Why a sloppy teacher: the SFT demonstrations come from a teacher that, on problems whose units
column carries (45% of them), often forgets the carry ("7+8=15, 4+3=7, so 75"): 60% of the time
when the units sum is 10, 4 points more for each unit above, 92% at 9+9 (`forget_rate`). A model
trained from scratch learns to imitate that majority habit, so greedy SFT accuracy lands on the
share of carry-free test problems (0.582) whatever the seed. (A merely under-trained model would
also be imperfect, but where it lands after a fixed budget swung from 16% to 99% across seeds in
our runs: these tiny models learn addition in a sudden jump.) The right answer is still the
teacher's minority answer on carry problems, so:
  - offline DPO (train_dpo.py) learns from shipped pairs: the right worked answer vs a plausible
    slip (the forgotten carry, a column sum off by one, an invented carry);
  - online DPO (train_online.py) samples 5 replies at temperature 0.8, where the right one often
    appears, and trains best vs worst as scored by `check`.
Why the rate grows with the units sum: the SFT model is then wrong by a different margin on each
units sum (log-odds of writing the carry from about -0.7 at 10 to -1.3 at 16-18), and DPO, which
raises the carry's log-odds on all of them together, fixes the narrow ones first and the wide ones
later, so accuracy rises step by step with training. With one rate (70% everywhere, the demo until
DATA_VERSION 3) every carry problem sat at the same margin and greedy decoding flipped all of them
at once or not at all: offline DPO left 2 of 10 runs unchanged (docs/experiments.md, experiment 0).

What the demo reaches over seeds and CPUs is measured in docs/results.md, "The demo"
(`python -m lion_min experiments demo --seeds=5`).

Everything here is deterministic and needs no downloads: the tokenizer is character-level and is
written from the list below.
"""

import json
import os
import random
import re
import tempfile
from pathlib import Path
from typing import NamedTuple, Optional

from lion_min.run.config import ConfigError, read_json

# --- the task ------------------------------------------------------------------------------------

LOW, HIGH = 10, 99
"""Operand range; the problem space is all 90 x 90 = 8100 ordered pairs."""
FORGET_AT_10, FORGET_STEP = 0.6, 0.04
"""How often the SFT teacher drops the units carry: 0.6 when the units sum is 10, 0.04 more for each
unit above (0.92 at 9+9=18; 0.71 over all carry problems). Above 0.5 everywhere, so the SFT model's
most likely answer on a carry problem is the wrong one (greedy gets it wrong); below 1, so sampling
still finds the right one for online DPO. Spread out, so that the SFT model is wrong by a different
margin on each units sum and preference tuning fixes them one after another (see the module
docstring), not all at once."""
PROMPT_FORMAT = "What is {a}+{b}?"
_PROMPT_RE = re.compile(r"What is (\d+)\+(\d+)\?")

N_TEST = 500
"""Held-out problems for the accuracy metric, never seen in any training file."""
N_SFT_EVAL = 200
N_SFT = 16000
"""SFT conversations; problems repeat, each time with a fresh draw of the teacher's answer."""
N_DPO = 2000
N_ONLINE = 256
MAX_REPLY_TOKENS = 32
"""Enough for the longest reply, "9+9=18, 9+9+1=19, so 198" (25 characters), and its end-of-turn."""


def problem_text(a: int, b: int) -> str:
    return PROMPT_FORMAT.format(a=a, b=b)


def make_problem(rng: random.Random) -> tuple[str, int]:
    """A random problem: (prompt text, the correct sum)."""
    a, b = rng.randint(LOW, HIGH), rng.randint(LOW, HIGH)
    return problem_text(a, b), a + b


def parse_problem(prompt: str) -> tuple[int, int]:
    m = _PROMPT_RE.search(prompt)
    if m is None:
        raise ValueError(f"not a demo problem: {prompt!r}")
    return int(m[1]), int(m[2])


def units_sum(a: int, b: int) -> int:
    """The units column's sum, 0..18: what decides the carry (and the teacher's forget rate)."""
    return a % 10 + b % 10


def carries(a: int, b: int) -> bool:
    """Whether the units digits carry into the tens."""
    return units_sum(a, b) >= 10


def worked_answer(a: int, b: int, carry: Optional[bool] = None, units_slip: int = 0, tens_slip: int = 0) -> str:
    """The answer format: units, then tens with the carry written out, then the result.

        47+38 -> "7+8=15, 4+3+1=8, so 85"        12+34 -> "2+4=6, 1+3=4, so 46"

    Writing the two column sums first lets a 0.8M-parameter model learn the task in a few hundred
    steps (straight to "85", the same model can sit at chance for 1000+ steps before it jumps).
    The keyword arguments make the wrong answers: carry=False forgets the carry (True adds one that
    is not there), and a slip adds to a column sum; the final number always follows from the steps.
    """
    units = units_sum(a, b) + units_slip
    c = (units >= 10) if carry is None else carry
    tens = a // 10 + b // 10 + int(c) + tens_slip
    tens_step = f"{a // 10}+{b // 10}{'+1' if c else ''}={tens}"
    return f"{a % 10}+{b % 10}={units}, {tens_step}, so {tens * 10 + units % 10}"


def forget_rate(units: int) -> float:
    """How often the teacher forgets the carry of a problem whose units digits sum to `units`
    (0 below 10: nothing to carry)."""
    return FORGET_AT_10 + FORGET_STEP * (units - 10) if units >= 10 else 0.0


def teacher_answer(a: int, b: int, rng: random.Random) -> str:
    """The sloppy teacher's SFT answer: the carry forgotten `forget_rate` of the time."""
    if carries(a, b) and rng.random() < forget_rate(units_sum(a, b)):
        return worked_answer(a, b, carry=False)
    return worked_answer(a, b)


def plausible_wrong(a: int, b: int, rng: random.Random) -> str:
    """A rejected answer for the offline pairs: the kind of slip a partly trained model makes.

    On a carry problem, half the time the forgotten carry (the SFT model's own mistake); otherwise
    one column sum off by one (or a carry invented where there is none). The other half of the
    pairs therefore teaches "be exact" rather than "carry", which leaves online DPO, which trains
    on the model's own samples, something to add.
    """
    if carries(a, b) and rng.random() < 0.5:
        return worked_answer(a, b, carry=False)
    slip = rng.choice(["units+", "units-", "tens+", "tens-", "carry"])
    if slip == "carry" and not carries(a, b):
        return worked_answer(a, b, carry=True)
    if slip.startswith("units") and units_sum(a, b) not in (0, 9, 10):  # keep the carry unchanged
        return worked_answer(a, b, units_slip=1 if slip == "units+" else -1)
    return worked_answer(a, b, tens_slip=-1 if slip == "tens-" else 1)


_FINAL_RE = re.compile(r"so (\d+)\s*$")


def final_answer(response: str) -> Optional[str]:
    """The number after the last "so " at the end of the reply, or None (no final answer)."""
    m = _FINAL_RE.search(response)
    return m[1] if m else None


def check(prompt: str, response: str) -> float:
    """The rule judge, on the final answer only (the steps are not checked).

    1.0: the final answer is the exact sum. A wrong final number: 0.5 x the fraction of its digit
    positions, aligned from the right, that match the sum ("so 75" for 85 scores 0.25, "so 74"
    0.0). No final answer (cut off, other text): 0.0. The partial credit only orders wrong replies
    for best-vs-worst pair selection; a correct answer always beats every wrong one.
    """
    a, b = parse_problem(prompt)
    got, want = final_answer(response), str(a + b)
    if got is None:
        return 0.0
    if got == want:
        return 1.0
    same = sum(x == y for x, y in zip(reversed(got), reversed(want)))
    return 0.5 * same / max(len(got), len(want))


def is_correct(prompt: str, response: str) -> bool:
    """The accuracy metric: the reply ends with "so <the exact sum>"."""
    return check(prompt, response) == 1.0


def is_strictly_correct(prompt: str, response: str) -> bool:
    """The strict metric: the whole worked answer is right ("7+8=15, 4+3+1=8, so 85", nothing else),
    so a right sum reached through wrong steps does not count."""
    return response.strip() == worked_answer(*parse_problem(prompt))


def judge_rule(messages: list[dict], response: str) -> float:
    """`check` as a lion_min.run.judges rule: the problem is the last user turn."""
    user = [m["content"] for m in messages if m["role"] == "user"]
    return check(user[-1], response)


def make_demo_judge(spec: str):
    """lion_min.run.judges.make_judge with the demo's rule added as "demo" (`judge_rule`)."""
    from lion_min.core.judge import RULES
    from lion_min.run.judges import make_judge

    return make_judge(spec, rules=RULES | {"demo": judge_rule})


# --- tokenizer -----------------------------------------------------------------------------------

SPECIAL_TOKENS = ("<pad>", "<bos>", "<unk>", "<|im_start|>", "<|im_end|>")
CHARS = "\n" + "".join(chr(c) for c in range(32, 127))
"""Newline and printable ASCII: the task needs digits, '+', '?' and a few letters, ChatML needs
'user', 'assistant', 'system' and newlines; the rest lets a user type other prompts."""


def build_demo_tokenizer(out_dir: str | Path) -> Path:
    """Write a character-level tokenizer.json (+ tokenizer_config.json) into out_dir; returns the folder.

    A BPE model whose vocabulary is the special tokens then one entry per character, with no
    merges: every character is one token. The ChatML markers, BOS and pad are added special tokens,
    so they are matched as one token in text; the Fuse decoder joins tokens back into the text.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = {tok: i for i, tok in enumerate(list(SPECIAL_TOKENS) + list(CHARS))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<bos>",
        "eos_token": "<|im_end|>",  # a chat model: a reply ends with the end-of-turn marker
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "clean_up_tokenization_spaces": False,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


# --- model and recommended stage settings ----------------------------------------------------------


def demo_model_args(tokenizer_or_vocab_size):
    """The demo model's ModelArgs: a 4-layer Llama-style decoder, dim 128 (~0.8M parameters). Takes
    the lion_min Tokenizer (its BOS / EOS / pad ids go into the config) or just a vocabulary size."""
    from lion_min.core.args import ModelArgs  # not at the top: --help reads the presets before torch loads

    tok = tokenizer_or_vocab_size
    vocab = tok if isinstance(tok, int) else tok.vocab_size
    ids = {} if isinstance(tok, int) else dict(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                                              pad_token_id=tok.pad_id)
    # max_seq_len only bounds what the scripts accept (RoPE has no table); 2048 lets the DPO
    # script's default max_len through. Training rows are 256 tokens; a demo conversation ~60.
    return ModelArgs(family="llama", vocab_size=vocab, dim=128, n_layers=4, n_heads=4, n_kv_heads=4,
                     head_dim=32, hidden_dim=384, norm_eps=1e-5, rope_theta=10000.0, max_seq_len=2048, **ids)


# The demo's settings, per stage: what the no-flag `python train_sft.py` (etc.) runs, over the
# stage dataclass's real-run defaults (figures: docs/results.md, "The demo"). `model` and `data` are
# filled in by `run_stage` (the demo's own files); "debug" is the same pipeline cut to seconds.
SETTINGS = {
    "sft": dict(
        out_dir="out/demo/sft", seq_len=256, epochs=2, batch_size=12, micro_batch_size=12, log_every=25,
        lr=3e-3, lr_schedule="cosine", warmup_ratio=0.05,
        # The demo model learns addition in a sudden jump; with beta2 0.999 it did not get there in 3 epochs.
        beta2=0.98),
    "dpo": dict(
        model="out/demo/sft", out_dir="out/demo/dpo", epochs=1, batch_size=16, micro_batch_size=16, log_every=25,
        # beta 0.5: the loss saturates once a pair's log-ratio margin reaches a few nats, so DPO stops
        # pushing the rejected replies down before it damages the right ones (at beta 0.1 it fell
        # below the SFT model on one seed in ten, with the earlier teacher; docs/experiments.md,
        # experiments 0 and 2). lr 3.5e-5 leaves the online stage room on every seed (at 4.5e-5
        # offline DPO reached 1.000 on one seed of three tried, and online DPO had nothing left to
        # gain; experiment 0).
        lr=3.5e-5, lr_schedule="linear", warmup_ratio=0.1, beta=0.5, precompute_ref=False,
        # A demo pair is ~45 tokens a side: rows of 128 instead of LION's 2048 give the same metrics
        # (each sequence still attends only to itself) and run 4.5x faster on CPU.
        max_len=128, max_prompt_len=64),
    "online": dict(
        model="out/demo/dpo", out_dir="out/demo/online", judge="demo", n_samples=5, temperature=0.8,
        # Demo replies show their working ("7+8=15, 4+3+1=8, so 85"), up to ~25 tokens.
        max_new_tokens=32, rounds=2, epochs=1, batch_size=16, micro_batch_size=16, log_every=25,
        # beta 0.5 as offline; 4 rounds or 1024 prompts at this lr overshot (accuracy fell on some seeds,
        # with the earlier teacher; docs/experiments.md, experiment 0).
        lr=5e-5, lr_schedule="constant", warmup_ratio=0.0, beta=0.5, precompute_ref=True, max_len=128,
        max_prompt_len=64),
}
DEBUG = {
    "sft": dict(out_dir="out/debug/sft", max_steps=3, batch_size=4, micro_batch_size=2, seq_len=128, log_every=1),
    "dpo": dict(model="out/debug/sft", out_dir="out/debug/dpo", max_steps=3, batch_size=4, micro_batch_size=2,
                log_every=1),
    # judge "length": a debug model's replies are all wrong, so the demo rule would tie them all
    "online": dict(model="out/debug/dpo", out_dir="out/debug/online", judge="length", max_new_tokens=8, rounds=1,
                   n_samples=3, batch_size=2, micro_batch_size=2, log_every=1),
}


def presets(stage: str) -> dict[str, dict]:
    """The demo's presets for a stage: "demo" and "debug" (the demo at a few steps). Both replace
    their own earlier run (overwrite): running the README's command again just runs it again."""
    own = {"overwrite": True}
    return {"demo": SETTINGS[stage] | own | {"_doc": "the built-in demo on CPU (what no flags at all run)"},
            "debug": SETTINGS[stage] | DEBUG[stage] | own | {"_doc": "the demo cut to a few steps, for a smoke test"}}


def wanted(stage: str):
    """default_preset for config.parse_cli: the demo when the command line names no starting model
    and no data (a --model without --data is an error of the stage, not a demo)."""
    needed = {"sft": ("model", "data"), "dpo": ("model", "data"), "online": ("model", "prompts")}[stage]
    return lambda given: None if given & set(needed) else "demo"


def init_model(folder: Path, tokenizer_dir: Path, seed: int) -> Path:
    """The demo's starting checkpoint: demo_model_args with weights initialised from `seed`,
    written once as a Hugging Face folder so the SFT stage loads it like any other model."""
    from lion_min.core.model import Transformer
    from lion_min.formats.hf import save_model
    from lion_min.formats.tokenizer import Tokenizer

    meta = {"version": DATA_VERSION, "seed": seed}
    if read_json(folder / "init_meta.json") == meta:
        return folder
    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    model = Transformer(demo_model_args(tokenizer))
    model.init_weights(seed=seed)
    save_model(model, folder, tokenizer=tokenizer)
    (folder / "init_meta.json").write_text(json.dumps(meta) + "\n")
    return folder


# --- data files ----------------------------------------------------------------------------------

DATA_VERSION = 3
FILES = {"sft": "sft.jsonl", "sft_eval": "sft_eval.jsonl", "dpo": "dpo.jsonl", "prompts": "prompts.jsonl",
         "test": "test.jsonl"}


def demo_dir(run_dir: str | Path) -> Path:
    # (called with the SFT stage's out_dir, or the DPO / online stage's starting model)
    """Where the demo's data and tokenizer live for a stage folder (out/sft, out/dpo, ...): one shared
    sibling folder, so every stage reads the files the SFT stage wrote."""
    return Path(run_dir).parent / "demo_data"


def demo_paths(out_dir: str | Path) -> dict[str, Path]:
    """The demo files in out_dir, written first (seed 0, as train_sft.py does) if they are missing
    or from another DATA_VERSION."""
    return write_demo_data(out_dir, seed=0)


def _split(seed: int) -> tuple[list, list, list]:
    """All problems, shuffled once, cut into test / SFT-eval / training problems (disjoint)."""
    problems = [(a, b) for a in range(LOW, HIGH + 1) for b in range(LOW, HIGH + 1)]
    random.Random(seed).shuffle(problems)
    return problems[:N_TEST], problems[N_TEST:N_TEST + N_SFT_EVAL], problems[N_TEST + N_SFT_EVAL:]


def _conversation(a: int, b: int, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": problem_text(a, b)}, {"role": "assistant", "content": answer}]}


def write_demo_data(out_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write the tokenizer and every data file into out_dir; returns their paths.

    Same seed, same bytes. Does nothing if out_dir already holds this seed's data (meta.json).
    Files are written to a temporary folder and moved in, meta.json last, so a reader never sees
    a half-written set.
    """
    out_dir = Path(out_dir)
    paths = {k: out_dir / f for k, f in FILES.items()} | {"tokenizer": out_dir / "tokenizer"}
    meta = {"version": DATA_VERSION, "seed": seed}
    meta_file = out_dir / "meta.json"
    if read_json(meta_file) == meta:
        return paths

    test, sft_eval, train = _split(seed)
    rng = random.Random(seed + 1)
    records = {
        "test": [{"prompt": problem_text(a, b), "answer": str(a + b)} for a, b in test],
        "sft_eval": [_conversation(a, b, teacher_answer(a, b, rng)) for a, b in sft_eval],
        "sft": [_conversation(a, b, teacher_answer(a, b, rng)) for a, b in (rng.choice(train) for _ in range(N_SFT))],
        "dpo": [{"prompt": problem_text(a, b), "chosen": worked_answer(a, b), "rejected": plausible_wrong(a, b, rng)}
                for a, b in (rng.choice(train) for _ in range(N_DPO))],
        "prompts": [{"prompt": problem_text(a, b)} for a, b in rng.sample(train, N_ONLINE)],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=out_dir))
    build_demo_tokenizer(tmp)
    for key, rows in records.items():
        (tmp / FILES[key]).write_text("".join(json.dumps(r) + "\n" for r in rows))
    paths["tokenizer"].mkdir(exist_ok=True)
    for f in tmp.iterdir():
        os.replace(f, (paths["tokenizer"] if f.name.startswith("tokenizer") else out_dir) / f.name)
    (tmp / "meta.json").write_text(json.dumps(meta) + "\n")
    os.replace(tmp / "meta.json", meta_file)
    tmp.rmdir()
    return paths


# --- evaluation ----------------------------------------------------------------------------------


def read_test(path: str | Path) -> list[str]:
    return [json.loads(line)["prompt"] for line in Path(path).read_text().splitlines() if line.strip()]


class Accuracy(NamedTuple):
    """Greedy held-out accuracy: the final answer right (`is_correct`, the headline figure), and the
    whole worked answer right (`is_strictly_correct`)."""

    final: float
    strict: float


def evaluate_accuracy(model, tokenizer, test_prompts: list[str], batch_size: int = 256,
                      max_new_tokens: int = MAX_REPLY_TOKENS, chat_template: str = "chatml") -> Accuracy:
    """Greedy accuracy over the prompts, each reply read up to its end-of-turn token."""
    import torch

    from lion_min.core.chat import encode_chat, stop_token_ids
    from lion_min.core.sample import generate

    stop = stop_token_ids(tokenizer, chat_template)
    ids = [encode_chat(tokenizer, [{"role": "user", "content": p}], chat_template, add_generation_prompt=True).input_ids
           for p in test_prompts]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = generate(model, ids, max_new_tokens, temperature=0.0, stop_ids=stop,
                       pad_id=tokenizer.pad_id if tokenizer.pad_id is not None else 0, batch_size=batch_size)
    model.train(was_training)
    replies = [tokenizer.decode([t for t in row if t not in stop]) for row in out]
    n = max(len(test_prompts), 1)
    return Accuracy(final=sum(is_correct(p, r) for p, r in zip(test_prompts, replies)) / n,
                    strict=sum(is_strictly_correct(p, r) for p, r in zip(test_prompts, replies)) / n)


def evaluate_checkpoint(folder: str | Path, paths: dict[str, Path], device: Optional[str] = None) -> Accuracy:
    """Greedy held-out accuracy of a saved checkpoint (its folder holds weights and tokenizer)."""
    from lion_min.formats.hf import load_model
    from lion_min.formats.tokenizer import Tokenizer

    model = load_model(str(folder), device=device or "cpu")
    return evaluate_accuracy(model, Tokenizer.from_dir(folder), read_test(paths["test"]))


# --- the demo around a stage -------------------------------------------------------------------------


def run_stage(stage: str, cfg, run):
    """Run `run(cfg)` (the stage) on the demo's files, then report greedy held-out accuracy.

    SFT writes the demo's data, tokenizer and starting model into demo_dir(out_dir) and trains
    from that model; DPO and online DPO read the files beside their starting model (the previous
    stage's out_dir). Each stage adds demo_accuracy (and demo_accuracy_start) to its summary.json;
    the online stage ends with the table of all three stages.
    """
    from lion_min.core.parallel import barrier, init_distributed
    from lion_min.run.run_folder import append_summary

    d = init_distributed(cfg.device)
    if stage == "sft":
        folder = demo_dir(cfg.out_dir)
        if d.main:
            paths = write_demo_data(folder, seed=0)
            init_model(folder / "init_model", paths["tokenizer"], cfg.seed)
        barrier(d)
        paths = demo_paths(folder)
        cfg.model = cfg.model or str(folder / "init_model")
        cfg.data, cfg.eval_data = cfg.data or str(paths["sft"]), cfg.eval_data or str(paths["sft_eval"])
    else:
        if not Path(cfg.model).is_dir():
            before = {"dpo": "train_sft.py", "online": "train_dpo.py"}[stage]
            raise ConfigError(f"{cfg.model}: no such folder: the demo's {stage} stage continues from the previous "
                              f"stage's run; run python {before} (with the same preset) first")
        paths = demo_paths(demo_dir(cfg.model))
        if stage == "dpo":
            cfg.data = cfg.data or str(paths["dpo"])
        else:
            cfg.prompts = cfg.prompts or str(paths["prompts"])
    if stage == "online":
        result = run(cfg, judge=make_demo_judge(cfg.judge))
    else:
        result = run(cfg)

    if d.main:
        out_dir = Path(cfg.out_dir)
        after = evaluate_checkpoint(out_dir, paths)
        if stage == "sft":
            append_summary(out_dir, demo_accuracy=after.final, demo_strict_accuracy=after.strict)
            print(f"demo task accuracy (greedy, held-out): {after.final:.3f} (whole worked answer: {after.strict:.3f})")
        else:
            before = evaluate_checkpoint(cfg.model, paths)
            append_summary(out_dir, demo_accuracy_start=before.final, demo_accuracy=after.final,
                           demo_strict_accuracy_start=before.strict, demo_strict_accuracy=after.strict)
            print(f"demo task accuracy (greedy, held-out): {cfg.model}: {before.final:.3f} -> {cfg.out_dir}: "
                  f"{after.final:.3f} (whole worked answer: {before.strict:.3f} -> {after.strict:.3f})")
            if stage == "online":
                print_table(Path(cfg.model), before, after)
    return result


def print_table(dpo_folder: Path, dpo_acc: Accuracy, online_acc: Accuracy):
    """The demo's accuracy after each stage; the SFT figures are the ones the DPO run recorded."""
    summary = read_json(dpo_folder / "summary.json") or {}
    sft = Accuracy(summary.get("demo_accuracy_start"), summary.get("demo_strict_accuracy_start"))
    print("\nstage         greedy accuracy on held-out problems: final answer | whole worked answer")
    for stage, acc in (("SFT", sft), ("offline DPO", dpo_acc), ("online DPO", online_acc)):
        print(f"{stage:13s} " + " | ".join("n/a" if x is None else f"{x:.3f}" for x in acc))
