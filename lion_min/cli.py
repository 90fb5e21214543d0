"""The command lines: flags to a stage, the presets, the no-flag demo, and how a command ends.

    python train_sft.py [flags]          # or: python -m lion_min sft, lion-sft once installed
    python train_dpo.py [flags]          # python -m lion_min dpo, lion-dpo
    python train_online.py [flags]       # python -m lion_min online, lion-online
    python -m lion_min sample|prepare|golden|plot|experiments|pairrm|tiny [flags]   # lion_min/__main__.py

This is the top of the package with __main__.py (tests/test_layers.py): it imports the stages and
the demo; no module below imports it.

The flags are parsed and checked, and --help printed, before torch is imported (that takes a second
or more): what is imported at the top here does not import it, and each command imports the modules
that run it once its flags are known (tests/test_install.py holds the training scripts to that).
"""

import ast
import dataclasses
import importlib
import os
import re
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Optional

from lion_min.demo import task as demo
from lion_min.run.config import ConfigError, DPOConfig, OnlineConfig, SFTConfig, format_config
from lion_min.run.flags import parse_cli, recipe_presets
from lion_min.stages.preflight import preflight


def presets(stage: str) -> dict[str, dict]:
    """Every preset a stage's command line knows: the demo's ("demo", "debug") and the recipe files'."""
    return demo.presets(stage) | recipe_presets(stage)


def default_preset(stage: str):
    """The preset a command line without --preset or --config gets: the demo when it names no
    starting model and no data (demo.wanted), else none."""
    return demo.wanted(stage)


def stage_doc(stage: str) -> str:
    """A stage module's docstring (its --help text), read from its source without importing it."""
    return ast.get_docstring(ast.parse((Path(__file__).parent / "stages" / f"{stage}.py").read_text()), clean=False)


def stage_main(config_cls, argv: Optional[list[str]], doc: str):
    """What each train_*.py script runs: the presets (the demo's and the recipes'), the command
    line, then the stage (lion_min/<stage>.py:run), on the demo's files when the demo (or debug)
    preset is chosen, which is what a command line without a model and data means (lion_min/demo/task.py).
    The stage's module, and torch with it, is imported once the flags are parsed and checked."""
    stage = config_cls.STAGE
    cfg = parse_cli(config_cls, presets(stage), argv, default_preset=default_preset(stage), doc=doc)
    if cfg.preset not in ("demo", "debug"):
        # What needs no weights, checked before the stage (and torch) loads, by the rank that speaks
        # for all (rank 0, or the only process): another rank has no process group yet to learn
        # whether rank 0 met the same mistake, and one that sees other inputs than rank 0 is stopped
        # by the stage's comparison of every rank's inputs (run_folder.agree_on_inputs).
        if int(os.environ.get("RANK", "0")) == 0:
            preflight(cfg)
    run = importlib.import_module(f"lion_min.stages.{stage}").run
    if cfg.preset in ("demo", "debug"):
        return demo.run_stage(stage, cfg, run)
    return run(cfg)


def loaded(module: str, name: str) -> tuple:
    """lion_min.<module>'s `name` (an exception class) if that module is loaded, else nothing: what
    run_cli catches from a module that never loaded cannot have been raised, and loading it now would
    load torch after a bad flag that was found before it."""
    return (getattr(sys.modules[f"lion_min.{module}"], name),) if f"lion_min.{module}" in sys.modules else ()


# The oldest torch the whole suite passes on (bench/torch_versions.sh, figures in bench/README.md); as
# requirements.txt and pyproject.toml. Before it: no FSDP2 on CPU (2.6: Stream.record_event), and on
# 2.8 FSDP2's gradient average over gloo ranks returns the sum, every gradient 2x with two ranks.
MIN_TORCH = (2, 9, 1)


def torch_problem(installed: Optional[str]) -> Optional[str]:
    """Why the installed torch (its version string, None when it is not installed) cannot run
    lion_min, or None. Read from the package metadata: no need to import torch to say so."""
    need = "torch >= " + ".".join(map(str, MIN_TORCH))
    if installed is None:
        return f"torch is not installed; lion_min needs {need}"
    release = tuple(int(part) for part in re.findall(r"\d+", installed.split("+")[0])[:3])
    if release < MIN_TORCH:  # (2.10.0a0 and 2.9.1+cu128 count as 2.10.0 and 2.9.1)
        return f"torch {installed} is installed; lion_min needs {need} (pip install -U torch)"
    return None


def installed_torch() -> Optional[str]:
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None


def in_process_group() -> bool:
    """Whether this process is one rank of several in a started process group (without importing torch)."""
    dist = sys.modules.get("torch.distributed")
    return dist is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def wait_for_rank_0(seconds: float = 3.0) -> None:
    """Before the process group starts, a rank other than 0 that meets the error rank 0 meets too (the
    same flags) says nothing: rank 0 says it. torchrun stops every rank as soon as one exits, so this
    one waits before exiting, or rank 0 could be stopped before its line is out (seen on a loaded
    machine); rank 0 exits first, and torchrun then ends this one."""
    time.sleep(seconds)


def run_cli(main) -> None:
    """Run a stage's main(); bad input (a ValueError naming the file, line or key), a missing file,
    or a non-finite loss ends the process with that one line on stderr and exit status 2, as does a
    torch older than MIN_TORCH (said before anything else, by rank 0 under torchrun)."""
    problem = torch_problem(installed_torch())
    if problem:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {problem}", file=sys.stderr)
        else:
            wait_for_rank_0()
        sys.exit(2)
    try:
        main()
    except loaded("run.loop", "StopRequested") as e:
        print(str(e), file=sys.stderr)
        sys.exit(e.code)
    except KeyboardInterrupt:  # Ctrl-C outside the training steps (loading, sampling), or a second one
        print("stopped by Ctrl-C (no checkpoint written for this part of the run)", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # the reader of stdout left (`--help | head`): stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (the exit's flush must not fail too)
        sys.exit(1)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        from lion_min.core.chat import ChatFormatError
        from lion_min.formats.data_files import DataError
        from lion_min.formats.tokenizer import TokenizerError

        # Under torchrun every rank checks the same flags and inputs and fails alike: rank 0 says so
        # once. An error of one rank's own (its share of the work, or one rank 0 did not meet: a file
        # only this rank cannot read) is said by that rank (faults.say_once).
        rank = int(os.environ.get("RANK", "0"))
        same_everywhere = isinstance(e, (ConfigError, FileNotFoundError, DataError, ChatFormatError, TokenizerError))
        same_everywhere &= not getattr(e, "said_by_this_rank", False)  # (raise_if_any found it here alone)
        peer_failed = isinstance(e, loaded("run.faults", "PeerFailed"))  # (said by that peer)
        # One line, even when a library's message (huggingface_hub's, say) spans several.
        message = " | ".join(line.strip() for line in str(e).splitlines() if line.strip())
        if peer_failed:
            pass
        elif in_process_group():
            from lion_min.run.faults import say_once

            say_once(f"error: {message}", rank, same_everywhere)
        elif rank == 0 or not same_everywhere:
            print(f"error: {message}", file=sys.stderr)
        else:
            wait_for_rank_0()
        if not in_process_group():
            sys.exit(2)
        from lion_min.run.faults import exit_now

        exit_now(2)
    except RuntimeError as e:  # a collective cut short by a rank that failed: one line, not a traceback
        from lion_min.run.faults import exit_now, peer_gone

        if peer_gone(e) is None:
            raise
        print(f"error: {peer_gone(e)}", file=sys.stderr)
        exit_now(2)
    # After success only (a failed rank must not wait for the others): leave the process group
    # and exit without the interpreter's teardown (faults.shutdown says why).
    if "lion_min.core.parallel" in sys.modules:
        from lion_min.run.faults import shutdown

        shutdown()


# --- the stages' command lines (python -m lion_min sft, lion-sft, ...) -----------------------------


def sft_main(argv=None):
    return stage_main(SFTConfig, argv, stage_doc("sft"))


def dpo_main(argv=None):
    return stage_main(DPOConfig, argv, stage_doc("dpo"))


def online_main(argv=None):
    return stage_main(OnlineConfig, argv, stage_doc("online"))


# With no arguments at all, train_*.py runs the demo (the README's first command, from the clone),
# while these, which run from any folder, print how to use them: a demo training into ./out is not
# what a bare `lion-sft` typed in a project folder should start.
USAGE = """usage: {name} --model=DIR_OR_HUB_ID --{data}=FILE [--out_dir=DIR] [flags]{judge}
       {name} --preset=lion-gemma-2b --{data}=FILE    (a recipe; --help lists them all)
       {name} --preset=demo                          (the built-in demo, into ./out/demo)
       {name} --help                                 (every flag with its default, and the presets)"""


def console(main, name: str, argv: Optional[list[str]] = None, data: str = "data", judge: str = ""):
    """A stage's command line as an installed command or `python -m lion_min STAGE`: the usage and
    exit status 2 when given no arguments, else run_cli(main)."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(USAGE.format(name=name, data=data, judge=judge), file=sys.stderr)
        sys.exit(2)
    run_cli(lambda: main(argv))


def sft():
    """The console script lion-sft (pyproject.toml)."""
    console(sft_main, "lion-sft")


def dpo():
    """The console script lion-dpo."""
    console(dpo_main, "lion-dpo")


def online():
    """The console script lion-online."""
    console(online_main, "lion-online", data="prompts", judge=" --judge=RULE_OR_DIR")


SAMPLE_DOC = """Completions from a checkpoint (lion_min/core/sample.py: batched, with a KV cache).

    python -m lion_min sample --model=DIR --prompt="Why is the sky blue?"
    python -m lion_min sample --model=DIR --prompts_file=prompts.jsonl --temperature=0.7 --top_p=0.9

The chat template comes from the model folder unless --chat_template names one (none = raw text);
one line says which is used."""


# --- python -m lion_min sample ---------------------------------------------------------------------


def sample_main(argv: Optional[list[str]] = None) -> list[str]:
    """python -m lion_min sample (the sampler module's docstring is the --help text): the completions, printed."""
    import torch

    from lion_min.core.chat import encode_prompt, get_template, stop_token_ids, template_system
    from lion_min.core.sample import generate
    from lion_min.formats.hf import load_model
    from lion_min.formats.hf_config import resolve_path
    from lion_min.formats.tokenizer import Tokenizer
    from lion_min.run.config import SampleConfig, resolve_dtype
    from lion_min.run.prompts import folder_template, read_prompts

    cfg = parse_cli(SampleConfig, {}, argv, doc=SAMPLE_DOC)
    if not cfg.model:
        raise ConfigError("--model=DIR is required")
    if not cfg.prompt and not cfg.prompts_file:
        raise ConfigError("give --prompt=TEXT or --prompts_file=FILE")
    if cfg.chat_template not in ("none", "auto"):
        get_template(cfg.chat_template)  # unknown names fail here, before loading anything
    prompts = ([cfg.prompt] if cfg.prompt else []) + (read_prompts(cfg.prompts_file) if cfg.prompts_file else [])
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          "cpu" if cfg.device == "auto" else cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    folder = resolve_path(cfg.model)
    tokenizer = Tokenizer.from_dir(folder)
    template, why = (folder_template(folder, tokenizer) if cfg.chat_template == "auto"
                     else (cfg.chat_template, "--chat_template"))
    # An export whose training inserted a system turn carries it in its template (chat.export_jinja).
    system = template_system(tokenizer.chat_template) if cfg.chat_template == "auto" else None
    ids = [encode_prompt(tokenizer, p, template, system) for p in prompts]  # bad prompts fail before the weights load
    model = load_model(folder, dtype=dtype, device=device)
    if template == "none":
        stop = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    else:
        stop = stop_token_ids(tokenizer, template)
    print(f"config:\n{format_config(cfg)}")
    print(f"chat template: {template} ({why})")
    out, stats = generate(model, ids, cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                          top_k=cfg.top_k, stop_ids=stop, pad_id=tokenizer.pad_id or 0, seed=cfg.seed,
                          batch_size=cfg.batch_size, return_stats=True)
    texts = [tokenizer.decode([t for t in row if t not in stop]) for row in out]
    for i, (prompt, text) in enumerate(zip(prompts, texts)):
        print(f"--- [{i}] prompt: {prompt!r}\n{text}")
    print(f"--- {stats} ({device}, {dtype})")
    return texts


# --- python -m lion_min prepare --------------------------------------------------------------------


def prepare_main(argv: Optional[list[str]] = None) -> None:
    """python -m lion_min prepare [sft|dpo] --model=... --data=... [the stage's flags] (its module
    docstring is the --help text)"""
    from lion_min.core.parallel import init_distributed
    from lion_min.formats.hf_config import resolve_path
    from lion_min.run import data_cache as prepare
    from lion_min.run.model_checks import chat_tokenizer
    from lion_min.stages import dpo, sft

    argv = sys.argv[1:] if argv is None else list(argv)
    stage = argv.pop(0) if argv and not argv[0].startswith("-") else "sft"
    stages = {"sft": (sft.SFTConfig, sft.prepare_sft, sft.load_sft_data),
              "dpo": (dpo.DPOConfig, dpo.prepare_dpo, dpo.load_dpo_data)}
    if stage not in stages:
        raise ConfigError(f"python -m lion_min prepare {stage}: expected sft or dpo")
    cls, prepare_data, load = stages[stage]
    cfg = parse_cli(cls, presets(stage), argv, doc=prepare.__doc__)
    if not cfg.model or not cfg.data:
        raise ConfigError("--model (for its tokenizer) and --data are required")
    if cfg.data_cache == "off":
        raise ConfigError("--data_cache=off: nothing to prepare (give a folder, or auto)")
    d = init_distributed("cpu")
    tokenizer, template = chat_tokenizer(cfg, resolve_path(cfg.model, cfg.revision))
    cfg = dataclasses.replace(cfg, chat_template=template)  # --chat_template=auto named
    t0 = time.perf_counter()
    prep = prepare_data(cfg, tokenizer, d, load=lambda: load(cfg))
    if d.main:
        print(prep.data_summary)
        for name, split in (("", prep.train), ("eval: ", prep.eval)):
            if isinstance(split, sft.PreparedRows):
                print(name + sft.packing_line(split.counts, len(split), cfg.seq_len) +
                      f"; {split.counts.real_tokens:,} tokens")
            elif split is not None:
                st = split.stats
                print(f"{name}{st['pairs']} pairs: {len(split)} kept, {st['prompt_truncated']} with the prompt "
                      f"truncated, {st['response_truncated']} with a response truncated, {st['dropped']} dropped; "
                      f"{int(split.docs[-1]):,} tokens")
        print(f"{d.world} process(es), {time.perf_counter() - t0:.1f}s in all; {prep.how()}")


# --- python -m lion_min golden ---------------------------------------------------------------------


def golden_main(argv: Optional[list[str]] = None) -> int:
    """python -m lion_min golden [compare EXPECTED ACTUAL] [flags] (golden/compute.py's docstring): the exit status."""
    from lion_min.golden import compare as golden
    from lion_min.golden.compare import COMPARE_USAGE, CompareConfig, compare, write
    from lion_min.golden.compute import GoldenConfig, compute

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["compare"]:
        paths = [a for a in argv[1:] if not a.startswith("-")]
        opts = parse_cli(CompareConfig, {}, [a for a in argv[1:] if a.startswith("-")], doc=COMPARE_USAGE)
        if len(paths) != 2:
            raise ConfigError("usage: " + COMPARE_USAGE.split("\n", 1)[0])
        result = compare(*paths, rtol=opts.rtol, atol=opts.atol, partial=opts.partial)
        print(result.table())
        return 0 if result.ok else 1
    cfg = parse_cli(GoldenConfig, {}, argv, doc=golden.__doc__)
    if not cfg.out:
        raise ConfigError("--out is required")
    if (Path(cfg.out) / "golden.json").exists() and not cfg.overwrite:
        raise ConfigError(f"--out={cfg.out}: holds golden numbers already; --overwrite=true replaces them")
    golden = compute(cfg)
    write(golden, cfg.out)
    s = golden.meta["scalars"]
    loss = s.get("sft_loss", s.get("dpo_loss"))
    print(f"{golden.meta['kind']}: loss {loss:.6f}, grad norm {golden.meta['grad_norm']['total']:.6f}; "
          f"wrote {Path(cfg.out) / 'golden.json'} and golden.safetensors")
    return 0


# --- python -m lion_min plot | experiments | pairrm ---------------------------------------------------


def plot_main(argv: Optional[list[str]] = None) -> None:
    from lion_min.run.plot import main

    main(argv)


def experiments_main(argv: Optional[list[str]] = None) -> None:
    from lion_min.demo.experiments import main

    main(argv)


def tiny_main(argv: Optional[list[str]] = None) -> int:
    from lion_min.demo.tiny import main

    return main(argv)


def pairrm_main(argv: Optional[list[str]] = None) -> None:
    """python -m lion_min pairrm convert SRC OUT (argparse's own usage; a bad folder: one error line)."""
    from lion_min.pairrm.model import main

    try:
        main(argv)
    except ValueError as e:
        sys.exit(f"error: {e}")
