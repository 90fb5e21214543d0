"""Stage 2: offline DPO on preference pairs.

    python train_dpo.py                                   # the demo: continues from out/sft
    python train_dpo.py --preset=lion-gemma-2b --model=out/lion-gemma-2b-sft --data=...
    torchrun --nproc_per_node=8 train_dpo.py --preset=lion-llama3-8b --model=... --data=...

Each pair is rendered as prompt + chosen and prompt + rejected; only the final response and its
end-of-turn token are scored. The reference is the starting model: either a frozen copy kept in
memory, or (--precompute_ref=true, the LION recipe) its log-probabilities computed once up front
and stored in out_dir, after which no reference model is held.
"""

import os

# On a shared CPU machine, OpenMP threads that spin while waiting for each other can make every
# small matmul take milliseconds (measured: 5.4 s vs 0.8 s per step, bench/README.md). Must be set
# before torch is imported; an explicit setting in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from lion_min.chat import get_template
from lion_min.checkpoint import resolve_path
from lion_min.config import ConfigError, DataConfig, parse_cli
from lion_min.data import load_preferences, train_eval_split
from lion_min.dpo import (compute_ref_logps, encode_pairs, fingerprint, load_or_compute_ref_logps,
                          make_dpo_objective, pair_batches)
from lion_min.losses import DPO_LOSS_TYPES
from lion_min.parallel import init_distributed
from lion_min.stage import append_summary, build_from_folder, check_seq_len, load_policy, resolve_dtype, run_cli
from lion_min.tokenizer import Tokenizer
from lion_min.train import train


@dataclass
class DPOConfig(DataConfig):
    """Defaults are the built-in demo: continue from the demo SFT model on demo preference pairs.
    `data` holds preference pairs (schema text_pairs | message_pairs | hh_rlhf)."""

    model: str = "out/sft"
    out_dir: str = "out/dpo"
    beta: float = 0.1
    loss_type: str = "sigmoid"
    """sigmoid (DPO), ipo or hinge."""
    label_smoothing: float = 0.0
    """cDPO: probability that a label is flipped (sigmoid loss only)."""
    ref_model: str = ""
    """Reference checkpoint ('' = the starting model)."""
    precompute_ref: bool = False
    """Compute reference log-probs once up front (stored in out_dir) and train without a reference in memory."""
    max_len: int = 2048
    max_prompt_len: int = 512

    # The demo's settings (measured: README, The demo); the real presets set their own.
    lr: float = 7e-5
    """Demo: 1e-4 or a second epoch overshoots (accuracy can fall below the SFT model's), 2e-5 does nothing."""
    lr_schedule: str = "linear"
    warmup_ratio: float = 0.1
    epochs: int = 1
    batch_size: int = 16
    micro_batch_size: int = 16
    log_every: int = 25


PRESETS = {
    "demo": DPOConfig(),
    "debug": DPOConfig(max_steps=3, batch_size=4, micro_batch_size=2, log_every=1),
    # LION (arXiv 2407.06542): sigmoid DPO, reference log-probs precomputed with the SFT model.
    "lion-gemma-2b": DPOConfig(model="out/lion-gemma-2b-sft", chat_template="chatml", system_prompt="",
                               beta=0.05, lr=5e-7, lr_schedule="linear", warmup_ratio=0.1, epochs=2,
                               batch_size=128, micro_batch_size=2, max_len=2048, max_prompt_len=512,
                               precompute_ref=True, activation_checkpointing=True, compile=True, log_every=1,
                               save_every=200, resume="auto", out_dir="out/lion-gemma-2b-dpo"),
    "lion-llama3-8b": DPOConfig(model="out/lion-llama3-8b-sft", chat_template="chatml", system_prompt="",
                                beta=0.01, lr=5e-7, lr_schedule="cosine", warmup_ratio=0.1, epochs=1,
                                batch_size=128, micro_batch_size=2, max_len=2048, max_prompt_len=1024,
                                precompute_ref=True, activation_checkpointing=True, compile=True, log_every=1,
                                save_every=200, resume="auto", out_dir="out/lion-llama3-8b-dpo"),
}


def check_config(cfg: DPOConfig):
    if cfg.micro_batch_size > cfg.batch_size:
        raise ConfigError(f"--micro_batch_size={cfg.micro_batch_size} is larger than --batch_size={cfg.batch_size}")
    if cfg.loss_type not in DPO_LOSS_TYPES:
        raise ConfigError(f"--loss_type={cfg.loss_type}: expected one of {', '.join(DPO_LOSS_TYPES)}")
    if cfg.max_prompt_len >= cfg.max_len:
        raise ConfigError(f"--max_prompt_len={cfg.max_prompt_len} must be smaller than --max_len={cfg.max_len}")
    if cfg.beta <= 0:
        raise ConfigError(f"--beta={cfg.beta} must be positive")


def run_dpo(cfg: DPOConfig, d, pairs, eval_pairs, dtype, summary: dict):
    """Policy, reference, batches, then the shared loop. Used by the online stage for each round."""
    model, args, tokenizer, folder = load_policy(cfg, d, dtype)
    check_seq_len(cfg.max_len, args, "max_len")
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    ref_folder = resolve_path(cfg.ref_model, cfg.revision) if cfg.ref_model else folder

    def make_ref():
        return build_from_folder(ref_folder, args, d, dtype, attn_backend=cfg.attn_backend).requires_grad_(False).eval()

    ref_model, ref_logps, eval_ref = None, None, None
    if cfg.precompute_ref:
        def compute(which):
            ref = make_ref()
            out = compute_ref_logps(ref, which, d, cfg.micro_batch_size, cfg.max_len, pad_id)
            del ref
            return out

        ref_file = Path(cfg.out_dir) / "reference_logps.safetensors"
        fp = fingerprint(pairs, ref_folder, cfg.chat_template)
        ref_logps = load_or_compute_ref_logps(ref_file, fp, lambda: compute(pairs), d)
        if eval_pairs:
            eval_ref = load_or_compute_ref_logps(ref_file.with_name("reference_logps_eval.safetensors"),
                                                 fingerprint(eval_pairs, ref_folder, cfg.chat_template),
                                                 lambda: compute(eval_pairs), d)
    else:
        ref_model = make_ref()

    batches = pair_batches(pairs, cfg.batch_size, cfg.micro_batch_size, cfg.epochs, cfg.seed, d, cfg.max_len,
                           pad_id, ref_logps)
    eval_batches = None
    n_eval = len(eval_pairs) - len(eval_pairs) % (cfg.micro_batch_size * d.world)
    if n_eval:
        eval_batches = pair_batches(eval_pairs[:n_eval], n_eval, cfg.micro_batch_size, 1, 0, d, cfg.max_len, pad_id,
                                    eval_ref[:n_eval] if eval_ref is not None else None, shuffle=False)
    objective = make_dpo_objective(cfg.beta, cfg.label_smoothing, cfg.loss_type, ref_model)
    summary = summary | {"pairs": len(pairs), "pairs_dropped_last_batch": batches.dropped_items}
    return train(cfg, model, objective, batches, d, eval_batches=eval_batches, tokenizer=tokenizer,
                 chat_template=get_template(cfg.chat_template).jinja, seq_len=cfg.max_len, summary=summary)


def main(argv=None):
    cfg = parse_cli(DPOConfig, PRESETS, argv)
    check_config(cfg)
    d = init_distributed(cfg.device)
    torch.manual_seed(cfg.seed)
    dtype = resolve_dtype(cfg.dtype, d.device)
    if d.main:
        print(f"config: {dataclasses.asdict(cfg)}")
    demo_paths = None
    if not cfg.data:
        from lion_min import demo

        demo_paths = demo.demo_paths(demo.demo_dir(Path(cfg.model)))
        data = str(demo_paths["dpo"])
    else:
        data = cfg.data
    tokenizer = Tokenizer.from_dir(resolve_path(cfg.model, cfg.revision))
    prefs, stats = load_preferences(data, schema=cfg.schema, skip_bad=cfg.skip_bad, seed=cfg.seed)
    if cfg.eval_data:
        eval_prefs, _ = load_preferences(cfg.eval_data, schema=cfg.schema, skip_bad=cfg.skip_bad, seed=cfg.seed)
    else:
        prefs, eval_prefs = train_eval_split(prefs, cfg.eval_fraction, cfg.seed)
    pairs, pst = encode_pairs(prefs, tokenizer, cfg.chat_template, cfg.max_len, cfg.max_prompt_len, cfg.system_prompt)
    eval_pairs, _ = encode_pairs(eval_prefs, tokenizer, cfg.chat_template, cfg.max_len, cfg.max_prompt_len,
                                 cfg.system_prompt)
    summary = {"data": stats.summary(), **dataclasses.asdict(pst)}
    if d.main:
        print(stats.summary())
        print(f"{pst.pairs} pairs: {pst.prompt_truncated} with the prompt truncated, {pst.response_truncated} with a "
              f"response truncated, {pst.dropped} dropped (nothing left to score)")
    result = run_dpo(cfg, d, pairs, eval_pairs, dtype, summary)

    if demo_paths is not None and d.main:
        from lion_min import demo

        before = demo.evaluate_checkpoint(Path(cfg.model), demo_paths)
        after = demo.evaluate_checkpoint(Path(cfg.out_dir), demo_paths)
        append_summary(Path(cfg.out_dir), demo_accuracy=after, demo_accuracy_start=before)
        print(f"demo task accuracy (greedy, held-out): {cfg.model}: {before:.3f} -> {cfg.out_dir}: {after:.3f}")
    return result


if __name__ == "__main__":
    run_cli(main)
