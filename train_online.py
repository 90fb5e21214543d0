"""Stage 3: online (iterative) DPO: sample from the current policy, judge, train on best vs worst.

    python train_online.py                                 # the demo: continues from out/dpo
    torchrun --nproc_per_node=8 train_online.py --preset=lion-gemma-2b --model=... --prompts=... --judge=RM_DIR

Each round:
  1. every rank loads the current policy unsharded (the previous round's exported Hugging Face
     folder, i.e. the full weights gathered once per round) and samples n_samples responses for
     its share of the prompts;
  2. the judge scores them; a prompt whose samples are all identical, or whose best and worst
     scores tie, is dropped; otherwise chosen = best, rejected = worst, as the sampled tokens;
  3. out_dir/round_K.jsonl records prompts, samples, scores and pairs, for auditing;
  4. reference log-probs are computed with the reference model (the starting model unless
     --ref_model says otherwise), then one epoch of DPO runs with the offline stage's code and
     exports out_dir/round_K/.
A run that stops resumes at the first round without its out_dir/round_K.done marker. At the end,
out_dir/curves.png plots the loss and reward curves of the runs this one descends from and of
every round (lion_min/plot.py; skipped with a message without matplotlib).
"""

import os

# On a shared CPU machine, OpenMP threads that spin while waiting for each other can make every
# small matmul take milliseconds (measured: 5.4 s vs 0.8 s per step, bench/README.md). Must be set
# before torch is imported; an explicit setting in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from lion_min.chat import stop_token_ids
from lion_min.checkpoint import load_model, resolve_path, save_model
from lion_min.config import ConfigError, parse_cli
from lion_min.dpo import EncodedPair, truncate, write_jsonl
from lion_min.judges import make_judge
from lion_min.parallel import barrier, init_distributed
from lion_min.plot import earlier_runs, plot_pipeline
from lion_min.sample import encode_prompt, generate, read_prompts
from lion_min.stage import append_summary, resolve_dtype, run_cli
from lion_min.tokenizer import Tokenizer
from train_dpo import DPOConfig, check_config, run_dpo


@dataclass
class OnlineConfig(DPOConfig):
    """Defaults are the built-in demo: continue from the demo DPO model on demo prompts."""

    model: str = "out/dpo"
    out_dir: str = "out/online"
    prompts: str = ""
    """Prompts: .jsonl with a "prompt" field (text or a list of messages), or one per line; '' = demo."""
    judge: str = "demo"
    """A rule name (lion_min.judges.RULES) or a reward-model checkpoint folder / hub id."""
    n_samples: int = 5
    temperature: float = 0.8
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 32
    """Demo replies show their working ("7+8=15, 4+3+1=8, so 85"), up to ~25 tokens."""
    rounds: int = 2
    sample_batch_size: int = 64
    """Prompts per sampling batch (each row is one sample of one prompt)."""

    precompute_ref: bool = True
    beta: float = 0.1
    lr: float = 5e-5
    lr_schedule: str = "constant"
    warmup_ratio: float = 0.0
    epochs: int = 1
    max_len: int = 128
    max_prompt_len: int = 64


PRESETS = {
    "demo": OnlineConfig(),
    "debug": OnlineConfig(max_new_tokens=8, rounds=1, n_samples=3, batch_size=2, micro_batch_size=2, log_every=1),
    # LION: 5 samples per prompt at temperature 0.8, up to 2048 new tokens, best vs worst by PairRM,
    # reference recomputed, one epoch of DPO at lr 5e-7.
    "lion-gemma-2b": OnlineConfig(model="out/lion-gemma-2b-dpo", out_dir="out/lion-gemma-2b-online",
                                  chat_template="chatml", system_prompt="", beta=0.05, lr=5e-7, lr_schedule="linear",
                                  batch_size=128, micro_batch_size=2, max_len=4096, max_prompt_len=512,
                                  max_new_tokens=2048, rounds=1, warmup_ratio=0.1,
                                  activation_checkpointing=True, compile=True, log_every=1),
    "lion-llama3-8b": OnlineConfig(model="out/lion-llama3-8b-dpo", out_dir="out/lion-llama3-8b-online",
                                   chat_template="chatml", system_prompt="", beta=0.01, lr=5e-7, lr_schedule="cosine",
                                   batch_size=128, micro_batch_size=2, max_len=4096, max_prompt_len=1024,
                                   max_new_tokens=2048, rounds=1, warmup_ratio=0.1,
                                  activation_checkpointing=True, compile=True, log_every=1),
}


def gather(items: list, d) -> list:
    """Concatenate every rank's list, in rank order."""
    if d.world == 1:
        return items
    out = [None] * d.world
    dist.all_gather_object(out, items)
    return [x for part in out for x in part]


def sample_and_judge(cfg: OnlineConfig, d, policy_folder: Path, prompts: list, judge, seed: int, dtype) -> list[dict]:
    """Every prompt's samples (tokens and text) and scores; each rank does prompts[rank::world]."""
    tokenizer = Tokenizer.from_dir(policy_folder)
    model = load_model(policy_folder, dtype=dtype, device=d.device)
    stop = stop_token_ids(tokenizer, cfg.chat_template)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    mine = list(range(d.rank, len(prompts), d.world))
    records = []
    for start in range(0, len(mine), cfg.sample_batch_size):
        idx = mine[start : start + cfg.sample_batch_size]
        messages = [[{"role": "user", "content": prompts[i]}] if isinstance(prompts[i], str) else prompts[i] for i in idx]
        ids = [encode_prompt(tokenizer, m, cfg.chat_template) for m in messages]
        rows = [p for p in ids for _ in range(cfg.n_samples)]
        out = generate(model, rows, cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                       top_k=cfg.top_k, stop_ids=stop, pad_id=pad_id, seed=seed * 100003 + d.rank * 1009 + start)
        for j, i in enumerate(idx):
            samples = out[j * cfg.n_samples : (j + 1) * cfg.n_samples]
            texts = [tokenizer.decode([t for t in s if t not in stop]) for s in samples]
            records.append({"index": i, "messages": messages[j], "prompt_ids": ids[j], "samples": samples,
                            "texts": texts, "scores": judge.score(messages[j], texts)})
    del model
    return sorted(gather(records, d), key=lambda r: r["index"])


def choose_pair(record: dict) -> str:
    """Set record["chosen"]/["rejected"] (indices of best / worst) or return why the prompt is dropped."""
    samples, scores = record["samples"], record["scores"]
    if all(s == samples[0] for s in samples):
        return "all samples identical"
    best = max(range(len(scores)), key=lambda k: scores[k])  # first index among equal scores
    worst = min(range(len(scores)), key=lambda k: scores[k])
    if scores[best] == scores[worst]:
        return "best and worst scores tie"
    record["chosen"], record["rejected"] = best, worst
    return ""


def to_pair(record: dict, max_len: int, max_prompt_len: int) -> EncodedPair:
    """The sampled tokens themselves (not a re-tokenization of their text) are scored."""
    sides = []
    for k in (record["chosen"], record["rejected"]):
        ids = record["prompt_ids"] + record["samples"][k]
        mask = [False] * len(record["prompt_ids"]) + [True] * len(record["samples"][k])
        sides.append(truncate(ids, mask, max_len, max_prompt_len)[:2])
    return EncodedPair(chosen=sides[0], rejected=sides[1])


def mean_score(records: list[dict]) -> float:
    scores = [s for r in records for s in r["scores"]]
    return sum(scores) / max(len(scores), 1)


def print_demo_table(dpo_folder: Path, dpo_acc: float, online_acc: float):
    """The demo's accuracy after each stage; the SFT figure is the one the DPO run recorded."""
    summary = dpo_folder / "summary.json"
    sft = json.loads(summary.read_text()) if summary.is_file() else {}
    rows = [("SFT", sft.get("demo_accuracy_start")), ("offline DPO", dpo_acc), ("online DPO", online_acc)]
    print("\nstage         greedy accuracy on held-out problems")
    for stage, acc in rows:
        print(f"{stage:13s} {'n/a' if acc is None else f'{acc:.3f}'}")


def main(argv=None):
    cfg = parse_cli(OnlineConfig, PRESETS, argv)
    check_config(cfg)
    if cfg.n_samples < 2:
        raise ConfigError(f"--n_samples={cfg.n_samples}: need at least 2 samples to form a pair")
    if cfg.rounds < 1:
        raise ConfigError(f"--rounds={cfg.rounds} must be at least 1")
    d = init_distributed(cfg.device)
    torch.manual_seed(cfg.seed)
    dtype = resolve_dtype(cfg.dtype, d.device)
    out_dir = Path(cfg.out_dir)
    start_folder = resolve_path(cfg.model, cfg.revision)
    ref_folder = resolve_path(cfg.ref_model, cfg.revision) if cfg.ref_model else start_folder
    demo_paths = None
    if not cfg.prompts:
        from lion_min import demo

        demo_paths = demo.demo_paths(demo.demo_dir(start_folder))
        prompts = read_prompts(str(demo_paths["prompts"]))
        judge = make_judge(cfg.judge, rules={"demo": demo.judge_rule})
    else:
        prompts = read_prompts(cfg.prompts)
        judge = make_judge(cfg.judge, chat_template=cfg.chat_template, dtype=dtype, device=d.device)
    if d.main:
        print(f"config: {dataclasses.asdict(cfg)}")
        print(f"{len(prompts)} prompts, judge {cfg.judge!r}, {cfg.rounds} round(s) of {cfg.n_samples} samples each")
        out_dir.mkdir(parents=True, exist_ok=True)

    policy, history = start_folder, []
    for k in range(cfg.rounds):
        round_dir, done = out_dir / f"round_{k}", out_dir / f"round_{k}.done"
        if done.is_file():
            history.append(json.loads(done.read_text()))
            policy = round_dir
            if d.main:
                print(f"round {k}: already done, resuming after it")
            continue
        records = sample_and_judge(cfg, d, policy, prompts, judge, cfg.seed + k, dtype)
        pairs, dropped = [], {}
        for r in records:
            why = choose_pair(r)
            r["dropped"] = why
            if why:
                dropped[why] = dropped.get(why, 0) + 1
            else:
                pairs.append(to_pair(r, cfg.max_len, cfg.max_prompt_len))
        if d.main:
            write_jsonl(out_dir / f"round_{k}.jsonl", [
                {"prompt": r["messages"], "samples": r["texts"], "scores": r["scores"],
                 "chosen": r.get("chosen"), "rejected": r.get("rejected"), "dropped": r["dropped"]} for r in records])
            print(f"round {k}: mean judged reward {mean_score(records):.4f} | {len(pairs)} pairs | dropped: {dropped}")
        if len(pairs) < cfg.batch_size:
            raise ValueError(f"round {k}: only {len(pairs)} usable pairs for batch_size={cfg.batch_size} "
                             f"(dropped: {dropped}); use more prompts or samples, or a smaller batch")
        round_cfg = dataclasses.replace(cfg, model=str(policy), ref_model=str(ref_folder), out_dir=str(round_dir),
                                        resume="", seed=cfg.seed + k)
        run_dpo(round_cfg, d, pairs, [], dtype, {"round": k, "pairs": len(pairs), "dropped": dropped})
        stats = {"round": k, "mean_reward": mean_score(records), "pairs": len(pairs), "dropped": dropped}
        history.append(stats)
        if d.main:
            (done.with_name(done.name + ".tmp")).write_text(json.dumps(stats))
            done.with_name(done.name + ".tmp").rename(done)
        barrier(d)
        policy = round_dir

    # The judged reward of the final policy, sampled the same way as round 0's.
    final = sample_and_judge(cfg, d, policy, prompts, judge, cfg.seed, dtype)
    if d.main:
        save_model(load_model(policy), out_dir, tokenizer=Tokenizer.from_dir(policy))
        shutil.copy(policy / "metrics.jsonl", out_dir / "last_round_metrics.jsonl")
        before, after = history[0]["mean_reward"], mean_score(final)
        append_summary(out_dir, rounds=history, mean_reward_start=before, mean_reward_final=after)
        print(f"mean judged reward: start {before:.4f} -> final {after:.4f}")
        if demo_paths is not None:
            from lion_min import demo

            acc0 = demo.evaluate_checkpoint(start_folder, demo_paths)
            acc1 = demo.evaluate_checkpoint(out_dir, demo_paths)
            append_summary(out_dir, demo_accuracy_start=acc0, demo_accuracy=acc1)
            print(f"demo task accuracy (greedy, held-out): {cfg.model}: {acc0:.3f} -> {cfg.out_dir}: {acc1:.3f}")
            print_demo_table(start_folder, acc0, acc1)
        png = plot_pipeline(out_dir / "curves.png", online=out_dir, **earlier_runs(start_folder))
        if png is not None:
            print(f"wrote the loss and reward curves to {png}")
    barrier(d)
    return history


if __name__ == "__main__":
    run_cli(main)
