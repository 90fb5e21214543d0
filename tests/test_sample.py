"""The sampler: greedy parity with transformers' generate, cache == full forward, the sampling
distribution, stop tokens, and the CLI end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers

import lion_min
from conftest import CONFIG_NAMES, make_hf_checkpoint
from lion_min.run.config import ConfigError
from lion_min.core.args import ModelArgs
from lion_min.core.model import Transformer
from lion_min.cli import sample_main as main
from lion_min.core.sample import filter_logits, generate, sample_next
from lion_min.run.prompts import read_prompts
from tokenizers_for_tests import build_gemma_tokenizer

ROOT = Path(__file__).resolve().parents[1]
LENS = (5, 11, 1, 8)  # prompt lengths: the batch is left-padded to 11


def run_module(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "lion_min", "sample", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True)


def make_prompts(lens=LENS, vocab=512, seed=0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab - 3, (n,), generator=g).tolist() for n in lens]


@pytest.fixture(scope="module")
def llama(hf_checkpoints):
    return lion_min.load_model(hf_checkpoints["llama-3-8b"])


def caches_cleared(model) -> bool:
    return all(layer.attention.cache is None for layer in model.layers) and model.cache_doc is None


# --- greedy parity -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_greedy_equals_transformers_generate(hf_checkpoints, name):
    n_new = 12
    prompts = make_prompts()
    ours = lion_min.load_model(hf_checkpoints[name])
    out = generate(ours, prompts, n_new, temperature=0)
    assert caches_cleared(ours)

    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_checkpoints[name], dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # never stop early: compare all n_new tokens
    T = max(LENS)
    ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        hf_out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n_new, do_sample=False,
                             pad_token_id=0)
    assert hf_out.shape == (len(prompts), T + n_new)
    assert out == hf_out[:, T:].tolist()
    # Left padding really mattered: each row equals that prompt generated alone (no padding), and the
    # rows are not all the same continuation.
    assert [generate(ours, [p], n_new, temperature=0)[0] for p in prompts] == out
    assert len({tuple(r) for r in out}) == len(prompts)


def test_cache_logits_equal_full_forward(hf_checkpoints):
    # The hidden states the sampler computed through the KV cache (captured at the final norm, the
    # last position of each call) give the same logits as a full forward over prompt + generated.
    for name in ("gemma-2b", "llama-3.1-8b"):
        model = lion_min.load_model(hf_checkpoints[name])
        prompts, n_new = make_prompts(seed=1), 7
        seen = []
        handle = model.norm.register_forward_hook(lambda m, inp, out: seen.append(out[:, -1].clone()))
        out = generate(model, prompts, n_new, temperature=0)
        handle.remove()
        assert len(seen) == n_new  # one prefill + n_new - 1 decode steps
        with torch.no_grad():
            step_logits = F.linear(torch.stack(seen), model.head_weight)  # (steps, B, V)
            for b, (p, new) in enumerate(zip(prompts, out)):
                full = model(torch.tensor([p + new]))[0]  # (len, V)
                torch.testing.assert_close(step_logits[:, b], full[len(p) - 1: len(p) - 1 + n_new],
                                           atol=2e-5, rtol=2e-5)
                assert step_logits[:, b].argmax(-1).tolist() == new


def test_batch_size_chunks_give_same_greedy_tokens(llama):
    prompts = make_prompts(lens=(4, 9, 2, 7, 3))
    full, stats = generate(llama, prompts, 6, temperature=0, return_stats=True)
    chunked, cstats = generate(llama, prompts, 6, temperature=0, batch_size=2, return_stats=True)
    assert chunked == full
    assert stats.prompts == cstats.prompts == 5 and stats.new_tokens == cstats.new_tokens == 30
    assert stats.prompt_tokens == sum((4, 9, 2, 7, 3)) and stats.tokens_per_s > 0


# --- stop tokens and lengths -------------------------------------------------------------------------


def cut_after(row, stops):
    for j, t in enumerate(row):
        if t in stops:
            return row[: j + 1]
    return row


def test_stop_tokens_and_max_new_tokens(llama):
    prompts, n_new = make_prompts(seed=2), 10
    free = generate(llama, prompts, n_new, temperature=0)
    assert [len(r) for r in free] == [n_new] * len(prompts)

    # A stop token that occurs in row 0 at step 4: that row ends there (stop token kept); the
    # others run on unless they produce it.
    stop = free[0][4]
    out = generate(llama, prompts, n_new, temperature=0, stop_ids=[stop])
    assert out == [cut_after(r, {stop}) for r in free]
    assert out[0][-1] == stop and len(out[0]) == 1 + free[0].index(stop) <= 5

    # Every row stops early: the loop ends as soon as the last row has finished.
    stops = {r[2] for r in free}
    out, stats = generate(llama, prompts, n_new, temperature=0, stop_ids=sorted(stops), return_stats=True)
    expected = [cut_after(r, stops) for r in free]
    assert out == expected and all(len(r) <= 3 for r in out)
    assert stats.steps == max(len(r) for r in expected) - 1 < n_new - 1
    assert stats.new_tokens == sum(len(r) for r in expected)

    # A stop id that never occurs changes nothing; max_new_tokens=0 returns nothing.
    never = next(t for t in range(512) if all(t not in r for r in free))
    assert generate(llama, prompts, n_new, temperature=0, stop_ids=[never]) == free
    assert generate(llama, prompts, 0) == [[] for _ in prompts]
    assert caches_cleared(llama)


def test_bad_arguments(llama):
    with pytest.raises(ValueError, match="at least one token"):
        generate(llama, [[1, 2], []], 4)
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(llama, [[1, 2]], llama.args.max_seq_len)
    with pytest.raises(ValueError, match="top_p"):
        generate(llama, [[1, 2]], 4, top_p=0.0)


# --- sampling ----------------------------------------------------------------------------------------


def test_seed_reproducible_and_seeds_differ(llama):
    prompts = make_prompts(seed=3)
    a = generate(llama, prompts, 16, temperature=1.0, seed=7)
    b = generate(llama, prompts, 16, temperature=1.0, seed=7)
    c = generate(llama, prompts, 16, temperature=1.0, seed=8)
    d = generate(llama, prompts, 16, temperature=1.0, generator=torch.Generator().manual_seed(7))
    assert a == b == d
    assert a != c
    assert a != generate(llama, prompts, 16, temperature=0)


def test_filter_logits_by_hand():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()  # probabilities, sorted
    inf = float("-inf")
    kept = lambda **kw: (filter_logits(logits, **kw)[0] > inf).tolist()  # noqa: E731
    assert kept(top_k=2) == [True, True, False, False]
    assert kept(top_k=10) == [True] * 4
    assert kept(top_p=0.45) == [True, False, False, False]  # the top token alone has mass >= 0.45
    assert kept(top_p=0.75) == [True, True, False, False]
    assert kept(top_p=0.85) == [True, True, True, False]
    assert kept(top_p=0.99) == [True] * 4
    assert kept(top_k=1, top_p=0.99) == [True, False, False, False]
    shuffled = logits[:, [2, 0, 3, 1]]  # the same set, whatever the order of the vocabulary
    assert (filter_logits(shuffled, top_p=0.75)[0] > inf).tolist() == [False, True, False, True]
    assert sample_next(shuffled, temperature=0).tolist() == [1]


@pytest.fixture(scope="module")
def vocab8():
    """A tiny model with an 8-token vocabulary and a first-token distribution far from uniform."""
    args = ModelArgs(vocab_size=8, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8, hidden_dim=32)
    model = Transformer(args)
    model.init_weights(std=0.5, seed=0)
    prompt = [1, 5, 2]
    with torch.no_grad():
        logits = model(torch.tensor([prompt]))[0, -1]
    return model.eval(), prompt, logits


def first_token_counts(model, prompt, n, **kw):
    out = generate(model, [prompt] * n, 1, seed=0, **kw)
    return torch.bincount(torch.tensor([r[0] for r in out]), minlength=8).float()


def chi_square(counts, probs):
    """Pearson's statistic over the tokens the distribution allows; inf if a forbidden one appears."""
    allowed = probs > 0
    if counts[~allowed].sum() > 0:
        return float("inf")
    expected = probs[allowed] * counts.sum()
    return float(((counts[allowed] - expected) ** 2 / expected).sum())


N = 20000
BOUND = 30.0  # chi-square with <= 7 degrees of freedom: P(> 30) < 1e-4 for a correct sampler


def test_temperature_follows_the_model_distribution(vocab8):
    model, prompt, logits = vocab8
    counts = first_token_counts(model, prompt, N, temperature=0.7)
    right, wrong = logits.div(0.7).softmax(-1), logits.softmax(-1)
    assert chi_square(counts, right) < BOUND
    assert chi_square(counts, wrong) > 10 * BOUND  # the check can tell temperature 0.7 from 1
    assert (counts / N - right).abs().max() < 0.015


def test_top_k_and_top_p_restrict_the_support(vocab8):
    model, prompt, logits = vocab8
    probs = logits.softmax(-1)
    order = probs.argsort(descending=True)

    counts = first_token_counts(model, prompt, N, top_k=3)
    top3 = torch.zeros(8).index_fill(0, order[:3], 1.0) * probs
    assert chi_square(counts, top3 / top3.sum()) < BOUND
    assert (counts > 0).sum() == 3

    cum = probs[order].cumsum(0)
    p = float(cum[2] + cum[3]) / 2  # needs the top 4 tokens (the top 3 hold less than p)
    counts = first_token_counts(model, prompt, N, top_p=p)
    top4 = torch.zeros(8).index_fill(0, order[:4], 1.0) * probs
    assert chi_square(counts, top4 / top4.sum()) < BOUND
    assert (counts > 0).sum() == 4


# --- CLI ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny Gemma checkpoint with the small Gemma tokenizer in the same folder."""
    folder = tmp_path_factory.mktemp("cli") / "model"
    make_hf_checkpoint("gemma-2b", folder, vocab_size=649)  # the test tokenizer's vocabulary
    build_gemma_tokenizer(folder)
    return folder


def test_cli_end_to_end(chat_model, tmp_path, capsys):
    from lion_min.core.chat import encode_chat, stop_token_ids
    from lion_min.formats.tokenizer import Tokenizer

    file = tmp_path / "prompts.jsonl"
    file.write_text(json.dumps({"prompt": "What is the capital of France?"}) + "\n"
                    + json.dumps({"prompt": [{"role": "user", "content": "Hello there!"}]}) + "\n")
    texts = main([f"--model={chat_model}", "--prompt=Write a short poem.", f"--prompts_file={file}",
                  "--chat_template=gemma", "--max_new_tokens=8", "--temperature=0", "--device=cpu"])
    printed = capsys.readouterr().out
    assert len(texts) == 3 and "tok/s" in printed and all(t in printed for t in texts)

    # The same as calling generate on the encoded conversations.
    tok, model = Tokenizer.from_dir(chat_model), lion_min.load_model(chat_model)
    convs = [[{"role": "user", "content": c}] for c in ("Write a short poem.", "What is the capital of France?",
                                                        "Hello there!")]
    stops = stop_token_ids(tok, "gemma")
    ids = [encode_chat(tok, c, "gemma", add_generation_prompt=True).input_ids for c in convs]
    out = generate(model, ids, 8, temperature=0, stop_ids=stops)
    assert texts == [tok.decode([t for t in r if t not in stops]) for r in out]

    # Plain text file, raw prompts (BOS + text).
    plain = tmp_path / "prompts.txt"
    plain.write_text("first prompt\n\nsecond prompt\n")
    assert len(main([f"--model={chat_model}", f"--prompts_file={plain}", "--chat_template=none", "--max_new_tokens=3",
                     "--device=cpu"])) == 2


def test_cli_takes_the_chat_template_from_the_model_folder(chat_model, tmp_path, capsys):
    import shutil

    from lion_min.core.chat import TEMPLATES

    folder = tmp_path / "model"
    shutil.copytree(chat_model, folder)

    def sample(*flags):
        texts = main([f"--model={folder}", "--prompt=Hello there!", "--max_new_tokens=4", "--temperature=0",
                      "--device=cpu", *flags])
        chosen = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("chat template:")]
        assert len(chosen) == 1  # one line says which template is used
        return texts, chosen[0]

    raw, line = sample()  # no template anywhere in the folder: raw text
    assert line == f"chat template: none ({folder} has no chat template: raw text)"
    assert sample("--chat_template=none") == (raw, "chat template: none (--chat_template)")
    gemma, _ = sample("--chat_template=gemma")
    assert gemma != raw  # the template changes the prompt, so the check below can tell them apart

    # The tokenizer's template, when it is exactly a known one.
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps(config | {"chat_template": TEMPLATES["gemma"].jinja}))
    assert sample() == (gemma, f"chat template: gemma (the tokenizer's template in {folder})")

    # A lion_min run's train_config.json comes first.
    (folder / "train_config.json").write_text(json.dumps({"chat_template": "gemma", "lr": 1e-5}))
    assert sample() == (gemma, f"chat template: gemma (from {folder / 'train_config.json'})")
    (folder / "train_config.json").write_text(json.dumps({"chat_template": "vicuna"}))
    with pytest.raises(ConfigError, match=r"train_config.json: chat_template 'vicuna' is not one lion_min knows; pass "
                                          r"--chat_template=none for raw text or name one \(llama3, gemma, gemma3, chatml\)$"):
        sample()
    (folder / "train_config.json").unlink()

    # A template lion_min does not know is reported; none or a named one still work.
    config_file.write_text(json.dumps(config | {"chat_template": TEMPLATES["gemma"].jinja + " "}))
    with pytest.raises(ConfigError, match=r"model: its tokenizer's chat template is not one lion_min knows; pass "
                                          r"--chat_template=none for raw text or name one"):
        sample()
    assert sample("--chat_template=none")[0] == raw
    assert sample("--chat_template=gemma")[0] == gemma


def test_cli_errors(chat_model, tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        main([f"--model={chat_model}", f"--prompts_file={tmp_path / 'missing.jsonl'}"])
    with pytest.raises(ConfigError, match="--prompt"):
        main([f"--model={chat_model}"])
    with pytest.raises(ValueError, match="--chat_template=vicuna: expected one of auto, chatml, llama3, gemma, gemma3, none"):
        main([f"--model={chat_model}", "--prompt=hi", "--chat_template=vicuna"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt field"}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl: line 1: expected an object with a \"prompt\" field"):
        main([f"--model={chat_model}", f"--prompts_file={bad}"])
    # As a module: a missing model folder is one clear line and a non-zero exit.
    missing = tmp_path / "no_such_model"
    r = run_module(f"--model={missing}", "--prompt=hi")
    assert r.returncode == 2 and r.stderr.startswith("error:") and str(missing) in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_cli_as_module(chat_model):
    r = run_module(f"--model={chat_model}", "--prompt=Hello", "--chat_template=gemma", "--max_new_tokens=4",
                   "--seed=3", "--device=cpu")
    assert r.returncode == 0, r.stderr
    assert "[0] prompt: 'Hello'" in r.stdout and "tok/s" in r.stdout


def test_prompts_file_formats(tmp_path):
    """A prompts .jsonl line: "prompt" as text or messages, or an SFT file's "messages", whose prompt
    is the conversation less its final reply."""
    u, a, s = ({"role": r, "content": c} for r, c in (("user", "q"), ("assistant", "r"), ("system", "be brief")))
    lines = [{"prompt": "hi"}, {"prompt": [s, u]}, {"messages": [s, u, a]}, {"messages": [u, a, u, a]},
             {"messages": [u]}]
    good = tmp_path / "prompts.jsonl"
    good.write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert read_prompts(str(good)) == ["hi", [s, u], [s, u], [u, a, u], [u]]
    bad = {"only_reply": ({"messages": [a]}, r"line 1: 'messages': the last turn must be the user's \(no turns\)"),
           "ends_with_reply": ({"prompt": [u, a]},
                               r"line 1: 'prompt': the last turn must be the user's \(got assistant\)"),
           "bad_role": ({"messages": [{"role": "bot", "content": "x"}, u]},
                        r"line 1: 'messages\[0\].role': unknown role 'bot'"),
           "system_only": ({"prompt": [s]}, r"line 1: 'prompt': the last turn must be the user's \(got system\)"),
           "no_content": ({"prompt": [{"role": "user"}]}, r"line 1: 'prompt\[0\].content': missing")}
    for name, (record, message) in bad.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text(json.dumps(record) + "\n")
        with pytest.raises(ConfigError, match=f"{name}.jsonl: {message}"):
            read_prompts(str(path))


@pytest.mark.parametrize("temperature", ["1.0", "0"])
def test_cli_weights_holding_nan_one_line(chat_model, tmp_path, capsys, temperature):
    import shutil

    from safetensors.torch import load_file, save_file

    from lion_min.cli import run_cli

    folder = tmp_path / "diverged"
    shutil.copytree(chat_model, folder)
    weights = load_file(str(folder / "model.safetensors"))
    weights["model.layers.0.mlp.down_proj.weight"][0, 0] = float("nan")  # what a diverged run exports
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main([f"--model={folder}", "--prompt=Hello", "--chat_template=gemma", "--max_new_tokens=4",
                              f"--temperature={temperature}", "--device=cpu"]))
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1
    assert err[0].startswith("error: the model's logits are not finite (NaN/inf)")
