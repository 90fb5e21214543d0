"""Hugging Face folders in and out: round trips, sharding, config styles, and bad input."""

import json
import shutil

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file, load_file

import lion_min
from lion_min.checkpoint import CheckpointError, args_from_config, load_model, save_model
from conftest import CONFIG_NAMES, small_config


def read_tensors(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as g:
            out |= {k: g.get_tensor(k) for k in g.keys()}
    return out


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_round_trip_is_bit_identical_and_transformers_loads_it(hf_checkpoints, name, tmp_path):
    src = hf_checkpoints[name]
    model = load_model(src)
    save_model(model, tmp_path / "out")
    a, b = read_tensors(src), read_tensors(tmp_path / "out")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    x = torch.randint(0, 512, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), atol=1e-5, rtol=0)


def test_sharded_equals_single_file(hf_checkpoints, tmp_path):
    model = load_model(hf_checkpoints["llama-3-8b"])
    save_model(model, tmp_path / "sharded", max_shard_size="40KB")
    shards = sorted((tmp_path / "sharded").glob("*.safetensors"))
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(shards) > 2 and set(index["weight_map"].values()) == {s.name for s in shards}
    again = load_model(tmp_path / "sharded")
    for (n, p), (n2, p2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert n == n2 and torch.equal(p, p2), n
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "sharded").eval()
    x = torch.randint(0, 512, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, again(x), atol=1e-5, rtol=0)


def test_dtype_and_export_dtype(hf_checkpoints, tmp_path):
    model = load_model(hf_checkpoints["gemma-2b"], dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    save_model(model, tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in read_tensors(tmp_path / "bf16").values())


def test_transformers5_rope_parameters_style_equals_old_style():
    old = small_config("llama-3.1-8b")
    new = {k: v for k, v in old.items() if k not in ("rope_theta", "rope_scaling")}
    new["rope_parameters"] = {"rope_theta": old["rope_theta"], **old["rope_scaling"]}
    a, b = args_from_config(old), args_from_config(new)
    assert (a.rope_theta, a.rope_scaling) == (b.rope_theta, b.rope_scaling)
    assert a.rope_scaling["factor"] == 8.0
    plain = small_config("llama-3-8b")
    plain.pop("rope_scaling"), plain.pop("rope_theta")
    plain["rope_parameters"] = {"rope_type": "default", "rope_theta": 500000.0}
    c = args_from_config(plain)
    assert c.rope_scaling is None and c.rope_theta == 500000.0


def test_head_dim_is_read_not_derived():
    args = args_from_config(json.loads(open("tests/data/configs/gemma-7b.json").read()))
    assert args.head_dim == 256 and args.dim // args.n_heads == 192 and args.tie_embeddings
    args = args_from_config(json.loads(open("tests/data/configs/gemma-2b.json").read()))
    assert args.n_kv_heads == 1
    assert args_from_config(json.loads(open("tests/data/configs/llama-3.2-1b.json").read())).tie_embeddings
    assert not args_from_config(json.loads(open("tests/data/configs/llama-3-8b.json").read())).tie_embeddings


# --- bad input: one clear error naming the file and key ------------------------------------------


def broken_copy(src, dst, edit_config=None, edit_tensors=None):
    shutil.copytree(src, dst)
    if edit_config:
        cfg = json.loads((dst / "config.json").read_text())
        edit_config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    if edit_tensors:
        t = load_file(str(dst / "model.safetensors"))
        edit_tensors(t)
        save_file(t, str(dst / "model.safetensors"))
    return dst


@pytest.mark.parametrize(
    "edit_config, message",
    [
        (lambda c: c.pop("num_hidden_layers"), "missing required key 'num_hidden_layers'"),
        (lambda c: c.update(model_type="mistral"), "model_type 'mistral' is not supported"),
        (lambda c: c.update(rope_scaling={"rope_type": "yarn", "factor": 2.0}), "rope type 'yarn' is not supported"),
        (lambda c: c.update(hidden_act="relu"), "hidden_act 'relu' is not supported"),
    ],
)
def test_bad_config(hf_checkpoints, tmp_path, edit_config, message):
    folder = broken_copy(hf_checkpoints["llama-3-8b"], tmp_path / "bad", edit_config=edit_config)
    with pytest.raises(CheckpointError, match=message) as e:
        load_model(folder)
    assert str(folder / "config.json") in str(e.value)


@pytest.mark.parametrize(
    "edit_tensors, message",
    [
        (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), r"missing tensor\(s\) \['model.layers.1.mlp.up_proj.weight'\]"),
        (lambda t: t.update({"model.layers.0.self_attn.rotary.weight": torch.zeros(2)}), "unexpected tensor 'model.layers.0.self_attn.rotary.weight'"),
        (lambda t: t.update({"model.norm.weight": torch.zeros(63)}), r"'model.norm.weight' has shape \(63,\), the config implies \(64,\)"),
    ],
)
def test_bad_tensors(hf_checkpoints, tmp_path, edit_tensors, message):
    folder = broken_copy(hf_checkpoints["llama-3-8b"], tmp_path / "bad", edit_tensors=edit_tensors)
    with pytest.raises(CheckpointError, match=message) as e:
        load_model(folder)
    assert str(folder) in str(e.value)


def test_missing_folder_and_pickled_weights(hf_checkpoints, tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        load_model(str(tmp_path / "nope"))
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(hf_checkpoints["llama-3-8b"] / "config.json", folder)
    (folder / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="safetensors only"):
        load_model(folder)


def test_hub_id_offline_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(CheckpointError, match="no-such-org/no-such-model: could not get it from the Hugging Face hub"):
        load_model("no-such-org/no-such-model")


def test_hub_id_goes_through_snapshot_download_with_revision(monkeypatch, hf_checkpoints):
    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, revision))
        return str(hf_checkpoints["gemma-2b"])

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model = load_model("google/gemma-2b", revision="abc123")
    assert calls == [("google/gemma-2b", "abc123")] and model.args.family == "gemma"


def test_failed_save_leaves_previous_folder(hf_checkpoints, tmp_path, monkeypatch):
    model = load_model(hf_checkpoints["llama-3-8b"])
    save_model(model, tmp_path / "out")
    before = read_tensors(tmp_path / "out")
    import lion_min.checkpoint as ck

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_file", boom)
    with pytest.raises(OSError):
        save_model(model, tmp_path / "out")
    after = read_tensors(tmp_path / "out")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left behind


def test_public_api_shapes(hf_checkpoints):
    model = lion_min.load_model(str(hf_checkpoints["llama-3.2-1b"]), dtype=torch.float32, device="cpu")
    assert model(torch.zeros(3, 5, dtype=torch.long)).shape == (3, 5, 512)


def test_nothing_is_unpickled_outside_weights_only():
    """Every torch.load in the package and scripts passes weights_only=True, and nothing imports
    pickle: weights come from safetensors, model/optimizer state from torch.distributed.checkpoint."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    files = sorted((root / "lion_min").glob("*.py")) + sorted(root.glob("train_*.py"))
    loads = 0
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not any(n.split(".")[0] in ("pickle", "dill", "cloudpickle") for n in names), f"{f}: imports pickle"
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                loads += 1
                kw = {k.arg: k.value for k in node.keywords}
                assert isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True, \
                    f"{f}:{node.lineno}: torch.load without weights_only=True"
    assert loads >= 1  # the trainer's RNG state is read this way, so the scan did see the call
