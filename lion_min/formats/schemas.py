"""Record schemas: one record (a dict read from JSONL, JSON or Parquet) -> a conversation or a
preference pair. Where records come from (files, globs, the hub, mixtures) is lion_min/formats/data_files.py
and data.py.

A conversation is a list of messages `{"role": "system" | "user" | "assistant", "content": str}`
(only those two keys are kept). A `Preference` holds the shared prompt turns and, separately, the
chosen and the rejected response turns that follow them.

Detected per source from the first record's keys, or forced with `schema=`. `columns=` maps the
schema's field names (left column below) to the record's keys, e.g. MetaMathQA:
`columns={"prompt": "query", "response": "response"}`.

    SFT (load_conversations)
    messages          messages: [{role, content}]                      UltraChat-200k
    sharegpt          conversations: [{from, value}], from in human|user, gpt|assistant, system
                                                                       SlimOrca, OpenHermes-2.5
    prompt_response   prompt: str, response: str, optional system: str (only when mapped)

    Preferences (load_preferences)
    text_pairs        prompt, chosen, rejected: str; optional system: str (only when mapped)
    message_pairs     chosen, rejected: whole conversations [{role, content}] that share the
                      prompt turns (UltraFeedback-binarized; a `prompt` key beside them is ignored)
    hh_rlhf           chosen, rejected: "\\n\\nHuman: ...\\n\\nAssistant: ..." text, multi-turn

For message_pairs and hh_rlhf the prompt is every turn up to the last non-assistant turn; it must
be identical in chosen and rejected, and what follows must be assistant turns only (one, usually).

Every conversation is checked: known roles only, a system message only as the first message,
string contents, no empty (blank) assistant turn, and for SFT at least one assistant turn.

A parser raises BadRecord(reason, key, detail); the loader adds the file and line and either
raises a DataError or counts the record as skipped.
"""

import re
from dataclasses import dataclass
from typing import Any, Callable, Optional

Message = dict[str, str]
Conversation = list[Message]

SFT_SCHEMAS = ("messages", "sharegpt", "prompt_response")
PREFERENCE_SCHEMAS = ("text_pairs", "message_pairs", "hh_rlhf")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
# The field names each schema reads; `columns` may map any of them to another key.
SCHEMA_FIELDS = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "prompt_response": ("prompt", "response", "system"),
    "text_pairs": ("prompt", "chosen", "rejected", "system"),
    "message_pairs": ("chosen", "rejected"),
    "hh_rlhf": ("chosen", "rejected"),
}


class BadRecord(Exception):
    """Raised by the record parsers; the loader adds the file and line and raises or counts it."""

    def __init__(self, reason: str, key: str = "", detail: str = ""):
        self.reason, self.key, self.detail = reason, key, detail or reason


@dataclass(frozen=True)
class Preference:
    prompt: Conversation  # the shared turns, ending with a user turn
    chosen: Conversation  # the response turn(s) that follow the prompt (assistant only)
    rejected: Conversation


def detect(r: dict, schemas, col) -> Optional[str]:
    if schemas == SFT_SCHEMAS:
        if col("messages") in r:
            return "messages"
        if col("conversations") in r:
            return "sharegpt"
        if col("prompt") in r and col("response") in r:
            return "prompt_response"
        return None
    if col("chosen") not in r or col("rejected") not in r:
        return None
    if isinstance(r[col("chosen")], list):
        return "message_pairs"
    return "text_pairs" if col("prompt") in r else "hh_rlhf"


class Columns(dict):
    """The `columns` mapping; col("prompt") is the record key that holds the prompt field."""

    def __call__(self, name: str) -> str:
        return self.get(name, name)


def _get(r: dict, key: str, kind: type) -> Any:
    if key not in r:
        raise BadRecord("missing key", key, f"missing (keys present: {', '.join(sorted(r))})")
    if not isinstance(r[key], kind):
        raise BadRecord("wrong type", key, f"expected {kind.__name__}, got {type(r[key]).__name__}")
    return r[key]


def _check(conv: Conversation, keys: list[str], need_assistant: bool, where: str) -> Conversation:
    """Validate a normalised conversation; keys[i] names message i's content in the record."""
    for i, m in enumerate(conv):
        if m["role"] == "system" and i > 0:
            raise BadRecord("misplaced system message", keys[i], "a system message may only be the first message")
        if m["role"] == "assistant" and not m["content"].strip():
            raise BadRecord("empty assistant turn", keys[i], "empty assistant turn")
    if need_assistant and not any(m["role"] == "assistant" for m in conv):
        raise BadRecord("no assistant turn", where, "no assistant turn")
    return conv


def _messages(value: Any, key: str) -> tuple[Conversation, list[str]]:
    if not isinstance(value, list):
        raise BadRecord("wrong type", key, f"expected a list of messages, got {type(value).__name__}")
    conv, keys = [], []
    for i, m in enumerate(value):
        k = f"{key}[{i}]"
        if not isinstance(m, dict):
            raise BadRecord("wrong type", k, f"expected a message object, got {type(m).__name__}")
        role = _prefixed(m, "role", str, k)
        if role not in ROLES:
            raise BadRecord("unknown role", f"{k}.role", f"unknown role {role!r} (expected system, user or assistant)")
        conv.append({"role": role, "content": _prefixed(m, "content", str, k)})
        keys.append(f"{k}.content")
    return conv, keys


def prompt_turns(value: Any, key: str) -> Conversation:
    """A prompt given as messages (online DPO's prompts files): checked like a conversation's, the
    assistant turns allowed but not needed."""
    return _check(*_messages(value, key), False, key)


def _parse_messages(r: dict, col) -> Conversation:
    key = col("messages")
    conv, keys = _messages(_get(r, key, list), key)
    return _check(conv, keys, True, key)


def _parse_sharegpt(r: dict, col) -> Conversation:
    key = col("conversations")
    conv, keys = [], []
    for i, turn in enumerate(_get(r, key, list)):
        k = f"{key}[{i}]"
        if not isinstance(turn, dict):
            raise BadRecord("wrong type", k, f"expected a turn object, got {type(turn).__name__}")
        who = _prefixed(turn, "from", str, k)
        if who not in SHAREGPT_ROLES:
            raise BadRecord("unknown role", f"{k}.from",
                       f"unknown role {who!r} (expected {', '.join(SHAREGPT_ROLES)})")
        conv.append({"role": SHAREGPT_ROLES[who], "content": _prefixed(turn, "value", str, k)})
        keys.append(f"{k}.value")
    return _check(conv, keys, True, key)


def _prefixed(d: dict, key: str, kind: type, prefix: str) -> Any:
    try:
        return _get(d, key, kind)
    except BadRecord as bad:
        bad.key = f"{prefix}.{bad.key}"
        raise


def _with_system(r: dict, col: "Columns", conv: Conversation) -> Conversation:
    # The system field is read only when columns maps it, so a stray key never becomes a prompt.
    if "system" in col:
        return [{"role": "system", "content": _get(r, col("system"), str)}] + conv
    return conv


def _parse_prompt_response(r: dict, col) -> Conversation:
    prompt, response = _get(r, col("prompt"), str), _get(r, col("response"), str)
    conv = _with_system(r, col, [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}])
    keys = ([col("system")] if len(conv) == 3 else []) + [col("prompt"), col("response")]
    return _check(conv, keys, True, col("response"))


def _parse_text_pairs(r: dict, col) -> Preference:
    prompt = _with_system(r, col, [{"role": "user", "content": _get(r, col("prompt"), str)}])
    chosen, rejected = _get(r, col("chosen"), str), _get(r, col("rejected"), str)
    for key, text in ((col("chosen"), chosen), (col("rejected"), rejected)):
        if not text.strip():
            raise BadRecord("empty assistant turn", key, "empty assistant turn")
    return Preference(prompt, [{"role": "assistant", "content": chosen}], [{"role": "assistant", "content": rejected}])


def _split_pair(c: Conversation, c_keys: list[str], r: Conversation, r_keys: list[str],
                c_key: str, r_key: str) -> Preference:
    """Split two whole conversations into the shared prompt (up to the last non-assistant turn)
    and the response turns after it."""
    halves = []
    for conv, keys, key in ((c, c_keys, c_key), (r, r_keys, r_key)):
        _check(conv, keys, True, key)
        if conv[-1]["role"] != "assistant":
            raise BadRecord("last turn not assistant", keys[-1] if keys else key,
                       f"the last turn is a {conv[-1]['role']} turn, expected the assistant's response")
        cut = max((i for i, m in enumerate(conv) if m["role"] != "assistant"), default=-1) + 1
        if not any(m["role"] == "user" for m in conv[:cut]):
            raise BadRecord("no prompt", key, "no user turn before the response")
        halves.append((conv[:cut], conv[cut:]))
    (c_prompt, c_resp), (r_prompt, r_resp) = halves
    if c_prompt != r_prompt:
        first = next((i for i, (a, b) in enumerate(zip(c_prompt, r_prompt)) if a != b), min(len(c_prompt), len(r_prompt)))
        raise BadRecord("prompt mismatch", f"{c_key}/{r_key}",
                   f"chosen and rejected do not share the prompt (they differ at prompt turn {first + 1}: "
                   f"chosen has {len(c_prompt)} prompt turns, rejected {len(r_prompt)})")
    return Preference(c_prompt, c_resp, r_resp)


def _parse_message_pairs(r: dict, col) -> Preference:
    c_key, r_key = col("chosen"), col("rejected")
    c, c_keys = _messages(_get(r, c_key, list), c_key)
    rj, r_keys = _messages(_get(r, r_key, list), r_key)
    for conv, key in ((c, c_key), (rj, r_key)):
        if not conv:
            raise BadRecord("no assistant turn", key, "empty conversation")
    return _split_pair(c, c_keys, rj, r_keys, c_key, r_key)


_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def _hh_turns(text: str, key: str) -> Conversation:
    parts = _HH_TURN.split(text)
    # parts = [before the first marker, role, content, role, content, ...]
    if parts[0].strip() or len(parts) < 3:
        raise BadRecord("malformed HH-RLHF text", key, "expected text starting with '\\n\\nHuman:'")
    return [{"role": "user" if who == "Human" else "assistant", "content": content.strip()}
            for who, content in zip(parts[1::2], parts[2::2])]


def _parse_hh(r: dict, col) -> Preference:
    c_key, r_key = col("chosen"), col("rejected")
    c = _hh_turns(_get(r, c_key, str), c_key)
    rj = _hh_turns(_get(r, r_key, str), r_key)
    # HH text has no per-turn keys; errors name the field and the turn number.
    c_keys = [f"{c_key} turn {i + 1}" for i in range(len(c))]
    r_keys = [f"{r_key} turn {i + 1}" for i in range(len(rj))]
    return _split_pair(c, c_keys, rj, r_keys, c_key, r_key)


PARSERS: dict[str, Callable[[dict, Callable[[str], str]], Any]] = {
    "messages": _parse_messages,
    "sharegpt": _parse_sharegpt,
    "prompt_response": _parse_prompt_response,
    "text_pairs": _parse_text_pairs,
    "message_pairs": _parse_message_pairs,
    "hh_rlhf": _parse_hh,
}
