"""Shared fixtures: tiny random Hugging Face checkpoints built from the real config.json files.

Sizes are scaled down (layers, hidden, heads, vocab) but every other key of the real file is kept,
so each quirk (multi-query attention, gemma-7b's head_dim, llama3 RoPE scaling, tied heads) is
exercised. Weights use std 0.2 and random norm weights: at the default std 0.02 logits stay near
zero and real mistakes (exact vs tanh GELU, say) hide below the tolerance.
"""

import json
from pathlib import Path

import pytest
import torch

DATA = Path(__file__).parent / "data"
CONFIG_NAMES = ["gemma-2b", "gemma-7b", "llama-3-8b", "llama-3.1-8b", "llama-3.2-1b", "gemma-2-2b-it", "gemma-3-1b-it"]

# Scaled-down sizes per config. gemma-7b keeps head_dim != hidden / heads (48 / 4 = 12 vs 16);
# llama-3.1 keeps head_dim 16 so some RoPE frequencies fall in the llama3 interpolation band.
_SMALL = {
    "gemma-2b": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=1, head_dim=32),
    "gemma-7b": dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=4, head_dim=16),
    "llama-3-8b": dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=2),
    "llama-3.1-8b": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2),
    "llama-3.2-1b": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16),
    # Gemma-2/3: a window of 4 tokens, so that every test's documents run past it. Gemma-2's attention
    # cap 50 barely bends std-0.2 scores (dropping it moved logits by 0.017): 2 here makes it act.
    # query_pre_attn_scalar 256 stays (scale 1/16, not head_dim's 1/4). Gemma-3: every second layer
    # global (the real pattern is 6, which would leave 2 layers both local).
    "gemma-2-2b-it": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=4,
                          attn_logit_softcapping=2.0),
    "gemma-3-1b-it": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=4,
                          sliding_window_pattern=2),
}


def small_config(name: str, vocab_size: int = 512) -> dict:
    cfg = json.loads((DATA / "configs" / f"{name}.json").read_text())
    cfg.update(_SMALL[name], num_hidden_layers=2, intermediate_size=96, vocab_size=vocab_size)
    if cfg["model_type"] == "llama":  # keep the special ids inside the small vocabulary
        cfg.update(bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1)
    return cfg


def make_hf_checkpoint(name: str, out_dir: Path, std: float = 0.2, seed: int = 0, vocab_size: int = 512,
                       auto_class: str = "AutoModelForCausalLM", **overrides) -> Path:
    """Write a random transformers checkpoint (fp32) for config `name` into out_dir; auto_class
    AutoModelForSequenceClassification gives a reward model."""
    import transformers

    cfg = small_config(name, vocab_size) | overrides
    model_type = cfg.pop("model_type")
    config = transformers.AutoConfig.for_model(
        model_type, **{k: v for k, v in cfg.items() if k not in ("architectures", "transformers_version")})
    torch.manual_seed(seed)
    model = getattr(transformers, auto_class).from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(torch.randn_like(p) * 0.5 + (0.0 if model_type.startswith("gemma") else 1.0))
            else:
                p.normal_(0.0, std)
    model.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    # Tiny models: one intra-op thread is as fast, and on a shared 2-core machine OpenMP threads
    # waiting for each other made each tiny matmul take ~20 ms instead of ~10 us.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {name: make_hf_checkpoint(name, root / name) for name in CONFIG_NAMES}


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama checkpoint with a small ChatML tokenizer in the same folder, 48 short
    conversations (`data`) and 40 preference pairs (`prefs`) as JSONL."""
    from tokenizers_for_tests import build_gemma_chatml_tokenizer

    root = tmp_path_factory.mktemp("chat_model")
    model = make_hf_checkpoint("llama-3-8b", root / "model", std=0.05, vocab_size=1024)
    build_gemma_chatml_tokenizer(model)
    cfg = json.loads((model / "config.json").read_text())
    cfg.update(bos_token_id=2, eos_token_id=1, pad_token_id=0)
    (model / "config.json").write_text(json.dumps(cfg))
    lines = []
    for i in range(48):
        turns = [{"role": "user", "content": f"What is {i} plus {i % 7}?"},
                 {"role": "assistant", "content": f"{i} plus {i % 7} is {i + i % 7}."}]
        if i % 3 == 0:
            turns += [{"role": "user", "content": "Thanks!"}, {"role": "assistant", "content": "You are welcome."}]
        lines.append(json.dumps({"messages": turns}))
    (root / "chats.jsonl").write_text("\n".join(lines) + "\n")
    prefs = [json.dumps({"prompt": f"What is {i} times {i % 5}?", "chosen": f"It is {i * (i % 5)}.",
                         "rejected": f"Maybe {i * (i % 5) + 1 + i % 3}? Not sure." * (1 + i % 2)})
             for i in range(40)]
    (root / "prefs.jsonl").write_text("\n".join(prefs) + "\n")
    return {"model": model, "data": root / "chats.jsonl", "prefs": root / "prefs.jsonl", "root": root}


@pytest.fixture(scope="session")
def tiny_online_argv(tiny_chat_model):
    """argv(out_dir, rounds=1): a seconds-long online run of tiny_chat_model on 8 prompts ("Say a." ...),
    judged by length; --judge is argv[2] and --temperature the last flag, for tests that change one."""
    prompts = tiny_chat_model["root"] / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say {w}."}) + "\n" for w in "abcdefgh"))

    def argv(out_dir: Path, rounds: int = 1) -> list[str]:
        return [f"--model={tiny_chat_model['model']}", f"--prompts={prompts}", "--judge=length", f"--out_dir={out_dir}",
                "--n_samples=3", "--max_new_tokens=6", f"--rounds={rounds}", "--batch_size=4", "--micro_batch_size=2",
                "--max_len=64", "--max_prompt_len=48", "--lr=1e-3", "--device=cpu", "--temperature=1.0"]

    return argv


@pytest.fixture(scope="session", autouse=True)
def _data_cache_in_tmp(tmp_path_factory):
    """The suite's prepared data (--data_cache=auto) goes to a temporary folder, not the user's
    ~/.cache; subprocesses inherit the variable."""
    import os

    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg_cache"))
    yield
    if old is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = old
