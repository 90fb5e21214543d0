"""Chat templates (llama3, gemma, gemma3, chatml) written by hand, and the loss mask of a conversation.

`render` produces exactly the text of the official Jinja template (kept in `ChatTemplate.jinja` so
exported tokenizers carry it, and checked against it in tests/test_chat.py). All four share one
shape:

    BOS  [header(role) + content + end_of_turn + after_turn] per message  [header("assistant")]

with the content stripped (Jinja's `| trim` is Python's str.strip) for llama3 and the Gemmas, not
chatml. Gemma-3's one difference: a system message is no turn of its own; its content and a blank
line open the first user turn (gemma-2b-it's template refuses a system message).

`encode_chat` tokenizes the whole rendered text ONCE (as apply_chat_template does), then builds the
loss mask from character spans: the content of each trained assistant message plus the
end-of-turn marker closing it. A token trains when its character span overlaps a trained span.
Turn markers are special tokens, so span ends always fall between tokens; a span start (after the
header's newline) falls between tokens too unless the content itself begins with whitespace the
template keeps (chatml only, e.g. "\n..."): then the token that joins the header's newline to that
whitespace ("\n\n") straddles the boundary and trains, since the model must emit it to produce the
reply.
"""

import json
import re
from dataclasses import dataclass, replace
from itertools import chain
from typing import Literal, NamedTuple, Optional, Protocol

import numpy as np


class Tokenizer(Protocol):
    """What chat encoding asks of a tokenizer; lion_min/formats/tokenizer.py:Tokenizer (a Hugging
    Face tokenizer.json with its special tokens) is the one the package reads from a model folder."""

    source: str  # where it was read from, for messages
    bos_token: Optional[str]
    bos_id: Optional[int]
    eos_id: Optional[int]
    chat_template: Optional[str]  # the folder's own Jinja template, if any
    added: str  # which special tokens were given ids here ("" if none)

    def encode(self, text: str) -> list[int]: ...
    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]: ...
    def encode_batch_with_offsets(self, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]: ...
    def token_id(self, token: str) -> int: ...
    def with_special_tokens(self, tokens: list[str]) -> "Tokenizer": ...


ROLES = ("system", "user", "assistant")
TrainOn = Literal["assistant", "all", "last"]


class ChatFormatError(ValueError):
    pass


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    header: str
    """Opens a turn; "{role}" is replaced by the role name."""
    end_of_turn: str
    """Special token closing every turn: trained after assistant content, and a stop token."""
    after_turn: str
    """Text after end_of_turn; never trained (the model stops at end_of_turn)."""
    strip_content: bool
    """Jinja `| trim` on the content (str.strip: Unicode whitespace at both ends)."""
    assistant_role: str
    """Role name written for "assistant" (gemma says "model")."""
    allow_system: bool
    alternate: bool
    """Roles must go user, assistant, user, ... starting with user (gemma)."""
    default_bos: Optional[str]
    """BOS written by render() when no bos_token is given; None for chatml, which takes the BOS of
    whatever model uses it."""
    specials: tuple[str, ...]
    """Special tokens the template writes; the tokenizer must encode each as one token."""
    jinja: str
    """The official Jinja template, verbatim, for tokenizer_config.json."""
    system_in_first_user: bool = False
    """Gemma-3: a leading system message is written at the start of the first user turn, followed by
    a blank line (and not stripped); roles alternate from the message after it."""


# The official templates, verbatim (data, not run here): Meta-Llama-3-8B-Instruct, gemma-2b-it (also
# Gemma-2's), gemma-3-*-it (with its image branch, which text never takes), and ChatML with a leading
# BOS as the LION models use it. The "\n" below are real newlines inside
# the Jinja string literals, as in the released tokenizer_config.json files: the rendered text would
# be the same with backslash-n escapes, but tools that recognise a template by its exact string (TRL
# maps known templates to training templates) would not know an export that carried that variant.
_LLAMA3_JINJA = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim "
    "+ '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
_GEMMA_JINJA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
    "supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != "
    "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}"
    "{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
_GEMMA3_JINJA = (
    "{{ bos_token }}\n{%- if messages[0]['role'] == 'system' -%}\n    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n{%- else -%}\n    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n{%- endif -%}\n{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n    {%- if (message['role'] == 'assistant') -%}\n        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n        {%- set role = message['role'] -%}\n    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n        {%- endfor -%}\n    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n    {%- endif -%}\n    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n{%- if add_generation_prompt -%}\n    {{'<start_of_turn>model\n'}}\n{%- endif -%}\n"
)
_CHATML_JINJA = (
    "{{ bos_token }}{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_GEMMA = ChatTemplate(
    name="gemma",
    header="<start_of_turn>{role}\n",
    end_of_turn="<end_of_turn>",
    after_turn="\n",
    strip_content=True,
    assistant_role="model",
    allow_system=False,
    alternate=True,
    default_bos="<bos>",
    specials=("<start_of_turn>", "<end_of_turn>"),
    jinja=_GEMMA_JINJA,
)

TEMPLATES: dict[str, ChatTemplate] = {
    "llama3": ChatTemplate(
        name="llama3",
        header="<|start_header_id|>{role}<|end_header_id|>\n\n",
        end_of_turn="<|eot_id|>",
        after_turn="",
        strip_content=True,
        assistant_role="assistant",
        allow_system=True,
        alternate=False,
        default_bos="<|begin_of_text|>",
        specials=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        jinja=_LLAMA3_JINJA,
    ),
    "gemma": _GEMMA,
    # Gemma-3 writes Gemma's turns; its one difference: a system message opens the first user turn.
    "gemma3": replace(_GEMMA, name="gemma3", allow_system=True, system_in_first_user=True, jinja=_GEMMA3_JINJA),
    "chatml": ChatTemplate(
        name="chatml",
        header="<|im_start|>{role}\n",
        end_of_turn="<|im_end|>",
        after_turn="\n",
        strip_content=False,
        assistant_role="assistant",
        allow_system=True,
        alternate=False,
        default_bos=None,
        specials=("<|im_start|>", "<|im_end|>"),
        jinja=_CHATML_JINJA,
    ),
}


def get_template(name: str) -> ChatTemplate:
    if name not in TEMPLATES:
        raise ValueError(f"unknown chat template {name!r}; known: {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def template_of(jinja: Optional[str]) -> Optional[ChatTemplate]:
    """The known template whose official Jinja text is exactly `jinja` (or is, after export_jinja's
    system-turn line), else None."""
    return next((t for t in TEMPLATES.values() if jinja in (t.jinja, export_jinja(t, template_system(jinja)))), None)


# The line an export puts before the official template when training inserted a system turn
# (--system_prompt, LION's empty one): the exported template renders what training saw, and a
# conversation with its own system turn keeps it, as with_system does. (TRL recognises only the
# official text; this one it renders through Jinja like any other.)
_SYSTEM_LINE = ("{%- if not messages or messages[0]['role'] != 'system' %}{%- set messages = "
                "[{'role': 'system', 'content': SYSTEM}] + messages %}{%- endif %}")
_SYSTEM_RE = re.compile(re.escape(_SYSTEM_LINE).replace("SYSTEM", "(\"(?:[^\"\\\\]|\\\\.)*\")"))


def export_jinja(template: ChatTemplate | str, system_prompt: Optional[str]) -> str:
    """The Jinja template an export carries: the official one, led by _SYSTEM_LINE when training
    inserted a system turn (with_system), so that it renders exactly the token layout training used."""
    t = _as_template(template)
    if system_prompt is None:
        return t.jinja
    return _SYSTEM_LINE.replace("SYSTEM", json.dumps(system_prompt, ensure_ascii=False)) + t.jinja


def template_system(jinja: Optional[str]) -> Optional[str]:
    """The system prompt an exported template (export_jinja) inserts, else None."""
    m = _SYSTEM_RE.match(jinja or "")
    return json.loads(m.group(1)) if m else None


def with_template_tokens(tokenizer: Tokenizer, template: ChatTemplate | str) -> Tokenizer:
    """The tokenizer, able to encode `template`. ChatML is written into models of any family (LION
    trains it on the base Gemma and Llama-3, whose tokenizers lack its two tokens), so its tokens
    are given ids where missing (Tokenizer.with_special_tokens: the family's reserved tokens, else
    new ids). The llama3 and Gemma templates need their own family's tokenizer (check_tokenizer)."""
    t = _as_template(template)
    return tokenizer.with_special_tokens(list(t.specials)) if t.name == "chatml" else tokenizer


def template_line(template: str, tokenizer: Tokenizer) -> str:
    """The opening summary's line on the chat template: whether it is the model folder's own or
    replaces another, and how its tokens got ids when the tokenizer lacked them."""
    own = template_of(tokenizer.chat_template)
    if own is not None and own.name == template:
        line = f"{template} (the model folder's own)"
    elif tokenizer.chat_template is None:
        line = f"{template} (the model folder carries none)"
    else:
        line = (f"{template}, replacing the {own.name if own else 'unknown'} template the model folder carries: "
                f"the export carries {template} (--chat_template=auto keeps the folder's)")
    return line + (f"; {tokenizer.added}" if tokenizer.added else "")


def _as_template(template: ChatTemplate | str) -> ChatTemplate:
    return get_template(template) if isinstance(template, str) else template


def _check_messages(messages: list[dict], t: ChatTemplate) -> None:
    if not isinstance(messages, (list, tuple)) or len(messages) == 0:
        raise ChatFormatError("a conversation needs at least one message (message 0 is missing)")
    first_turn = 0  # the message where user/assistant alternation starts
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ChatFormatError(f"message {i}: needs 'role' and 'content' keys, got {m!r}")
        role, content = m["role"], m["content"]
        if not isinstance(content, str):
            raise ChatFormatError(f"message {i}: content must be a string, got {type(content).__name__}")
        if role not in ROLES:
            raise ChatFormatError(f"message {i}: unknown role {role!r}; expected one of {', '.join(ROLES)}")
        if role == "system" and not t.allow_system:
            raise ChatFormatError(f"message {i}: system role not supported by the {t.name} template")
        if role == "system" and t.system_in_first_user:  # Gemma-3: only first, as no turn of its own
            if i > 0:
                raise ChatFormatError(f"message {i}: the {t.name} template takes a system message only first")
            first_turn = 1
            continue
        if t.alternate and role != ("user" if (i - first_turn) % 2 == 0 else "assistant"):
            raise ChatFormatError(
                f"message {i}: {t.name} roles must alternate user/assistant/user/assistant/..., got {role!r}"
            )


def _render_with_spans(
    messages: list[dict], t: ChatTemplate, add_generation_prompt: bool, bos_token: Optional[str]
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and, per message, the (start, end) character span of its content plus
    end-of-turn marker (the part an assistant message trains on)."""
    _check_messages(messages, t)
    bos = bos_token if bos_token is not None else t.default_bos
    if bos is None:
        raise ChatFormatError(f"the {t.name} template needs a bos_token (the model's BOS)")
    parts, spans, n = [bos], [], len(bos)
    system = ""  # Gemma-3: a system message's text, waiting for the first user turn
    for m in messages:
        if m["role"] == "system" and t.system_in_first_user:
            system = m["content"] + "\n\n"
            spans.append((n, n))  # it writes nothing here
            continue
        role = t.assistant_role if m["role"] == "assistant" else m["role"]
        header, system = t.header.format(role=role) + system, ""
        content = m["content"].strip() if t.strip_content else m["content"]
        start = n + len(header)
        end = start + len(content) + len(t.end_of_turn)
        parts += [header, content, t.end_of_turn, t.after_turn]
        spans.append((start, end))
        n = end + len(t.after_turn)
    if add_generation_prompt:
        parts.append(t.header.format(role=t.assistant_role))
    return "".join(parts), spans


def render(
    messages: list[dict],
    template: ChatTemplate | str,
    add_generation_prompt: bool = False,
    bos_token: Optional[str] = None,
) -> str:
    """The conversation as text, identical to the official Jinja template's output.

    messages: [{"role": "system" | "user" | "assistant", "content": str}, ...].
    bos_token: defaults to the template's own (required for chatml); encode_chat passes the
    tokenizer's.
    """
    return _render_with_spans(messages, _as_template(template), add_generation_prompt, bos_token)[0]


class ChatEncoding(NamedTuple):
    """One encoded example, the type SFT, DPO and sampling share: `ids, mask = encoding` unpacks it."""

    input_ids: list[int]
    loss_mask: list[bool]
    """loss_mask[i]: token i is a training target (predicted from position i - 1)."""


def check_tokenizer(tokenizer: Tokenizer, template: ChatTemplate | str) -> None:
    """Raise ChatFormatError unless the tokenizer has a BOS and encodes each special token the
    template writes as a single token (else the markers would be split into ordinary text)."""
    t = _as_template(template)
    if tokenizer.bos_token is None:
        raise ChatFormatError(f"the tokenizer at {tokenizer.source} has no bos_token; the {t.name} template needs one")
    for s in (tokenizer.bos_token, *t.specials):
        if len(tokenizer.encode(s)) != 1:
            raise ChatFormatError(
                f"the tokenizer at {tokenizer.source} lacks the special token {s!r} of the {t.name} template"
            )


def _mask_from_spans(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """True for each token whose character span overlaps one of `spans` (both sorted by start)."""
    mask, j = [], 0
    for a, b in offsets:
        while j < len(spans) and spans[j][1] <= a:  # spans that end before this token starts
            j += 1
        mask.append(j < len(spans) and spans[j][0] < b and a < spans[j][1])
    return mask


def encode_chat(
    tokenizer: Tokenizer,
    messages: list[dict],
    template: ChatTemplate | str,
    train_on: TrainOn = "assistant",
    add_generation_prompt: bool = False,
) -> ChatEncoding:
    """Token ids of render(messages) tokenized once, and the loss mask.

    train_on:
      "assistant": the content and end-of-turn token of every assistant message (SFT).
      "last":      the same for the last assistant message only.
      "all":       every token except the leading BOS (which nothing predicts).
    Never trained under "assistant"/"last": BOS, headers, the text after an end-of-turn marker,
    system and user turns, and the generation prompt.
    """
    if train_on not in ("assistant", "all", "last"):
        raise ValueError(f"train_on must be 'assistant', 'all' or 'last', got {train_on!r}")
    t = _as_template(template)
    check_tokenizer(tokenizer, t)
    text, spans = _render_with_spans(messages, t, add_generation_prompt, tokenizer.bos_token)
    ids, offsets = tokenizer.encode_with_offsets(text)
    spans = _trained_spans(messages, text, spans, train_on, tokenizer.bos_token)
    return ChatEncoding(input_ids=ids, loss_mask=_mask_from_spans(offsets, spans))


def _trained_spans(messages: list[dict], text: str, spans: list[tuple[int, int]], train_on: TrainOn,
                   bos_token: str) -> list[tuple[int, int]]:
    """The character spans that train under `train_on` (see encode_chat)."""
    if train_on == "all":
        return [(len(bos_token), len(text))]
    spans = [s for m, s in zip(messages, spans) if m["role"] == "assistant"]
    return spans[-1:] if train_on == "last" else spans


class ChatBatch(NamedTuple):
    """Many encoded conversations laid end to end (encode_chats)."""

    input_ids: np.ndarray
    """(total_tokens,) int64: conversation k is input_ids[starts[k]:starts[k + 1]]."""
    loss_mask: np.ndarray
    """(total_tokens,) bool, as ChatEncoding.loss_mask."""
    starts: np.ndarray
    """(num_conversations + 1,) int64 token offsets."""


def encode_chats(tokenizer: Tokenizer, conversations: list[list[dict]], template: ChatTemplate | str,
                 train_on: TrainOn = "assistant") -> ChatBatch:
    """encode_chat for many conversations, bit-identical to it, without per-token Python.

    The same rendering (_render_with_spans) and the same single tokenization of each text, but
    all texts go to the tokenizer in one batched call (its own threads), and the mask rule of
    _mask_from_spans is applied to every token at once: with the trained spans sorted and
    disjoint, the only span a token (a, b) can overlap is the first one ending after a, and it
    does when that span starts before b. Each conversation's character offsets and spans are
    shifted by the length of the texts before it, so one search serves the whole batch.
    """
    if train_on not in ("assistant", "all", "last"):
        raise ValueError(f"train_on must be 'assistant', 'all' or 'last', got {train_on!r}")
    t = _as_template(template)
    check_tokenizer(tokenizer, t)
    if not conversations:
        return ChatBatch(np.zeros(0, np.int64), np.zeros(0, bool), np.zeros(1, np.int64))
    texts, span_ends = [], []  # per conversation: its text; per trained span: (start, end) shifted
    base = 0
    for messages in conversations:
        text, spans = _render_with_spans(messages, t, False, tokenizer.bos_token)
        span_ends += [(base + a, base + b) for a, b in _trained_spans(messages, text, spans, train_on,
                                                                      tokenizer.bos_token)]
        texts.append(text)
        base += len(text)
    encoded = tokenizer.encode_batch_with_offsets(texts)
    lengths = np.fromiter((len(ids) for ids, _ in encoded), np.int64, len(encoded))
    starts = np.concatenate([[0], np.cumsum(lengths)])
    ids = np.fromiter(chain.from_iterable(ids for ids, _ in encoded), np.int64, int(starts[-1]))
    offsets = np.fromiter(chain.from_iterable(chain.from_iterable(o for _, o in encoded)), np.int64,
                          2 * int(starts[-1])).reshape(-1, 2)  # (tokens, 2) character (start, end)
    text_base = np.cumsum([0] + [len(x) for x in texts[:-1]], dtype=np.int64)
    offsets += np.repeat(text_base, lengths)[:, None]
    spans = np.asarray(span_ends, dtype=np.int64).reshape(-1, 2)  # (spans, 2), sorted, disjoint
    j = np.searchsorted(spans[:, 1], offsets[:, 0], side="right")  # first span ending after a
    hit = j < len(spans)
    mask = np.zeros(len(ids), dtype=bool)
    mask[hit] = spans[j[hit], 0] < offsets[hit, 1]
    return ChatBatch(input_ids=ids, loss_mask=mask, starts=starts)


def stop_token_ids(tokenizer: Tokenizer, template: ChatTemplate | str) -> list[int]:
    """Ids that end a generated reply: the template's end-of-turn token, then EOS (if different)."""
    t = _as_template(template)
    ids = [tokenizer.token_id(t.end_of_turn)]
    if tokenizer.eos_id is not None and tokenizer.eos_id not in ids:
        ids.append(tokenizer.eos_id)
    return ids


def with_system(messages: list[dict], system_prompt: Optional[str]) -> list[dict]:
    """Prepend a system turn when one is configured and the conversation has none (LION inserts an
    empty one for ChatML)."""
    if system_prompt is None or (messages and messages[0]["role"] == "system"):
        return messages
    return [{"role": "system", "content": system_prompt}] + messages


def encode_prompt(tokenizer, prompt, chat_template: str, system_prompt: Optional[str] = None) -> list[int]:
    """A prompt (text or messages) as the model sees it before its reply: rendered up to the
    generation prompt, with `system_prompt` inserted as training did (with_system), or as raw text
    after the BOS for chat_template="none"."""
    if chat_template == "none":
        if not isinstance(prompt, str):
            raise ValueError("a list of messages needs a chat template (--chat_template)")
        return ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + tokenizer.encode(prompt)
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return encode_chat(tokenizer, with_system(messages, system_prompt), chat_template,
                       add_generation_prompt=True).input_ids
