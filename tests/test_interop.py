"""Exports that other tools take for the original checkpoint: transformers loads them as it loads the
source, its text-generation pipeline chats with the export's own template and stops at the
end-of-turn token, and TRL's SFTTrainer (optional; skipped when not installed) accepts an exported
llama3 folder and Gemma-2 and Gemma-3 ones for assistant-only training.

The sources are the hub-style folders of test_checkpoint.py (hub_checkpoint), exported by lion_min
after loading them in fp32.
"""

import importlib.util

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from lion_min.core.chat import encode_chat, get_template, render
from lion_min.formats.hf import load_model, save_model
from lion_min.formats.tokenizer import Tokenizer
from test_checkpoint import HUB_CASES, hub_checkpoint

CONVERSATION = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "Thank you!"},
]


def export(src, out, case: str):
    save_model(load_model(src), out, tokenizer=Tokenizer.from_dir(src), chat_template=HUB_CASES[case][-1])
    return out


@pytest.mark.parametrize("case", list(HUB_CASES))
def test_transformers_loads_the_export_as_the_source(case, tmp_path):
    src = hub_checkpoint(case, tmp_path / "src")
    out = export(src, tmp_path / "out", case)
    t = get_template(HUB_CASES[case][-1])

    a, b = (transformers.AutoConfig.from_pretrained(f).to_dict() | {"_name_or_path": None} for f in (src, out))
    assert (a.pop("dtype"), b.pop("dtype")) == ("bfloat16", "float32") and a == b
    ga, gb = (transformers.GenerationConfig.from_pretrained(f).to_dict() for f in (src, out))
    tok = transformers.AutoTokenizer.from_pretrained(out)
    eot = tok.convert_tokens_to_ids(t.end_of_turn)
    assert gb.pop("eos_token_id") == [ga.pop("eos_token_id"), eot] and ga == gb

    hf_src = transformers.AutoTokenizer.from_pretrained(src)
    assert type(tok) is type(hf_src) and tok.all_special_tokens == hf_src.all_special_tokens
    text = render(CONVERSATION[:2], t, add_generation_prompt=False, bos_token=tok.bos_token)
    assert tok(text, add_special_tokens=False).input_ids == hf_src(text, add_special_tokens=False).input_ids
    messages = [{"role": "system", "content": "Be brief."}, *CONVERSATION] if t.allow_system else CONVERSATION
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        render(messages, t, add_generation_prompt=True, bos_token=tok.bos_token)

    ma = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    mb = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    x = torch.randint(0, 600, (2, 12))
    with torch.no_grad():
        assert torch.equal(ma(x).logits, mb(x).logits)  # the fp32 export holds the bf16 values exactly


def make_bigram(folder, chain: list[int]) -> None:
    """Turn a Llama checkpoint into a bigram model that, given chain[i] as the last token, predicts
    chain[i + 1]: with every attention and MLP output projection zero the residual stream is the
    token's embedding, so the logits are lm_head @ rmsnorm(embedding); each chain row of lm_head
    gets the normalised embedding of the token before it (a logit of ~dim against ~1 for the rest)."""
    file = folder / "model.safetensors"
    w = {k: v.float() for k, v in load_file(str(file)).items()}
    for k in w:
        if k.endswith(("o_proj.weight", "down_proj.weight")):
            w[k].zero_()
    w["model.norm.weight"].fill_(1.0)
    emb = w["model.embed_tokens.weight"]
    normed = emb / emb.pow(2).mean(-1, keepdim=True).sqrt()
    head = torch.randn_like(w["lm_head.weight"]) * 0.02
    for before, after in zip(chain, chain[1:]):
        head[after] += normed[before]
    w["lm_head.weight"] = head
    save_file({k: v.to(torch.bfloat16) for k, v in w.items()}, str(file), metadata={"format": "pt"})


def test_pipeline_chats_with_the_export_and_stops_at_end_of_turn(tmp_path):
    """The model answers "Hello there" then <|eot_id|>, then (if not stopped) "Paris". The export's
    pipeline renders with the exported template and stops at <|eot_id|> because the export lists it
    among the eos ids; with the source's eos ids alone it runs on past it."""
    src = hub_checkpoint("llama3", tmp_path / "src")
    tok = Tokenizer.from_dir(src)
    t = get_template("llama3")
    prompt = encode_chat(tok, CONVERSATION[:1], t, add_generation_prompt=True).input_ids
    reply, after = tok.encode("Hello there"), tok.encode(" Paris")
    eot = tok.token_id(t.end_of_turn)
    chain = [prompt[-1], *reply, eot, *after]
    assert len(set(chain)) == len(chain)
    make_bigram(src, chain)
    out = export(src, tmp_path / "out", "llama3")

    pipe = transformers.pipeline("text-generation", model=str(out), dtype=torch.float32)
    result = pipe(CONVERSATION[:1], max_new_tokens=8, do_sample=False)
    assert result[0]["generated_text"] == [*CONVERSATION[:1], {"role": "assistant", "content": "Hello there"}]

    # What it generated, as ids: the template's prompt, the reply, <|eot_id|>, nothing after it.
    inputs = pipe.tokenizer.apply_chat_template(CONVERSATION[:1], add_generation_prompt=True, return_tensors="pt",
                                                return_dict=True)
    assert inputs["input_ids"][0].tolist() == prompt
    ids = pipe.model.generate(**inputs, max_new_tokens=8, do_sample=False)[0].tolist()
    assert ids == [*prompt, *reply, eot]
    # Stopped by the export's generation_config: with the source's eos ids it goes on past the end of turn.
    longer = pipe.model.generate(**inputs, max_new_tokens=8, do_sample=False, eos_token_id=tok.eos_id)[0].tolist()
    assert longer[:len(prompt) + len(reply) + len(after) + 1] == [*prompt, *reply, eot, *after]


needs_trl = pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="TRL is not installed "
                               "(optional: pip install trl, ~110 MB with accelerate, datasets, pandas)")


def trl_rows(case: str, tmp_path) -> tuple[list, Tokenizer]:
    """TRL's SFTTrainer (assistant_only_loss) on an export of `case`: one training step, then
    (TRL's rows, each with lion_min's encoding of the same conversation; the export's tokenizer)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    out = export(hub_checkpoint(case, tmp_path / "src"), tmp_path / "out", case)
    conversations = [[*CONVERSATION[:2], {"role": "user", "content": f"And {i}?"},
                      {"role": "assistant", "content": f"It is {i}."}] for i in range(4)]
    args = SFTConfig(output_dir=str(tmp_path / "trl"), assistant_only_loss=True, max_steps=1, per_device_train_batch_size=2,
                     report_to="none", use_cpu=True, save_strategy="no", logging_strategy="no")
    trainer = SFTTrainer(model=str(out), args=args, train_dataset=Dataset.from_list([{"messages": c} for c in conversations]),
                         processing_class=transformers.AutoTokenizer.from_pretrained(out))
    trainer.train()
    tok = Tokenizer.from_dir(out)
    template = HUB_CASES[case][-1]
    return [(row, encode_chat(tok, conv, template, train_on="assistant"))
            for row, conv in zip(trainer.train_dataset, conversations)], tok


@needs_trl
def test_trl_sft_trainer_takes_the_llama3_export_for_assistant_only_loss(tmp_path):
    """TRL recognises a template by its exact text to swap in its training version; the export's
    must therefore be Meta's text byte for byte. The tokens it then trains are those lion_min's loss
    mask trains."""
    rows, _ = trl_rows("llama3", tmp_path)
    for row, ours in rows:
        assert row["input_ids"] == ours.input_ids
        assert [label != -100 for label in row["labels"]] == ours.loss_mask  # labels: ids where trained, else -100


@needs_trl
@pytest.mark.parametrize("case,config,template", [("gemma2", "gemma-2-2b-it", "gemma"), ("gemma3", "gemma-3-1b-it", "gemma3")])
def test_trl_sft_trainer_takes_a_gemma_export_and_also_trains_the_newline_after_end_of_turn(tmp_path, monkeypatch,
                                                                                          case, config, template):
    """A Gemma-2 export with the gemma template, a Gemma-3 one with gemma3: TRL recognises the template
    and tokenizes exactly as lion_min does; its training template puts the "\\n" after each model turn's
    <end_of_turn> inside the trained span, where lion_min trains the reply and <end_of_turn> only (what
    generation emits before it stops). So TRL's mask is lion_min's plus that one token per assistant turn."""
    monkeypatch.setitem(HUB_CASES, case, (config, "gemma", "<bos>", "<eos>", "<pad>", template))
    rows, tok = trl_rows(case, tmp_path)
    eot, newline = tok.token_id("<end_of_turn>"), tok.encode("\n")
    for row, ours in rows:
        assert row["input_ids"] == ours.input_ids
        after_trained_eot = [i > 0 and ours.loss_mask[i - 1] and ours.input_ids[i - 1] == eot
                             for i in range(len(ours.input_ids))]
        assert all(ours.input_ids[i] == newline[0] for i, a in enumerate(after_trained_eot) if a)
        assert sum(after_trained_eot) == 2  # the two assistant turns
        assert [label != -100 for label in row["labels"]] == [m or a for m, a in zip(ours.loss_mask, after_trained_eot)]
