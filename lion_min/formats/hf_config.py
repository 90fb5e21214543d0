"""A Hugging Face model folder without its weights: where it is (a local folder, or a hub id fetched),
its config.json <-> ModelArgs, its generation_config.json, and which safetensors files hold the
weights (formats/hf.py reads and writes those).

No torch here, so that everything a run can check about a checkpoint before loading it is
checked in a fraction of a second (stages/preflight.py).
"""

import json
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from lion_min.core.args import LAYER_TYPES, ModelArgs
from lion_min.formats.hub import did_you_mean, hub_error, looks_local

if TYPE_CHECKING:
    import torch


class CheckpointError(ValueError):
    pass


# --- config.json ---------------------------------------------------------------------------------

_GELU_TANH = {"gelu", "gelu_pytorch_tanh"}
_ACTIVATIONS = {"llama": {"silu"}, "gemma": _GELU_TANH, "gemma2": _GELU_TANH, "gemma3_text": _GELU_TANH}
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
                  "gemma3_text": "Gemma3ForCausalLM"}


def args_from_config(cfg: dict, source: str = "config.json") -> ModelArgs:
    """Read a Llama or Gemma config.json, old key style (rope_theta, rope_scaling) or the
    transformers-5 style (rope_parameters). `source` names the file in error messages."""

    def need(key):
        if key not in cfg:
            raise CheckpointError(f"{source}: missing required key {key!r}")
        return cfg[key]

    # Numbers must be numbers (a "64" string would fail deep inside torch); bool is not an int here.
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "intermediate_size", "max_position_embeddings"):
        value = cfg.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise CheckpointError(f"{source}: {key} must be a positive integer, got {value!r}")
    for key in ("rms_norm_eps", "rope_theta"):
        value = cfg.get(key)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)):
            raise CheckpointError(f"{source}: {key} must be a number, got {value!r}")

    family = need("model_type")
    if family == "gemma3":  # multimodal Gemma-3 (4b, 12b, 27b): its language model, as a text-only Gemma-3
        return args_from_config(gemma3_text_config(cfg, source), source)
    if family not in _ACTIVATIONS:
        raise CheckpointError(f"{source}: model_type {family!r} is not supported (supported: {', '.join(_ACTIVATIONS)})")
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu"
    if act not in _ACTIVATIONS[family]:
        raise CheckpointError(f"{source}: hidden_act {act!r} is not supported for {family}")
    for key in ("attention_bias", "mlp_bias", "use_bidirectional_attention"):
        if cfg.get(key):
            raise CheckpointError(f"{source}: {key}=true is not supported")

    # transformers 5 folds rope_theta and rope_scaling into one rope_parameters dict; for Gemma-3, one
    # per layer type, the global layers' under "full_attention" and the local ones' under "sliding_attention".
    rope = cfg.get("rope_parameters") or {}
    local_rope = rope.get("sliding_attention") if family == "gemma3_text" else None
    rope = rope.get("full_attention", rope) if family == "gemma3_text" else rope
    default_theta = 1_000_000.0 if family == "gemma3_text" else 10000.0  # transformers' defaults
    theta = rope.get("rope_theta", cfg.get("rope_theta", default_theta))
    scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        # Gemma-3 (4b and up) scales its global layers linearly; Llama-3.1/3.2 use "llama3".
        supported = ("linear",) if family == "gemma3_text" else ("llama3",)
        if kind not in supported:
            raise CheckpointError(f"{source}: rope type {kind!r} is not supported for {family} (supported: default, "
                                  f"{', '.join(supported)})")
        keys = ("factor",) if kind == "linear" else ("factor", "low_freq_factor", "high_freq_factor",
                                                     "original_max_position_embeddings")
        for k in keys:
            if k not in scaling:
                raise CheckpointError(f"{source}: rope scaling is missing key {k!r}")
        scaling = {k: scaling[k] for k in keys} | {"rope_type": kind}
    gemma23 = _gemma23_args(cfg, family, local_rope, source) if family in ("gemma2", "gemma3_text") else {}

    heads = need("num_attention_heads")
    kv_heads = cfg.get("num_key_value_heads") or heads
    if heads % kv_heads:  # grouped-query attention shares each key/value head among a whole group
        raise CheckpointError(f"{source}: num_attention_heads ({heads}) is not a multiple of num_key_value_heads "
                              f"({kv_heads})")
    return ModelArgs(
        family=family,
        vocab_size=need("vocab_size"),
        dim=need("hidden_size"),
        n_layers=need("num_hidden_layers"),
        n_heads=heads,
        n_kv_heads=kv_heads,
        # gemma-7b: head_dim 256 although hidden_size / heads = 192, so never derive it when given.
        head_dim=cfg.get("head_dim") or need("hidden_size") // heads,
        hidden_dim=need("intermediate_size"),
        norm_eps=need("rms_norm_eps"),
        rope_theta=float(theta),
        rope_scaling=scaling,
        max_seq_len=cfg.get("max_position_embeddings", 8192),
        # Gemma checkpoints tie their head (the default when the key is absent); Llama says so (3.2 ties).
        tie_embeddings=cfg.get("tie_word_embeddings", family != "llama"),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=cfg.get("eos_token_id"),
        pad_token_id=cfg.get("pad_token_id"),
        hf_config=dict(cfg),
        **gemma23,
    )


# transformers' Gemma3TextConfig defaults: the hub's multimodal Gemma-3 files list in text_config only
# the keys that differ from them (gemma-3-4b: hidden_size, intermediate_size, num_hidden_layers,
# rope_scaling, sliding_window).
_GEMMA3_TEXT_DEFAULTS = dict(
    vocab_size=262_208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
    num_key_value_heads=4, head_dim=256, hidden_activation="gelu_pytorch_tanh", max_position_embeddings=131_072,
    rms_norm_eps=1e-6, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, query_pre_attn_scalar=256,
    sliding_window=4096, sliding_window_pattern=6, final_logit_softcapping=None, attn_logit_softcapping=None,
    tie_word_embeddings=True, bos_token_id=2, eos_token_id=1, pad_token_id=0,
)


def gemma3_text_config(cfg: dict, source: str) -> dict:
    """The config.json of the language model inside a multimodal Gemma-3 config (model_type "gemma3"):
    its text_config over transformers' defaults, the special ids from the outer file where the inner
    one lacks them. lion_min reads and trains that language model alone, and exports it as a text-only
    Gemma3ForCausalLM folder (the vision tower is not read, so not written)."""
    text = cfg.get("text_config")
    if not isinstance(text, dict):
        raise CheckpointError(f"{source}: model_type 'gemma3' (multimodal Gemma-3) without a text_config object")
    ids = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in cfg}
    return _GEMMA3_TEXT_DEFAULTS | ids | text | {"model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"]}


def _gemma23_args(cfg: dict, family: str, local_rope: Optional[dict], source: str) -> dict:
    """The ModelArgs fields only Gemma-2 and Gemma-3 have, with transformers' defaults for absent keys
    (older Gemma-2 files have no layer_types; Gemma-3 files give sliding_window_pattern instead)."""
    n = cfg.get("num_hidden_layers")
    layer_types = cfg.get("layer_types")
    if layer_types is None and family == "gemma2":  # alternating, layer 0 local
        layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
    elif layer_types is None:  # Gemma-3: every `pattern`-th layer global
        pattern = cfg.get("sliding_window_pattern", 6)
        layer_types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
    if not isinstance(layer_types, list) or len(layer_types) != n or not set(layer_types) <= set(LAYER_TYPES):
        raise CheckpointError(f"{source}: layer_types must list {n} entries, each one of {', '.join(LAYER_TYPES)}")
    window = cfg.get("sliding_window", 4096)
    if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
        raise CheckpointError(f"{source}: sliding_window must be a positive integer, got {window!r}")
    gemma2 = family == "gemma2"
    out = dict(
        layer_types=tuple(layer_types),
        sliding_window=window,
        query_pre_attn_scalar=cfg.get("query_pre_attn_scalar", 256),
        # Gemma-2 soft-caps (50 / 30 when the key is absent); Gemma-3 has none unless its config says so.
        attn_softcap=cfg.get("attn_logit_softcapping", 50.0 if gemma2 else None),
        final_softcap=cfg.get("final_logit_softcapping", 30.0 if gemma2 else None),
    )
    if not gemma2:  # Gemma-3: the local layers' own RoPE base
        if local_rope and local_rope.get("rope_type", "default") != "default":
            raise CheckpointError(f"{source}: rope type {local_rope['rope_type']!r} on the sliding layers is not "
                                  f"supported (supported: default)")
        out["rope_local_theta"] = float((local_rope or {}).get("rope_theta", cfg.get("rope_local_base_freq", 10000.0)))
    return out


def _architecture(args: ModelArgs) -> dict:
    return {f.name: getattr(args, f.name) for f in fields(args) if not f.name.startswith("hf_")}


def config_from_args(args: ModelArgs, dtype: "torch.dtype") -> dict:
    """The config.json of an export. The one args were read from (args.hf_config) comes back as it
    was while args still describe it, with only the dtype of the written weights updated (and
    `architectures` where it is not the causal LM). Otherwise (args built in code, or changed since)
    every architectural key is written from args, in the old key style that transformers 4.4x and 5
    both read."""
    cfg = dict(args.hf_config)
    if not cfg or _architecture(args_from_config(cfg)) != _architecture(args):
        cfg = {k: v for k, v in cfg.items() if k not in ("rope_parameters", "dtype", "torch_dtype", "hidden_activation")}
        cfg.update(_architecture_keys(args))
    cfg["architectures"] = [_ARCHITECTURES[args.family]]
    # transformers 5 writes "dtype", 4.x (and the hub's files) "torch_dtype"; 5 reads both.
    for key in [k for k in ("torch_dtype", "dtype") if k in cfg] or ["torch_dtype"]:
        cfg[key] = str(dtype).removeprefix("torch.")
    return cfg


def _architecture_keys(args: ModelArgs) -> dict:
    gemma = args.gemma
    keys = dict(
        model_type=args.family,
        vocab_size=args.vocab_size,
        hidden_size=args.dim,
        num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads,
        num_key_value_heads=args.n_kv_heads,
        head_dim=args.head_dim,
        intermediate_size=args.hidden_dim,
        hidden_act="gelu_pytorch_tanh" if gemma else "silu",
        rms_norm_eps=args.norm_eps,
        rope_theta=args.rope_theta,
        rope_scaling=args.rope_scaling,
        max_position_embeddings=args.max_seq_len,
        tie_word_embeddings=args.tie_embeddings,
        attention_bias=False,
        bos_token_id=args.bos_token_id,
        eos_token_id=args.eos_token_id,
        pad_token_id=args.pad_token_id,
    )
    if args.sandwich_norms:  # Gemma-2/3
        keys.update(layer_types=list(args.layer_types), sliding_window=args.sliding_window,
                    query_pre_attn_scalar=args.query_pre_attn_scalar, attn_logit_softcapping=args.attn_softcap,
                    final_logit_softcapping=args.final_softcap)
    if args.rope_local_theta is not None:  # Gemma-3
        keys["rope_local_base_freq"] = args.rope_local_theta
    return keys


def generation_config(args: ModelArgs, stop_id: Optional[int] = None) -> dict:
    """The generation_config.json of an export: the one read with the checkpoint (else bos / eos /
    pad from args), with `stop_id` (the chat template's end-of-turn token) added to eos_token_id, so
    that generate() ends a reply there as it does for the released chat models."""
    ids = {"bos_token_id": args.bos_token_id, "eos_token_id": args.eos_token_id, "pad_token_id": args.pad_token_id}
    gen = dict(args.hf_generation_config) or {k: v for k, v in ids.items() if v is not None}
    eos = gen.get("eos_token_id")
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if stop_id is not None and stop_id not in eos:
        gen["eos_token_id"] = eos + [stop_id]  # a list, as in Meta's release: [<|end_of_text|>, <|eot_id|>]
    return gen


# --- the folder ---------------------------------------------------------------------------------


def resolve_path(path_or_hub_id: str, revision: Optional[str] = None) -> Path:
    """A local folder as is; otherwise a hub id (org/name) fetched with snapshot_download, which
    honours HF_HUB_OFFLINE by using only the local cache. A name that looks like a local path
    (hub.looks_local) is never sent to the hub: a missing one is reported as a missing folder."""
    p = Path(path_or_hub_id).expanduser()
    if p.is_dir() and (p / "trainer_state.json").is_file() and not (p / "config.json").is_file():
        run = p.parent.parent if p.parent.name == "checkpoints" else p
        raise CheckpointError(f"{p}: a resumable training checkpoint (torch.distributed.checkpoint), not a Hugging "
                              f"Face folder: continue training from it with --resume={p}; the exported model of "
                              f"the run is in {run}")
    if p.is_dir():
        return p
    if p.exists():
        raise CheckpointError(f"{p}: expected a checkpoint folder, found a file")
    if looks_local(path_or_hub_id):
        raise CheckpointError(f"{path_or_hub_id}: no such checkpoint folder{did_you_mean(path_or_hub_id)}")
    if path_or_hub_id.count("/") != 1:
        raise CheckpointError(f"{path_or_hub_id}: no such checkpoint folder (and not a hub id like org/name)")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*"]
    try:
        return Path(snapshot_download(path_or_hub_id, revision=revision, allow_patterns=patterns))
    except Exception as e:  # offline, unknown repo, gated, revision not found...
        raise CheckpointError(hub_error(path_or_hub_id, e, revision)) from e


def _read_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    return data


def read_config(folder: Path) -> ModelArgs:
    """ModelArgs from folder/config.json, keeping that file and generation_config.json (if any)
    for the export."""
    file = folder / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{file}: not found")
    args = args_from_config(_read_json(file), str(file))
    gen = folder / "generation_config.json"
    args.hf_generation_config = _read_json(gen) if gen.is_file() else {}
    return args


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the shards named by the index, or the single file."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text()).get("weight_map")
        except (ValueError, AttributeError) as e:  # not JSON, or JSON that is not an object
            raise CheckpointError(f"{index}: not a valid index file ({e})") from None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: missing key 'weight_map'")
        files = [folder / f for f in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{index}: names shard {f.name}, which is missing")
        return files
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    if list(folder.glob("*.bin")) or list(folder.glob("*.pt")):
        raise CheckpointError(f"{folder}: only pickled weights (.bin/.pt) found; lion_min reads safetensors only")
    raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json")
