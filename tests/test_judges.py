"""Judges: the reward model against transformers' AutoModelForSequenceClassification, rules, make_judge."""

import json
import math
from pathlib import Path

import pytest
import torch
import transformers

from conftest import make_hf_checkpoint
from lion_min.core.chat import get_template
from lion_min.formats.hf_config import CheckpointError
from lion_min.core.judge import RULES, Judge, RuleJudge, register_rule
from lion_min.run.judges import RewardModelJudge, last_token_index, make_judge
from lion_min.formats.tokenizer import Tokenizer
from tokenizers_for_tests import build_gemma_tokenizer

VOCAB = 649  # the small Gemma test tokenizer's vocabulary


def make_reward_checkpoint(name: str, out_dir: Path, std: float = 0.2, seed: int = 0, **overrides) -> Path:
    """A random transformers *ForSequenceClassification checkpoint (one label) plus the small Gemma
    tokenizer. Random norm weights and std 0.2 as in conftest.make_hf_checkpoint, score head included."""
    make_hf_checkpoint(name, out_dir, std=std, seed=seed, vocab_size=VOCAB,
                       auto_class="AutoModelForSequenceClassification", num_labels=1, **overrides)
    build_gemma_tokenizer(out_dir)
    return out_dir


# Each family with a pad id; llama's pad is a token that also occurs in the data (below).
PAD = {"gemma-2b": 0, "llama-3-8b": 5}


@pytest.fixture(scope="module")
def reward_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("rm")
    out = {name: make_reward_checkpoint(name, root / name, pad_token_id=pad) for name, pad in PAD.items()}
    out["llama-no-pad"] = make_reward_checkpoint("llama-3.2-1b", root / "nopad", pad_token_id=None, seed=1)
    return out


def hf_scores(path: Path, sequences: list[list[int]], pad_id: int) -> torch.Tensor:
    """transformers on a right-padded batch with an attention mask -> (N,) scores."""
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    T = max(len(s) for s in sequences)
    ids = torch.tensor([s + [pad_id] * (T - len(s)) for s in sequences])
    mask = torch.tensor([[1] * len(s) + [0] * (T - len(s)) for s in sequences])
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask).logits[:, 0]


def random_sequences(lens, seed=0, avoid=()):
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(10, VOCAB, (n,), generator=g).tolist() for n in lens]
    return [[t if t not in avoid else t + 1 for t in s] for s in seqs]


@pytest.mark.parametrize("name", list(PAD))
def test_reward_model_equals_transformers(reward_models, name):
    pad = PAD[name]
    judge = RewardModelJudge(reward_models[name], "gemma", batch_size=3)
    seqs = random_sequences((5, 17, 1, 9, 12), avoid={pad})  # two chunks of different padded lengths
    ours = judge.score_ids(seqs)[:, 0]
    torch.testing.assert_close(ours, hf_scores(reward_models[name], seqs, pad), atol=1e-5, rtol=1e-5)
    # And each sequence alone through transformers (no padding at all).
    alone = torch.cat([hf_scores(reward_models[name], [s], pad) for s in seqs])
    torch.testing.assert_close(ours, alone, atol=1e-5, rtol=1e-5)
    assert ours.std() > 0.1  # the scores are not all alike, so a wrong read position would show


def test_score_read_where_transformers_reads_it(reward_models):
    # transformers reads the rightmost token that is not pad_token_id: a sequence ending with the pad
    # id itself (pad = EOS in some reward models) is scored before those tokens. We do the same.
    pad = PAD["llama-3-8b"]
    ids = torch.tensor([[7, 8, 9, pad, pad], [7, pad, 9, 4, pad], [7, 8, 9, 4, 3]])
    assert last_token_index(ids, pad).tolist() == [2, 3, 4]
    judge = RewardModelJudge(reward_models["llama-3-8b"], "gemma")
    seqs = [[11, 12, 13, pad], [11, pad, 13, 14, pad, pad], [11, 12, 13], [20, 21, 22, 23, 24, 25, 26]]
    ours = judge.score_ids(seqs)[:, 0]
    torch.testing.assert_close(ours, hf_scores(reward_models["llama-3-8b"], seqs, pad), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours[0], ours[2])  # [11, 12, 13, pad] is scored at 13


def test_no_pad_id_scores_each_last_token(reward_models):
    # transformers without pad_token_id takes batch size 1 only and reads the last token.
    path = reward_models["llama-no-pad"]
    assert json.loads((path / "config.json").read_text()).get("pad_token_id") is None
    judge = RewardModelJudge(path, "gemma")
    seqs = random_sequences((4, 10, 7), seed=3)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        alone = torch.cat([hf(input_ids=torch.tensor([s])).logits[:, 0] for s in seqs])
    torch.testing.assert_close(judge.score_ids(seqs)[:, 0], alone, atol=1e-5, rtol=1e-5)


def test_score_text_through_the_chat_template(reward_models):
    # The whole path from text: our rendering + tokenizer, against transformers' tokenizer with the
    # official Jinja template (apply_chat_template) feeding transformers' reward model.
    path = reward_models["gemma-2b"]
    judge: Judge = make_judge(str(path), chat_template="gemma")
    assert isinstance(judge, RewardModelJudge) and isinstance(judge, Judge)
    prompt = [{"role": "user", "content": "What is the capital of France?"}]
    responses = ["Paris.", "The capital of France is Paris, a beautiful city on the Seine.", "I am fine, thank you."]
    scores = judge.score(prompt, responses)
    assert len(scores) == 3 and all(isinstance(s, float) for s in scores)

    hf_tok = transformers.AutoTokenizer.from_pretrained(path)
    hf_ids = [hf_tok.apply_chat_template(prompt + [{"role": "assistant", "content": r}], tokenize=True,
                                         chat_template=get_template("gemma").jinja, return_dict=False)
              for r in responses]
    assert hf_ids == [judge.encode(prompt, r) for r in responses]
    torch.testing.assert_close(torch.tensor(scores), hf_scores(path, hf_ids, PAD["gemma-2b"]), atol=1e-5, rtol=1e-5)


def test_reward_model_errors(reward_models, hf_checkpoints, tmp_path):
    with pytest.raises(CheckpointError, match="score.weight"):
        RewardModelJudge(hf_checkpoints["llama-3-8b"], "gemma", tokenizer=Tokenizer.from_dir(reward_models["gemma-2b"]))
    with pytest.raises(ValueError, match="label=1"):
        RewardModelJudge(reward_models["gemma-2b"], "gemma", label=1)
    with pytest.raises(ValueError, match="chat_template"):
        make_judge(str(reward_models["gemma-2b"]))
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        make_judge(str(tmp_path / "missing_rm"), chat_template="gemma")


# --- rules -------------------------------------------------------------------------------------------


def test_rule_judge_scores_each_response():
    calls = []

    def says_paris(prompt, response):
        calls.append(prompt[-1]["content"])
        return "paris" in response.lower()

    judge = RuleJudge(says_paris)
    prompt = [{"role": "user", "content": "Capital of France?"}]
    assert judge.score(prompt, ["Paris!", "London", "It is paris."]) == [1.0, 0.0, 1.0]
    assert calls == ["Capital of France?"] * 3
    assert isinstance(judge, Judge)
    with pytest.raises(TypeError, match="not a number"):
        RuleJudge(lambda p, r: "high").score(prompt, ["x"])
    with pytest.raises(ValueError, match="nan"):
        RuleJudge(lambda p, r: math.nan, name="broken").score(prompt, ["x"])


def test_make_judge_rules_and_unknown_name(monkeypatch):
    prompt = [{"role": "user", "content": "hi"}]
    assert make_judge("length").score(prompt, ["ab", "abcd"]) == [2.0, 4.0]
    assert make_judge("brevity").score(prompt, ["ab", "abcd"]) == [-2.0, -4.0]
    own = {"exact": lambda p, r: float(r == "42")}
    assert make_judge("exact", rules=own).score(prompt, ["42", "41"]) == [1.0, 0.0]
    with pytest.raises(ValueError, match=r"unknown judge 'lenght'.*brevity, length"):
        make_judge("lenght")
    with pytest.raises(ValueError, match=r"unknown judge 'length'.*known: exact"):
        make_judge("length", rules=own)

    monkeypatch.setitem(RULES, "always_one", None)  # the registry gets its old contents back at the end
    del RULES["always_one"]

    @register_rule("always_one")
    def always_one(prompt, response):
        return 1

    assert make_judge("always_one").score(prompt, ["a", "b"]) == [1.0, 1.0]
    with pytest.raises(ValueError, match="already registered"):
        register_rule("always_one")(lambda p, r: 0.0)
