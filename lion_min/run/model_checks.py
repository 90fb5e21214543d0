"""Whether a checkpoint folder fits the run, read from its config.json and tokenizer alone (no
weights, no torch): the tokenizer can encode the run's chat template, every token id has an
embedding row, the sequence length fits the model, a reference has the policy's shape, and a
judge is a known rule or a reward model with a score head and a chat template.

stages/preflight.py makes these checks before anything loads (a second, not a download or a
minute of loading); the stage makes them again on what it loaded (a hub id is fetched only then).
"""

from pathlib import Path
from typing import NamedTuple, Optional

from safetensors import safe_open

from lion_min.core.args import ModelArgs
from lion_min.core.chat import TEMPLATES, check_tokenizer, template_of, with_template_tokens
from lion_min.core.judge import RULES, RuleFn
from lion_min.formats.hf_config import CheckpointError, read_config, resolve_path, weight_files
from lion_min.formats.hub import goes_to_hub
from lion_min.formats.tokenizer import Tokenizer
from lion_min.run.config import ConfigError


class ModelFolder(NamedTuple):
    """A run's model folder as read_model_folder found it (everything but the weights)."""
    folder: Path
    args: ModelArgs  # its config.json
    tokenizer: Tokenizer  # with the run's chat template's tokens (chat_tokenizer)
    template: str  # the run's chat template, named (--chat_template=auto resolved)


def read_model_folder(cfg, name: Optional[str] = None) -> ModelFolder:
    """The model folder `name` (--model when None) read without its weights, and checked against the
    run: config.json, the weight files listed, the attention backend, the tokenizer's ids against the
    embedding rows and the chat template's tokens. The stage reads it once; preflight too, earlier."""
    folder = resolve_path(name or cfg.model, cfg.revision)
    args = read_config(folder)
    check_attn_backend(cfg.attn_backend, args, folder)
    weight_files(folder)
    tokenizer = Tokenizer.from_dir(folder)
    check_vocab(tokenizer, args, folder)
    tokenizer, template = chat_tokenizer(cfg, folder, tokenizer)
    check_tokenizer(tokenizer, template)
    return ModelFolder(folder, args, tokenizer, template)


def chat_tokenizer(cfg, folder: Path, tokenizer: Optional[Tokenizer] = None) -> tuple[Tokenizer, str]:
    """(the tokenizer of `folder`, able to encode the run's chat template; that template's name).
    `tokenizer`: the folder's, when the caller has read it already.

    --chat_template=auto names the folder's own template, or chatml, LION's, when the folder carries
    none; the caller records the name in its config (dataclasses.replace). ChatML's two tokens are
    given ids when the tokenizer lacks them (chat.with_template_tokens), as LION did on the base
    Gemma and Llama-3."""
    tokenizer = tokenizer or Tokenizer.from_dir(folder)
    template = cfg.chat_template
    if template == "auto":
        own = template_of(tokenizer.chat_template)
        if tokenizer.chat_template is not None and own is None:
            raise ConfigError(f"--chat_template=auto: {folder} carries a chat template lion_min does not know; "
                              f"name one with --chat_template ({', '.join(TEMPLATES)})")
        template = own.name if own else "chatml"
    return with_template_tokens(tokenizer, template), template


def check_vocab(tokenizer: Tokenizer, args, folder: Path):
    """Every token id must have an embedding row (a larger model vocabulary, padded, is fine)."""
    if tokenizer.vocab_size > args.vocab_size:
        raise ConfigError(f"{folder}: the tokenizer has {tokenizer.vocab_size} token ids but config.json's "
                          f"vocab_size (the embedding rows) is {args.vocab_size}; resizing embeddings is not supported")


def check_same_architecture(ref_folder: Path, args, flag: str = "--ref_model"):
    """The reference is run with the policy's architecture: refuse one of another shape."""
    ref = read_config(ref_folder)
    # The reference is built with the policy's ModelArgs, so everything they hold must agree.
    keys = ("family", "vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim",
            "tie_embeddings", "norm_eps", "rope_theta", "rope_scaling", "rope_local_theta", "layer_types",
            "sliding_window", "query_pre_attn_scalar", "attn_softcap", "final_softcap")  # the last six: Gemma-2/3
    diff = [f"{k} {getattr(ref, k)} vs {getattr(args, k)}" for k in keys if getattr(ref, k) != getattr(args, k)]
    if diff:
        raise ConfigError(f"{flag}={ref_folder}: another architecture than --model ({', '.join(diff)})")


def check_seq_len(seq_len: int, args, key: str = "seq_len", default: Optional[int] = None):
    if seq_len > args.max_seq_len:
        was = " (the default)" if seq_len == default else ""
        raise ConfigError(f"--{key}={seq_len}{was} is above the model's max_position_embeddings ({args.max_seq_len})")



def check_attn_backend(backend: str, args, folder: Path):
    """--attn_backend=varlen on a model its kernel cannot run (Gemma-2's soft-cap, a sliding window);
    where the device cannot run varlen at all, config.check_values has refused it already."""
    if backend != "varlen":
        return
    from lion_min.core.attention import varlen_model_problem  # (torch: loaded already, by check_values)

    problem = varlen_model_problem(args.attn_softcap, args.sliding_window)
    if problem:
        raise ConfigError(f"--attn_backend=varlen: {problem} in {folder}; use --attn_backend=flex or sdpa")

# --- the judge -------------------------------------------------------------------------------------


def reward_head_shape(folder: Path, args) -> tuple[int, int]:
    """The (num_labels, dim) shape of a reward model's score.weight, read from the safetensors headers."""
    shape = None
    for file in weight_files(folder):
        with safe_open(str(file), framework="numpy") as f:  # (the header only: no torch)
            if "score.weight" in f.keys():
                shape = f.get_slice("score.weight").get_shape()
    if shape is None:
        raise CheckpointError(f"{folder}: no score.weight; not a sequence-classification (reward model) checkpoint")
    if len(shape) != 2 or shape[1] != args.dim:
        raise CheckpointError(f"{folder}: score.weight has shape {tuple(shape)}, expected (num_labels, {args.dim})")
    return tuple(shape)


def judge_template(template: Optional[str], tokenizer: Tokenizer, folder: Path) -> str:
    """The Jinja chat template a reward model's inputs are rendered with (--judge_template): its own
    (None or "auto": its folder's chat_template.jinja or tokenizer_config.json), a template lion_min
    knows by name, or a .jinja file."""
    if template in (None, "auto"):
        if tokenizer.chat_template is None:
            raise ConfigError(f"--judge={folder}: its tokenizer carries no chat_template; name the one it was "
                              f"trained with: --judge_template=FILE.jinja or {' | '.join(TEMPLATES)}")
        return tokenizer.chat_template
    if template in TEMPLATES:
        return TEMPLATES[template].jinja
    if not Path(template).expanduser().is_file():
        raise ConfigError(f"--judge_template={template}: no such file (expected a .jinja file, auto, or "
                          f"{', '.join(TEMPLATES)})")
    return Path(template).expanduser().read_text()


def check_judge(spec: str, template: Optional[str] = None, rules: Optional[dict[str, RuleFn]] = None) -> None:
    """--judge's files, read without weights (lion_min/stages/preflight.py): a rule name, a PairRM folder, or
    a reward model's config.json, score head, tokenizer and chat template (--judge_template). A hub id
    is checked once fetched."""
    rules = RULES if rules is None else rules
    path = spec.removeprefix("pairrm:")
    if spec in rules or goes_to_hub(path):
        return
    if not spec.startswith("pairrm:") and not Path(spec).expanduser().is_dir() and "/" not in spec:
        raise unknown_judge(spec, rules)
    folder = resolve_path(path)
    if spec.startswith("pairrm:"):
        return
    reward_head_shape(folder, read_config(folder))
    judge_template(template, Tokenizer.from_dir(folder), folder)


def unknown_judge(spec: str, rules: dict) -> ValueError:
    return ValueError(f"unknown judge {spec!r}: not a registered rule (known: {', '.join(sorted(rules)) or 'none'}) "
                      f"and not a reward-model folder or hub id")
