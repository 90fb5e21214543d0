"""Gemma-2 and Gemma-3 (text) against transformers' eager attention, on tiny random fp32 checkpoints.

The tiny configs (conftest: gemma-2-2b-it, gemma-3-1b-it) have a sliding window of 4 tokens, so every
document here runs past it. Checks: logits and token log-probs, packed rows against each document
alone (values and gradients), every attention path (dense SDPA reference, compiled flex forward,
KV-cache prefill and decode past the window), the config keys read both ways, exports written from
args, one-line refusals, and SFT resume == uninterrupted on a tiny Gemma-2.
(Greedy sampling == transformers' generate and export round trips: the CONFIG_NAMES tests of
test_sample.py and test_checkpoint.py include both configs.)
"""

import json
import re
import sys
from pathlib import Path

import pytest
import torch
import transformers

import lion_min
from lion_min.core.attention import attend, build_mask, dense_mask
from lion_min.formats.hf_config import CheckpointError, args_from_config
from lion_min.formats.hf import load_model, save_model
from conftest import DATA, make_hf_checkpoint, small_config

FP32_TOL = 1e-4  # as test_model.py
GEMMA23 = ["gemma-2-2b-it", "gemma-3-1b-it"]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # train_sft.py


def eager(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                             attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def gemma3_linear(tmp_path_factory):
    """Gemma-3 with the 4b's global-layer RoPE scaling (linear, factor 8), saved by transformers 5
    (rope_parameters per layer type)."""
    return make_hf_checkpoint("gemma-3-1b-it", tmp_path_factory.mktemp("g3lin") / "m",
                              rope_scaling={"rope_type": "linear", "factor": 8.0})


def packed(docs):
    tokens = torch.cat(docs)[None]
    pos = torch.cat([torch.arange(len(d)) for d in docs])[None]
    doc_ids = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])[None]
    return tokens, pos, doc_ids


@pytest.mark.parametrize("name", GEMMA23 + ["gemma-3-linear"])
def test_logits_and_logprobs_match_transformers_eager(hf_checkpoints, gemma3_linear, name):
    path = gemma3_linear if name == "gemma-3-linear" else hf_checkpoints[name]
    hf, ours = eager(path), load_model(path)
    gen = torch.Generator().manual_seed(11)
    for B, T in [(1, 1), (3, 9), (2, 33)]:  # 9 and 33 tokens: past the window of 4
        x = torch.randint(0, 512, (B, T), generator=gen)
        targets = torch.randint(0, 512, (B, T), generator=gen)
        with torch.no_grad():
            ref = hf(x).logits
            diff = (ref - ours(x)).abs().max().item()
            ref_logp = ref.log_softmax(-1).gather(-1, targets[..., None])[..., 0]
            logp_diff = (ref_logp - ours(x, targets=targets)).abs().max().item()
        assert diff <= FP32_TOL and logp_diff <= FP32_TOL, (name, B, T, diff, logp_diff)
    # Far positions: Gemma-3's global layers with the linear scaling, the local ones without.
    x = torch.randint(0, 512, (2, 12), generator=gen)
    pos = torch.arange(12).expand(2, 12) + torch.tensor([[5000], [30000]])
    with torch.no_grad():
        assert (hf(x, position_ids=pos).logits - ours(x, positions=pos)).abs().max().item() <= FP32_TOL


def test_each_difference_shows(hf_checkpoints):
    # The parity above would catch each Gemma-2 feature missing: dropping one moves the logits well
    # past the tolerance on these tiny configs.
    path = hf_checkpoints["gemma-2-2b-it"]
    hf, x = eager(path), torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        ref = hf(x).logits
        for change in ("sliding_window", "attn_softcap", "final_softcap"):
            model = load_model(path)
            if change == "attn_softcap":
                for layer in model.layers:
                    layer.attention.softcap = None
            else:
                setattr(model.args, change, 1000 if change == "sliding_window" else None)
            assert (ref - model(x)).abs().max().item() > 100 * FP32_TOL, change


@pytest.mark.parametrize("name", GEMMA23)
def test_packed_row_equals_documents_alone_with_gradients(hf_checkpoints, name):
    model = load_model(hf_checkpoints[name])
    gen = torch.Generator().manual_seed(13)
    docs = [torch.randint(0, 512, (n,), generator=gen) for n in (7, 11, 3, 9)]
    targets = [torch.cat([d[1:], torch.tensor([-100])]) for d in docs]
    tokens, pos, doc_ids = packed(docs)
    tgt = torch.cat(targets)[None]
    weights = torch.randn(tokens.shape[1], generator=gen)
    with torch.no_grad():
        logits = model(tokens, positions=pos, doc_ids=doc_ids)[0]
        alone = torch.cat([model(d[None])[0] for d in docs])
    torch.testing.assert_close(logits, alone, atol=1e-5, rtol=1e-5)
    (model(tokens, positions=pos, doc_ids=doc_ids, targets=tgt)[0] * weights).sum().backward()
    g_packed = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    lp = torch.cat([model(d[None], targets=t[None])[0] for d, t in zip(docs, targets)])
    (lp * weights).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(g_packed[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)


def test_window_acts_inside_each_document():
    # Slot distance < window, and never across a document boundary.
    doc = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1]])
    slots = torch.arange(8)
    m = dense_mask(doc, slots, doc, slots, window=3)[0, 0]
    assert m[4].tolist() == [False, False, True, True, True, False, False, False]
    assert m[6].tolist() == [False] * 5 + [True, True, False]
    assert m[7].tolist() == [False] * 5 + [True, True, True]


def test_compiled_flex_with_softcap_and_window_equals_dense_reference():
    B, T = 2, 150
    doc = torch.tensor([[0] * 40 + [1] * 70 + [2] * 35 + [-1] * 5, [0] * 150])
    gen = torch.Generator().manual_seed(14)
    q, k, v = (torch.randn(B, h, T, 16, generator=gen) * 2 for h in (4, 2, 2))
    for window, cap in [(7, 2.0), (None, 2.0), (7, None)]:
        ref = attend(q, k, v, build_mask(doc, "sdpa", window=window, softcap=cap), scale=0.1, softcap=cap)
        with torch.no_grad():
            out = attend(q, k, v, build_mask(doc, "flex", window=window, softcap=cap), scale=0.1, softcap=cap)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # The dense reference with a cap is the cap applied to SDPA's scores: a huge cap is no cap.
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=dense_mask(doc, torch.arange(T), doc, torch.arange(T), 7), scale=0.1, enable_gqa=True)
    got = attend(q, k, v, build_mask(doc, "sdpa", window=7, softcap=1e6), scale=0.1, softcap=1e6)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_model_forward_flex_equals_sdpa_packed(hf_checkpoints):
    model = load_model(hf_checkpoints["gemma-2-2b-it"])
    docs = [torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(n)) for n in (30, 50, 20)]
    tokens, pos, doc_ids = packed(docs)
    with torch.no_grad():
        ref = model(tokens, positions=pos, doc_ids=doc_ids)
        model.attn_backend = "flex"
        out = model(tokens, positions=pos, doc_ids=doc_ids)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", GEMMA23)
def test_cache_prefill_and_decode_past_the_window_left_padded(hf_checkpoints, name):
    # Row 0 left-padded by 3; decode runs 9 steps, well past the window of 4.
    model = load_model(hf_checkpoints[name])
    gen = torch.Generator().manual_seed(15)
    a, b = torch.randint(0, 512, (1, 5), generator=gen), torch.randint(0, 512, (1, 8), generator=gen)
    new = torch.randint(0, 512, (2, 9), generator=gen)
    tokens = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), a], 1), b])
    doc = torch.tensor([[-1] * 3 + [0] * 5, [0] * 8])
    pos = torch.tensor([[0, 0, 0, 0, 1, 2, 3, 4], list(range(8))])
    with torch.no_grad():
        model.setup_caches(batch=2, max_len=20)
        steps = [model(tokens, positions=pos, doc_ids=doc, cache_slots=torch.arange(8))[:, -1:]]
        for t in range(9):
            steps.append(model(new[:, t:t + 1], positions=pos[:, -1:] + 1 + t, doc_ids=torch.zeros(2, 1, dtype=torch.long),
                               cache_slots=torch.tensor([8 + t])))
        model.clear_caches()
        got = torch.cat(steps, 1)  # (2, 10, V): last prompt position, then each new token
        alone_a = model(torch.cat([a, new[:1]], 1))[0, 4:]
        alone_b = model(torch.cat([b, new[1:]], 1))[0, 7:]
    torch.testing.assert_close(got[0], alone_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], alone_b, atol=1e-5, rtol=1e-5)


def test_softcapped_sampling_distribution(hf_checkpoints):
    # The sampler's logits are soft-capped (temperature sampling draws from the capped distribution).
    from lion_min.core.sample import _last_logits

    model = load_model(hf_checkpoints["gemma-2-2b-it"])
    x = torch.randint(0, 512, (1, 6), generator=torch.Generator().manual_seed(16))
    with torch.no_grad():
        model.setup_caches(1, 8)
        last = _last_logits(model, x, None, None, torch.arange(6))
        model.clear_caches()
        full = model(x)[:, -1]
    torch.testing.assert_close(last, full, atol=1e-5, rtol=1e-5)
    assert full.abs().max() <= 30


def test_config_old_and_new_key_styles_agree(hf_checkpoints):
    # The hub's gemma-3-1b file (rope_theta, rope_local_base_freq, sliding_window_pattern) and the same
    # config as transformers 5 writes it (rope_parameters per layer type, layer_types).
    for name in GEMMA23:
        old = args_from_config(small_config(name))
        new = args_from_config(json.loads((hf_checkpoints[name] / "config.json").read_text()))
        old.hf_config = new.hf_config = {}
        assert old == new, name
    g3 = args_from_config(json.loads((DATA / "configs" / "gemma-3-1b-it.json").read_text()))
    assert (g3.rope_theta, g3.rope_local_theta, g3.sliding_window, g3.attn_softcap) == (1e6, 1e4, 512, None)
    assert g3.layer_types[:6] == ("sliding_attention",) * 5 + ("full_attention",)
    g2 = args_from_config(json.loads((DATA / "configs" / "gemma-2-2b-it.json").read_text()))
    assert (g2.attn_softcap, g2.final_softcap, g2.query_pre_attn_scalar, g2.sliding_window) == (50, 30, 256, 4096)
    assert g2.layer_types[:2] == ("sliding_attention", "full_attention") and g2.tie_embeddings


@pytest.mark.parametrize("name", GEMMA23 + ["gemma-3-linear"])
def test_export_written_from_args_loads_in_transformers(hf_checkpoints, gemma3_linear, name, tmp_path):
    # With no config.json to write back, every architectural key comes from args (config_from_args).
    path = gemma3_linear if name == "gemma-3-linear" else hf_checkpoints[name]
    model = load_model(path)
    model.args.hf_config = {}
    save_model(model, tmp_path / "out")
    hf = eager(tmp_path / "out")
    x = torch.randint(0, 512, (2, 14), generator=torch.Generator().manual_seed(17))
    pos = torch.arange(14).expand(2, 14) + 3000
    with torch.no_grad():
        torch.testing.assert_close(hf(x, position_ids=pos).logits, model(x, positions=pos), atol=FP32_TOL, rtol=0)


@pytest.fixture(scope="module")
def gemma3_multimodal(tmp_path_factory):
    """A tiny Gemma3ForConditionalGeneration (SigLIP tower of one layer), the 4b's RoPE scaling."""
    text = small_config("gemma-3-1b-it") | dict(rope_scaling={"rope_type": "linear", "factor": 8.0})
    text = {k: v for k, v in text.items() if k not in ("architectures", "transformers_version", "model_type")}
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                       image_token_index=500, boi_token_index=501, eoi_token_index=502)
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration(config)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.5) if "norm" in n else p.normal_(0.0, 0.2)
    out = tmp_path_factory.mktemp("g3mm") / "m"
    model.save_pretrained(out)
    return out


def test_multimodal_gemma3_language_model_read_and_exported_text_only(gemma3_multimodal, tmp_path):
    hf = transformers.Gemma3ForConditionalGeneration.from_pretrained(gemma3_multimodal, dtype=torch.float32,
                                                                     attn_implementation="eager").eval()
    ours = load_model(gemma3_multimodal)
    x = torch.randint(0, 500, (2, 17), generator=torch.Generator().manual_seed(18))  # text tokens only
    with torch.no_grad():
        ref = hf(input_ids=x).logits
        assert (ref - ours(x)).abs().max().item() <= FP32_TOL
    save_model(ours, tmp_path / "text")
    cfg = json.loads((tmp_path / "text" / "config.json").read_text())
    assert cfg["model_type"] == "gemma3_text" and cfg["architectures"] == ["Gemma3ForCausalLM"]
    with torch.no_grad():
        torch.testing.assert_close(eager(tmp_path / "text")(x).logits, ref, atol=FP32_TOL, rtol=0)
    # The hub's gemma-3-4b text_config lists only what differs from transformers' defaults.
    sparse = {"model_type": "gemma3", "eos_token_id": [1, 106], "text_config": {
        "hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text", "num_hidden_layers": 34,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024}}
    a = args_from_config(sparse)
    assert (a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.head_dim, a.vocab_size) == (2560, 34, 8, 4, 256, 262208)
    assert (a.rope_scaling, a.rope_theta, a.rope_local_theta) == ({"factor": 8.0, "rope_type": "linear"}, 1e6, 1e4)
    assert a.layer_types.count("full_attention") == 5 and a.eos_token_id == [1, 106] and a.sliding_window == 1024
    with pytest.raises(CheckpointError) as e:
        args_from_config({"model_type": "gemma3"}, "x/config.json")
    assert str(e.value) == "x/config.json: model_type 'gemma3' (multimodal Gemma-3) without a text_config object"


@pytest.mark.parametrize("cap, window, says", [(50.0, None, "soft-capping"), (None, 4, "sliding window")])
def test_varlen_refused_for_softcap_or_window(cap, window, says, monkeypatch):
    from lion_min.core import attention
    monkeypatch.setattr(attention, "varlen_problem", lambda device, dtype: None)  # as if on a GPU
    doc = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(ValueError) as e:
        build_mask(doc, "varlen", torch.bfloat16, window=window, softcap=cap)
    assert "\n" not in str(e.value) and "attn_backend='varlen'" in str(e.value) and says in str(e.value)
    assert attention.resolve_backend("auto", torch.device("cuda"), torch.bfloat16, cap, window) == "flex"


def test_varlen_refused_before_training_a_gemma2(tiny_gemma2_chat, tmp_path, monkeypatch):
    # As on a GPU where varlen runs: the model's soft-cap is what refuses it, in one line, no run folder.
    import train_sft
    from lion_min.run.config import ConfigError

    monkeypatch.setattr("lion_min.core.attention.varlen_problem", lambda device, dtype: None)
    out = tmp_path / "run"
    with pytest.raises(ConfigError) as e:
        train_sft.main([f"--model={tiny_gemma2_chat['model']}", f"--data={tiny_gemma2_chat['data']}",
                        f"--out_dir={out}", "--attn_backend=varlen", "--device=cpu", "--max_steps=1"])
    assert "\n" not in str(e.value) and not out.exists()
    assert str(e.value).startswith("--attn_backend=varlen: FlashAttention's varlen kernel has no attention-logit "
                                   "soft-capping (Gemma-2's 2)"), str(e.value)


def test_reference_with_another_window_or_cap_refused(hf_checkpoints, tmp_path):
    # The DPO reference is built with the policy's ModelArgs: a Gemma-2 differing only in its window
    # or soft-cap would silently run as the policy; it is refused instead.
    import shutil

    from lion_min.run.config import ConfigError
    from lion_min.run.model_checks import check_same_architecture

    src = hf_checkpoints["gemma-2-2b-it"]
    args = lion_min.formats.hf_config.read_config(src)
    check_same_architecture(src, args)  # the same folder passes
    for key, value, field in (("sliding_window", 8, "sliding_window"), ("final_logit_softcapping", 20.0, "final_softcap")):
        ref = tmp_path / key
        shutil.copytree(src, ref)
        cfg = json.loads((ref / "config.json").read_text()) | {key: value}
        (ref / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(ConfigError, match=f"another architecture than --model \\({field} "):
            check_same_architecture(ref, args)


@pytest.fixture(scope="module")
def tiny_gemma2_chat(tmp_path_factory, tiny_chat_model):
    from tokenizers_for_tests import build_gemma_chatml_tokenizer

    root = tmp_path_factory.mktemp("g2chat")
    model = make_hf_checkpoint("gemma-2-2b-it", root / "model", std=0.05, vocab_size=1024)
    build_gemma_chatml_tokenizer(model)
    return {"model": model, "data": tiny_chat_model["data"]}


@pytest.mark.slow
def test_sft_resume_equals_uninterrupted_gemma2(tiny_gemma2_chat, tmp_path):
    import train_sft
    from test_sft import base_args, metrics, weights

    full, part = tmp_path / "full", tmp_path / "part"
    train_sft.main(base_args(tiny_gemma2_chat, full, max_steps=4, save_every=2, epochs=2))
    train_sft.main(base_args(tiny_gemma2_chat, part, max_steps=2, save_every=2, epochs=2))
    train_sft.main(base_args(tiny_gemma2_chat, part, max_steps=4, save_every=2, epochs=2, resume="auto"))
    a, b = metrics(full), metrics(part)
    assert [m["step"] for m in b] == [1, 2, 3, 4] and a[-1]["loss"] != a[0]["loss"]
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-6), (x, y)
    wa, wb = weights(full), weights(part)
    assert "model.layers.0.post_feedforward_layernorm.weight" in wa
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # The export is a Gemma-2 transformers loads, with our logits.
    hf, ours = eager(full), load_model(full)
    x = torch.randint(0, 1024, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(x), atol=FP32_TOL, rtol=0)


def test_a_gemma3_it_folder_trains_and_exports_its_own_template(tiny_chat_model, tmp_path, capsys):
    """--chat_template=auto on a Gemma-3-it folder names its template (gemma3: the system message
    opens the first user turn); the export carries it, and transformers renders the export's template
    to the very ids training used."""
    import train_sft
    from test_sft import base_args
    from tokenizers_for_tests import build_gemma_tokenizer

    from lion_min.core.chat import TEMPLATES, encode_chat, with_system
    from lion_min.formats.tokenizer import Tokenizer

    model = make_hf_checkpoint("gemma-3-1b-it", tmp_path / "g3it", std=0.05, vocab_size=1024)
    build_gemma_tokenizer(model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": TEMPLATES["gemma3"].jinja}))
    out = tmp_path / "out"
    train_sft.main(base_args({"model": model, "data": tiny_chat_model["data"]}, out, max_steps=1,
                             chat_template="auto", system_prompt="Be brief."))
    assert re.search(r"chat template +gemma3 \(the model folder's own\)", capsys.readouterr().out)
    exported = transformers.AutoTokenizer.from_pretrained(out)
    conv = [json.loads(line) for line in tiny_chat_model["data"].read_text().splitlines()][0]["messages"]
    ours = encode_chat(Tokenizer.from_dir(out), with_system(conv, "Be brief."), "gemma3")
    theirs = exported.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"]
    assert "<start_of_turn>user\nBe brief.\n\n" in exported.decode(theirs)
    assert theirs == ours.input_ids
