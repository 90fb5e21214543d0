"""Stage 3: online (iterative) DPO: sample from the current policy, judge, train on best vs worst.

Each round:
  1. every rank loads the current policy unsharded (the previous round's exported Hugging Face
     folder, i.e. the full weights gathered once per round) and samples n_samples responses for
     its share of the prompts (sample.generate, a batched KV-cache sampler);
  2. the judge scores them (judges.py); a prompt whose samples are all identical, or whose best
     and worst scores tie, is dropped; otherwise chosen = best, rejected = worst, as the sampled
     tokens themselves (no re-tokenization of their text);
  3. out_dir/round_K.jsonl records prompts, samples (text and token ids), scores and pairs, written
     as soon as the round is judged: a rerun reuses it instead of sampling again (with other
     training settings too, as long as no round has finished: TRAINING_KEYS);
  4. reference log-probs are computed with the reference model (the starting model unless
     --ref_model says otherwise), then DPO runs with the offline stage's code (dpo.train_pairs)
     and exports out_dir/round_K/.
A run that stops resumes at the first round without its out_dir/round_K.done marker; a finished
run asked again has nothing to do, and asked for more --rounds continues after its last. At the end,
out_dir/curves.png plots the loss and reward curves of the runs this one descends from and of
every round (lion_min/run/plot.py; skipped with a message without matplotlib).
"""

import dataclasses
import json
import shutil
from pathlib import Path

from lion_min.core.judge import Judge
from lion_min.core.online import choose_pair, mean_score, sample_and_judge, to_pair
from lion_min.core.parallel import Dist, barrier
from lion_min.formats.hf import load_model, save_model
from lion_min.formats.hf_config import resolve_path
from lion_min.formats.tokenizer import Tokenizer
from lion_min.run.config import TRAINING_KEYS, ConfigError, OnlineConfig, format_config, read_json
from lion_min.run.judges import make_judge
from lion_min.run.loop import StopRequested
from lion_min.run.model_checks import read_model_folder
from lion_min.run.plot import earlier_runs, plot_pipeline
from lion_min.run.policy import checkpoint_dtype
from lion_min.run.prompts import read_prompts
from lion_min.run.run_folder import append_summary, broadcast, claim, continue_command, overwrite_flag, start_run
from lion_min.stages.dpo import check_config as check_dpo_config
from lion_min.stages.dpo import train_pairs


def check_config(cfg: OnlineConfig):
    check_dpo_config(cfg)
    for key in ("prompts", "judge"):
        if not getattr(cfg, key):
            raise ConfigError(f"--{key} is required (run with no flags at all for the built-in demo)")
    if cfg.n_samples < 2:
        raise ConfigError(f"--n_samples={cfg.n_samples}: need at least 2 samples to form a pair")
    if cfg.rounds < 1:
        raise ConfigError(f"--rounds={cfg.rounds} must be at least 1")
    # Refused, as transformers' generate refuses sampling at temperature 0 (TRL's online DPO samples
    # through it): greedy decoding gives every sample of a prompt the same text, so no pair forms.
    if cfg.temperature <= 0:
        raise ConfigError(f"--temperature={cfg.temperature:g}: online DPO samples {cfg.n_samples} different responses "
                          f"per prompt, and greedy decoding (temperature 0) makes them all the same; use a "
                          f"temperature > 0 (LION: 0.8)")


def check_enough_prompts(cfg: OnlineConfig, num_prompts: int):
    """A prompt gives at most one pair (its best and worst sample), so a round of fewer prompts than
    --batch_size cannot fill one batch: refused before anything is sampled."""
    if num_prompts < cfg.batch_size:
        raise ConfigError(f"--prompts={cfg.prompts}: {num_prompts} prompts give at most {num_prompts} pairs a round "
                          f"(one per prompt, from its {cfg.n_samples} samples), fewer than --batch_size="
                          f"{cfg.batch_size}; use more prompts or a smaller --batch_size")


def write_round(path: Path, records: list[dict]):
    """round_K.jsonl: per prompt its messages, samples (text, and the token ids that train), scores and
    the pair chosen (or why the prompt was dropped, once pairs are chosen)."""
    write_jsonl(path, [
        {"prompt": r["messages"], "samples": r["texts"], "scores": r["scores"], "chosen": r.get("chosen"),
         "rejected": r.get("rejected"), "dropped": r.get("dropped"), "prompt_ids": r["prompt_ids"],
         "sample_ids": r["samples"], "prompt_truncated": r["prompt_truncated"]} for r in records])


def read_round(path: Path) -> list[dict] | None:
    """The records of a sampled and judged round (write_round), or None for a file written before
    rounds kept their token ids."""
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not lines or "sample_ids" not in lines[0]:
        return None
    return [{"index": i, "messages": r["prompt"], "prompt_ids": r["prompt_ids"], "samples": r["sample_ids"],
             "texts": r["samples"], "scores": r["scores"], "prompt_truncated": r["prompt_truncated"]}
            for i, r in enumerate(lines)]


def write_jsonl(path: Path, rows: list[dict]):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.rename(path)


def sample_and_judge_folder(cfg: OnlineConfig, d: Dist, policy_folder: Path, prompts: list, judge: Judge, seed: int,
                            dtype) -> list[dict]:
    """core/online.py:sample_and_judge with the policy read from its folder (every rank, unsharded)."""
    model = load_model(policy_folder, dtype=dtype, device=d.device)
    return sample_and_judge(model, Tokenizer.from_dir(policy_folder), prompts, judge, cfg, d, seed)


def run_round(cfg: OnlineConfig, d: Dist, k: int, policy: Path, ref_folder: Path, prompts: list, judge: Judge,
              dtype) -> dict:
    """Sample, judge, pick pairs, write round_k.jsonl, train; returns the round's statistics."""
    out_dir = Path(cfg.out_dir)
    path = out_dir / f"round_{k}.jsonl"
    records = broadcast(read_round(path) if d.main and path.is_file() else None, d)
    if records is None:
        records = sample_and_judge_folder(cfg, d, policy, prompts, judge, cfg.seed + k, dtype)
        if d.main:  # kept at once: sampling a real model's round takes hours
            write_round(path, records)
    elif d.main:
        print(f"round {k}: reusing the samples and scores of {path}")
    pairs, dropped = [], {}
    for r in records:
        r["dropped"] = why = choose_pair(r)
        if why:
            dropped[why] = dropped.get(why, 0) + 1
        else:
            pairs.append(to_pair(r, cfg.max_len, cfg.max_prompt_len))
    if d.main:
        write_round(path, records)
        cut = sum(r["prompt_truncated"] for r in records)
        print(f"round {k}: mean judged reward {mean_score(records):.4f} | {len(pairs)} pairs | dropped: {dropped}"
              + (f" | {cut} prompts cut to --max_prompt_len={cfg.max_prompt_len}" if cut else ""))
    if len(pairs) < cfg.batch_size:
        raise ConfigError(f"round {k}: only {len(pairs)} usable pairs for --batch_size={cfg.batch_size} (dropped: "
                          f"{dropped}); its samples and scores are kept in {path}: the same command with "
                          f"--batch_size={max(len(pairs), 1)} or less reuses them")
    # A round that stopped part way is redone from its sampling: its DPO folder is replaced, so it
    # writes no checkpoints, and a signal's message says how this stage resumes.
    round_cfg = dataclasses.replace(cfg, model=str(policy), ref_model=str(ref_folder), resume="", seed=cfg.seed + k,
                                    out_dir=str(out_dir / f"round_{k}"), overwrite=True, save_every=0)
    try:
        train_pairs(round_cfg, d, pairs, [], dtype, {"round": k, "pairs": len(pairs), "dropped": dropped}, inputs={})
    except StopRequested as e:
        # (how a stopped run goes on: never with --overwrite=true, which would replace the rounds kept)
        raise StopRequested(f"stopped in round {k}: rounds before it are kept and round {k} is redone from its "
                            f"sampling; continue with {continue_command(cfg)}", e.code) from None
    return {"round": k, "mean_reward": mean_score(records), "pairs": len(pairs), "dropped": dropped}


def run(cfg: OnlineConfig, judge: Judge | None = None) -> list[dict]:
    """All rounds, then the final policy's judged reward, the export and the curves.
    `judge` replaces --judge (the demo passes its rule this way)."""
    check_config(cfg)
    d, dtype = start_run(cfg)
    start = read_model_folder(cfg)
    start_folder = start.folder
    ref_folder = resolve_path(cfg.ref_model, cfg.revision) if cfg.ref_model else start_folder
    prompts = read_prompts(cfg.prompts)
    check_enough_prompts(cfg, len(prompts))
    cfg = dataclasses.replace(cfg, chat_template=start.template)  # --chat_template=auto named
    if start.tokenizer.added:
        raise ConfigError(f"--model={cfg.model}: its tokenizer lacks the {cfg.chat_template} template's tokens; online "
                          f"DPO samples with them, so start from an SFT or DPO run's export (which carries them)")
    judge = judge or make_judge(cfg.judge, chat_template=cfg.judge_template, dtype=dtype, device=d.device)
    if d.main:
        print(f"config:\n{format_config(cfg)}")
        print(f"{len(prompts)} prompts, judge {cfg.judge!r}, {cfg.rounds} round(s) of {cfg.n_samples} samples each")
    judge_dir = cfg.judge.removeprefix("pairrm:")
    inputs = {"--model": start_folder, "--ref_model": ref_folder, "--prompts": cfg.prompts, "--judge": judge_dir}
    # Finished rounds are always reused, so the folder must hold this same run (or be replaced); until
    # one has finished, only the sampled rounds are kept and the training settings may change.
    out_dir = Path(cfg.out_dir)
    finished = sorted(out_dir.glob("round_*.done"))
    if len(finished) > cfg.rounds and not cfg.overwrite:
        raise ConfigError(f"--rounds={cfg.rounds}: {out_dir} holds {len(finished)} finished rounds of this run; ask "
                          f"for at least as many (or --overwrite=true to start again)")
    with claim(cfg, d, inputs, resuming=True, free=frozenset() if finished else TRAINING_KEYS):
        summary = read_json(out_dir / "summary.json") or {}
        if len(summary.get("rounds", [])) == cfg.rounds and not cfg.overwrite:  # the rerun rule
            if d.main:
                print(f"{out_dir} holds this run, finished ({cfg.rounds} round(s)) and exported: nothing to do (a "
                      f"larger --rounds continues it; {overwrite_flag(cfg)} runs it again)")
            return summary["rounds"]
        return rounds(cfg, d, start_folder, ref_folder, prompts, judge, dtype)


def rounds(cfg: OnlineConfig, d: Dist, start_folder: Path, ref_folder: Path, prompts: list, judge: Judge,
           dtype) -> list[dict]:
    out_dir = Path(cfg.out_dir)
    policy, history = start_folder, []
    for k in range(cfg.rounds):
        round_dir, done = out_dir / f"round_{k}", out_dir / f"round_{k}.done"
        if done.is_file():
            history.append(json.loads(done.read_text()))
            if d.main:
                print(f"round {k}: already done, resuming after it")
        else:
            history.append(run_round(cfg, d, k, policy, ref_folder, prompts, judge, dtype))
            if d.main:
                done.with_name(done.name + ".tmp").write_text(json.dumps(history[-1]))
                done.with_name(done.name + ".tmp").rename(done)
            barrier(d)
        policy = round_dir

    # The judged reward of the final policy, sampled the same way as round 0's.
    final = sample_and_judge_folder(cfg, d, policy, prompts, judge, cfg.seed, dtype)
    if d.main:
        # In the last round's dtype (that is, --export_dtype), not the float32 load_model gives by default.
        save_model(load_model(policy, dtype=checkpoint_dtype(policy)), out_dir, tokenizer=Tokenizer.from_dir(policy))
        shutil.copy(policy / "metrics.jsonl", out_dir / "last_round_metrics.jsonl")
        before, after = history[0]["mean_reward"], mean_score(final)
        append_summary(out_dir, rounds=history, mean_reward_start=before, mean_reward_final=after)
        if getattr(judge, "relative", False):
            print("the judge scores samples only relative to each other (pairwise): no mean reward to compare")
        else:
            print(f"mean judged reward: start {before:.4f} -> final {after:.4f}")
        png = plot_pipeline(out_dir / "curves.png", online=out_dir, **earlier_runs(start_folder))
        if png is not None:
            print(f"wrote the loss and reward curves to {png}")
    barrier(d)
    return history
