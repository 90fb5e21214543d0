"""Hugging Face checkpoints in and out: config.json <-> ModelArgs, safetensors <-> Transformer.

Loading builds the module on the meta device, allocates it once on the target device, then copies
tensors in one at a time from the memory-mapped safetensors files, so the host never holds a second
full copy of the weights. Weights are only ever read from safetensors (never unpickled).
Writing goes to a temporary folder that is renamed into place, so a crash leaves no half folder.
"""

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lion_min.model import ModelArgs, Transformer


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
_TOP_KEYS = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def hf_name(name: str) -> str:
    """Our parameter name -> the Hugging Face tensor name."""
    if name in _TOP_KEYS:
        return _TOP_KEYS[name]
    _, i, rest = name.split(".", 2)  # layers.{i}.{rest}
    return f"model.layers.{i}.{_LAYER_KEYS[rest]}"


# --- config.json ---------------------------------------------------------------------------------

_ACTIVATIONS = {"llama": {"silu"}, "gemma": {"gelu", "gelu_pytorch_tanh"}}


def args_from_config(cfg: dict, source: str = "config.json") -> ModelArgs:
    """Read a Llama or Gemma config.json, old key style (rope_theta, rope_scaling) or the
    transformers-5 style (rope_parameters). `source` names the file in error messages."""

    def need(key):
        if key not in cfg:
            raise CheckpointError(f"{source}: missing required key {key!r}")
        return cfg[key]

    family = need("model_type")
    if family not in _ACTIVATIONS:
        raise CheckpointError(f"{source}: model_type {family!r} is not supported (supported: llama, gemma)")
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu"
    if act not in _ACTIVATIONS[family]:
        raise CheckpointError(f"{source}: hidden_act {act!r} is not supported for {family}")
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            raise CheckpointError(f"{source}: {key}=true is not supported")

    # transformers 5 folds rope_theta and rope_scaling into one rope_parameters dict.
    rope = cfg.get("rope_parameters") or {}
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind != "llama3":
            raise CheckpointError(f"{source}: rope type {kind!r} is not supported (supported: default, llama3)")
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        for k in keys:
            if k not in scaling:
                raise CheckpointError(f"{source}: rope scaling is missing key {k!r}")
        scaling = {k: scaling[k] for k in keys} | {"rope_type": "llama3"}

    heads = need("num_attention_heads")
    return ModelArgs(
        family=family,
        vocab_size=need("vocab_size"),
        dim=need("hidden_size"),
        n_layers=need("num_hidden_layers"),
        n_heads=heads,
        n_kv_heads=cfg.get("num_key_value_heads") or heads,
        # gemma-7b: head_dim 256 although hidden_size / heads = 192, so never derive it when given.
        head_dim=cfg.get("head_dim") or need("hidden_size") // heads,
        hidden_dim=need("intermediate_size"),
        norm_eps=need("rms_norm_eps"),
        rope_theta=float(theta),
        rope_scaling=scaling,
        max_seq_len=cfg.get("max_position_embeddings", 8192),
        # Gemma always ties its head; Llama says so in the config (3.2 does, 3.0/3.1 don't).
        tie_embeddings=cfg.get("tie_word_embeddings", family == "gemma"),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=cfg.get("eos_token_id"),
        pad_token_id=cfg.get("pad_token_id"),
        hf_config=dict(cfg),
    )


def config_from_args(args: ModelArgs, dtype: torch.dtype) -> dict:
    """A config.json that both transformers 4.4x and 5 read: the keys it was loaded from, with
    every architectural key written from args (old key style, which both versions accept)."""
    gemma = args.family == "gemma"
    cfg = {k: v for k, v in args.hf_config.items() if k not in ("rope_parameters", "dtype", "torch_dtype")}
    cfg.update(
        architectures=["GemmaForCausalLM" if gemma else "LlamaForCausalLM"],
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
        torch_dtype=str(dtype).removeprefix("torch."),
    )
    cfg.pop("hidden_activation", None)
    return cfg


# --- reading -------------------------------------------------------------------------------------


def resolve_path(path_or_hub_id: str, revision: Optional[str] = None) -> Path:
    """A local folder as is; otherwise a hub id fetched with snapshot_download (which honours
    HF_HUB_OFFLINE by using only the local cache)."""
    p = Path(path_or_hub_id).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise CheckpointError(f"{p}: expected a checkpoint folder, found a file")
    if path_or_hub_id.count("/") != 1 or path_or_hub_id.startswith((".", "/", "~")):
        raise CheckpointError(f"{path_or_hub_id}: no such checkpoint folder (and not a hub id like org/name)")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*"]
    try:
        return Path(snapshot_download(path_or_hub_id, revision=revision, allow_patterns=patterns))
    except Exception as e:  # offline, unknown repo, gated, revision not found...
        raise CheckpointError(f"{path_or_hub_id}: could not get it from the Hugging Face hub "
                              f"(revision={revision}, HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}): {e}") from e


def read_config(folder: Path) -> ModelArgs:
    file = folder / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{file}: not found")
    try:
        cfg = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from e
    return args_from_config(cfg, str(file))


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the shards named by the index, or the single file."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
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

    `extra` maps additional HF names to parameters (e.g. a reward model's score head)."""
    params = dict(model.named_parameters())
    wanted = {hf_name(n): p for n, p in params.items()} | (extra or {})
    seen = set()
    tied_head = model.output is None
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():
                if key not in wanted:
                    if tied_head and key == "lm_head.weight":
                        continue  # some tied checkpoints store the head copy too; it is the embedding
                    if key.endswith("rotary_emb.inv_freq"):
                        continue  # older exports saved the RoPE buffer; we recompute it
                    raise CheckpointError(f"{file}: unexpected tensor {key!r}")
                tensor = f.get_tensor(key)
                p = wanted[key]
                if tuple(tensor.shape) != tuple(p.shape):
                    raise CheckpointError(
                        f"{file}: tensor {key!r} has shape {tuple(tensor.shape)}, the config implies {tuple(p.shape)}")
                with torch.no_grad():
                    p.copy_(tensor)
                seen.add(key)
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


def atomic_dir(out_dir: Path):
    """Context: yields a temporary sibling folder whose files land in out_dir only if the block succeeds.

    A new out_dir is one rename. An existing one (a training run's folder also holds metrics and
    checkpoints) gets each file moved in by its own atomic rename, weights before config.json,
    and stale weight shards of an earlier export removed.
    """

    class _Atomic:
        def __enter__(self):
            out_dir.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
            return self.tmp

        def __exit__(self, exc_type, exc, tb):
            if exc_type is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
                return False
            if not out_dir.exists():
                self.tmp.rename(out_dir)
                return False
            new = sorted(self.tmp.iterdir(), key=lambda f: f.name == "config.json")
            for stale in out_dir.glob("model*.safetensors*"):
                if not (self.tmp / stale.name).exists():
                    stale.unlink()
            for f in new:
                os.replace(f, out_dir / f.name)
            self.tmp.rmdir()
            return False

    return _Atomic()


def hf_state_dict(state_dict: dict[str, torch.Tensor], dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    """Our names -> Hugging Face names, as contiguous CPU tensors (the tied head is not written)."""
    out = {}
    for name, p in state_dict.items():
        if name == "inv_freq":
            continue
        t = p.detach()
        out[hf_name(name)] = t.to("cpu", dtype or t.dtype).contiguous()
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
    """Write a Hugging Face folder: config.json, safetensors (sharded with an index when larger than
    max_shard_size), generation_config.json, and the tokenizer files when a tokenizer is given.

    `state_dict` (our parameter names) replaces model.state_dict(), e.g. the full weights gathered
    from an FSDP-sharded model."""
    out_dir = Path(out_dir)
    tensors = hf_state_dict(state_dict if state_dict is not None else model.state_dict(), dtype)
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
        (tmp / "config.json").write_text(json.dumps(config_from_args(args, saved_dtype), indent=2))
        gen = {"bos_token_id": args.bos_token_id, "eos_token_id": args.eos_token_id, "pad_token_id": args.pad_token_id}
        (tmp / "generation_config.json").write_text(json.dumps({k: v for k, v in gen.items() if v is not None}, indent=2))
        if tokenizer is not None:
            tokenizer.save(tmp, chat_template=chat_template)
    return out_dir
