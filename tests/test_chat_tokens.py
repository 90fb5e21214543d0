"""The paper's recipe on the paper's checkpoints: ChatML on a base Gemma or Llama-3, whose tokenizers
lack <|im_start|> and <|im_end|>. The SFT stage gives them ids (the family's reserved tokens, else
new ids with embedding rows at the mean), says so in its opening summary, and exports a folder
whose tokenizer transformers renders ChatML with and whose generate stops at <|im_end|>."""

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import train_sft
from conftest import make_hf_checkpoint
from lion_min.core.chat import encode_chat, get_template, render
from lion_min.formats.hf import grow_vocab, load_model
from lion_min.formats.tokenizer import Tokenizer
from test_checkpoint import hub_checkpoint
from test_interop import make_bigram
from tokenizers_for_tests import build_llama3_tokenizer

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def sft(model, tiny, out, capsys, *extra) -> str:
    train_sft.main([f"--model={model}", f"--data={tiny['data']}", f"--out_dir={out}", "--seq_len=96",
                    "--batch_size=2", "--max_steps=1", "--lr=1e-9", "--device=cpu", *extra])
    return capsys.readouterr().out


def untie(folder: Path):
    """Give a tied (Gemma) export its own head, a copy of the embedding, so make_bigram can set it."""
    weights = load_file(str(folder / "model.safetensors"))
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"tie_word_embeddings": False}))


def summary_line(stdout: str) -> str:
    return next(line for line in stdout.splitlines() if line.strip().startswith("chat template"))


def base_without_reserved(folder: Path) -> Path:
    """A Llama checkpoint whose byte-level tokenizer has no reserved tokens and no spare embedding rows."""
    import tokenizers

    src = make_hf_checkpoint("llama-3-8b", folder, vocab_size=260, bos_token_id=0, eos_token_id=1)
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=260, special_tokens=["<s>", "</s>"], show_progress=False,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world"], trainer=trainer)
    tok.save(str(src / "tokenizer.json"))
    (src / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return src


def test_real_llama3_tokenizer_maps_chatml_onto_reserved_tokens(tmp_path):
    """Meta's vocabulary (quicktok): <|im_start|>, <|im_end|> take <|reserved_special_token_0|> and
    _1| (128002, 128003); transformers loads the saved tokenizer and renders ChatML with those ids."""
    from lion_min.core.chat import with_template_tokens

    tok = with_template_tokens(Tokenizer.from_dir(build_llama3_tokenizer(tmp_path / "base")), "chatml")
    assert tok.token_id("<|im_start|>") == 128002 and tok.token_id("<|im_end|>") == 128003
    assert tok.vocab_size == 128256 and "onto the reserved <|reserved_special_token_0|> (id 128002)" in tok.added
    tok.save(tmp_path / "out", chat_template=get_template("chatml").jinja)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    ids = hf.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ids == encode_chat(tok, CHAT, "chatml", add_generation_prompt=True).input_ids
    assert ids[:2] == [128000, 128002] and ids.count(128003) == 1 and len(hf) == 128256


def test_base_gemma_sft_chatml_onto_unused_tokens_and_generate_stops_at_im_end(tiny_chat_model, tmp_path, capsys):
    """A base Gemma folder (its <unusedN> tokens in tokenizer.json and tokenizer_config.json), the
    default --chat_template=chatml: the run trains, says where the tokens went, keeps the model's
    shape, and transformers chats with the export and stops at <|im_end|>."""
    src = hub_checkpoint("gemma", tmp_path / "base")
    base_tok = Tokenizer.from_dir(src)
    unused = [base_tok.token_id("<unused0>"), base_tok.token_id("<unused1>")]
    out = tmp_path / "sft"
    line = summary_line(sft(src, tiny_chat_model, out, capsys))
    assert line.split(None, 2)[2] == (f"chatml (the model folder carries none); <|im_start|> = {unused[0]}, "
                                      f"<|im_end|> = {unused[1]}, onto the reserved <unused0> (id {unused[0]}), "
                                      f"<unused1> (id {unused[1]})")
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 1024  # unchanged

    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == unused
    prompt = hf_tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert prompt == encode_chat(Tokenizer.from_dir(out), CHAT, "chatml", add_generation_prompt=True).input_ids
    assert hf_tok.decode(prompt) == render(CHAT, "chatml", add_generation_prompt=True, bos_token="<bos>")
    assert unused[1] in transformers.GenerationConfig.from_pretrained(out).eos_token_id

    # Make the export answer "Paris" then <|im_end|> then (unstopped) " Lyon": generate stops at <|im_end|>.
    reply, after = hf_tok.encode("Paris", add_special_tokens=False), hf_tok.encode(" Lyon", add_special_tokens=False)
    chain = [prompt[-1], *reply, unused[1], *after]
    assert len(set(chain)) == len(chain)
    untie(out)
    make_bigram(out, chain)
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)[0].tolist()
    assert ids == [*prompt, *reply, unused[1]]


def test_tokenizer_without_reserved_tokens_grows_the_embedding_and_head(tiny_chat_model, tmp_path, capsys):
    """No reserved tokens to reuse and an untied head (Llama): two new ids, two new rows in the
    embedding and the head, each the mean of the existing rows; the export has vocab_size + 2."""
    src = base_without_reserved(tmp_path / "base")
    n = Tokenizer.from_dir(src).vocab_size
    assert n == 260

    out = tmp_path / "sft"
    line = summary_line(sft(src, tiny_chat_model, out, capsys, "--lr=1e-30"))  # the new rows stay put
    assert (f"<|im_start|> = {n}, <|im_end|> = {n + 1}, as new ids (the tokenizer has no reserved tokens to reuse); "
            f"the embedding and the output head grow from {n} to {n + 2} rows, each new row the mean of the others"
            in line)
    before, after = load_model(src).state_dict(), load_model(out).state_dict()
    for name in ("tok_embeddings.weight", "output.weight"):
        assert after[name].shape[0] == n + 2
        torch.testing.assert_close(after[name][n:], before[name].mean(0).expand(2, -1))
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = hf_tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ids.count(n) == 2 and transformers.AutoConfig.from_pretrained(out).vocab_size == n + 2


@pytest.mark.parametrize("tied", [False, True])
def test_grow_vocab_is_transformers_mean_resizing(tmp_path, tied):
    """transformers' resize_token_embeddings draws the new rows around the mean with 1e-9 times the
    rows' covariance: within 1e-4 of grow_vocab's mean rows."""
    name = "llama-3.2-1b" if tied else "llama-3-8b"
    src = make_hf_checkpoint(name, tmp_path / name, vocab_size=128)
    hf = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    hf.resize_token_embeddings(131, mean_resizing=True)
    ours = grow_vocab(load_model(src).state_dict(), 131)
    torch.testing.assert_close(ours["tok_embeddings.weight"], hf.get_input_embeddings().weight, atol=1e-4, rtol=0)
    if not tied:
        torch.testing.assert_close(ours["output.weight"], hf.get_output_embeddings().weight, atol=1e-4, rtol=0)


def test_auto_keeps_the_folders_template_and_a_change_is_said(tiny_chat_model, tmp_path, capsys):
    """An instruct folder carrying the llama3 template: --chat_template=auto trains with it; naming
    chatml prints a note and the summary says the export replaces the folder's template."""
    src = hub_checkpoint("llama3", tmp_path / "it", template_in_source=True)
    assert "llama3 (the model folder's own)" in summary_line(
        sft(src, tiny_chat_model, tmp_path / "auto", capsys, "--chat_template=auto"))
    assert json.loads((tmp_path / "auto" / "run.json").read_text())["config"]["chat_template"] == "llama3"
    stdout = sft(src, tiny_chat_model, tmp_path / "chatml", capsys, "--chat_template=chatml")
    assert "note: chat template chatml, replacing the llama3 template the model folder carries" in stdout
    assert "replacing the llama3 template" in summary_line(stdout)
    assert Tokenizer.from_dir(tmp_path / "chatml").chat_template == get_template("chatml").jinja


def test_dpo_from_a_base_model_grows_policy_and_reference_alike(tiny_chat_model, tmp_path, capsys):
    """Offline DPO straight from a base checkpoint with ChatML and new ids: data, policy and reference
    all see the same token ids and rows; the first step's loss is ln 2 (policy == reference)."""
    import train_dpo

    src = base_without_reserved(tmp_path / "base")
    out = tmp_path / "dpo"
    train_dpo.main([f"--model={src}", f"--data={tiny_chat_model['prefs']}", f"--out_dir={out}", "--max_len=96",
                    "--max_prompt_len=48", "--batch_size=2", "--max_steps=1", "--device=cpu"])
    assert "grow from 260 to 262 rows" in summary_line(capsys.readouterr().out)
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(0.6931, abs=1e-3)
    assert Path(out / "tokenizer.json").is_file()
    # A --ref_model of its own (a copy of the same base) grows alike: the same architecture, loss ln 2.
    import shutil

    ref, out2 = shutil.copytree(src, tmp_path / "ref"), tmp_path / "dpo_ref"
    train_dpo.main([f"--model={src}", f"--ref_model={ref}", f"--data={tiny_chat_model['prefs']}", f"--out_dir={out2}",
                    "--max_len=96", "--max_prompt_len=48", "--batch_size=2", "--max_steps=1", "--device=cpu"])
    first = json.loads((out2 / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(0.6931, abs=1e-3)
