"""Bad input across the three scripts: one clear error naming the file / line / key, a non-zero exit,
and no output folder left behind."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_dpo  # noqa: E402
import train_online  # noqa: E402
import train_sft  # noqa: E402
from lion_min.cli import run_cli  # noqa: E402
from tokenizers_for_tests import build_gemma_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def files(tiny_chat_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    good = tiny_chat_model["data"]
    lines = good.read_text().splitlines()
    (root / "malformed.jsonl").write_text("\n".join(lines[:2] + ['{"messages": [oops'] + lines[3:5]) + "\n")
    (root / "noassistant.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    (root / "badrole.jsonl").write_text(lines[0] + "\n" + json.dumps(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}) + "\n")
    (root / "wrongschema.jsonl").write_text(json.dumps({"text": "just text"}) + "\n")
    (root / "empty.jsonl").write_text("")
    (root / "sft_format.jsonl").write_text("\n".join(lines[:3]) + "\n")
    (root / "bad_prompts.jsonl").write_text('{"prompt": "a"}\n\n{"prompt": \n')
    (root / "empty_prompts.jsonl").write_text("\n")
    (root / "prefs_missing.jsonl").write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n"
                                              + json.dumps({"prompt": "q", "chosen": "a"}) + "\n")
    (root / "sub").mkdir()
    shutil.copy(good, root / "sub" / "chats.jsonl")
    (root / "utf8_prompts.txt").write_bytes(b"fine\n\nalso fine\nbroken \xff here\n")
    # Checkpoints broken in the ways a download or a hand edit breaks them.
    model = tiny_chat_model["model"]
    for name in ("corrupt", "types", "bigvocab", "otherarch", "badindex", "kvheads"):
        shutil.copytree(model, root / name)
    (root / "badindex" / "model.safetensors.index.json").write_text('{"weight_map": {"a": ')
    data = (model / "model.safetensors").read_bytes()
    (root / "corrupt" / "model.safetensors").write_bytes(data[: len(data) // 3])
    config = json.loads((model / "config.json").read_text())
    (root / "types" / "config.json").write_text(json.dumps(config | {"hidden_size": str(config["hidden_size"])}))
    (root / "bigvocab" / "config.json").write_text(json.dumps(config | {"vocab_size": 100}))
    (root / "otherarch" / "config.json").write_text(json.dumps(config | {"num_hidden_layers": 1}))
    (root / "kvheads" / "config.json").write_text(json.dumps(config | {"num_key_value_heads": 3}))
    (root / "same_sides.jsonl").write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "a", "rejected": "a"}) + "\n"
                                                   for i in range(8)))
    # A checkpoint whose tokenizer (Gemma-like) lacks ChatML's and Llama-3's special tokens.
    plain = root / "plain_tok_model"
    shutil.copytree(tiny_chat_model["model"], plain)
    build_gemma_tokenizer(plain)
    return {"root": root, "good": good, "model": tiny_chat_model["model"], "prefs": tiny_chat_model["prefs"],
            "plain": plain}


def sft(f, out, **over):
    a = dict(model=f["model"], data=f["good"], out_dir=out, seq_len=96, batch_size=4, micro_batch_size=1,
             max_steps=1, device="cpu") | over
    return [f"--{k}={v}" for k, v in a.items()]


# Why --attn_backend=varlen cannot run on this CPU: no kernel here, or, before torch 2.10, no varlen at all
# (the message for the installed torch is checked; the README lists both).
NO_VARLEN = {True: "--attn_backend=varlen: FlashAttention's varlen kernel runs on CUDA in bfloat16/float16 only, "
                   "not cpu float32 (torch ",
             False: "has no usable torch.nn.attention.varlen.varlen_attn (it appeared in torch 2.10)"}
HAS_VARLEN = importlib.util.find_spec("torch.nn.attention.varlen") is not None

CASES = [
    # (script, overrides, expected message)
    ("sft", {"data": "{root}/nope.jsonl"}, "nope.jsonl: no such file or folder"),
    ("sft", {"data": "{root}/malformed.jsonl"}, "malformed.jsonl: line 3"),
    ("sft", {"data": "{root}/noassistant.jsonl"}, "noassistant.jsonl: line 1"),
    ("sft", {"data": "{root}/badrole.jsonl"}, "badrole.jsonl: line 2: 'messages[1].role'"),
    ("sft", {"data": "{root}/wrongschema.jsonl"}, "wrongschema.jsonl: line 1: cannot tell the schema"),
    ("sft", {"data": "{root}/empty.jsonl"}, "empty.jsonl: no records"),
    ("sft", {"model": "{root}/no_model"}, "no_model: no such checkpoint folder"),
    ("sft", {"model": "{plain}", "chat_template": "llama3"}, "lacks the special token '<|start_header_id|>'"),
    ("sft", {"micro_batch_size": 8}, "--micro_batch_size=8 is larger than --batch_size=4"),
    ("sft", {"seq_len": 100000}, "--seq_len=100000 is above the model's max_position_embeddings (8192)"),
    ("sft", {"chat_template": "vicuna"}, "--chat_template=vicuna: expected one of llama3, gemma, gemma3, chatml, auto"),
    ("sft", {"preset": "lion-mistral"}, "--preset=lion-mistral: unknown preset"),
    ("sft", {"data": ""}, "--data is required (run with no flags at all for the built-in demo)"),
    ("sft", {"learning_rate": "1e-5"}, "unknown option --learning_rate: lion_min calls it --lr"),
    ("dpo", {"data": ""}, "--data is required"),
    ("online", {"judge": ""}, "--judge is required"),
    ("sft", {"lr": "fast"}, "--lr: expected float"),
    ("sft", {"lr_rate": 1}, "unknown option --lr_rate"),
    ("sft", {"dtype": "fp8"}, "--dtype=fp8: expected one of auto, float32, bfloat16"),
    ("sft", {"batch_size": 6, "micro_batch_size": 4}, "--batch_size=6 must be a multiple of --micro_batch_size * world size = 4 * 1"),
    ("sft", {"resume": "{root}/no_ckpt"}, "no_ckpt: not a complete checkpoint folder"),
    ("sft", {"batch_size": 1000}, "only 32 packed rows of data for --batch_size=1000"),
    ("sft", {"model": "no-such-org/no-such-model"}, "no-such-org/no-such-model: could not get it from the Hugging Face hub"),
    ("dpo", {"data": "{root}/prefs_missing.jsonl"}, "prefs_missing.jsonl: line 2: 'rejected'"),
    ("dpo", {"data": "{root}/sft_format.jsonl"}, "sft_format.jsonl: line 1: cannot tell the schema"),
    ("dpo", {"ref_model": "{root}/no_ref"}, "no_ref: no such checkpoint folder"),
    ("dpo", {"loss_type": "kto"}, "--loss_type=kto: expected one of sigmoid, ipo, hinge"),
    ("dpo", {"max_prompt_len": 4096, "max_len": 2048}, "--max_prompt_len=4096 must be smaller than --max_len=2048"),
    ("online", {"prompts": "{root}/no_prompts.jsonl"}, "no_prompts.jsonl: no such file"),
    ("online", {"prompts": "{root}/bad_prompts.jsonl"}, "bad_prompts.jsonl: line 3: not valid JSON"),
    ("online", {"prompts": "{root}/empty_prompts.jsonl"}, "empty_prompts.jsonl: no prompts"),
    ("online", {"judge": "oracle"}, "unknown judge 'oracle'"),
    ("online", {"judge": "{root}/no_rm"}, "no_rm: no such checkpoint folder"),
    ("online", {"n_samples": 1}, "--n_samples=1: need at least 2 samples"),
    ("online", {"prompts": "{root}/utf8_prompts.txt"}, "utf8_prompts.txt: line 4: not valid UTF-8"),
    ("sft", {"model": "{root}/corrupt"}, "corrupt/model.safetensors: not a readable safetensors file"),
    ("sft", {"model": "{root}/badindex"}, "badindex/model.safetensors.index.json: not a valid index file"),
    ("sft", {"model": "{root}/kvheads"}, "kvheads/config.json: num_attention_heads (8) is not a multiple of num_key_value_heads (3)"),
    ("dpo", {"data": "{root}/same_sides.jsonl"}, "8 pairs dropped: identical sides (chosen == rejected)"),
    ("online", {"temperature": 0}, "--temperature=0: online DPO samples 2 different responses per prompt, and greedy decoding"),
    ("sft", {"model": "{root}/types"}, "types/config.json: hidden_size must be a positive integer, got '64'"),
    ("sft", {"model": "{root}/bigvocab"}, "bigvocab: the tokenizer has 651 token ids but config.json's vocab_size (the embedding rows) is 100"),
    ("dpo", {"ref_model": "{root}/otherarch"}, "otherarch: another architecture than --model (n_layers 1 vs 2)"),
    ("sft", {"seq_len": 16}, "no target tokens to train on: 48 of 48 conversations have no reply token within "
                             "--seq_len=16"),
    ("sft", {"lr": 0}, "--lr=0.0: must be in (0, inf)"),
    ("sft", {"label_smoothing": 0.1}, "unknown option --label_smoothing"),
    ("dpo", {"loss_type": "ipo", "label_smoothing": 0.1}, "--label_smoothing=0.1 applies to --loss_type=sigmoid only"),
    ("sft", {"attn_backend": "varlen"}, NO_VARLEN[HAS_VARLEN]),
    ("sft", {"device": "cuda"}, "--device=cuda: no CUDA device is available here"),
    ("sft", {"data": "{root}/sub/chats.jsonl", "out_dir": "{root}/sub"}, "contains --data="),
    ("sft", {"out_dir": "{root}/empty.jsonl"}, "empty.jsonl: is a file, not a folder"),
    ("sft", {"out_dir": "/sys/lion_min_run"}, "--out_dir=/sys/lion_min_run: cannot write there"),
]


def build_argv(script, over, f, out):
    fill = lambda v: str(v).format(root=f["root"], plain=f["plain"])
    over = {k: fill(v) for k, v in over.items()}
    if script == "sft":
        return train_sft, sft(f, out, **over)
    base = dict(model=f["model"], out_dir=out, device="cpu", batch_size=4, micro_batch_size=2, max_len=64,
                max_prompt_len=32, max_steps=1)
    if script == "dpo":
        return train_dpo, [f"--{k}={v}" for k, v in (base | {"data": f["prefs"]} | over).items()]
    prompts = f["root"] / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(4)))
    base |= {"prompts": prompts, "judge": "length", "max_new_tokens": 4, "n_samples": 2}
    return train_online, [f"--{k}={v}" for k, v in (base | over).items()]


@pytest.mark.parametrize("script, over, message", CASES, ids=[f"{c[0]}-{'-'.join(c[1])}" for c in CASES])
def test_clear_error_and_no_output(files, tmp_path, monkeypatch, capsys, script, over, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    module, argv = build_argv(script, over, files, out)
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: module.main(argv))  # what `python train_X.py ...` runs
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_operations_page_lists_every_case():
    page = (ROOT / "docs/operations.md").read_text().replace("\\|", "|")  # a table cell writes | as \|
    missing = [message for message in [m for _, _, m in CASES] + list(NO_VARLEN.values()) if message not in page]
    assert not missing, f"docs/operations.md's bad-input table lacks {missing}"


def test_exit_code_and_one_line_on_stderr(files, tmp_path):
    out = tmp_path / "out"
    _, argv = build_argv("sft", {"data": "{root}/malformed.jsonl"}, files, out)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, str(ROOT / "train_sft.py"), *argv], capture_output=True, text=True, env=env)
    assert res.returncode == 2
    assert res.stderr.startswith("error: ") and "malformed.jsonl: line 3" in res.stderr
    assert "Traceback" not in res.stderr and not out.exists()
