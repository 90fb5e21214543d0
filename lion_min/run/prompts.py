"""Prompts for sampling and online DPO: read from a file, and the chat template a model folder carries."""

import json
from pathlib import Path

from lion_min.core.chat import TEMPLATES, template_of
from lion_min.formats.schemas import BadRecord, prompt_turns
from lion_min.run.config import ConfigError


def read_prompts(path: str) -> list:
    """Prompts from a file: str per prompt, or a list of messages. A .jsonl line (or .json line, or
    item of a .json array, told apart as --data does) holds "prompt" (text or messages), or
    "messages", a conversation as SFT files hold it: its turns before the final assistant reply(ies)
    are the prompt, so an SFT file can be sampled from as it is. Any other file: a prompt a line."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{path}: no such file (expected prompts: .jsonl, .json or one per line)")
    lines = []
    for n, raw in enumerate(p.read_bytes().splitlines(), 1):  # n is the line an editor shows
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: line {n}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
        if line.strip():
            lines.append((n, line))
    if not lines:
        raise ConfigError(f"{path}: no prompts in the file")
    if p.suffix not in (".jsonl", ".json"):
        return [line for _, line in lines]
    # As --data reads them: a .json file holding an array is a list of records, else (.jsonl, or
    # .json as datasets' to_json writes it) one record a line.
    if p.suffix == ".json" and lines[0][1].lstrip().removeprefix("\ufeff").startswith("["):
        try:
            records = list(enumerate(json.loads(p.read_text(encoding="utf-8-sig")), 1))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        where = "item"
    else:
        records, where = [], "line"
        for n, line in lines:  # n counts blank lines too, so it is the line an editor shows
            try:
                records.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}: line {n}: not valid JSON ({e})") from None
    prompts = []
    for n, record in records:
        key = "messages" if isinstance(record, dict) and "prompt" not in record and "messages" in record else "prompt"
        if not isinstance(record, dict) or not isinstance(record.get(key), (str, list)):
            raise ConfigError(f"{path}: {where} {n}: expected an object with a \"prompt\" field (text or messages) "
                              f"or a \"messages\" conversation")
        prompt = record[key]
        if isinstance(prompt, list):
            try:
                prompt = prompt_turns(prompt, key)
            except BadRecord as bad:
                raise ConfigError(f"{path}: {where} {n}: '{bad.key}': {bad.detail}") from None
            while key == "messages" and prompt and prompt[-1]["role"] == "assistant":
                prompt.pop()  # a conversation's reply: what the policy is to write
            if not prompt or prompt[-1]["role"] != "user":
                got = f"got {prompt[-1]['role']}" if prompt else "no turns"
                raise ConfigError(f"{path}: {where} {n}: '{key}': the last turn must be the user's ({got})")
        prompts.append(prompt)
    return prompts


def folder_template(folder: Path, tokenizer) -> tuple[str, str]:
    """--chat_template=auto: (the template's name, where it came from) for a model folder. The
    train_config.json that a lion_min run writes beside its export names the template it trained
    with; otherwise the tokenizer's Jinja template (chat_template.jinja or tokenizer_config.json) must
    be exactly one that lion_min knows. A folder with no template at all gets raw text."""
    run = folder / "train_config.json"
    name = json.loads(run.read_text()).get("chat_template") if run.is_file() else None
    advice = f"pass --chat_template=none for raw text or name one ({', '.join(TEMPLATES)})"
    if name:
        if name not in TEMPLATES:
            raise ConfigError(f"{run}: chat_template {name!r} is not one lion_min knows; {advice}")
        return name, f"from {run}"
    if tokenizer.chat_template is None:
        return "none", f"{folder} has no chat template: raw text"
    known = template_of(tokenizer.chat_template)
    if known is None:
        raise ConfigError(f"{folder}: its tokenizer's chat template is not one lion_min knows; {advice}")
    return known.name, f"the tokenizer's template in {folder}"
