"""Tokenizer folders for tests, built offline (no hub access in CI).

Each builder writes tokenizer.json + tokenizer_config.json into out_dir and returns out_dir, so
`lion_min.formats.tokenizer.Tokenizer.from_dir` and transformers' `AutoTokenizer` can both load it.

- build_llama3_tokenizer: the real Llama-3 tokenizer, rebuilt from the BPE ranks shipped in the
  `quicktok-v1` package (Meta's vocabulary). Token ids match Meta's tokenizer.
- build_gemma_tokenizer: a small byte-level BPE (trained here on a few sentences) whose special
  tokens sit at the real Gemma ids. The ids of ordinary text are NOT Gemma's (no Gemma vocabulary
  is available offline); use it for template structure, special ids and masks.
- build_chatml_tokenizer / build_gemma_chatml_tokenizer: the above plus `<|im_start|>` and
  `<|im_end|>` appended as special tokens (as the LION models do for ChatML).

Building the Llama-3 tokenizer takes a few seconds, so its JSON is cached in the process: later
calls in the same pytest session only write the file.
"""

import functools
import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

# Llama-3's pre-tokenizer pattern (the tiktoken pattern of Meta's release).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_NUM_SPECIAL = 256  # <|begin_of_text|> = 128000 ... <|reserved_special_token_250|> = 128255

GEMMA_SPECIAL_IDS = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<start_of_turn>": 106, "<end_of_turn>": 107}
CHATML_TOKENS = ["<|im_start|>", "<|im_end|>"]

# A few lines so the small BPE learns some merges, in several scripts (accents, CJK, emoji).
_GEMMA_CORPUS = [
    "Hello there! How are you today? I am fine, thank you very much.",
    "The quick brown fox jumps over the lazy dog. What is the capital of France?",
    "The capital of France is Paris. Paris is a beautiful city on the Seine.",
    "Bonjour, ça va ? Très bien, merci. L'été dernier, nous sommes allés à Montréal.",
    "你好，世界！我们今天学习机器学习。こんにちは、元気ですか？",
    "Emoji test: 😀 🎉 👍🏽 — naïve café résumé.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "Write a short poem about the sea.\nThe sea is wide, the sea is deep.",
]


def _byte_to_unicode() -> dict[int, str]:
    """The byte-level alphabet used by GPT-2-style BPE: every byte maps to a printable character
    (printable bytes to themselves, the rest to code points from 256 up), so BPE works on str."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _write_config(out_dir: Path, **tokens: str | None) -> None:
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    config.update({f"{k}_token": v for k, v in tokens.items() if v is not None})
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))


def _bos_processor(bos: str, bos_id: int) -> processors.PostProcessor:
    # Like the released Llama-3 and Gemma tokenizers: encode(add_special_tokens=True) prepends BOS.
    # lion_min always encodes with add_special_tokens=False, and the tests check for a single BOS.
    return processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]),
    ])


@functools.cache
def _llama3_json() -> str:
    import quicktok

    enc = quicktok.get_encoding("llama3")
    num_regular = enc.n_vocab - LLAMA3_NUM_SPECIAL
    ranks = {enc.decode_single_token_bytes(i): i for i in range(num_regular)}
    b2u = _byte_to_unicode()
    as_str = lambda b: "".join(b2u[x] for x in b)  # noqa: E731

    # tiktoken merges, at each step, the adjacent pair whose concatenation has the lowest rank,
    # whatever split produced the pair. So every split (left, right) of a token into two tokens is
    # a merge, prioritised by the rank of the merged token.
    merges = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            if token[:i] in ranks and token[i:] in ranks:
                merges.append((rank, ranks[token[:i]], as_str(token[:i]), as_str(token[i:])))
    merges.sort()

    # ignore_merges: a pre-token that is itself in the vocabulary is one token (tiktoken does this).
    bpe = models.BPE(
        vocab={as_str(b): i for b, i in ranks.items()},
        merges=[(l, r) for _, _, l, r in merges],
        ignore_merges=True,
    )
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    specials = [enc.decode_single_token_bytes(num_regular + i).decode() for i in range(LLAMA3_NUM_SPECIAL)]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    tok.post_processor = _bos_processor("<|begin_of_text|>", 128000)
    return tok.to_str()


def build_llama3_tokenizer(out_dir: Path) -> Path:
    """The real Llama-3 tokenizer (128256 tokens; bos <|begin_of_text|>, eos <|end_of_text|>)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.json").write_text(_llama3_json())
    _write_config(out_dir, bos="<|begin_of_text|>", eos="<|end_of_text|>")
    return out_dir


def _gemma(vocab_size: int = 1000) -> Tokenizer:
    # Specials first, in id order, so the trainer gives them the real Gemma ids; <unusedN> fill
    # the gap up to <start_of_turn> = 106 (3 = <unk> as in Gemma).
    names = {i: s for s, i in GEMMA_SPECIAL_IDS.items()} | {3: "<unk>"}
    specials = [names.get(i, f"<unused{i - 4}>") for i in range(max(GEMMA_SPECIAL_IDS.values()) + 1)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[AddedToken(s, special=True, normalized=False) for s in specials],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable, no <unk>
        show_progress=False,
    )
    tok.train_from_iterator(_GEMMA_CORPUS, trainer=trainer)
    tok.post_processor = _bos_processor("<bos>", GEMMA_SPECIAL_IDS["<bos>"])
    return tok


def build_gemma_tokenizer(out_dir: Path) -> Path:
    """Small byte-level BPE with Gemma's special ids (<pad> 0, <eos> 1, <bos> 2, turns 106/107)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _gemma().save(str(out_dir / "tokenizer.json"))
    _write_config(out_dir, bos="<bos>", eos="<eos>", pad="<pad>")
    return out_dir


def _add_chatml(tok: Tokenizer) -> Tokenizer:
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in CHATML_TOKENS])
    return tok


def build_chatml_tokenizer(out_dir: Path) -> Path:
    """Llama-3 plus <|im_start|> = 128256 and <|im_end|> = 128257."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _add_chatml(Tokenizer.from_str(_llama3_json())).save(str(out_dir / "tokenizer.json"))
    _write_config(out_dir, bos="<|begin_of_text|>", eos="<|end_of_text|>")
    return out_dir


def build_gemma_chatml_tokenizer(out_dir: Path) -> Path:
    """The small Gemma-like tokenizer plus <|im_start|> and <|im_end|> at the end."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _add_chatml(_gemma()).save(str(out_dir / "tokenizer.json"))
    _write_config(out_dir, bos="<bos>", eos="<eos>", pad="<pad>")
    return out_dir
