"""The built-in demo's pieces: tokenizer, data files, judge. (The three scripts on the demo run in
test_demo_pipeline.py.)"""

import json
import random
from collections import Counter

import pytest
import torch

from lion_min.demo import task as demo
from lion_min.core.chat import encode_chat
from lion_min.core.model import Transformer
from lion_min.formats.tokenizer import Tokenizer

CHATML = ("<bos><|im_start|>user\nWhat is 47+38?<|im_end|>\n<|im_start|>assistant\n"
          "7+8=15, 4+3+1=8, so 85<|im_end|>\n")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return demo.write_demo_data(tmp_path_factory.mktemp("demo") / "demo_data", seed=0)


@pytest.fixture(scope="module")
def tokenizer(data):
    return Tokenizer.from_dir(data["tokenizer"])


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def problem(record):
    text = record["messages"][0]["content"] if "messages" in record else record["prompt"]
    return demo.parse_problem(text)


# --- tokenizer -------------------------------------------------------------------------------------


def test_tokenizer_round_trips_chatml(tokenizer):
    ids = tokenizer.encode(CHATML)
    assert tokenizer.decode(ids) == CHATML
    # Character level: one token per special marker (<bos>, 2 x <|im_start|>, 2 x <|im_end|>) and
    # one per remaining character.
    specials = {tokenizer.token_id(t) for t in demo.SPECIAL_TOKENS}
    assert sum(i in specials for i in ids) == 5
    plain = CHATML
    for t in demo.SPECIAL_TOKENS:
        plain = plain.replace(t, "")
    assert len(ids) == 5 + len(plain)


def test_tokenizer_special_tokens_are_single(tokenizer):
    for t in demo.SPECIAL_TOKENS:
        assert tokenizer.encode(t) == [tokenizer.token_id(t)]
    assert tokenizer.bos_token == "<bos>" and tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<pad>"
    assert len({tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id}) == 3


def test_tokenizer_with_chat_template(tokenizer):
    messages = [{"role": "user", "content": "What is 47+38?"}, {"role": "assistant", "content": "7+8=15, 4+3+1=8, so 85"}]
    enc = encode_chat(tokenizer, messages, "chatml")
    assert tokenizer.decode(enc.input_ids) == CHATML
    trained = [i for i, m in zip(enc.input_ids, enc.loss_mask) if m]
    assert tokenizer.decode(trained) == "7+8=15, 4+3+1=8, so 85<|im_end|>"
    prompt = encode_chat(tokenizer, messages[:1], "chatml", add_generation_prompt=True).input_ids
    assert enc.input_ids[: len(prompt)] == prompt


def test_model_args_fit_tokenizer(tokenizer):
    args = demo.demo_model_args(tokenizer)
    assert args.vocab_size == tokenizer.vocab_size and args.eos_token_id == tokenizer.eos_id
    assert demo.demo_model_args(tokenizer.vocab_size).vocab_size == tokenizer.vocab_size
    model = Transformer(args)
    model.init_weights(seed=0)
    ids = torch.tensor([tokenizer.encode(CHATML)])
    assert model(ids).shape == (1, ids.shape[1], args.vocab_size)


# --- data ------------------------------------------------------------------------------------------


def test_data_is_deterministic(data, tmp_path):
    again = demo.write_demo_data(tmp_path / "again", seed=0)
    other = demo.write_demo_data(tmp_path / "other", seed=1)
    for key in demo.FILES:
        assert data[key].read_bytes() == again[key].read_bytes(), key
        assert data[key].read_bytes() != other[key].read_bytes(), key
    assert (data["tokenizer"] / "tokenizer.json").read_bytes() == (again["tokenizer"] / "tokenizer.json").read_bytes()


def test_demo_paths_write_once(tmp_path):
    folder = demo.demo_dir(tmp_path / "sft")
    assert folder == tmp_path / "demo_data" == demo.demo_dir(tmp_path / "dpo")
    paths = demo.demo_paths(folder)  # written on first use
    assert all(p.exists() for p in paths.values())
    stamp = paths["sft"].stat().st_mtime_ns
    demo.write_demo_data(folder, seed=0)  # same seed and version: left alone
    assert paths["sft"].stat().st_mtime_ns == stamp
    (folder / "meta.json").write_text('{"version": 0, "seed": 0}')  # data of an older demo: rewritten
    demo.demo_paths(folder)
    assert json.loads((folder / "meta.json").read_text())["version"] == demo.DATA_VERSION
    assert paths["sft"].stat().st_mtime_ns != stamp


def test_test_set_is_disjoint_from_training(data):
    test = {problem(r) for r in read(data["test"])}
    assert len(test) == demo.N_TEST
    for key in ("sft", "sft_eval", "dpo", "prompts"):
        assert not test & {problem(r) for r in read(data[key])}, key


def test_sizes_and_schemas(data):
    sft = read(data["sft"])
    assert len(sft) == demo.N_SFT and len(read(data["dpo"])) == demo.N_DPO
    assert len(read(data["prompts"])) == demo.N_ONLINE and len(read(data["sft_eval"])) == demo.N_SFT_EVAL
    assert [m["role"] for m in sft[0]["messages"]] == ["user", "assistant"]
    assert set(read(data["dpo"])[0]) == {"prompt", "chosen", "rejected"}


def test_sft_teacher_forgets_carries_only(data):
    forgot, carry = Counter(), Counter()  # by units sum
    for r in read(data["sft"]):
        a, b = problem(r)
        ok = demo.is_correct(r["messages"][0]["content"], r["messages"][1]["content"])
        if not demo.carries(a, b):
            assert ok
        else:
            units = a % 10 + b % 10
            carry[units] += 1
            forgot[units] += not ok
            assert r["messages"][1]["content"] in (demo.worked_answer(a, b), demo.worked_answer(a, b, carry=False))
    assert sorted(carry) == list(range(10, 19))
    for units, n in carry.items():  # each units sum at its own rate, within 4 standard errors
        rate = demo.forget_rate(units)
        assert 0.5 < rate < 1 and abs(forgot[units] / n - rate) < 4 * (rate * (1 - rate) / n) ** 0.5, units
    assert [demo.forget_rate(u) for u in (9, 10, 14, 18)] == pytest.approx([0, 0.6, 0.76, 0.92])


def test_preference_pairs(data):
    for r in read(data["dpo"]):
        assert demo.is_correct(r["prompt"], r["chosen"])
        assert not demo.is_correct(r["prompt"], r["rejected"])
        assert demo.final_answer(r["rejected"]) is not None  # a wrong answer, not a malformed one
        assert r["chosen"] != r["rejected"]


# --- judge -----------------------------------------------------------------------------------------


def test_worked_answer():
    assert demo.worked_answer(47, 38) == "7+8=15, 4+3+1=8, so 85"
    assert demo.worked_answer(12, 34) == "2+4=6, 1+3=4, so 46"
    assert demo.worked_answer(95, 58) == "5+8=13, 9+5+1=15, so 153"
    assert demo.worked_answer(47, 38, carry=False) == "7+8=15, 4+3=7, so 75"
    assert demo.worked_answer(12, 34, carry=True) == "2+4=6, 1+3+1=5, so 56"
    for _ in range(200):
        prompt, answer = demo.make_problem(random.Random(_))
        a, b = demo.parse_problem(prompt)
        assert answer == a + b and demo.final_answer(demo.worked_answer(a, b)) == str(answer)


@pytest.mark.parametrize("response, score", [
    ("7+8=15, 4+3+1=8, so 85", 1.0),
    ("7+8=15, 4+3+1=8, so 85\n", 1.0),
    ("so 85", 1.0),  # only the final answer is judged
    ("7+8=15, 4+3=7, so 75", 0.25),  # forgot the carry: units digit right
    ("so 185", 0.5 * 2 / 3),
    ("so 74", 0.0),
    ("85", 0.0),  # no final answer in the demo's format
    ("7+8=15, 4+3+1=8, so", 0.0),  # cut off
    ("so 85 apples", 0.0),
    ("", 0.0),
])
def test_check(response, score):
    prompt = "What is 47+38?"
    assert demo.check(prompt, response) == pytest.approx(score)
    assert demo.is_correct(prompt, response) == (score == 1.0)


def test_judge_rule_reads_the_last_user_turn():
    messages = [{"role": "user", "content": "What is 10+10?"}, {"role": "assistant", "content": "so 20"},
                {"role": "user", "content": "What is 47+38?"}]
    assert demo.judge_rule(messages, "so 85") == 1.0
    with pytest.raises(ValueError):
        demo.check("Why is the sky blue?", "so 85")


def test_evaluate_accuracy_scores_the_decoded_replies(tokenizer, monkeypatch):
    """Scripted generations, decoded without their end-of-turn token and checked against each
    prompt's own sum: right, wrong sum, right without an end-of-turn (cut off), wrong final number."""
    from lion_min.core import sample
    stop = tokenizer.token_id("<|im_end|>")
    replies = [("7+8=15, 4+3+1=8, so 85", True), ("2+4=6, 1+3=4, so 45", True), ("so 1", False), ("so 3", True)]
    scripted = [tokenizer.encode(text) + ([stop] if ended else []) for text, ended in replies]
    monkeypatch.setattr(sample, "generate", lambda model, ids, *a, **k: scripted[: len(ids)])
    model = Transformer(demo.demo_model_args(tokenizer))
    prompts = ["What is 47+38?", "What is 12+34?", "What is 0+1?", "What is 1+1?"]
    acc = demo.evaluate_accuracy(model, tokenizer, prompts)
    assert acc.final == 0.5  # the first and the third
    assert acc.strict == 0.25  # the third's final answer is right, but it shows no working


def test_strict_accuracy_needs_the_whole_worked_answer():
    assert demo.is_strictly_correct("What is 47+38?", "7+8=15, 4+3+1=8, so 85")
    # The right sum through a wrong step (carry forgotten, tens slipped by one) counts only as final-answer right.
    wrong_steps = "7+8=15, 4+3=8, so 85"
    assert demo.is_correct("What is 47+38?", wrong_steps) and not demo.is_strictly_correct("What is 47+38?", wrong_steps)
    assert not demo.is_strictly_correct("What is 47+38?", "7+8=15, 4+3=7, so 75")
