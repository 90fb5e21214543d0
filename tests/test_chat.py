"""Chat templates and the tokenizer wrapper against the official Jinja templates.

Golden texts come from jinja2 rendering the verbatim official templates in data/chat_templates
(gemma3.jinja, the gemma-3-*-it template, is copied from TRL 1.16.0's trl/chat_templates/gemma3.jinja,
which TRL checks against the hub's releases; the hub is out of reach here);
golden ids from tokenizing that whole text once (and, for Llama-3, from quicktok's independent
implementation of Meta's tokenizer). Golden masks are spelled out by hand.
"""

import json
from pathlib import Path

import jinja2
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lion_min.core.chat import (
    TEMPLATES,
    ChatFormatError,
    encode_chat,
    get_template,
    render,
    stop_token_ids,
    template_of,
)
from lion_min.formats.tokenizer import Tokenizer, TokenizerError, UnknownTokenError
from tokenizers_for_tests import (
    build_chatml_tokenizer,
    build_gemma_chatml_tokenizer,
    build_gemma_tokenizer,
    build_llama3_tokenizer,
)

TEMPLATE_DIR = Path(__file__).parent / "data" / "chat_templates"
BUILDERS = {
    "llama3": build_llama3_tokenizer,
    "gemma": build_gemma_tokenizer,
    "chatml": build_chatml_tokenizer,
    "gemma_chatml": build_gemma_chatml_tokenizer,
}
# (template, tokenizer) pairs under test: ChatML is used with both model families.
# Gemma-3's template writes the same tokens as Gemma's (its tokenizer gives them other ids: 105, 106).
PAIRS = [("llama3", "llama3"), ("gemma", "gemma"), ("gemma3", "gemma"), ("chatml", "chatml"), ("chatml", "gemma_chatml")]
PAIR_IDS = [f"{t}-{k}" for t, k in PAIRS]


@pytest.fixture(scope="session")
def tok_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    return {name: build(root / name) for name, build in BUILDERS.items()}


@pytest.fixture(scope="session")
def toks(tok_dirs) -> dict[str, Tokenizer]:
    return {name: Tokenizer.from_dir(d) for name, d in tok_dirs.items()}


def jinja_render(name: str, messages: list[dict], bos_token: str, add_generation_prompt: bool) -> str:
    # As transformers renders chat templates: sandboxed, trim_blocks + lstrip_blocks.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message: str):
        raise jinja2.TemplateError(message)

    template = env.from_string((TEMPLATE_DIR / f"{name}.jinja").read_text())
    return template.render(
        messages=messages, bos_token=bos_token, add_generation_prompt=add_generation_prompt,
        raise_exception=raise_exception,
    )


def msgs(*pairs: str) -> list[dict]:
    """msgs("user", "hi", "assistant", "hello") -> [{"role": "user", "content": "hi"}, ...]."""
    return [{"role": r, "content": c} for r, c in zip(pairs[::2], pairs[1::2])]


# User/assistant alternating conversations (valid for every template); a system message is
# prepended where the template allows one.
CONVERSATIONS = {
    "one_user_turn": msgs("user", "What is 2+2?"),
    "multi_turn": msgs(
        "user", "Hi!", "assistant", "Hello! How can I help?",
        "user", "Write code.", "assistant", "def f(x):\n    return x + 1\n\nprint(f(2))",
    ),
    "whitespace": msgs(
        "user", "  padded question \n\n", "assistant", "\n\tpadded answer  \n",
        "user", "\u00a0nbsp and ideographic space\u3000", "assistant", "   ",
    ),
    "non_ascii": msgs(
        "user", "Ça va ? L'été à Montréal, naïve café 🇫🇷", "assistant", "Très bien ! 😀🎉👍🏽",
        "user", "你好，世界。日本語もOK？", "assistant", "你好！こんにちは 👋",
    ),
    "empty_assistant": msgs("user", "Say nothing.", "assistant", "", "user", "ok"),
}
SYSTEM = {"role": "system", "content": "  You are a helpful assistant.\n"}


def conversation(template: str, name: str) -> list[dict]:
    c = CONVERSATIONS[name]
    return [SYSTEM, *c] if TEMPLATES[template].allow_system else c


def trained_runs(tok: Tokenizer, ids: list[int], mask: list[bool]) -> list[str]:
    """Decoded text of each maximal run of trained tokens."""
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    return runs + ([tok.decode(cur)] if cur else [])


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_stored_jinja_is_the_official_text_byte_for_byte(name):
    """ChatTemplate.jinja is what an export writes as chat_template; tools recognise a template by
    its exact string, so it must be the released text (real newlines inside the Jinja string
    literals, as tokenizer_config.json decodes to), not just one that renders the same."""
    official = (TEMPLATE_DIR / f"{name}.jinja").read_bytes()
    assert b"\\n" not in official  # the reference copy itself has no backslash-n escapes
    assert TEMPLATES[name].jinja.encode() == official
    assert template_of(official.decode()) is TEMPLATES[name]
    assert template_of(official.decode().replace("\n", "\\n")) is None  # the escaped variant is not it


# --- render and encode_chat against Jinja ---------------------------------------------------------


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("conv", list(CONVERSATIONS))
@pytest.mark.parametrize("template,tok_name", PAIRS, ids=PAIR_IDS)
def test_matches_jinja(toks, template, tok_name, conv, add_generation_prompt):
    tok, t = toks[tok_name], TEMPLATES[template]
    messages = conversation(template, conv)
    expected = jinja_render(template, messages, tok.bos_token, add_generation_prompt)

    text = render(messages, template, add_generation_prompt, bos_token=tok.bos_token)
    assert text == expected
    enc = encode_chat(tok, messages, template, add_generation_prompt=add_generation_prompt)
    assert enc.input_ids == tok.encode(expected)
    assert len(enc.loss_mask) == len(enc.input_ids)
    assert enc.input_ids[0] == tok.bos_id and enc.input_ids.count(tok.bos_id) == 1
    assert not enc.loss_mask[0]

    # Trained text = each assistant content (stripped where the template strips) + end of turn.
    # The one allowed exception is the documented straddle: an unstripped content starting with
    # whitespace can merge with the header's newline into one token, which then trains.
    want = [
        (m["content"].strip() if t.strip_content else m["content"]) + t.end_of_turn
        for m in messages if m["role"] == "assistant"
    ]
    runs = trained_runs(tok, enc.input_ids, enc.loss_mask)
    assert len(runs) == len(want)
    for run, exp in zip(runs, want):
        straddle = not t.strip_content and exp[:1].isspace() and run == "\n" + exp
        assert run == exp or straddle, (run, exp)
    if add_generation_prompt:  # the generation prompt never trains
        header = tok.encode(t.header.format(role=t.assistant_role))
        assert enc.input_ids[-len(header):] == header and not any(enc.loss_mask[-len(header):])


@pytest.mark.parametrize("conv", list(CONVERSATIONS))
def test_llama3_ids_match_quicktok(toks, conv):
    """An implementation independent of `tokenizers` gives the same ids for the rendered text."""
    import quicktok

    text = render(conversation("llama3", conv), "llama3", add_generation_prompt=True)
    assert toks["llama3"].encode(text) == quicktok.get_encoding("llama3").encode(text, allowed_special="all")


def test_render_defaults_and_bos(toks):
    m = msgs("user", " hi ")
    assert render(m, "llama3") == "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
    assert render(m, "gemma", True) == "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"
    assert render(m, "chatml", bos_token="<bos>") == "<bos><|im_start|>user\n hi <|im_end|>\n"
    assert render(m, TEMPLATES["llama3"]) == render(m, "llama3")
    with pytest.raises(ChatFormatError, match="bos_token"):
        render(m, "chatml")  # ChatML has no BOS of its own


# --- golden masks ---------------------------------------------------------------------------------

GOLDEN = msgs("system", "Be brief.", "user", "Hi!", "assistant", " Hello there! ", "user", "Thanks 😀", "assistant", "Bye.")


def test_llama3_golden_ids_and_mask(toks):
    tok = toks["llama3"]
    enc = encode_chat(tok, GOLDEN[:3], "llama3")
    bot, sh, eh, eot = 128000, 128006, 128007, 128009
    # Real Llama-3 ids: system 9125, user 882, assistant 78191, "\n\n" 271, Hello 9906.
    assert enc.input_ids == [
        bot, sh, 9125, eh, 271, 3513, 10015, 13, eot,
        sh, 882, eh, 271, 13347, 0, eot,
        sh, 78191, eh, 271, 9906, 1070, 0, eot,
    ]
    assert enc.loss_mask == [False] * 20 + [True] * 4  # "Hello", " there", "!", <|eot_id|>


@pytest.mark.parametrize("template,tok_name", PAIRS, ids=PAIR_IDS)
def test_golden_mask(toks, template, tok_name):
    tok, t = toks[tok_name], TEMPLATES[template]
    messages = GOLDEN if t.allow_system else GOLDEN[1:]
    eot = t.end_of_turn
    strip = t.strip_content
    first = ("Hello there!" if strip else " Hello there! ") + eot

    enc = encode_chat(tok, messages, template)
    ids, mask = enc.input_ids, enc.loss_mask
    assert trained_runs(tok, ids, mask) == [first, "Bye." + eot]
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == first + "Bye." + eot

    tokens = [tok.decode([i]) for i in ids]
    assert not mask[0] and tokens[0] == tok.bos_token
    for i, s in enumerate(tokens):
        if s == eot:  # every end of turn: trained exactly when it closes an assistant turn
            assert mask[i] == mask[i - 1]
            if t.after_turn:  # the newline after it never trains
                assert tokens[i + 1] == t.after_turn and not mask[i + 1]
        if s in t.specials and s != eot:  # headers never train
            assert not mask[i]
    header = tok.encode(t.header.format(role=t.assistant_role))  # the assistant role header
    starts = [i for i in range(len(ids)) if ids[i:i + len(header)] == header]
    assert len(starts) == 2 and not any(any(mask[i:i + len(header)]) for i in starts)
    for user_text in ("Hi!", "Thanks 😀", "Be brief."):  # user and system content never trains
        assert user_text not in "".join(trained_runs(tok, ids, mask))

    # train_on="last": only the last assistant turn. "all": everything but the BOS.
    last = encode_chat(tok, messages, template, train_on="last")
    assert last.input_ids == ids
    assert trained_runs(tok, ids, last.loss_mask) == ["Bye." + eot]
    every = encode_chat(tok, messages, template, train_on="all")
    assert every.loss_mask == [False] + [True] * (len(ids) - 1)


def test_train_on_last_uses_last_assistant_turn(toks):
    # The conversation ends with a user turn: "last" still means the last assistant message.
    enc = encode_chat(toks["llama3"], GOLDEN[:4], "llama3", train_on="last")
    assert trained_runs(toks["llama3"], enc.input_ids, enc.loss_mask) == ["Hello there!<|eot_id|>"]
    none = encode_chat(toks["llama3"], GOLDEN[:2], "llama3")  # no assistant turn: nothing trains
    assert not any(none.loss_mask)


def test_straddling_token_trains(toks):
    """ChatML keeps content whitespace: "assistant\\n" + "\\nHi" gives one "\\n\\n" token holding the
    header's newline and the content's. The rule (any overlap trains) puts it in the mask."""
    tok = toks["chatml"]
    enc = encode_chat(tok, msgs("user", "x", "assistant", "\nHi"), "chatml")
    i = len(enc.input_ids) - enc.input_ids[::-1].index(tok.token_id("<|im_start|>")) - 1  # assistant turn
    assert [tok.decode([x]) for x in enc.input_ids[i:i + 4]] == ["<|im_start|>", "assistant", "\n\n", "Hi"]
    assert enc.loss_mask[i:i + 4] == [False, False, True, True]
    assert trained_runs(tok, enc.input_ids, enc.loss_mask) == ["\n\nHi<|im_end|>"]


def test_character_split_across_tokens_trains_whole(toks):
    # The small Gemma-like BPE splits a CJK character it never merged into byte tokens sharing one offset.
    tok = toks["gemma"]
    enc = encode_chat(tok, msgs("user", "a", "assistant", "丼"), "gemma")
    pieces = [i for i, m in zip(enc.input_ids, enc.loss_mask) if m]
    assert len(pieces) == 4  # three byte tokens + <end_of_turn>
    assert tok.decode(pieces) == "丼<end_of_turn>"


# --- errors ---------------------------------------------------------------------------------------

U, A = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}


@pytest.mark.parametrize("template", list(TEMPLATES))
@pytest.mark.parametrize(
    "messages,index,words",
    [
        ([], 0, "at least one message"),
        ([{"role": "user"}], 0, "'role' and 'content'"),
        ([U, {"content": "x"}], 1, "'role' and 'content'"),
        ([U, "hello"], 1, "'role' and 'content'"),
        ([U, {"role": "assistant", "content": None}], 1, "content must be a string"),
        ([U, {"role": "assistant", "content": ["a"]}], 1, "content must be a string"),
        ([U, A, {"role": "tool", "content": "x"}], 2, "unknown role 'tool'"),
    ],
)
def test_bad_messages(template, messages, index, words):
    with pytest.raises(ChatFormatError, match=rf"message {index}\b.*{words}|{words}.*message {index}\b"):
        render(messages, template, bos_token="<s>")


@pytest.mark.parametrize(
    "messages,index,words,jinja_words",
    [
        ([{"role": "system", "content": "s"}, U], 0, "system role not supported", "System role not supported"),
        ([U, A, {"role": "system", "content": "s"}], 2, "system role not supported", "alternate"),
        ([U, U], 1, "must alternate", "alternate"),
        ([A, U], 0, "must alternate", "alternate"),
        ([U, A, A], 2, "must alternate", "alternate"),
    ],
)
def test_gemma_role_errors(messages, index, words, jinja_words):
    with pytest.raises(ChatFormatError, match=rf"message {index}: .*{words}"):
        render(messages, "gemma")
    with pytest.raises(jinja2.TemplateError, match=jinja_words):  # the official template refuses too
        jinja_render("gemma", messages, "<bos>", False)


S = {"role": "system", "content": " Be brief.\n"}


def test_gemma3_writes_the_system_message_into_the_first_user_turn():
    # Unstripped, then a blank line, then the user's stripped text; no turn of its own, never trained.
    m = [S, {"role": "user", "content": " Hi "}, A]
    assert render(m, "gemma3") == ("<bos><start_of_turn>user\n Be brief.\n\n\nHi<end_of_turn>\n"
                                   "<start_of_turn>model\nhello<end_of_turn>\n")
    for messages in (m, [S], [S, U]):  # a system message alone writes nothing, as the official template
        assert render(messages, "gemma3", True) == jinja_render("gemma3", messages, "<bos>", True)


@pytest.mark.parametrize(
    "messages,index,words,jinja_words",
    [
        ([U, A, S], 2, "system message only first", "alternate"),
        ([S, A], 1, "must alternate", "alternate"),
        ([S, U, U], 2, "must alternate", "alternate"),
        ([S, U, A, A], 3, "must alternate", "alternate"),
    ],
)
def test_gemma3_role_errors(messages, index, words, jinja_words):
    with pytest.raises(ChatFormatError, match=rf"message {index}: .*{words}"):
        render(messages, "gemma3")
    with pytest.raises(jinja2.TemplateError, match=jinja_words):
        jinja_render("gemma3", messages, "<bos>", False)


def test_gemma3_refuses_a_late_system_message_its_template_would_write_as_a_turn():
    # The official template writes [user, system] as a "<start_of_turn>system" turn, which Gemma-3
    # was not trained on; lion_min refuses it rather than train on it.
    assert "<start_of_turn>system\n" in jinja_render("gemma3", [U, S], "<bos>", False)
    with pytest.raises(ChatFormatError, match="message 1: the gemma3 template takes a system message only first"):
        render([U, S], "gemma3")


def test_llama3_and_chatml_accept_any_role_order():
    m = [U, U, A, A, {"role": "system", "content": "late system"}]
    for name in ("llama3", "chatml"):
        assert render(m, name, bos_token="<s>") == jinja_render(name, m, "<s>", False)


@pytest.mark.parametrize(
    "template,tok_name,missing",
    [("gemma", "llama3", "<start_of_turn>"), ("chatml", "llama3", "<|im_start|>"), ("llama3", "gemma", "<|start_header_id|>")],
)
def test_tokenizer_lacking_template_tokens(toks, template, tok_name, missing):
    with pytest.raises(ChatFormatError, match=f"lacks the special token '{missing}'.*{template}"):
        encode_chat(toks[tok_name], [U, A], template)


def test_bad_names(toks):
    with pytest.raises(ValueError, match="llama3, gemma, gemma3, chatml"):
        get_template("vicuna")
    with pytest.raises(ValueError, match="train_on"):
        encode_chat(toks["llama3"], [U, A], "llama3", train_on="prompt")


def test_stop_token_ids(toks):
    assert stop_token_ids(toks["llama3"], "llama3") == [128009, 128001]
    assert stop_token_ids(toks["gemma"], "gemma") == [107, 1]
    assert stop_token_ids(toks["chatml"], "chatml") == [128257, 128001]


# --- the tokenizer wrapper ------------------------------------------------------------------------


def test_special_ids(toks):
    llama, gemma, chatml = toks["llama3"], toks["gemma"], toks["chatml"]
    assert (llama.bos_id, llama.eos_id, llama.pad_id, llama.vocab_size) == (128000, 128001, None, 128256)
    assert [llama.token_id(s) for s in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")] == [128006, 128007, 128009]
    assert llama.token_id("<|reserved_special_token_250|>") == 128255
    assert (gemma.pad_id, gemma.eos_id, gemma.bos_id) == (0, 1, 2)
    assert [gemma.token_id(s) for s in ("<start_of_turn>", "<end_of_turn>", "<unk>", "<unused0>")] == [106, 107, 3, 4]
    assert [chatml.token_id(s) for s in ("<|im_start|>", "<|im_end|>")] == [128256, 128257]
    assert chatml.vocab_size == 128258


@pytest.mark.parametrize("name", ["llama3", "gemma"])
def test_encode_adds_no_bos(toks, name):
    tok = toks[name]
    assert tok._tok.encode("hello", add_special_tokens=True).ids[0] == tok.bos_id  # the post-processor would
    assert tok.bos_id not in tok.encode("hello")
    text = f"{tok.bos_token}hello"
    assert tok.encode(text) == [tok.bos_id, *tok.encode("hello")]


@pytest.mark.parametrize("name", ["llama3", "gemma"])
def test_decode_round_trip(toks, name):
    tok = toks[name]
    for text in ["Ça va ? 你好 😀👍🏽 x", "  spaces\n\n\ttabs  ", "<|eot_id|> and <end_of_turn> as text"]:
        assert tok.decode(tok.encode(text)) == text
    ids = tok.encode(f"{tok.bos_token}a")
    assert tok.decode(ids, skip_special_tokens=True) == "a"


def test_token_id_unknown(toks, tok_dirs):
    with pytest.raises(KeyError, match=r"'<\|nope\|>'.*" + str(tok_dirs["gemma"])):
        toks["gemma"].token_id("<|nope|>")
    with pytest.raises(UnknownTokenError):
        toks["gemma"].token_id("<|nope|>")


def test_from_dir_errors(tmp_path, tok_dirs):
    with pytest.raises(TokenizerError, match=f"no tokenizer.json in {tmp_path}"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match=str(tmp_path / "tokenizer.json")):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text((tok_dirs["gemma"] / "tokenizer.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(TokenizerError, match=str(tmp_path / "tokenizer_config.json")):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|missing|>"}))
    with pytest.raises(UnknownTokenError, match="<\\|missing\\|>"):
        Tokenizer.from_dir(tmp_path)
    # Added-token form of a special token, as older tokenizer_config.json files store it.
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": {"content": "<bos>", "lstrip": False}}))
    assert Tokenizer.from_dir(tmp_path).bos_id == 2


@pytest.mark.parametrize("template,tok_name", PAIRS, ids=PAIR_IDS)
def test_save_round_trip_and_transformers(toks, tmp_path, template, tok_name):
    import transformers

    tok, t = toks[tok_name], TEMPLATES[template]
    out = tok.save(tmp_path / "export", chat_template=t.jinja)
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["chat_template"] == t.jinja and config["bos_token"] == tok.bos_token

    again = Tokenizer.from_dir(out)
    assert (again.bos_id, again.eos_id, again.pad_id, again.vocab_size) == (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size)
    assert again.chat_template == t.jinja
    hf = transformers.AutoTokenizer.from_pretrained(out)
    for conv in ("multi_turn", "non_ascii", "whitespace"):
        messages = conversation(template, conv)
        ours = encode_chat(tok, messages, template, add_generation_prompt=True)
        assert encode_chat(again, messages, template, add_generation_prompt=True) == ours
        text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert text == render(messages, template, True, bos_token=tok.bos_token)
        hf_ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
        assert list(hf_ids) == ours.input_ids


def test_save_writes_back_the_folder_files_and_only_changed_tokens(tok_dirs, tmp_path):
    """save() writes the files read by from_dir byte for byte; a special token that differs from the
    config's is updated in tokenizer_config.json and in special_tokens_map.json (where that file has
    it); a token in the AddedToken form that did not change stays in that form."""
    import shutil

    src = shutil.copytree(tok_dirs["gemma"], tmp_path / "src")
    pad = {"content": "<pad>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    (src / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<eos>", "pad_token": pad}))
    (src / "tokenizer.model").write_bytes(b"\x00 sentencepiece bytes, carried as they are")
    tok = Tokenizer.from_dir(src)
    tok.save(tmp_path / "same")
    for f in src.iterdir():
        assert (tmp_path / "same" / f.name).read_bytes() == f.read_bytes(), f.name

    changed = Tokenizer(tok._tok, bos_token="<bos>", eos_token="<end_of_turn>", pad_token="<pad>",
                        config=tok.config | {"pad_token": {"__type": "AddedToken"} | pad}, files=tok.files)
    out = changed.save(tmp_path / "changed")
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config == tok.config | {"eos_token": "<end_of_turn>", "pad_token": {"__type": "AddedToken"} | pad}
    assert json.loads((out / "special_tokens_map.json").read_text()) == {"eos_token": "<end_of_turn>", "pad_token": pad}
    assert Tokenizer.from_dir(out).eos_id == 107


def test_save_of_a_tokenizer_built_in_memory(tok_dirs, tmp_path):
    import tokenizers
    import transformers

    tok = Tokenizer(tokenizers.Tokenizer.from_file(str(tok_dirs["gemma"] / "tokenizer.json")), bos_token="<bos>",
                    eos_token="<eos>")
    out = tok.save(tmp_path / "out", chat_template=TEMPLATES["gemma"].jinja)
    assert sorted(f.name for f in out.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    assert json.loads((out / "tokenizer_config.json").read_text()) == {
        "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False, "bos_token": "<bos>",
        "eos_token": "<eos>", "chat_template": TEMPLATES["gemma"].jinja}
    hf = transformers.AutoTokenizer.from_pretrained(out)
    messages = msgs("user", "Hello there!", "assistant", "Paris.")
    assert hf.apply_chat_template(messages, tokenize=True, return_dict=False) == encode_chat(tok, messages, "gemma").input_ids
