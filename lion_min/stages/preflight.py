"""Every check that needs no weights, made before torch is imported: a mistake on a real model ends
in a fraction of a second with one line, not after a 16 GB download or a minute of loading.

    preflight(cfg)      # cli.stage_main, once the flags are parsed; then the stage's run(cfg)

In order: --report_to's package, the data and prompts (local sources exist, their first record
parses), the output folder's state (run_folder.check: the same refusals as the run's own claim,
which checks again) and a --resume=PATH checkpoint, then the model folders (config.json, weights
listed, tokenizer, the chat template's tokens, the lengths, the attention backend) and the judge's
files (--judge_template included). None of it imports torch (tests/test_second_contact.py holds
it to that), unless --attn_backend=varlen asks for a device check. A hub id is not fetched here:
the stage downloads it after these checks, and checks what it got.
"""

from pathlib import Path

from lion_min.formats.data import check_sources
from lion_min.formats.hub import goes_to_hub
from lion_min.run.config import TRAINING_KEYS, ConfigError, DPOConfig, SFTConfig, parse_columns
from lion_min.run.model_checks import check_judge, check_same_architecture, check_seq_len, read_model_folder
from lion_min.run.report import check_report_to
from lion_min.run.run_folder import check, named_checkpoint


def preflight(cfg) -> None:
    """The checks of the module docstring for a stage's config (SFTConfig, DPOConfig, OnlineConfig);
    the first problem found raises its one-line error (ConfigError, DataError, CheckpointError...)."""
    stage = cfg.STAGE
    check_report_to(cfg.report_to)
    required = ("model", "prompts", "judge") if stage == "online" else ("model", "data")
    if not all(getattr(cfg, flag) for flag in required):
        return  # the stage says which flag is required
    if stage != "online":
        columns = parse_columns(getattr(cfg, "columns", None))
        for flag in ("data", "eval_data"):
            if getattr(cfg, flag):
                check_sources(getattr(cfg, flag), preferences=stage == "dpo", schema=cfg.schema, columns=columns,
                              skip_bad=cfg.skip_bad)
    elif cfg.prompts and not Path(cfg.prompts).is_file():
        raise ConfigError(f"--prompts={cfg.prompts}: no such file (expected prompts: .jsonl or one per line)")

    inputs = {"--model": cfg.model, "--data": getattr(cfg, "data", ""), "--eval_data": getattr(cfg, "eval_data", "")}
    resuming, free = bool(cfg.resume), frozenset()
    if stage in ("dpo", "online"):
        inputs["--ref_model"] = cfg.ref_model or cfg.model
    if stage == "online":  # as online.run claims its folder
        inputs = {k: inputs[k] for k in ("--model", "--ref_model")} | {
            "--prompts": cfg.prompts, "--judge": cfg.judge.removeprefix("pairrm:")}
        resuming = True
        free = frozenset() if any(Path(cfg.out_dir).glob("round_*.done")) else TRAINING_KEYS
    check(cfg, inputs, resuming, free)
    if cfg.resume not in ("", "auto"):  # a checkpoint named by its path
        named_checkpoint(cfg.resume)

    args = check_model_folder(cfg, cfg.model)
    if args is not None:  # the length a row or sequence may have
        if stage == "sft":
            check_seq_len(cfg.seq_len, args, default=SFTConfig.seq_len)
        else:
            check_seq_len(cfg.max_len, args, "max_len", default=DPOConfig.max_len)
    if getattr(cfg, "ref_model", "") and args is not None:
        ref_args = check_model_folder(cfg, cfg.ref_model)
        if ref_args is not None:
            check_same_architecture(Path(cfg.ref_model).expanduser(), args)
    if stage == "online":
        check_judge(cfg.judge, cfg.judge_template)


def check_model_folder(cfg, name: str):
    """A local model folder's config.json (as ModelArgs), checked as the stage will check it
    (model_checks.read_model_folder); None for a hub id (checked once fetched)."""
    return None if goes_to_hub(name) else read_model_folder(cfg, name).args
