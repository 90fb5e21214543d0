"""PairRM (llm-blender/PairRM): a pairwise ranker on DeBERTa-v3-large, the LION paper's online judge.

What llm-blender's pair ranker does (llm_blender/pair_ranker: collator.CrossCompareCollator,
ranker.CrossCompareReranker, gpt_eval/utils.get_scores_from_cmps), restated:

1. Input: one row per ordered pair (A, B) of candidates for a source (the prompt):
       [CLS] <|source|> source [SEP] [CLS] <|candidate1|> A [SEP] [CLS] <|candidate2|> B [SEP]
   Each segment is its own tokenizer call ("[SEP]" in a text is first replaced by a space):
   the source truncated to source_max_length tokens (1224) with its [CLS]/[SEP], each candidate
   to candidate_max_length (412) plus half of what the source left unused, so a row never
   exceeds 1224 + 2 * 412 = 2048 tokens. Candidates are tokenized with "<|candidate|>" and that
   token is then replaced by <|candidate1|> / <|candidate2|>.
2. The encoder's last hidden states at the three prefix tokens: s, a, b (each dim).
3. One head shared by both sides: head(x) = W2 tanh(W1 x + b1) + b2, on [s; a] and [s; b]
   (2 * dim -> dim -> n_tasks); the logit is mean over tasks of head([s; a]) - head([s; b]).
   > 0: A is better than B.
4. For N candidates, all N(N-1) ordered pairs (both orders of each pair, as llm-blender's
   `_full_predict` does, to cancel the position bias) give a matrix M[i, j] (diagonal 0), and
   llm-blender's default policy "max_logits" scores candidate i by mean_j (M[i, j] - M[j, i]),
   a mean over all N columns including i's own zero.

Differences from llm-blender, each deliberate: the prefix tokens are read at the positions we
put them (llm-blender searches the ids, and breaks when a text contains a prefix string); the
candidate budget uses this prompt's source length (llm-blender's `rank()` uses the longest source
among the prompts in its batch, i.e. the same as ours with batch_size=1); no dropout (eval only).

The checkpoint folder this reads is the llm-blender/PairRM-hf layout: config.json (a deberta-v2
config plus source_prefix_id, cand1_prefix_id, cand2_prefix_id, cand_prefix_id, n_tasks),
model.safetensors (pretrained_model.* and head_layer.{1,4}.*) and tokenizer.json. `python -m
lion_min.pairrm.model convert` makes one from the original llm-blender/PairRM folder (docs/pairrm.md).
"""

import argparse
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from lion_min.formats.hf import atomic_dir
from lion_min.formats.hf_config import CheckpointError, resolve_path, weight_files
from lion_min.formats.tokenizer import Tokenizer, TokenizerError
from lion_min.pairrm.deberta import DebertaArgs, DebertaEncoder, args_from_config, load_encoder_weights

Messages = list[dict]

# llm-blender adds these with tokenizer.add_tokens, in this order, after deberta-v3-large's 128001
# tokens: ids 128001..128004 in PairRM.
PREFIX_TOKENS = {"source_prefix_id": "<|source|>", "cand1_prefix_id": "<|candidate1|>",
                 "cand2_prefix_id": "<|candidate2|>", "cand_prefix_id": "<|candidate|>"}
# microsoft/deberta-v3-large's config.json (public), for the original llm-blender/PairRM folder,
# whose config.json is llm-blender's RankerConfig naming that model instead of describing it.
DEBERTA_V3_LARGE = {
    "model_type": "deberta-v2", "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
    "intermediate_size": 4096, "hidden_act": "gelu", "max_position_embeddings": 512, "type_vocab_size": 0,
    "layer_norm_eps": 1e-7, "relative_attention": True, "position_buckets": 256, "norm_rel_ebd": "layer_norm",
    "share_att_key": True, "pos_att_type": "p2c|c2p", "max_relative_positions": -1, "position_biased_input": False,
    "pad_token_id": 0, "vocab_size": 128100,
}
SOURCE_MAX_LENGTH, CANDIDATE_MAX_LENGTH = 1224, 412  # PairRM's RankerConfig (and llm-blender's tokenize_pair)
# Tensors an older transformers saved that carry no weights here.
_IGNORED = ("pretrained_model.embeddings.position_ids",)


@dataclass
class PairRMArgs:
    source_prefix_id: int
    cand1_prefix_id: int
    cand2_prefix_id: int
    cand_prefix_id: int
    n_tasks: int = 1
    source_max_length: int = SOURCE_MAX_LENGTH
    candidate_max_length: int = CANDIDATE_MAX_LENGTH


class PairRM(nn.Module):
    def __init__(self, args: DebertaArgs, n_tasks: int = 1):
        super().__init__()
        self.encoder = DebertaEncoder(args)
        # llm-blender's head_layer = Sequential(Dropout, Linear, Tanh, Dropout, Linear): .1 and .4.
        self.head1 = nn.Linear(2 * args.dim, args.dim)
        self.head2 = nn.Linear(args.dim, n_tasks)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.head2(torch.tanh(self.head1(x)))

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor, prefix_pos: torch.Tensor) -> torch.Tensor:
        """ids, attention_mask (B, T); prefix_pos (B, 3): where <|source|>, <|candidate1|>,
        <|candidate2|> sit. Returns (B,) logits, > 0 when candidate 1 is the better one."""
        h = self.encoder(ids, attention_mask)  # (B, T, dim)
        s, a, b = h[torch.arange(len(ids), device=ids.device)[:, None], prefix_pos].unbind(1)  # 3 x (B, dim)
        left, right = self.head(torch.cat([s, a], -1)), self.head(torch.cat([s, b], -1))  # (B, n_tasks)
        return (left - right).mean(-1)


def scores_from_matrix(M: torch.Tensor) -> torch.Tensor:
    """(N, N) comparison logits M[i, j] (i as candidate 1 vs j as candidate 2; diagonal 0) -> (N,)
    scores: llm-blender's default "max_logits" policy, mean_j (M[i, j] - M[j, i])."""
    return (M - M.T).mean(-1)


# --- loading ---------------------------------------------------------------------------------------


def _read_json(file: Path) -> dict:
    if not file.is_file():
        raise CheckpointError(f"{file}: not found")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from e


def read_pairrm_config(folder: Path) -> tuple[DebertaArgs, PairRMArgs]:
    file = folder / "config.json"
    cfg = _read_json(file)
    if "ranker_type" in cfg:
        raise CheckpointError(f"{file}: an llm-blender RankerConfig, not a model config; convert the folder once "
                              f"with `python -m lion_min pairrm convert` (docs/pairrm.md)")
    missing = [k for k in PREFIX_TOKENS if k not in cfg]
    if missing:
        raise CheckpointError(f"{file}: missing PairRM key(s) {missing}; is this a PairRM checkpoint?")
    pair = PairRMArgs(**{k: cfg[k] for k in PREFIX_TOKENS}, n_tasks=cfg.get("n_tasks", 1),
                      source_max_length=cfg.get("source_maxlength", SOURCE_MAX_LENGTH),
                      candidate_max_length=cfg.get("candidate_maxlength", CANDIDATE_MAX_LENGTH))
    return args_from_config(cfg, str(file)), pair


def load_pairrm(folder: Path, dtype: torch.dtype = torch.float32, device="cpu") -> tuple[PairRM, PairRMArgs]:
    args, pair = read_pairrm_config(folder)
    try:
        files = weight_files(folder)
    except CheckpointError as e:
        raise CheckpointError(f"{e}; convert pytorch_model.bin once with `python -m lion_min pairrm convert`") from None
    with torch.device("meta"):
        model = PairRM(args, pair.n_tasks)
    model.to(dtype).to_empty(device=device)
    handles = [safe_open(str(f), framework="pt", device="cpu") for f in files]
    where = {k: h for h in handles for k in h.keys()}

    def get(key: str) -> torch.Tensor:
        if key not in where:
            raise CheckpointError(f"{folder}: missing tensor {key!r}")
        return where[key].get_tensor(key)

    used = load_encoder_weights(model.encoder, get, prefix="pretrained_model.")
    with torch.no_grad():
        for ours, theirs in ((model.head1, "head_layer.1"), (model.head2, "head_layer.4")):
            for name in ("weight", "bias"):
                t, p = get(f"{theirs}.{name}"), getattr(ours, name)
                if t.shape != p.shape:
                    raise CheckpointError(f"{folder}: {theirs}.{name} has shape {tuple(t.shape)}, expected {tuple(p.shape)}")
                p.copy_(t)
                used.add(f"{theirs}.{name}")
    extra = sorted(set(where) - used - set(_IGNORED))
    if extra:
        raise CheckpointError(f"{folder}: unexpected tensor(s) {extra[:5]}")
    return model.eval().requires_grad_(False), pair


# --- input format ----------------------------------------------------------------------------------


def source_text(prompt: Messages) -> str:
    """The text PairRM sees as the source. A single user turn (after an optional system message)
    is its content, with a non-empty system message in front on its own line. A longer history is
    written as "USER: ..." / "ASSISTANT: ..." lines (the role names of llm-blender's
    compare_conversations; llm-blender's rank() itself only takes one source string)."""
    turns = [m for m in prompt if m["role"] != "system"]
    system = "\n".join(m["content"] for m in prompt if m["role"] == "system" and m["content"])
    if len(turns) == 1:
        body = turns[0]["content"]
    else:
        body = "\n".join(f"{m['role'].upper()}: {m['content']}" for m in turns)
    return f"{system}\n{body}" if system else body


class PairEncoder:
    """Token ids of PairRM rows, as llm-blender's CrossCompareCollator + cat_ids build them."""

    def __init__(self, tokenizer: Tokenizer, pair: PairRMArgs):
        self.tok, self.pair = tokenizer, pair
        cfg = tokenizer.config
        self.sep_token = cfg.get("sep_token", "[SEP]")
        self.cls_id = tokenizer.token_id(cfg.get("cls_token", "[CLS]"))
        self.sep_id = tokenizer.token_id(self.sep_token)
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
        for key, token in PREFIX_TOKENS.items():
            if tokenizer.token_id(token) != getattr(pair, key):
                raise TokenizerError(f"{tokenizer.source}: {token} has id {tokenizer.token_id(token)}, the PairRM "
                                     f"config says {key}={getattr(pair, key)}")

    def segment(self, prefix: str, text: str, max_len: int) -> list[int]:
        """[CLS] prefix text [SEP] in at most max_len tokens (the text is cut, as HF truncation does)."""
        ids = self.tok.encode(prefix + text.replace(self.sep_token, " "))
        return [self.cls_id] + ids[: max(max_len - 2, 0)] + [self.sep_id]

    def encode(self, source: str, candidates: list[str]) -> tuple[list[int], list[list[int]]]:
        """The source segment and each candidate's segment (still with <|candidate|> at index 1)."""
        src = self.segment(PREFIX_TOKENS["source_prefix_id"], source, self.pair.source_max_length)
        # Candidates get what the source left unused, shared between the two.
        budget = self.pair.candidate_max_length + (self.pair.source_max_length - len(src)) // 2
        return src, [self.segment(PREFIX_TOKENS["cand_prefix_id"], c, budget) for c in candidates]

    def row(self, src: list[int], a: list[int], b: list[int]) -> tuple[list[int], list[int]]:
        """One comparison row (A as candidate 1, B as candidate 2) and its three prefix positions."""
        a = [a[0], self.pair.cand1_prefix_id] + a[2:]
        b = [b[0], self.pair.cand2_prefix_id] + b[2:]
        return src + a + b, [1, len(src) + 1, len(src) + len(a) + 1]


# --- the judge -------------------------------------------------------------------------------------


class PairRMJudge:
    """judge.score(prompt, responses): every ordered pair compared (N(N-1) rows, batch_size rows
    per forward, no grad, in the model's dtype), then llm-blender's max_logits score per response."""

    relative = True
    """Scores only rank a prompt's own samples (they sum to 0 per prompt): no absolute reward."""

    def __init__(self, path: str | Path, dtype: torch.dtype = torch.float32, device="cpu", batch_size: int = 8,
                 tokenizer: Optional[Tokenizer] = None):
        folder = resolve_path(str(path))
        self.model, self.pair = load_pairrm(folder, dtype, device)
        self.encoder = PairEncoder(tokenizer or Tokenizer.from_dir(folder), self.pair)
        self.batch_size, self.device = batch_size, torch.device(device)

    @torch.inference_mode()
    def compare(self, rows: list[tuple[list[int], list[int]]]) -> torch.Tensor:
        """(ids, prefix positions) rows -> (len(rows),) fp32 logits; right-padded batches."""
        out = []
        for i in range(0, len(rows), self.batch_size):
            chunk = rows[i : i + self.batch_size]
            T = max(len(ids) for ids, _ in chunk)
            ids = torch.tensor([r + [self.encoder.pad_id] * (T - len(r)) for r, _ in chunk], device=self.device)
            mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r, _ in chunk], device=self.device)
            pos = torch.tensor([p for _, p in chunk], device=self.device)
            out.append(self.model(ids, mask, pos).float())
        return torch.cat(out).cpu()

    def matrix(self, prompt: Messages, responses: list[str]) -> torch.Tensor:
        """(N, N) M[i, j] = logit of response i (as candidate 1) against j (as candidate 2)."""
        src, cands = self.encoder.encode(source_text(prompt), responses)
        N = len(responses)
        pairs = [(i, j) for i in range(N) for j in range(N) if i != j]
        M = torch.zeros(N, N)
        if pairs:
            i, j = torch.tensor(pairs).T
            M[i, j] = self.compare([self.encoder.row(src, cands[a], cands[b]) for a, b in pairs])
        return M

    def score(self, prompt: Messages, responses: list[str]) -> list[float]:
        return scores_from_matrix(self.matrix(prompt, responses)).tolist()


# --- one-time conversion of the original llm-blender/PairRM folder --------------------------------


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def _fields(buf: bytes):
    """(field number, value) of each field of one protobuf message: varints as int, fixed-width and
    length-delimited fields as bytes. Enough to read a SentencePiece model without protobuf."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        wire = key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            value, i = buf[i : i + n], i + n
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i : i + n], i + n
        else:
            raise TokenizerError(f"unsupported protobuf wire type {wire}: not a SentencePiece model?")
        yield key >> 3, value


def tokenizer_from_spm(spm_file: Path):
    """A `tokenizers` Tokenizer equal to what transformers' DebertaV2Converter builds from a DeBERTa-v3
    spm.model (do_lower_case and split_by_punct off, as in deberta-v3-large), plus [MASK] after the
    pieces as deberta-v3's tokenizer_config adds it. Reads the SentencePiece protobuf directly:
    ModelProto 1 = pieces (1 piece, 2 score as float32, 3 type), 2 = trainer_spec (3 model_type,
    40 unk_id), 3 = normalizer_spec (2 precompiled_charsmap)."""
    import struct

    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers import Tokenizer as HFTokenizer

    pieces, unk_id, model_type, charsmap = [], 0, 1, b""
    for field, value in _fields(spm_file.read_bytes()):
        if field == 1:
            p = {1: b"", 2: b"\0\0\0\0", 3: 1} | dict(_fields(value))  # type NORMAL unless given
            pieces.append((p[1].decode("utf-8"), struct.unpack("<f", p[2])[0], p[3]))
        elif field == 2:
            spec = dict(_fields(value))
            unk_id, model_type = spec.get(40, 0), spec.get(3, 1)
        elif field == 3:
            charsmap = dict(_fields(value)).get(2, b"")
    if model_type != 1 or not pieces:
        raise TokenizerError(f"{spm_file}: not a SentencePiece unigram model")
    tok = HFTokenizer(models.Unigram([(p, s) for p, s, _ in pieces], unk_id=unk_id, byte_fallback=False))
    # Control pieces ([PAD] [CLS] [SEP]) are special tokens, user-defined ones plain added tokens.
    tok.add_tokens([AddedToken(p, normalized=False, special=t == 3) for p, _, t in pieces if t in (3, 4)])
    steps = [normalizers.Strip()] + ([normalizers.Precompiled(charsmap)] if charsmap else [])
    tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    ids = {p: i for i, (p, _, _) in enumerate(pieces)}
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0", pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])])
    tok.add_special_tokens([AddedToken("[MASK]", normalized=False, special=True)])
    return tok


def _convert_weights(src: Path) -> dict[str, torch.Tensor]:
    files = sorted(src.glob("*.safetensors"))
    if files:
        tensors = {}
        for f in files:
            with safe_open(str(f), framework="pt", device="cpu") as h:
                tensors |= {k: h.get_tensor(k) for k in h.keys()}
        return tensors
    bin_file = src / "pytorch_model.bin"
    if not bin_file.is_file():
        raise CheckpointError(f"{src}: neither *.safetensors nor pytorch_model.bin")
    # weights_only=True: tensors and plain containers only, no code from the pickle is run.
    state = torch.load(bin_file, map_location="cpu", weights_only=True, mmap=True)
    return {k: v.contiguous().clone() for k, v in state.items()}


def convert(src: Path, tokenizer_dir: Path, out: Path) -> Path:
    """Write out/ (config.json, model.safetensors, tokenizer.json, tokenizer_config.json) from an
    llm-blender/PairRM or PairRM-hf folder and a DeBERTa-v3 tokenizer folder holding tokenizer.json
    or spm.model. The prefix tokens are added to the tokenizer when missing (as llm-blender's
    collator does)."""
    import tokenizers

    src_cfg = _read_json(src / "config.json")
    tok_file = tokenizer_dir / "tokenizer.json"
    if tok_file.is_file():
        tok = tokenizers.Tokenizer.from_file(str(tok_file))
    elif (tokenizer_dir / "spm.model").is_file():
        tok_file = tokenizer_dir / "spm.model"
        tok = tokenizer_from_spm(tok_file)
    else:
        raise TokenizerError(f"{tokenizer_dir}: neither tokenizer.json nor spm.model")
    tok.add_tokens([t for t in PREFIX_TOKENS.values() if tok.token_to_id(t) is None])
    ids = {k: tok.token_to_id(t) for k, t in PREFIX_TOKENS.items()}
    tensors = _convert_weights(src)
    emb = tensors.get("pretrained_model.embeddings.word_embeddings.weight")
    if emb is None:
        raise CheckpointError(f"{src}: no pretrained_model.embeddings.word_embeddings.weight; not a PairRM checkpoint")
    if "ranker_type" in src_cfg:  # original llm-blender/PairRM: the architecture is deberta-v3-large's
        if src_cfg.get("model_name") != "microsoft/deberta-v3-large":
            raise CheckpointError(f"{src}/config.json: model_name {src_cfg.get('model_name')!r}; only "
                                  f"microsoft/deberta-v3-large is known")
        cfg = dict(DEBERTA_V3_LARGE, vocab_size=emb.shape[0], n_tasks=src_cfg.get("n_tasks", 1),
                   source_maxlength=src_cfg.get("source_maxlength") or SOURCE_MAX_LENGTH,
                   candidate_maxlength=src_cfg.get("candidate_maxlength") or CANDIDATE_MAX_LENGTH)
    else:
        cfg = dict(src_cfg)
    for k, i in ids.items():
        if k in cfg and cfg[k] != i:
            raise TokenizerError(f"{tok_file}: {PREFIX_TOKENS[k]} gets id {i}, but {src}/config.json says {cfg[k]}")
    cfg |= ids
    if max(ids.values()) >= emb.shape[0]:
        raise CheckpointError(f"{src}: the embedding has {emb.shape[0]} rows, too few for prefix id {max(ids.values())}")
    with atomic_dir(out) as tmp:
        save_file({k: v for k, v in tensors.items() if k not in _IGNORED}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        tok.save(str(tmp / "tokenizer.json"))
        tok_cfg = tokenizer_dir / "tokenizer_config.json"
        if tok_cfg.is_file():
            shutil.copy(tok_cfg, tmp / "tokenizer_config.json")
        else:
            (tmp / "tokenizer_config.json").write_text(json.dumps(
                {"cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]", "unk_token": "[UNK]",
                 "mask_token": "[MASK]"}, indent=2))
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def main(argv: Optional[list[str]] = None):
    p = argparse.ArgumentParser(prog="python -m lion_min pairrm", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert", help="make a folder judges.py loads from an llm-blender/PairRM download")
    c.add_argument("src", type=Path, help="llm-blender/PairRM or PairRM-hf folder")
    c.add_argument("out", type=Path)
    c.add_argument("--tokenizer", type=Path, help="folder with a DeBERTa-v3 tokenizer.json or spm.model (default: src)")
    a = p.parse_args(argv)
    out = convert(a.src, a.tokenizer or a.src, a.out)
    print(f"wrote {out}")
