"""The recipe as users run it (issue 31): what the user typed wins over the recipe, every suggestion a
message makes works when followed, and mistakes are caught before any weights load."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_dpo  # noqa: E402
import train_sft  # noqa: E402
from lion_min.cli import presets, run_cli  # noqa: E402
from lion_min.run.config import ConfigError, DPOConfig, OnlineConfig, SFTConfig  # noqa: E402
from lion_min.run.flags import parse_cli, recipe_presets  # noqa: E402

ENV = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
# A recipe's values that a CPU test of a tiny model must override (8192-token rows, compiled blocks).
SMALL = ["--seq_len=96", "--batch_size=4", "--micro_batch_size=1", "--compile=false", "--activation_checkpointing=off",
         "--device=cpu", "--lr=1e-3"]


def sft_argv(tiny, out, *extra) -> list[str]:
    return [f"--model={tiny['model']}", f"--data={tiny['data']}", f"--out_dir={out}", *SMALL, *extra]


# --- 1. what the user typed wins; every suggestion works -----------------------------------------


@pytest.mark.parametrize("cls", [SFTConfig, DPOConfig, OnlineConfig])
def test_a_typed_overwrite_wins_over_the_recipes_resume(cls):
    for name in recipe_presets(cls.STAGE):
        assert parse_cli(cls, presets(cls.STAGE), [f"--preset={name}"]).resume == "auto"
        cfg = parse_cli(cls, presets(cls.STAGE), [f"--preset={name}", "--overwrite=true"])
        assert cfg.overwrite and cfg.resume == ""
    with pytest.raises(ConfigError, match="--overwrite=true with --resume=auto: .* contradict"):
        parse_cli(cls, presets(cls.STAGE), ["--preset=lion-gemma-2b", "--overwrite=true", "--resume=auto"])


def follow(argv: list[str], how: str) -> list[str]:
    """The command that `how` (after "continue with " in a stop message) says to run."""
    if how == "the same command":
        return list(argv)
    if " in place of any " in how:  # (a flag the user may or may not have typed)
        old = how.split(" in place of any ")[1]
        return ["--resume=auto" if a == old else a for a in argv] + ([] if old in argv else ["--resume=auto"])
    if " in place of " in how:
        old = how.split(" in place of ")[1]
        assert old in argv, (how, argv)
        return ["--resume=auto" if a == old else a for a in argv]
    assert how == "the same command and --resume=auto", how
    return [*argv, "--resume=auto"]


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--overwrite=true"], ["--preset=lion-llama3-8b"],
                                   ["--preset=lion-llama3-8b", "--overwrite=true"], ["--preset=debug"],
                                   ["--preset=debug", "--overwrite=true"]])
def test_following_the_ctrl_c_message_continues_the_run(tiny_chat_model, tmp_path, extra):
    out = tmp_path / "run"
    argv = sft_argv(tiny_chat_model, out, "--max_steps=40", "--epochs=8", "--save_every=1", *extra)
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_sft.py"), *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().count("\n") >= 2:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err.count("\n") == 1, err
    step = int(err.split("after step ")[1].split(":")[0])
    again = follow(argv, err.strip().split("; continue with ")[1])
    res = subprocess.run([sys.executable, str(ROOT / "train_sft.py"), *again], capture_output=True, text=True, env=ENV)
    assert res.returncode == 0, res.stderr
    assert f"training 40 steps from step {step} (resumed from" in res.stdout
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if "loss" in m] == list(range(1, 41))  # (the demo's also has an eval/loss line)


def test_holds_a_run_suggests_resume_only_where_it_is_accepted(tiny_chat_model, tmp_path, capsys):
    out = tmp_path / "run"
    argv = sft_argv(tiny_chat_model, out, "--max_steps=2")
    train_sft.main(argv)
    with pytest.raises(ConfigError, match=r"holds a run \(.*\); continue it with --resume=auto") as same:
        train_sft.main(argv)
    assert "--resume=auto" in str(same.value)
    capsys.readouterr()
    train_sft.main([*argv, "--resume=auto"])  # followed: the same run, finished
    assert "holds this run, finished (2 steps) and exported: nothing to do" in capsys.readouterr().out
    # Another run (another lr): --resume=auto would be refused, so only the choices that work are named.
    with pytest.raises(ConfigError, match=r"holds another run: lr differ; pick another --out_dir, or replace it "
                                          r"with --overwrite=true") as other:
        train_sft.main([*argv, "--lr=5e-4"])
    assert "--resume" not in str(other.value)
    with pytest.raises(ConfigError, match="lr differ"):  # what it did not suggest would indeed fail
        train_sft.main([*argv, "--lr=5e-4", "--resume=auto"])
    # Followed under a recipe (which sets resume=auto): the typed --overwrite=true replaces the run.
    train_sft.main([*argv, "--lr=5e-4", "--preset=lion-llama3-8b", "--overwrite=true"])
    assert json.loads((out / "train_config.json").read_text())["preset"] == "lion-llama3-8b"
    # Finished: "nothing to do (...; --overwrite=true in place of any --resume=auto runs it again)", followed.
    again = [*argv, "--lr=5e-4", "--preset=lion-llama3-8b", "--resume=auto"]
    capsys.readouterr()
    train_sft.main(again)
    said = capsys.readouterr().out
    assert "nothing to do" in said and "--overwrite=true in place of any --resume=auto runs it again" in said
    train_sft.main(["--overwrite=true" if a == "--resume=auto" else a for a in again])
    assert "training 2 steps from step 0" in capsys.readouterr().out


# --- 2. mistakes before any weights load ---------------------------------------------------------


def imported(stderr: str) -> set[str]:
    return {line.rsplit("|", 1)[1].strip() for line in stderr.splitlines() if line.startswith("import time:")}


@pytest.fixture(scope="module")
def finished_run(tiny_chat_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    train_sft.main(sft_argv(tiny_chat_model, out, "--max_steps=1"))
    return out


@pytest.mark.parametrize("script,over,says", [
    ("sft", {"data": "{data}.jsnol"}, "chats.jsonl.jsnol: no such file or folder"),
    ("sft", {"out_dir": "{finished}", "lr": "5e-4"}, "holds another run: batch_size, lr, seq_len differ"),
    ("dpo", {}, "which look like SFT conversations, for train_sft.py (schema messages); pass --schema="),
])
def test_mistakes_without_weights_end_before_torch_and_before_the_config_dump(tiny_chat_model, finished_run,
                                                                                tmp_path, script, over, says):
    values = {"model": tiny_chat_model["model"], "data": tiny_chat_model["data"], "out_dir": tmp_path / "out"} | over
    argv = [f"--{k}={str(v).format(data=tiny_chat_model['data'], finished=finished_run)}" for k, v in values.items()]
    res = subprocess.run([sys.executable, "-X", "importtime", str(ROOT / f"train_{script}.py"), *argv, "--device=cpu"],
                         capture_output=True, text=True, env=ENV)
    said = [line for line in res.stderr.splitlines() if not line.startswith("import time:")]
    assert res.returncode == 2 and len(said) == 1 and said[0].startswith("error: ") and says in said[0], said
    assert "torch" not in imported(res.stderr) and res.stdout == ""  # no config dump before the error
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def broken_models(tiny_chat_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("broken")
    model = tiny_chat_model["model"]
    for name in ("no_tokenizer", "bad_config", "no_weights"):
        shutil.copytree(model, root / name)
    (root / "no_tokenizer" / "tokenizer.json").unlink()
    (root / "bad_config" / "config.json").write_text("{not json")
    (root / "no_weights" / "model.safetensors").unlink()
    return root


@pytest.mark.parametrize("script,over,says", [
    ("sft", {"model": "{root}/no_tokenizer"}, "no tokenizer.json in"),
    ("sft", {"model": "{root}/bad_config"}, "config.json: not valid JSON"),
    ("sft", {"model": "{root}/no_weights"}, "no model.safetensors or model.safetensors.index.json"),
    ("sft", {"chat_template": "llama3"}, "lacks the special token '<|start_header_id|>'"),
    ("dpo", {"data": "{prefs}", "ref_model": "{root}/no_weights"}, "no model.safetensors"),
    ("sft", {"resume": "{root}/no_ckpt"}, "no_ckpt: not a complete checkpoint folder"),
    ("sft", {"seq_len": 100000}, "--seq_len=100000 is above the model's max_position_embeddings (8192)"),
    ("dpo", {"data": "{prefs}", "max_len": 100000}, "--max_len=100000 is above the model's max_position_embeddings"),
])
def test_model_folder_mistakes_end_before_torch_is_imported(tiny_chat_model, broken_models, tmp_path, script, over,
                                                            says):
    """Reading config.json, the tokenizer, the weights' file names and a --resume=PATH folder needs no
    torch (core/args.py, formats/hf_config.py, run/model_checks.py): the error comes before torch is
    even imported, so no weight can have been loaded, and the command ends in a fraction of a second."""
    values = {"model": tiny_chat_model["model"], "data": tiny_chat_model["data"], "out_dir": tmp_path / "out"} | over
    fill = dict(root=broken_models, prefs=tiny_chat_model["prefs"])
    argv = [f"--{k}={str(v).format(**fill)}" for k, v in values.items()] + ["--device=cpu"]
    res = subprocess.run([sys.executable, "-X", "importtime", str(ROOT / f"train_{script}.py"), *argv],
                         capture_output=True, text=True, env=ENV)
    said = [line for line in res.stderr.splitlines() if not line.startswith("import time:")]
    assert res.returncode == 2 and len(said) == 1 and said[0].startswith("error: ") and says in said[0], said
    assert "torch" not in imported(res.stderr) and res.stdout == ""  # no config dump before the error
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("cache", ["off", "a folder"])
def test_sft_reads_its_data_before_the_weights(tiny_chat_model, tmp_path, monkeypatch, capsys, cache):
    """What only a full read of the data finds (a bad record past the first, too few rows for a batch)
    ends before the model's weights load, as in DPO: the SFT stage encodes with the tokenizer alone."""
    import lion_min.formats.hf

    def no_weights(*a, **k):
        raise AssertionError("weights loaded before the data was read")

    monkeypatch.setattr(lion_min.formats.hf, "load_weights", no_weights)
    first = Path(tiny_chat_model["data"]).read_text().splitlines()[0]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(f"{first}\n{first}\n" + '{"messages": "oops"}\n')
    few = tmp_path / "few.jsonl"
    few.write_text(f"{first}\n")
    for data, says in ((bad, "bad.jsonl: line 3: 'messages': expected list, got str"),
                       (few, "packed rows of data for --batch_size=4")):
        argv = sft_argv(tiny_chat_model, tmp_path / "out", f"--data={data}", "--eval_fraction=0",
                        f"--data_cache={'off' if cache == 'off' else tmp_path / 'cache'}")
        with pytest.raises(SystemExit) as e:
            run_cli(lambda: train_sft.main(argv))
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: ") and says in err and err.count("\n") == 1, err
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_a_stage_reads_the_model_folder_once(tiny_chat_model, tmp_path, monkeypatch, stage):
    """--model's tokenizer is parsed twice a run: by preflight (before torch) and by the stage, which
    hands what it read to load_policy (with the real Llama-3 tokenizer a parse is about half a second)."""
    from lion_min.formats.tokenizer import Tokenizer

    parsed, real = [], Tokenizer.from_dir.__func__
    monkeypatch.setattr(Tokenizer, "from_dir", classmethod(lambda cls, f: parsed.append(Path(f)) or real(cls, f)))
    argv = sft_argv(tiny_chat_model, tmp_path / "out", "--max_steps=1", "--eval_fraction=0", "--data_cache=off")
    if stage == "dpo":
        argv = [a.replace("--seq_len=", "--max_len=") for a in argv]
        argv += [f"--data={tiny_chat_model['prefs']}", "--max_prompt_len=48"]
    (train_sft if stage == "sft" else train_dpo).main(argv)
    assert parsed == [tiny_chat_model["model"]] * 2


def test_a_hub_id_is_not_fetched_before_the_local_checks(tiny_chat_model, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    fetched = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: fetched.append(a) or 1 / 0)
    argv = ["--model=some-org/some-model", f"--data={tiny_chat_model['data']}.jsnol", f"--out_dir={tmp_path / 'o'}"]
    with pytest.raises(SystemExit):
        run_cli(lambda: train_sft.main(argv))
    assert "no such file or folder" in capsys.readouterr().err and fetched == []


# --- 4. the export renders what training saw --------------------------------------------------------


@pytest.mark.parametrize("preset", sorted(recipe_presets("sft")))
def test_the_exports_template_renders_the_token_layout_training_used(tiny_chat_model, tmp_path, preset):
    """Under each recipe (system_prompt="": an empty system turn), transformers' apply_chat_template on
    the SFT and DPO exports gives the ids of the training encoder, and the sampler's prompt is its prefix."""
    from transformers import AutoTokenizer

    from lion_min.core.chat import encode_chat, template_system, with_system
    from lion_min.core.chat import encode_prompt
    from lion_min.formats.tokenizer import Tokenizer

    sft_out, dpo_out = tmp_path / "sft", tmp_path / "dpo"
    train_sft.main(sft_argv(tiny_chat_model, sft_out, f"--preset={preset}", "--max_steps=1"))
    train_dpo.main([f"--preset={preset}", f"--model={sft_out}", f"--data={tiny_chat_model['prefs']}",
                    f"--out_dir={dpo_out}", "--batch_size=4", "--micro_batch_size=2", "--max_len=64",
                    "--max_prompt_len=32", "--max_steps=1", "--compile=false", "--activation_checkpointing=off",
                    "--device=cpu"])
    cfg = parse_cli(SFTConfig, presets("sft"), [f"--preset={preset}"])
    assert cfg.system_prompt == ""  # the recipes' empty system turn
    conversations = [json.loads(line)["messages"] for line in tiny_chat_model["data"].read_text().splitlines()[:4]]
    conversations.append([{"role": "system", "content": "Be brief."}] + conversations[0])  # its own: kept
    for folder in (sft_out, dpo_out):
        hf, ours = AutoTokenizer.from_pretrained(folder), Tokenizer.from_dir(folder)
        assert template_system(ours.chat_template) == ""
        for messages in conversations:
            text = hf.apply_chat_template(messages, tokenize=False)
            trained = encode_chat(ours, with_system(messages, cfg.system_prompt), cfg.chat_template).input_ids
            assert hf(text, add_special_tokens=False)["input_ids"] == trained
            prompt = messages[:-1]
            text = hf.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            sampled = encode_prompt(ours, prompt, cfg.chat_template, template_system(ours.chat_template))
            assert hf(text, add_special_tokens=False)["input_ids"] == sampled == trained[:len(sampled)]
        assert "<|im_start|>system\n<|im_end|>" in hf.apply_chat_template(conversations[0], tokenize=False)


# --- 5. DPO step 1: policy == reference, exactly ------------------------------------------------------


@pytest.mark.parametrize("precompute", ["true", "false"])
@pytest.mark.parametrize("max_len", [40, 256], ids=["short_rows", "packed_rows"])
def test_dpo_step_1_rewards_are_exactly_zero_on_the_cpu_in_fp32(tiny_chat_model, tmp_path, precompute, max_len):
    out = tmp_path / "dpo"
    train_dpo.main([f"--model={tiny_chat_model['model']}", f"--data={tiny_chat_model['prefs']}", f"--out_dir={out}",
                    "--batch_size=8", "--micro_batch_size=2", f"--max_len={max_len}", "--max_prompt_len=24",
                    "--max_steps=2", "--seed=3", f"--precompute_ref={precompute}", "--device=cpu", "--lr=1e-3"])
    first, second = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()[:2]]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logratios/chosen", "logratios/rejected"):
        assert first[key] == 0.0, (key, first[key])
    assert first["rewards/accuracies"] == 0.0  # a tie is not a correct preference (as TRL counts it)
    assert second["rewards/margins"] != 0.0  # (the policy moved: the check can fail)


# --- 3. a reward-model judge with its own tokenizer and chat template -------------------------------


@pytest.fixture(scope="module")
def own_reward_models(tmp_path_factory):
    """Reward models whose small Gemma tokenizer lacks ChatML's tokens: one carrying the Gemma
    template (chat_template.jinja, as transformers saves it), one carrying no template."""
    from conftest import make_hf_checkpoint
    from tokenizers_for_tests import build_gemma_tokenizer

    from lion_min.core.chat import get_template

    root = tmp_path_factory.mktemp("own_rm")
    for name in ("with_template", "without_template"):
        make_hf_checkpoint("gemma-2b", root / name, vocab_size=649, auto_class="AutoModelForSequenceClassification",
                           num_labels=1, pad_token_id=0)
        build_gemma_tokenizer(root / name)
    (root / "with_template" / "chat_template.jinja").write_text(get_template("gemma").jinja)
    return root


def test_a_reward_model_judge_renders_with_its_own_tokenizer_and_template(own_reward_models, tiny_online_argv,
                                                                          tmp_path, capsys):
    from transformers import AutoTokenizer

    from lion_min.run.judges import RewardModelJudge

    import train_online

    rm = own_reward_models / "with_template"
    prompt = [{"role": "user", "content": "What is the capital of France?"}]
    judge = RewardModelJudge(rm)
    hf = AutoTokenizer.from_pretrained(rm)
    for response in ("Paris.", "The capital of France is Paris, on the Seine."):
        want = hf.apply_chat_template(prompt + [{"role": "assistant", "content": response}], tokenize=True,
                                      return_dict=False)
        assert judge.encode(prompt, response) == want
    argv = tiny_online_argv(tmp_path / "online")
    argv[2] = f"--judge={rm}"
    train_online.main(argv)  # the policy speaks ChatML; the judge's tokenizer has no <|im_start|>
    records = [json.loads(x) for x in (tmp_path / "online" / "round_0.jsonl").read_text().splitlines()]
    assert all(len(set(r["scores"])) > 1 for r in records)  # real, differing reward-model scores


def test_a_judge_folder_without_a_template_is_named_before_weights_load(own_reward_models, tiny_online_argv, tmp_path,
                                                                       monkeypatch, capsys):
    import lion_min.formats.hf
    import train_online
    from lion_min.core.chat import get_template

    rm = own_reward_models / "without_template"
    argv = tiny_online_argv(tmp_path / "online")
    argv[2] = f"--judge={rm}"
    monkeypatch.setattr(lion_min.formats.hf, "load_weights", lambda *a, **k: 1 / 0)
    with pytest.raises(SystemExit):
        run_cli(lambda: train_online.main(argv))
    err = capsys.readouterr().err
    assert err.startswith(f"error: --judge={rm}: its tokenizer carries no chat_template; name the one it was trained "
                          f"with: --judge_template=FILE.jinja or") and err.count("\n") == 1, err
    # The same command alone: the judge's folder is read without torch being imported.
    res = subprocess.run([sys.executable, "-X", "importtime", str(ROOT / "train_online.py"), *argv],
                         capture_output=True, text=True, env=ENV)
    said = [line for line in res.stderr.splitlines() if not line.startswith("import time:")]
    assert res.returncode == 2 and said == [err.strip()] and "torch" not in imported(res.stderr)
    monkeypatch.undo()
    (tmp_path / "gemma.jinja").write_text(get_template("gemma").jinja)
    train_online.main([*argv, f"--judge_template={tmp_path / 'gemma.jinja'}"])  # followed: it runs
    assert (tmp_path / "online" / "summary.json").is_file()


# --- 7. a tiny random checkpoint of a named family, with a real tokenizer ---------------------------


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama3", "llama3.2"])
def test_tiny_writes_a_real_shaped_checkpoint_that_transformers_and_the_recipe_take(tmp_path, family, capsys):
    import torch
    import transformers
    from tokenizers_for_tests import build_llama3_tokenizer

    from lion_min.formats.hf import load_model
    from lion_min.demo.tiny import main

    tok = build_llama3_tokenizer(tmp_path / "tok")
    out = tmp_path / "tiny"
    assert main([f"--family={family}", f"--tokenizer={tok}", f"--out={out}", "--layers=1"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["vocab_size"] == 128256 and config["rope_theta"] == 500000.0
    assert config["bos_token_id"] == 128000 and config["tie_word_embeddings"] == (family == "llama3.2")
    assert (config.get("rope_scaling") or {}).get("rope_type") == ("llama3" if family == "llama3.2" else None)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([[128000, 9906, 1917, 0, 13]])
    with torch.no_grad():
        torch.testing.assert_close(load_model(out)(ids), hf(ids).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="exists and is not an empty folder"):
        main([f"--family={family}", f"--tokenizer={tok}", f"--out={out}"])
    data = tmp_path / "chats.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]})
                    + "\n")
    train_sft.main(["--preset=lion-llama3-8b", f"--model={out}", f"--data={data}", f"--out_dir={tmp_path / 'sft'}",
                    *SMALL, "--batch_size=1", "--max_steps=1"])
    assert (tmp_path / "sft" / "model.safetensors").is_file()


# --- 6. live metrics: --report_to ---------------------------------------------------------------------


def test_report_to_tensorboard_holds_the_scalars_of_metrics_jsonl_and_a_resume_appends(tiny_chat_model, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    argv = sft_argv(tiny_chat_model, out, "--report_to=tensorboard", "--save_every=2", "--eval_fraction=0.2")
    train_sft.main([*argv, "--max_steps=4"])
    train_sft.main([*argv, "--max_steps=6", "--resume=auto"])  # continues the finished run: the same TB run
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    sent = {(tag, e.step): e.value for tag in events.Tags()["scalars"] for e in events.Scalars(tag)}
    want = {(k, line["step"]): v for line in lines for k, v in line.items() if k != "step"}
    assert sorted(sent) == sorted(want)  # the same scalars, no more and no fewer
    assert all(sent[k] == pytest.approx(v, rel=1e-6, abs=1e-12) for k, v in want.items())  # (stored as float32)
    assert [s for _, s in sent if _ == "loss"] == [1, 2, 3, 4, 5, 6] and ("eval/loss", 6) in sent


def test_report_to_wandb_offline(tiny_chat_model, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "run"
    train_sft.main(sft_argv(tiny_chat_model, out, "--report_to=wandb", "--max_steps=2"))
    run_id = (out / "wandb_id").read_text()
    assert any(p.name.endswith(run_id) for p in (out / "wandb").iterdir())


def test_report_to_a_missing_package_is_one_line_before_anything_loads(tiny_chat_model, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"--report_to=wandb: the wandb package is not installed \(pip install wandb"):
        train_sft.main(sft_argv(tiny_chat_model, tmp_path / "run", "--report_to=wandb"))
    assert not (tmp_path / "run").exists()
