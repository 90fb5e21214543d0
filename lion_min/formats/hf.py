"""Hugging Face checkpoints in and out: safetensors <-> Transformer (the folder's config.json <->
ModelArgs, and finding the folder, are in hf_config.py).

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
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lion_min.core.chat import TEMPLATES, template_of
from lion_min.core.choices import EXPORT_FILES
from lion_min.core.model import Transformer
from lion_min.formats.hf_config import (
    CheckpointError,
    config_from_args,
    generation_config,
    read_config,
    resolve_path,
    weight_files,
)
from lion_min.formats.tokenizer import Tokenizer

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


# --- reading -------------------------------------------------------------------------------------


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
    what a killed export leaves stays inside out_dir (run_folder.claim removes it on the next run).
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

    chat_template: a Jinja string or a known template's name ("chatml", "llama3", "gemma", "gemma3"), stored
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
