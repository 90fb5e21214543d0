"""A thin wrapper around a Hugging Face `tokenizers` tokenizer.json, with the special tokens that
tokenizer_config.json names (bos / eos / pad).

Text is always encoded with add_special_tokens=False: the chat template writes the BOS itself, and
the released Llama-3 and Gemma tokenizers have a post-processor that would prepend a second one.
Special-token strings written in the text (`<|eot_id|>`, `<start_of_turn>`, ...) are still
recognised as single added tokens.
"""

import json
from pathlib import Path
from typing import Optional

import tokenizers


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


class Tokenizer:
    def __init__(
        self,
        tok: tokenizers.Tokenizer,
        bos_token: Optional[str] = None,
        eos_token: Optional[str] = None,
        pad_token: Optional[str] = None,
        source: str = "<in memory>",
        config: Optional[dict] = None,
    ):
        self._tok = tok
        self.source = source
        """Where the tokenizer came from, for error messages."""
        self.config = dict(config or {})
        """The tokenizer_config.json read by from_dir; save() writes its other keys back."""
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        template = self.config.get("chat_template")  # a list of named templates is left alone
        self.chat_template: Optional[str] = template if isinstance(template, str) else None
        # Resolve now so a config naming a token the vocabulary lacks fails at load time.
        self.bos_id = None if bos_token is None else self.token_id(bos_token)
        self.eos_id = None if eos_token is None else self.token_id(eos_token)
        self.pad_id = None if pad_token is None else self.token_id(pad_token)
        # Largest id + 1 (not the count of entries), so every id indexes an embedding row.
        self.vocab_size: int = max(tok.get_vocab(with_added_tokens=True).values()) + 1

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        """Load `path/tokenizer.json` and, if present, `path/tokenizer_config.json`."""
        path = Path(path)
        tok_file, cfg_file = path / "tokenizer.json", path / "tokenizer_config.json"
        if not tok_file.is_file():
            raise TokenizerError(f"no tokenizer.json in {path}")
        try:
            tok = tokenizers.Tokenizer.from_file(str(tok_file))
        except Exception as e:  # the Rust side raises a bare Exception for bad JSON or schema
            raise TokenizerError(f"cannot load {tok_file}: {e}") from e
        config = {}
        if cfg_file.is_file():
            try:
                config = json.loads(cfg_file.read_text(encoding="utf-8"))
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
        )

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

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int:
        """The id of one token string (a special token, or an entry of the vocabulary)."""
        i = self._tok.token_to_id(token)
        if i is None:
            raise UnknownTokenError(f"token {token!r} is not in the vocabulary of the tokenizer at {self.source}")
        return i

    def save(self, out_dir: str | Path, chat_template: Optional[str] = None) -> Path:
        """Write tokenizer.json and tokenizer_config.json, loadable by from_dir and by transformers'
        AutoTokenizer. chat_template (a Jinja string, e.g. ChatTemplate.jinja) is stored for
        apply_chat_template; None keeps the one loaded with the tokenizer, if any."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(out_dir / "tokenizer.json"))
        config = dict(self.config)
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        # transformers would otherwise "clean up" spaces before punctuation when decoding.
        config.setdefault("clean_up_tokenization_spaces", False)
        for name, token in (("bos_token", self.bos_token), ("eos_token", self.eos_token), ("pad_token", self.pad_token)):
            if token is None:
                config.pop(name, None)
            else:
                config[name] = token
        template = chat_template if chat_template is not None else self.chat_template
        if template is not None:
            config["chat_template"] = template
        (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        return out_dir
