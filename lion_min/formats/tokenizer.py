"""A thin wrapper around a Hugging Face `tokenizers` tokenizer.json, with the special tokens that
tokenizer_config.json names (bos / eos / pad).

Text is always encoded with add_special_tokens=False: the chat template writes the BOS itself, and
the released Llama-3 and Gemma tokenizers have a post-processor that would prepend a second one.
Special-token strings written in the text (`<|eot_id|>`, `<start_of_turn>`, ...) are still
recognised as single added tokens.

A tokenizer read from a folder remembers that folder's files byte for byte, and save() writes them
back unchanged except where something changed (the chat template, a special token), so an export
carries the original tokenizer_config.json, special_tokens_map.json, ... as other tools know them.
"""

import json
import re
import tempfile
from pathlib import Path
from typing import Optional

import tokenizers

# Files of a tokenizer folder that save() writes back byte for byte (tokenizer.model: the
# sentencepiece model that slow tokenizers load; the fast ones read tokenizer.json).
SIDE_FILES = ("tokenizer.json", "special_tokens_map.json", "tokenizer.model", "added_tokens.json")
CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"  # where transformers >= 4.5x saves a template; read before the config's
TOKEN_NAMES = ("bos_token", "eos_token", "pad_token")
# Special tokens a family reserves for later use, each numbered: Gemma's <unused0>..<unused98>,
# Llama-3's <|reserved_special_token_0|>..<|reserved_special_token_250|>. New special tokens take
# their places (lowest number first), so the model keeps its shape.
RESERVED = re.compile(r"<unused(\d+)>|<\|reserved_special_token_(\d+)\|>")


class TokenizerError(ValueError):
    pass


class UnknownTokenError(TokenizerError, KeyError):
    """A token string the vocabulary lacks; catchable as KeyError too."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0])


def _token_str(value: object) -> Optional[str]:
    # tokenizer_config.json stores a special token either as a string or as a serialised
    # AddedToken: {"content": "<bos>", "lstrip": false, ...}.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _json_bytes(obj: dict) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def _set_token(config: dict, name: str, token: Optional[str], add: bool) -> None:
    """Write `token` under `name` only if it differs from what config says (a token stored in the
    AddedToken form stays as it was); add=False: only update a key that config already has."""
    if _token_str(config.get(name)) == token:
        return
    if token is None:
        config.pop(name, None)
    elif add or name in config:
        config[name] = token


class Tokenizer:
    def __init__(
        self,
        tok: tokenizers.Tokenizer,
        bos_token: Optional[str] = None,
        eos_token: Optional[str] = None,
        pad_token: Optional[str] = None,
        source: str = "<in memory>",
        config: Optional[dict] = None,
        files: Optional[dict[str, bytes]] = None,
    ):
        self._tok = tok
        self.source = source
        """Where the tokenizer came from, for error messages."""
        self.config = dict(config or {})
        """The tokenizer_config.json read by from_dir; save() writes its other keys back."""
        self.files = dict(files or {})
        """The files of the folder it was read from (SIDE_FILES, the config, the template file),
        byte for byte; save() writes them back."""
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.added = ""
        """How with_special_tokens gave this copy its new tokens ('' for a tokenizer as read)."""
        template = self.config.get("chat_template")  # a list of named templates is left alone
        if TEMPLATE_FILE in self.files:  # transformers reads this file first, so it wins
            try:
                template = self.files[TEMPLATE_FILE].decode("utf-8")
            except UnicodeDecodeError as e:
                raise TokenizerError(f"cannot read {TEMPLATE_FILE} of {source}: {e}") from e
        self.chat_template: Optional[str] = template if isinstance(template, str) else None
        # Resolve now so a config naming a token the vocabulary lacks fails at load time.
        self.bos_id = None if bos_token is None else self.token_id(bos_token)
        self.eos_id = None if eos_token is None else self.token_id(eos_token)
        self.pad_id = None if pad_token is None else self.token_id(pad_token)
        # Largest id + 1 (not the count of entries), so every id indexes an embedding row.
        self.vocab_size: int = max(tok.get_vocab(with_added_tokens=True).values()) + 1

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        """Load `path/tokenizer.json` and, if present, `path/tokenizer_config.json` (and
        `path/chat_template.jinja`, which transformers prefers to the config's template)."""
        path = Path(path)
        tok_file, cfg_file = path / "tokenizer.json", path / CONFIG_FILE
        if not tok_file.is_file():
            raise TokenizerError(f"no tokenizer.json in {path}")
        files = {f.name: f.read_bytes() for f in map(path.joinpath, (*SIDE_FILES, CONFIG_FILE, TEMPLATE_FILE))
                 if f.is_file()}
        try:
            tok = tokenizers.Tokenizer.from_str(files["tokenizer.json"].decode("utf-8"))
        except Exception as e:  # the Rust side raises a bare Exception for bad JSON or schema
            raise TokenizerError(f"cannot load {tok_file}: {e}") from e
        config = {}
        if CONFIG_FILE in files:
            try:
                config = json.loads(files[CONFIG_FILE].decode("utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise TokenizerError(f"cannot parse {cfg_file}: {e}") from e
            if not isinstance(config, dict):
                raise TokenizerError(f"{cfg_file} must hold a JSON object")
        return cls(
            tok,
            bos_token=_token_str(config.get("bos_token")),
            eos_token=_token_str(config.get("eos_token")),
            pad_token=_token_str(config.get("pad_token")),
            source=str(path),
            config=config,
            files=files,
        )

    @classmethod
    def of(cls, tokenizer) -> "Tokenizer":
        """A lion_min Tokenizer from a Tokenizer (itself), a tokenizer folder (a path), or a
        transformers tokenizer (what its save_pretrained writes, so tokens added to it come along)."""
        if isinstance(tokenizer, Tokenizer):
            return tokenizer
        if isinstance(tokenizer, (str, Path)):
            return cls.from_dir(tokenizer)
        if hasattr(tokenizer, "save_pretrained"):
            with tempfile.TemporaryDirectory() as tmp:
                tokenizer.save_pretrained(tmp)
                own = cls.from_dir(tmp)
            own.source = getattr(tokenizer, "name_or_path", None) or own.source
            return own
        raise TypeError(f"expected a lion_min Tokenizer, a tokenizer folder or a transformers tokenizer, "
                        f"got {type(tokenizer).__name__}")

    def encode(self, text: str) -> list[int]:
        """Token ids of the whole text, tokenized once, with no special tokens added."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """encode(text) plus, for each token, its (start, end) character span in text.

        Tokens that hold only part of a multi-byte character (byte-level BPE can split an emoji)
        report the span of the whole character.
        """
        enc = self._tok.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def encode_batch_with_offsets(self, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """encode_with_offsets for many texts at once, in the Rust tokenizer's own threads."""
        return [(e.ids, e.offsets) for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int:
        """The id of one token string (a special token, or an entry of the vocabulary)."""
        i = self._tok.token_to_id(token)
        if i is None:
            raise UnknownTokenError(f"token {token!r} is not in the vocabulary of the tokenizer at {self.source}")
        return i

    def save(self, out_dir: str | Path, chat_template: Optional[str] = None) -> Path:
        """Write the tokenizer files, loadable by from_dir and by transformers' AutoTokenizer.

        A tokenizer read from a folder writes that folder's files back byte for byte; only
        tokenizer_config.json changes, and only where something did: the chat template (a Jinja
        string, e.g. ChatTemplate.jinja; None keeps the loaded one) and bos/eos/pad if they were
        changed. The template goes where the folder kept it: chat_template.jinja if it had one, else
        the config's "chat_template". save_model calls this inside its temporary folder."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        files = dict(self.files)
        files.pop(CONFIG_FILE, None)
        if "tokenizer.json" not in files:  # built in memory
            files["tokenizer.json"] = self._tok.to_str(pretty=True).encode("utf-8")
        config = dict(self.config)
        if CONFIG_FILE not in self.files:  # what transformers needs to load a bare tokenizer.json
            config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
            # transformers would otherwise "clean up" spaces before punctuation when decoding.
            config.setdefault("clean_up_tokenization_spaces", False)
        specials = json.loads(files.get("special_tokens_map.json", b"{}"))
        new_specials = dict(specials)
        for name in TOKEN_NAMES:
            _set_token(config, name, getattr(self, name), add=True)
            _set_token(new_specials, name, getattr(self, name), add=False)
        if new_specials != specials:
            files["special_tokens_map.json"] = _json_bytes(new_specials)
        template = chat_template if chat_template is not None else self.chat_template
        if template is not None and TEMPLATE_FILE in files:
            files[TEMPLATE_FILE] = template.encode("utf-8")
        elif template is not None:
            config["chat_template"] = template
        unchanged = CONFIG_FILE in self.files and config == self.config
        files[CONFIG_FILE] = self.files[CONFIG_FILE] if unchanged else _json_bytes(config)
        for name, data in files.items():
            (out_dir / name).write_bytes(data)
        return out_dir

    def with_special_tokens(self, tokens: list[str]) -> "Tokenizer":
        """A copy that encodes each of `tokens` as one special token (its `added` says how).

        Tokens it already has keep their ids. The others take the places of the family's reserved
        tokens (RESERVED) when there are enough of them: renamed in tokenizer.json (its added tokens
        and its model vocabulary) and in tokenizer_config.json's added_tokens_decoder, so the
        vocabulary keeps its size. Otherwise they are appended as new ids after the largest, and the
        model needs embedding rows for them (checkpoint.grow_vocab). The copy's files are the new
        ones, so save() exports a tokenizer that has these tokens."""
        missing = [t for t in dict.fromkeys(tokens) if len(self.encode(t)) != 1]
        if not missing:
            return self
        data = json.loads(self._tok.to_str())
        vocab = data["model"].get("vocab")
        vocab = vocab if isinstance(vocab, dict) else {}  # BPE / WordPiece / WordLevel: token -> id
        ids = {entry["content"]: entry["id"] for entry in data["added_tokens"]} | {
            t: i for t, i in vocab.items() if t not in {e["content"] for e in data["added_tokens"]}}
        reserved = sorted((int(m.group(1) or m.group(2)), t) for t in ids if (m := RESERVED.fullmatch(t)))
        decoder = dict(self.config.get("added_tokens_decoder") or {})
        if len(reserved) >= len(missing):
            renamed = dict(zip((t for _, t in reserved), missing))
            for entry in data["added_tokens"]:
                if entry["content"] in renamed:
                    entry["content"] = renamed[entry["content"]]
            for old, new in renamed.items():
                if old in vocab:
                    vocab[new] = vocab.pop(old)
                if str(ids[old]) in decoder:
                    decoder[str(ids[old])] = dict(decoder[str(ids[old])], content=new, special=True)
            tok = tokenizers.Tokenizer.from_str(json.dumps(data, ensure_ascii=False))
            how = "onto the reserved " + ", ".join(f"{old} (id {ids[old]})" for old in renamed)
        else:
            renamed = {}
            tok = tokenizers.Tokenizer.from_str(self._tok.to_str())
            how = "as new ids (the tokenizer has no reserved tokens to reuse)"
        # A token renamed only in the model vocabulary, or a new one, becomes an added special token.
        tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in missing])
        for t in missing:
            decoder.setdefault(str(tok.token_to_id(t)), {"content": t, "lstrip": False, "normalized": False,
                                                         "rstrip": False, "single_word": False, "special": True})
        files = dict(self.files, **{"tokenizer.json": tok.to_str(pretty=True).encode("utf-8")})
        config = dict(self.config)
        if "added_tokens_decoder" in config:  # transformers reads the added tokens from here too
            config["added_tokens_decoder"] = dict(sorted(decoder.items(), key=lambda kv: int(kv[0])))
        if "added_tokens.json" in files:  # the slow tokenizer's token -> id map
            added = json.loads(files["added_tokens.json"]) | {t: tok.token_to_id(t) for t in missing}
            files["added_tokens.json"] = _json_bytes({k: v for k, v in added.items() if k not in renamed})
        if CONFIG_FILE in files:
            files[CONFIG_FILE] = _json_bytes(config)
        copy = Tokenizer(tok, self.bos_token, self.eos_token, self.pad_token, self.source, config, files)
        copy.added = ", ".join(f"{t} = {tok.token_to_id(t)}" for t in missing) + ", " + how
        return copy
