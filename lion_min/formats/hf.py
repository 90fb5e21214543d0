"""Hugging Face checkpoints in and out: config.json <-> ModelArgs, safetensors <-> Transformer.

Loading builds the module on the meta device, allocates it once on the target device, then copies
tensors in one at a time from the memory-mapped safetensors files, so the host never holds a second
full copy of the weights. Weights are only ever read from safetensors (never unpickled).
Writing goes to a temporary folder that is renamed into place, so a crash leaves no half folder.
An export is the folder it was loaded from with only what training changed: config.json and
generation_config.json are written back as read (args.hf_config, args.hf_generation_config), the
tokenizer writes back its own files, and the differences are the weights, their dtype, the chat
template and its end-of-turn token among the stop ids (tests/test_checkpoint.py names each). One
exception: a multimodal Gemma-3 folder is read for its language model only, and its export is that
language model as a text-only Gemma-3 (gemma3_text_config).
"""

import json
import os
import secrets
import shutil
from dataclasses import fields
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lion_min.core.chat import TEMPLATES, template_of
from lion_min.formats.hub import did_you_mean, hub_error, looks_local
from lion_min.core.model import LAYER_TYPES, ModelArgs, Transformer
from lion_min.formats.tokenizer import Tokenizer
from lion_min.core.choices import EXPORT_FILES


class CheckpointError(ValueError):
    pass


# Our module names <- Hugging Face names. {i} is the layer index.
_LAYER_KEYS = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
# Gemma-2/3 (sandwich norms): HF's post_attention_layernorm is the norm on the attention's OUTPUT,
# and the MLP's input norm is pre_feedforward_layernorm; Gemma-3 adds the QK-norm weights.
_SANDWICH_KEYS = _LAYER_KEYS | {
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "post_ffn_norm.weight": "post_feedforward_layernorm.weight",
    "attention.q_norm.weight": "self_attn.q_norm.weight",
    "attention.k_norm.weight": "self_attn.k_norm.weight",
}
_TOP_KEYS = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def hf_name(name: str, sandwich: bool = False) -> str:
    """Our parameter name -> the Hugging Face tensor name (sandwich: Gemma-2/3, args.sandwich_norms)."""
    if name in _TOP_KEYS:
        return _TOP_KEYS[name]
    _, i, rest = name.split(".", 2)  # layers.{i}.{rest}
    return f"model.layers.{i}.{(_SANDWICH_KEYS if sandwich else _LAYER_KEYS)[rest]}"


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


def config_from_args(args: ModelArgs, dtype: torch.dtype) -> dict:
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


# --- reading -------------------------------------------------------------------------------------


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


def hash_files(h, files, names: bool = True) -> None:
    """Feed each file's bytes (after its name, unless names=False) into the hashlib object `h`, in
    the order given; files are read in 16 MiB blocks. The exact fingerprints: reference log-probs
    (dpo), golden numbers, the prepared data (prepare)."""
    for f in files:
        if names:
            h.update(Path(f).name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)


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


def load_weights(model: Transformer, files: list[Path], extra: Optional[dict] = None) -> None:
    """Copy every tensor from `files` into `model` (already allocated), checking names and shapes.

    `extra` maps additional HF names to parameters (e.g. a reward model's score head). A multimodal
    Gemma-3 folder's language model is read from under `language_model.`; its vision tower and
    projector are left out (gemma3_text_config)."""
    params = dict(model.named_parameters())
    wanted = {hf_name(n, model.args.sandwich_norms): p for n, p in params.items()} | (extra or {})
    seen = set()
    tied_head = model.output is None
    for file in files:
        try:
            handle = safe_open(str(file), framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own error type for a corrupt or truncated file
            raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None
        with handle as f:
            for key in f.keys():
                name = key
                if model.args.family == "gemma3_text":  # Gemma-3: the language model of a multimodal folder
                    if key.startswith(("vision_tower.", "multi_modal_projector.")):
                        continue
                    name = key.removeprefix("language_model.")
                if name not in wanted:
                    if tied_head and name == "lm_head.weight":
                        continue  # some tied checkpoints store the head copy too; it is the embedding
                    if key.endswith("rotary_emb.inv_freq"):
                        continue  # older exports saved the RoPE buffer; we recompute it
                    raise CheckpointError(f"{file}: unexpected tensor {key!r}")
                tensor = f.get_tensor(key)
                p = wanted[name]
                if tuple(tensor.shape) != tuple(p.shape):
                    raise CheckpointError(
                        f"{file}: tensor {key!r} has shape {tuple(tensor.shape)}, the config implies {tuple(p.shape)}")
                with torch.no_grad():
                    p.copy_(tensor)
                seen.add(name)
    missing = sorted(set(wanted) - seen)
    if missing:
        where = files[0].parent
        raise CheckpointError(f"{where}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")


def load_model(
    path_or_hub_id: str,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    revision: Optional[str] = None,
) -> Transformer:
    """Load a Llama-3 or Gemma Hugging Face checkpoint (local folder or hub id) into a Transformer."""
    folder = resolve_path(str(path_or_hub_id), revision)
    args = read_config(folder)
    files = weight_files(folder)
    with torch.device("meta"):
        model = Transformer(args)
    # Cast while still on meta (free), so the one allocation is already in the target dtype.
    model.to(dtype).to_empty(device=device)
    load_weights(model, files)
    model.init_buffers()
    return model.eval()


# --- writing -------------------------------------------------------------------------------------


def parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    s = size.strip().upper()
    for unit, mult in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


def shard_state_dict(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Greedy shards in name order, each at most max_bytes (a tensor larger than that gets its own)."""
    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    if current:
        shards.append(current)
    return shards


def atomic_temp(out_dir: Path) -> Path:
    """atomic_dir's temporary folder for out_dir: inside it when it exists, else beside it."""
    return (out_dir if out_dir.is_dir() else out_dir.parent) / f".{out_dir.name}.tmp-{secrets.token_hex(4)}"


def atomic_dir(out_dir: Path):
    """Context: yields a temporary folder whose files land in out_dir only if the block succeeds.

    A new out_dir is one rename of a sibling folder (a rename within one folder). An existing one (a
    training run's folder also holds metrics and checkpoints) is written inside itself, in a hidden
    folder, and gets each file moved in by its own atomic rename, weights before config.json, and
    the EXPORT_FILES of an earlier export that this one lacks removed: never beside it, where a
    rename would cross a mount when out_dir is a mount point (a container's output volume), and
    what a killed export leaves stays inside out_dir (run_dir.claim removes it on the next run).
    Files and folder get the usual permissions for the umask (0644 / 0755), not the private ones
    of temporary files.
    """

    class _Atomic:
        def __enter__(self):
            out_dir.parent.mkdir(parents=True, exist_ok=True)
            # mkdir, not tempfile.mkdtemp: that one makes the folder 0700, and a new out_dir is this folder.
            self.tmp = atomic_temp(out_dir)
            self.tmp.mkdir()
            return self.tmp

        def __exit__(self, exc_type, exc, tb):
            if exc_type is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
                return False
            file_mode = self.tmp.stat().st_mode & 0o666  # 0777 & ~umask for the folder -> 0666 & ~umask
            new = sorted(self.tmp.iterdir(), key=lambda f: f.name == "config.json")
            for f in new:
                f.chmod(file_mode)  # safetensors writes its files 0600
            if not out_dir.exists():
                self.tmp.rename(out_dir)
                return False
            try:
                for stale in [f for pattern in EXPORT_FILES for f in out_dir.glob(pattern)]:
                    if stale.is_file() and not (self.tmp / stale.name).exists():
                        stale.unlink()
                for f in new:
                    os.replace(f, out_dir / f.name)
            finally:  # (a move that failed leaves no temporary folder either; config.json moves last)
                shutil.rmtree(self.tmp, ignore_errors=True)
            return False

    return _Atomic()


def hf_state_dict(state_dict: dict[str, torch.Tensor], dtype: Optional[torch.dtype] = None,
                  sandwich: bool = False) -> dict[str, torch.Tensor]:
    """Our names -> Hugging Face names, as contiguous CPU tensors (the tied head is not written)."""
    out = {}
    for name, p in state_dict.items():
        if name == "inv_freq":
            continue
        t = p.detach()
        out[hf_name(name, sandwich)] = t.to("cpu", dtype or t.dtype).contiguous()
    return out


def grow_vocab(state_dict: dict[str, torch.Tensor], vocab_size: int) -> dict[str, torch.Tensor]:
    """The state dict with the embedding (and an untied output head) grown to vocab_size rows, each
    new row the mean of the existing rows (computed in float32).

    The rows of tokens added to a checkpoint (the ChatML markers on a base model) start where the
    average token is, as transformers' resize_token_embeddings(mean_resizing=True) does: it draws
    them from a normal at that mean with 1e-9 times the rows' covariance, i.e. the mean to within
    about 3e-5 of the rows' spread. The mean itself is deterministic, so a policy and its reference
    grown apart get the same rows."""
    out = dict(state_dict)
    for name in ("tok_embeddings.weight", "output.weight"):
        w = out.get(name)
        if w is not None and w.shape[0] < vocab_size:
            mean = w.float().mean(0, keepdim=True).to(w.dtype)
            out[name] = torch.cat([w, mean.expand(vocab_size - w.shape[0], -1)])
    return out


def save_model(
    model: Transformer,
    out_dir: str | Path,
    tokenizer=None,
    dtype: Optional[torch.dtype] = None,
    max_shard_size: int | str = "5GB",
    chat_template: Optional[str] = None,
    state_dict: Optional[dict[str, torch.Tensor]] = None,
) -> Path:
    """Write a Hugging Face folder: safetensors (sharded with an index when larger than
    max_shard_size), config.json and generation_config.json as the checkpoint had them (see
    config_from_args, generation_config), and the tokenizer's files when a tokenizer is given (a
    lion_min Tokenizer, a tokenizer folder, or a transformers tokenizer: Tokenizer.of).

    chat_template: a Jinja string or a known template's name ("chatml", "llama3", "gemma"), stored
    with the tokenizer; None keeps the tokenizer's own. When the template is a known one, its
    end-of-turn token joins the eos ids of generation_config.json.
    `state_dict` (our parameter names) replaces model.state_dict(), e.g. the full weights gathered
    from an FSDP-sharded model."""
    out_dir = Path(out_dir)
    tokenizer = Tokenizer.of(tokenizer) if tokenizer is not None else None
    if chat_template in TEMPLATES:
        chat_template = TEMPLATES[chat_template].jinja
    stop_id = None
    if tokenizer is not None:
        known = template_of(chat_template if chat_template is not None else tokenizer.chat_template)
        stop_id = tokenizer.token_id(known.end_of_turn) if known else None
    elif chat_template is not None:
        raise ValueError("save_model: a chat_template is stored with the tokenizer; pass tokenizer= too")
    tensors = hf_state_dict(state_dict if state_dict is not None else model.state_dict(), dtype,
                            model.args.sandwich_norms)
    saved_dtype = next(iter(tensors.values())).dtype
    args = model.args
    with atomic_dir(out_dir) as tmp:
        shards = shard_state_dict(tensors, parse_size(max_shard_size))
        if len(shards) == 1:
            save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata={"format": "pt"})
                weight_map |= {k: fname for k in shard}
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(config_from_args(args, saved_dtype), indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(generation_config(args, stop_id), indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp, chat_template=chat_template)
    return out_dir
