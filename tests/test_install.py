"""The package installs (pyproject.toml) and works from any folder, recipes included."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_installed_package_imports_from_another_folder(tmp_path):
    src, target = tmp_path / "src", tmp_path / "site"  # a copy: pip builds in place (build/, *.egg-info)
    shutil.copytree(ROOT / "lion_min", src / "lion_min", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    res = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                          "--target", str(target), str(src)], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    code = ("import lion_min, lion_min.run.flags as c; print(lion_min.__file__); "
            "print(sorted(c.recipe_presets('dpo')))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    where, presets = out.stdout.splitlines()
    assert Path(where).is_relative_to(target)  # the installed copy, not the repository
    assert presets == "['lion-gemma-2b', 'lion-gemma2-2b', 'lion-gemma2-9b', 'lion-gemma3-1b', 'lion-gemma3-4b', 'lion-llama3-8b']"


def test_the_stages_run_from_the_entry_point():
    for stage in ("sft", "dpo", "online"):
        res = subprocess.run([sys.executable, "-m", "lion_min", stage, "--help"], capture_output=True, text=True,
                             cwd=ROOT)
        assert res.returncode == 0 and "--model=" in res.stdout and "lion-gemma-2b" in res.stdout, res.stderr


def readme_python_block(after: str) -> str:
    """The first ```python block of README.md after the heading `after`."""
    text = (ROOT / "README.md").read_text()
    return text[text.index(after):].split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_python_api_runs_as_written(tmp_path, monkeypatch):
    """The Public API snippet, as printed, with a tiny local checkpoint for the hub id and the CPU for
    CUDA: it loads, computes logits, decodes one token and exports a folder transformers loads."""
    import transformers

    from test_checkpoint import hub_checkpoint

    src = hub_checkpoint("llama3", tmp_path / "Meta-Llama-3-8B")
    code = readme_python_block("## From code")
    assert code.count('"meta-llama/Meta-Llama-3-8B"') == 2 and 'device="cuda"' in code
    code = code.replace('"meta-llama/Meta-Llama-3-8B"', repr(str(src))).replace('"cuda"', '"cpu"')
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["logits"].shape == (1, len(scope["input_ids"][0]), 1024)
    out = tmp_path / "out" / "my-model"
    assert transformers.AutoModelForCausalLM.from_pretrained(out).config.vocab_size == 1024
    assert (out / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()


def test_save_model_takes_any_kind_of_tokenizer(tmp_path):
    """save_model(tokenizer=...) with a transformers tokenizer, a lion_min Tokenizer or a folder path:
    each export's tokenizer encodes a chat exactly as the source does."""
    import transformers

    import lion_min
    from test_checkpoint import hub_checkpoint

    src = hub_checkpoint("gemma", tmp_path / "src")
    model = lion_min.load_model(src)
    text = "<bos><start_of_turn>user\nHi there<end_of_turn>\n"
    want = lion_min.Tokenizer.from_dir(src).encode(text)
    kinds = {"transformers": transformers.AutoTokenizer.from_pretrained(src),
             "lion_min": lion_min.Tokenizer.from_dir(src), "folder": str(src)}
    for kind, tokenizer in kinds.items():
        out = lion_min.save_model(model, tmp_path / kind, tokenizer=tokenizer, chat_template="gemma")
        assert lion_min.Tokenizer.from_dir(out).encode(text) == want, kind
        hf = transformers.AutoTokenizer.from_pretrained(out)
        assert hf.apply_chat_template([{"role": "user", "content": "Hi there"}], tokenize=False) == text, kind


def test_a_bare_console_command_prints_usage_instead_of_training(tmp_path, monkeypatch, capsys):
    """`lion-sft` (or python -m lion_min sft) with no arguments, in a project folder: the usage on
    stderr, exit status 2, nothing written; train_sft.py with no arguments stays the demo."""
    from lion_min import cli
    monkeypatch.chdir(tmp_path)
    for command, name in ((cli.sft, "lion-sft"), (cli.dpo, "lion-dpo"), (cli.online, "lion-online")):
        monkeypatch.setattr(sys, "argv", [name])
        with pytest.raises(SystemExit) as e:
            command()
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith(f"usage: {name} --model=DIR_OR_HUB_ID")
        assert f"{name} --preset=demo" in err and f"{name} --help" in err
    assert "--prompts=FILE" in err and "--judge=" in err
    res = subprocess.run([sys.executable, "-m", "lion_min", "sft"], capture_output=True, text=True, cwd=tmp_path,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert res.returncode == 2 and res.stderr.startswith("usage: python -m lion_min sft --model=") and not res.stdout
    assert list(tmp_path.iterdir()) == []
    res = subprocess.run([sys.executable, "-m", "lion_min"], capture_output=True, text=True, cwd=tmp_path,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert res.returncode == 2 and "python -m lion_min sft" in res.stderr and "python -m lion_min golden" in res.stderr
    res = subprocess.run([sys.executable, "-m", "lion_min", "sfft"], capture_output=True, text=True, cwd=tmp_path,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert res.returncode == 2 and res.stderr.splitlines()[-1].startswith("error: unknown command 'sfft'")


def imported(stderr: str) -> set[str]:
    """The modules a `python -X importtime` run imported (its stderr lists each one)."""
    return {line.rsplit("|", 1)[1].strip() for line in stderr.splitlines() if line.startswith("import time:")}


@pytest.mark.parametrize("stage", ["sft", "dpo", "online"])
def test_help_and_a_bad_flag_answer_without_loading_torch(tmp_path, stage):
    """--help and a mistyped or out-of-range flag answer before torch is imported (a second or more,
    far longer on a loaded machine): the same text and exit status, without the wait."""
    commands = [[str(ROOT / f"train_{stage}.py")], ["-m", "lion_min", stage]]  # the script, the entry point
    runs = [(["--help"], 0, None), (["--lr_rate=1"], 2, "error: unknown option --lr_rate (did you mean --min_lr_ratio?)"),
            (["--lr=-1"], 2, "error: --lr=-1.0: must be in (0, inf)")]
    for command, (args, code, error) in [(c, r) for c in commands for r in runs]:
        res = subprocess.run([sys.executable, "-X", "importtime", *command, *args], capture_output=True, text=True,
                             cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        modules = imported(res.stderr)
        assert "lion_min.run.flags" in modules, res.stderr[-2000:]  # (the list is there to look at)
        assert "torch" not in modules, f"{args}: torch imported"
        said = [line for line in res.stderr.splitlines() if not line.startswith("import time:")]
        assert res.returncode == code and said == ([error] if error else []), (args, res.returncode, said)
        if error is None:
            assert "--model=" in res.stdout and "lion-gemma-2b" in res.stdout
    assert list(tmp_path.iterdir()) == []
    # The package's public names are loaded at first use, and load torch then.
    code = ("import sys, lion_min; assert 'torch' not in sys.modules; "
            "from lion_min import load_model; import lion_min.formats.hf as c; "
            "assert load_model is c.load_model and lion_min.Tokenizer and 'torch' in sys.modules")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]


def test_help_into_a_pipe_closed_early_ends_quietly(tmp_path):
    """`python train_sft.py --help | head -3`: the reader may leave before the help is written; then
    the command ends without a traceback. Here the reader is gone before it starts (deterministic)."""
    read, write = os.pipe()
    os.close(read)
    res = subprocess.run([sys.executable, str(ROOT / "train_sft.py"), "--help"], stdout=write,
                         stderr=subprocess.PIPE, text=True, cwd=tmp_path, timeout=60)
    os.close(write)
    assert res.returncode == 1 and res.stderr == "", res.stderr[-2000:]


@pytest.mark.slow
def test_under_torchrun_a_flag_error_is_printed_once(tmp_path):
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(ROOT / "train_sft.py"), "--model=m", "--data=d.jsonl", "--lr_rate=1"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300,
                         env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"))
    assert res.returncode != 0
    errors = [line for line in res.stderr.splitlines() if "error: unknown option --lr_rate" in line]
    assert len(errors) == 1, res.stderr[-3000:]


def test_an_older_torch_is_refused_in_one_line(monkeypatch, capsys):
    """MIN_TORCH is what requirements.txt and pyproject.toml declare; an older or missing torch (read
    from the package metadata) ends a command with one line saying which torch is there and which is
    needed, exit 2, before the command runs; the floor itself and newer releases pass."""
    from lion_min import cli
    floor = ".".join(map(str, cli.MIN_TORCH))
    assert f"torch>={floor}\n" in (ROOT / "requirements.txt").read_text()
    assert f'"torch>={floor}"' in (ROOT / "pyproject.toml").read_text()
    for ok in (floor, "2.10.0a0+git1234", "2.15.0+cu130", "3.0.0"):
        assert cli.torch_problem(ok) is None, ok
    ran = []
    for installed, said in (("2.8.0+cu128", "torch 2.8.0+cu128 is installed"), ("2.9.0", "torch 2.9.0 is installed"),
                            (None, "torch is not installed")):
        monkeypatch.setattr(cli, "installed_torch", lambda: installed)
        with pytest.raises(SystemExit) as e:
            cli.run_cli(lambda: ran.append(1))
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.splitlines() == [f"error: {said}; lion_min needs torch >= {floor}"
                                                          + (" (pip install -U torch)" if installed else "")]
    assert ran == []  # (with the torch installed here, every run_cli in tests/test_bad_input.py gets past it)
