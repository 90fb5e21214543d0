"""PairRM: the DeBERTa-v2/v3 encoder against transformers, the pair format and head against a hand
restatement of llm-blender's definition, the judge's choice, and one online DPO round judged by it.

Checkpoints are tiny and random but shaped like deberta-v3-large (relative attention, log-bucketed
positions scaled down so that rows run past the buckets, p2c|c2p, shared attention keys, a
LayerNorm on the relative embeddings, max_relative_positions -1), at std 0.2 with random
LayerNorm weights so that a mistake moves the outputs well past the tolerance.
"""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_online  # noqa: E402
from lion_min.stages import online  # noqa: E402
from lion_min.pairrm import model as P  # noqa: E402
from lion_min.formats.hf_config import CheckpointError  # noqa: E402
from lion_min.pairrm.deberta import DebertaEncoder, args_from_config, load_encoder_weights, relative_buckets  # noqa: E402
from lion_min.run.judges import make_judge  # noqa: E402
from lion_min.formats.tokenizer import Tokenizer, TokenizerError  # noqa: E402

transformers = pytest.importorskip("transformers")

# deberta-v3-large's architecture keys, sizes scaled down; max_position_embeddings (the log
# buckets' reach when max_relative_positions is -1) and position_buckets scaled down too.
V3_TINY = dict(model_type="deberta-v2", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=96, hidden_act="gelu", max_position_embeddings=24, type_vocab_size=0,
               layer_norm_eps=1e-7, relative_attention=True, position_buckets=8, norm_rel_ebd="layer_norm",
               share_att_key=True, pos_att_type="p2c|c2p", max_relative_positions=-1, position_biased_input=False,
               pad_token_id=0, vocab_size=120)


def random_deberta(cfg: dict, seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.DebertaV2Model(transformers.DebertaV2Config(**cfg)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if name.endswith("weight") else 0.0))
            else:
                p.normal_(0.0, 0.2)
    return model


def ours_from(hf_model) -> DebertaEncoder:
    ours = DebertaEncoder(args_from_config(hf_model.config.to_dict())).eval()
    sd = hf_model.state_dict()
    used = load_encoder_weights(ours, sd.__getitem__)
    assert used == {k for k, _ in hf_model.named_parameters()}  # every tensor read, none twice
    return ours


# --- the encoder -----------------------------------------------------------------------------------


@pytest.mark.parametrize("T, buckets, max_rel, max_pos", [(40, 8, -1, 24), (2100, 256, -1, 512), (50, 6, 20, 24),
                                                          (30, -1, 12, 24), (30, -1, -1, 24)])
def test_relative_buckets_match_transformers(T, buckets, max_rel, max_pos):
    from transformers.models.deberta_v2.modeling_deberta_v2 import build_relative_position

    args = args_from_config(V3_TINY | dict(position_buckets=buckets, max_relative_positions=max_rel,
                                           max_position_embeddings=max_pos))
    x = torch.zeros(1, T, 1)
    rel = build_relative_position(x, x, bucket_size=buckets, max_position=args.max_relative)[0]
    expect = torch.clamp(rel + args.span, 0, 2 * args.span - 1)  # where transformers indexes its table
    got = relative_buckets(T, args)
    assert torch.equal(got, expect)
    assert got.min() == 0 and got.max() == 2 * args.span - 1  # rows long enough to hit both clamps


@pytest.mark.parametrize("overrides", [
    {},  # deberta-v3-large's shape
    dict(share_att_key=False),  # separate pos_key_proj / pos_query_proj
    dict(share_att_key=False, pos_att_type="c2p", norm_rel_ebd="none"),
    dict(position_buckets=-1, max_relative_positions=10, max_position_embeddings=48, position_biased_input=True,
         type_vocab_size=2),  # v2 style: absolute positions too, unbucketed distances
])
def test_encoder_matches_transformers(overrides):
    hf = random_deberta(V3_TINY | overrides)
    ours = ours_from(hf)
    ids = torch.randint(4, 120, (3, 40))
    mask = torch.ones(3, 40, dtype=torch.long)
    mask[1, 31:] = 0
    mask[2, 7:] = 0  # right padding
    with torch.no_grad():
        expect = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours(ids, mask)
        alone = ours(ids[2:, :7])  # the padded row's tokens, run without padding
    assert expect.abs().max() > 1.0
    # Every position, padding included (padding rows attend uniformly, as in transformers).
    torch.testing.assert_close(got, expect, atol=1e-4, rtol=0)
    torch.testing.assert_close(got[2:, :7], alone, atol=1e-4, rtol=0)


def test_the_position_terms_matter_at_this_init():
    """Dropping the c2p and p2c terms must move the outputs far past 1e-4, or the parity test
    above could not catch a wrong bucket or a swapped index."""
    hf = random_deberta(V3_TINY)
    ours = ours_from(hf)
    ours.args.pos_att_type = ()
    ids = torch.randint(4, 120, (1, 40))
    with torch.no_grad():
        diff = (ours(ids) - hf(input_ids=ids).last_hidden_state).abs().max()
    assert diff > 1e-2


# --- a tiny PairRM checkpoint ----------------------------------------------------------------------

CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,!?'\"-+=:;()\n"
SOURCE_MAX, CANDIDATE_MAX = 12, 8


def build_char_tokenizer(out_dir: Path, with_prefixes: bool = True) -> Path:
    """One token per character; [PAD] [CLS] [SEP] [UNK] at DeBERTa's ids 0-3, [MASK] after the
    vocabulary, then PairRM's prefix tokens added as llm-blender adds them (tokenizer.add_tokens)."""
    from tokenizers import AddedToken, Regex, Tokenizer as HFTokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(["[PAD]", "[CLS]", "[SEP]", "[UNK]", *CHARS])}
    tok = HFTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.add_special_tokens([AddedToken(t, special=True) for t in ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"]])
    if with_prefixes:
        tok.add_tokens(list(P.PREFIX_TOKENS.values()))
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(
        {"cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]", "unk_token": "[UNK]", "mask_token": "[MASK]"}))
    return out_dir


def pairrm_tensors(hf_model, seed: int = 1) -> dict[str, torch.Tensor]:
    """The state dict llm-blender saves: pretrained_model.* and head_layer.{1,4}.*."""
    torch.manual_seed(seed)
    d = hf_model.config.hidden_size
    out = {f"pretrained_model.{k}": v.clone() for k, v in hf_model.state_dict().items()}
    out |= {"head_layer.1.weight": torch.randn(d, 2 * d) * 0.2, "head_layer.1.bias": torch.randn(d) * 0.2,
            "head_layer.4.weight": torch.randn(1, d) * 0.2, "head_layer.4.bias": torch.randn(1) * 0.2}
    return out


@pytest.fixture(scope="module")
def tiny_pairrm(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairrm")
    folder = build_char_tokenizer(root / "pairrm")
    n = len(CHARS) + 5  # [PAD] [CLS] [SEP] [UNK], chars, [MASK]
    hf = random_deberta(V3_TINY | dict(vocab_size=n + 4, max_position_embeddings=48, position_buckets=16))
    tensors = pairrm_tensors(hf)
    save_file(tensors, str(folder / "model.safetensors"))
    cfg = hf.config.to_dict() | {k: n + i for i, k in enumerate(P.PREFIX_TOKENS)}
    cfg |= dict(n_tasks=1, source_maxlength=SOURCE_MAX, candidate_maxlength=CANDIDATE_MAX)
    (folder / "config.json").write_text(json.dumps(cfg))
    return {"folder": folder, "hf": hf, "tensors": tensors, "root": root}


def char_ids(text: str) -> list[int]:
    return [4 + CHARS.index(c) for c in text]


def test_input_format_by_hand(tiny_pairrm):
    judge = P.PairRMJudge(tiny_pairrm["folder"])
    enc = judge.encoder
    src_id, c_id, c1_id, c2_id = (enc.pair.source_prefix_id, enc.pair.cand_prefix_id, enc.pair.cand1_prefix_id,
                                  enc.pair.cand2_prefix_id)
    CLS, SEP = 1, 2
    # A long source is cut to SOURCE_MAX tokens: [CLS], then the prefix and text cut to SOURCE_MAX - 2
    # tokens (the prefix counts), then [SEP]. A "[SEP]" in a text becomes a space first.
    src, cands = enc.encode("What is 2+2?[SEP]Say it.", ["Four, of course.", "4"])
    assert src == [CLS, src_id] + char_ids("What is 2") + [SEP]
    # The source used all its budget, so each candidate gets CANDIDATE_MAX tokens.
    assert cands == [[CLS, c_id] + char_ids("Four,") + [SEP], [CLS, c_id] + char_ids("4") + [SEP]]
    row, pos = enc.row(src, cands[0], cands[1])
    assert row == src + [CLS, c1_id] + char_ids("Four,") + [SEP] + [CLS, c2_id] + char_ids("4") + [SEP]
    assert pos == [1, 13, 21] and [row[p] for p in pos] == [src_id, c1_id, c2_id]
    # A short source leaves SOURCE_MAX - len(src) tokens, half of which go to each candidate.
    src, cands = enc.encode("Hi", ["abcdefghijklmnopqrstuvwxyz"])
    assert src == [CLS, src_id] + char_ids("Hi") + [SEP]
    assert cands[0] == [CLS, c_id] + char_ids("abcdefgh") + [SEP]  # 8 + (12 - 5) // 2 = 11 tokens
    # "[SEP]" inside a candidate becomes a space too.
    assert enc.encode("Hi", ["a[SEP]b"])[1][0] == [CLS, c_id] + char_ids("a b") + [SEP]


def test_source_text():
    assert P.source_text([{"role": "user", "content": "Hi"}]) == "Hi"
    assert P.source_text([{"role": "system", "content": ""}, {"role": "user", "content": "Hi"}]) == "Hi"
    assert P.source_text([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]) == "Be brief.\nHi"
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}]
    assert P.source_text(conv) == "USER: Hi\nASSISTANT: Hello\nUSER: Bye"


def hand_logit(tiny_pairrm, ids: list[int]) -> float:
    """llm-blender's CrossCompareReranker._forward on one unpadded row, with transformers' encoder:
    hidden states where the prefix ids are found, head_layer = Linear, Tanh, Linear (dropout off)."""
    hf, t = tiny_pairrm["hf"], tiny_pairrm["tensors"]
    cfg = json.loads((tiny_pairrm["folder"] / "config.json").read_text())
    x = torch.tensor([ids])
    with torch.no_grad():
        h = hf(input_ids=x, attention_mask=torch.ones_like(x)).last_hidden_state[0]
    s, a, b = (h[ids.index(cfg[k])] for k in ("source_prefix_id", "cand1_prefix_id", "cand2_prefix_id"))

    def head(v):
        return t["head_layer.4.weight"] @ torch.tanh(t["head_layer.1.weight"] @ v + t["head_layer.1.bias"]) + t["head_layer.4.bias"]

    return (head(torch.cat([s, a])) - head(torch.cat([s, b]))).mean().item()


def test_matrix_and_scores_equal_a_hand_computation(tiny_pairrm):
    judge = P.PairRMJudge(tiny_pairrm["folder"], batch_size=4)  # 6 rows: a padded batch of 4, then 2
    prompt = [{"role": "user", "content": "Name a fruit."}]
    responses = ["Apple.", "A banana, ripe and yellow.", "no"]
    src, cands = judge.encoder.encode("Name a fruit.", responses)
    M = torch.zeros(3, 3)
    for i in range(3):
        for j in range(3):
            if i != j:
                M[i, j] = hand_logit(tiny_pairrm, judge.encoder.row(src, cands[i], cands[j])[0])
    assert M.abs().max() > 0.5 and (M + M.T).abs().max() > 1e-3  # both orders carry information
    torch.testing.assert_close(judge.matrix(prompt, responses), M, atol=1e-4, rtol=0)
    # llm-blender's "max_logits": (M - M^T).mean(axis=-1), the mean over all N columns.
    expect = [sum(M[i, j] - M[j, i] for j in range(3)).item() / 3 for i in range(3)]
    assert judge.score(prompt, responses) == pytest.approx(expect, abs=1e-4)


def test_judge_picks_best_and_worst_on_a_constructed_case(tiny_pairrm):
    """A ranker with a known preference (longer candidate wins) plus a position bias toward
    candidate 1: scoring both orders cancels the bias, and the online loop's choice follows."""
    judge = P.PairRMJudge(tiny_pairrm["folder"])
    sep = judge.encoder.sep_id

    def fake_compare(rows):
        logits = []
        for ids, (s, a, b) in rows:
            len_a, len_b = ids.index(sep, a) - a, ids.index(sep, b) - b
            logits.append(0.1 * (len_a - len_b) + 3.0)  # bias 3.0 would dominate one order alone
        return torch.tensor(logits)

    judge.compare = fake_compare
    judge.pair.source_max_length = judge.pair.candidate_max_length = 64  # no truncation here
    prompt = [{"role": "user", "content": "Tell me."}]
    record = {"samples": [[1], [2], [3], [4]], "scores": judge.score(prompt, ["mid len", "x", "the longest one", "midd"])}
    assert online.choose_pair(record) == "" and (record["chosen"], record["rejected"]) == (2, 1)
    # All equal: the bias cancels exactly, every score is 0 and the prompt is dropped as a tie.
    record = {"samples": [[1], [2], [3]], "scores": judge.score(prompt, ["abc", "def", "ghi"])}
    assert record["scores"] == [0.0, 0.0, 0.0]
    assert online.choose_pair(record) == "best and worst scores tie"


def test_make_judge_and_bad_folders(tiny_pairrm, tmp_path):
    judge = make_judge(f"pairrm:{tiny_pairrm['folder']}", batch_size=3)
    assert isinstance(judge, P.PairRMJudge) and judge.batch_size == 3
    with pytest.raises(ValueError, match="pairrm:DIR"):
        make_judge("pairrm:")
    # The original llm-blender folder: its config.json is a RankerConfig.
    orig = tmp_path / "orig"
    orig.mkdir()
    (orig / "config.json").write_text(json.dumps({"ranker_type": "pairranker", "model_name": "microsoft/deberta-v3-large"}))
    with pytest.raises(CheckpointError, match="convert"):
        P.PairRMJudge(orig)
    # Pickled weights only.
    binonly = tmp_path / "binonly"
    binonly.mkdir()
    (binonly / "config.json").write_text((tiny_pairrm["folder"] / "config.json").read_text())
    (binonly / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="convert"):
        P.PairRMJudge(binonly)
    # A tokenizer whose prefix ids differ from the config's.
    with pytest.raises(TokenizerError, match="<\\|source\\|>"):
        P.PairEncoder(Tokenizer.from_dir(tiny_pairrm["folder"]),
                      P.PairRMArgs(source_prefix_id=5, cand1_prefix_id=6, cand2_prefix_id=7, cand_prefix_id=8))


def test_convert_original_layout(tiny_pairrm, tmp_path, monkeypatch):
    """llm-blender/PairRM as downloaded: RankerConfig + pytorch_model.bin, tokenizer without the
    prefix tokens. (The architecture is deberta-v3-large's; here the tiny one stands in for it.)"""
    src = tmp_path / "PairRM"
    src.mkdir()
    ranker_cfg = {"ranker_type": "pairranker", "model_type": "deberta", "model_name": "microsoft/deberta-v3-large",
                  "source_maxlength": SOURCE_MAX, "candidate_maxlength": CANDIDATE_MAX, "n_tasks": 1}
    (src / "config.json").write_text(json.dumps(ranker_cfg))
    tensors = dict(tiny_pairrm["tensors"], **{"pretrained_model.embeddings.position_ids": torch.arange(48)[None]})
    torch.save(tensors, src / "pytorch_model.bin")
    tok_dir = build_char_tokenizer(tmp_path / "deberta-tok", with_prefixes=False)
    tiny_arch = {k: v for k, v in tiny_pairrm["hf"].config.to_dict().items() if k in P.DEBERTA_V3_LARGE}
    monkeypatch.setattr(P, "DEBERTA_V3_LARGE", tiny_arch)
    out = P.convert(src, tok_dir, tmp_path / "converted")
    prompt, responses = [{"role": "user", "content": "Pick one."}], ["yes", "no", "maybe so"]
    expect = P.PairRMJudge(tiny_pairrm["folder"]).matrix(prompt, responses)
    torch.testing.assert_close(P.PairRMJudge(out).matrix(prompt, responses), expect, atol=0, rtol=0)


def test_online_round_judged_by_pairrm(tiny_chat_model, tiny_pairrm, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say something about {w}."}) + "\n"
                               for w in ["cats", "dogs", "rain", "tea", "maps", "jazz", "salt", "oak"]))
    out = tmp_path / "online"
    folder = tiny_pairrm["folder"]
    argv = [f"--model={tiny_chat_model['model']}", f"--prompts={prompts}", f"--judge=pairrm:{folder}",
            f"--out_dir={out}", "--n_samples=3", "--max_new_tokens=6", "--rounds=1", "--batch_size=4",
            "--micro_batch_size=2", "--max_len=64", "--max_prompt_len=48", "--lr=1e-3", "--device=cpu",
            "--temperature=1.0"]
    history = train_online.main(argv)
    records = [json.loads(line) for line in (out / "round_0.jsonl").read_text().splitlines()]
    judge = P.PairRMJudge(folder)
    assert len(records) == 8
    for r in records:
        assert r["scores"] == pytest.approx(judge.score(r["prompt"], r["samples"]), abs=1e-5)
        assert sum(r["scores"]) == pytest.approx(0.0, abs=1e-4)  # the max_logits scores of a prompt sum to 0
        if not r["dropped"]:
            assert r["scores"][r["chosen"]] == max(r["scores"]) and r["scores"][r["rejected"]] == min(r["scores"])
    assert history[0]["pairs"] == sum(not r["dropped"] for r in records) >= 4
    assert (out / "round_0.done").is_file() and (out / "model.safetensors").is_file()


def test_flops_formula_matches_torch_flop_counter():
    """The bench's GPU estimate rests on DebertaEncoder.flops; torch counts the same matmuls."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    for overrides in ({}, dict(share_att_key=False, pos_att_type="c2p")):
        ours = ours_from(random_deberta(V3_TINY | overrides))
        # The math backend runs attention as matmuls the counter sees (it skips the CPU flash kernel).
        with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            ours(torch.randint(4, 120, (3, 40)))
        assert counter.get_total_flops() == ours.flops(3, 40)


def test_spm_conversion_matches_transformers_converter(tmp_path):
    """tokenizer_from_spm reads spm.model without protobuf; checked against transformers'
    DebertaV2Converter on a small unigram model trained here (needs the optional sentencepiece and
    protobuf packages, test-only)."""
    spm = pytest.importorskip("sentencepiece")
    pytest.importorskip("google.protobuf")
    import io
    from types import SimpleNamespace

    from tokenizers import AddedToken
    from transformers.convert_slow_tokenizer import DebertaV2Converter

    corpus = ["The quick brown fox jumps over the lazy dog.", "Résumé: naïve café, 2+2=4!", "What is the capital of France?",
              "Paris is the capital of France.", "def add(a, b):\n    return a + b", "Hello   world,  again."] * 20
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=model, vocab_size=120, hard_vocab_limit=False, model_type="unigram",
                                   pad_id=0, bos_id=1, eos_id=2, unk_id=3, pad_piece="[PAD]", bos_piece="[CLS]",
                                   eos_piece="[SEP]", unk_piece="[UNK]", user_defined_symbols=["<url>"],
                                   normalization_rule_name="nmt_nfkc", minloglevel=2)
    spm_file = tmp_path / "spm.model"
    spm_file.write_bytes(model.getvalue())
    pieces = spm.SentencePieceProcessor(model_file=str(spm_file))
    stub = SimpleNamespace(vocab_file=str(spm_file), do_lower_case=False, split_by_punct=False, add_prefix_space=True,
                           convert_tokens_to_ids=pieces.piece_to_id)
    expect = DebertaV2Converter(stub).converted()
    expect.add_special_tokens([AddedToken("[MASK]", normalized=False, special=True)])
    got = P.tokenizer_from_spm(spm_file)
    for t in (expect, got):
        t.add_tokens(list(P.PREFIX_TOKENS.values()))
    assert got.get_vocab(with_added_tokens=True) == expect.get_vocab(with_added_tokens=True)
    texts = corpus[:6] + ["  leading and trailing  ", "tabs\tand\nnewlines", "ﬁ ligature ① and ＡＢＣ", "<url> [SEP] x",
                          "<|source|>What?<|candidate|> Yes.", "unseen zqxj words", ""]
    for text in texts:
        assert got.encode(text).ids == expect.encode(text).ids, text
        assert got.encode(text, add_special_tokens=False).ids == expect.encode(text, add_special_tokens=False).ids
