"""Hugging Face folders in and out: round trips, sharding, config styles, and bad input."""

import json
import os
import re
import shutil
import stat
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file, load_file

import lion_min
from lion_min.formats.hf_config import CheckpointError, args_from_config
from lion_min.formats.hf import load_model, save_model
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
    cfg = json.loads((tmp_path / "bf16" / "config.json").read_text())
    # The source was written by transformers 5, which names the key "dtype": that key is updated.
    assert cfg["dtype"] == "bfloat16" and "torch_dtype" not in cfg
    assert transformers.AutoConfig.from_pretrained(tmp_path / "bf16").dtype == torch.bfloat16
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


def test_bad_generation_config(hf_checkpoints, tmp_path):
    folder = broken_copy(hf_checkpoints["llama-3-8b"], tmp_path / "bad")
    (folder / "generation_config.json").write_text('{"eos_token_id": 1,')
    with pytest.raises(CheckpointError, match=f"{folder / 'generation_config.json'}: not valid JSON"):
        load_model(folder)
    (folder / "generation_config.json").write_text("[1]")
    with pytest.raises(CheckpointError, match="generation_config.json: expected a JSON object"):
        load_model(folder)


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
    with pytest.raises(CheckpointError, match=r"no-such-org/no-such-model: could not get it from the Hugging Face hub "
                                              r"\(HF_HUB_OFFLINE is set and there is no cached copy\); download "
                                              r"it once with network access, or give a local path instead$"):
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
    import lion_min.formats.hf as ck

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
    files = sorted((root / "lion_min").rglob("*.py")) + sorted(root.glob("train_*.py"))
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


# --- exports that other tools take for the original checkpoint -----------------------------------
# A source folder as the hub has it (the real config.json scaled down, bf16 weights, the files a
# 4.x-era release ships), exported by lion_min after loading in fp32. Every file is compared with
# the source's key by key; the only differences allowed are the ones named in ALLOWED.

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
# case -> (config name, tokenizer builder, bos, eos, pad, template the export is given)
HUB_CASES = {
    "llama3": ("llama-3-8b", "gemma", "<|begin_of_text|>", "<|end_of_text|>", None, "llama3"),
    "gemma": ("gemma-2b", "gemma", "<bos>", "<eos>", "<pad>", "gemma"),
    "chatml": ("gemma-2b", "gemma_chatml", "<bos>", "<eos>", "<pad>", "chatml"),  # the LION recipe
}
HUB_VOCAB = 1024


def added_token(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}


def hub_checkpoint(case: str, out_dir, template_in_source: bool = False):
    """A checkpoint folder in the released layout for `case` (see HUB_CASES); template_in_source:
    it already carries its chat template (an instruct release), in tokenizer_config.json."""
    import tokenizers
    from tokenizers_for_tests import build_gemma_chatml_tokenizer, build_gemma_tokenizer
    from conftest import make_hf_checkpoint
    from lion_min.core.chat import get_template

    name, tok_kind, bos, eos, pad, template = HUB_CASES[case]
    (build_gemma_chatml_tokenizer if tok_kind == "gemma_chatml" else build_gemma_tokenizer)(out_dir)
    tok = tokenizers.Tokenizer.from_file(str(out_dir / "tokenizer.json"))
    if case == "llama3":  # the Llama-3 special tokens, after the small vocabulary
        tok.add_special_tokens([tokenizers.AddedToken(s, special=True, normalized=False) for s in LLAMA3_SPECIALS])
        tok.save(str(out_dir / "tokenizer.json"))
    ids = {s: tok.token_to_id(s) for s in (bos, eos, pad) if s}
    make_hf_checkpoint(name, out_dir, vocab_size=HUB_VOCAB, bos_token_id=ids[bos], eos_token_id=ids[eos],
                       pad_token_id=ids.get(pad))
    # The hub's files: old key style, bf16 weights, sampling defaults, tokens in the AddedToken form.
    cfg = small_config(name, HUB_VOCAB) | {"bos_token_id": ids[bos], "eos_token_id": ids[eos],
                                            "torch_dtype": "bfloat16", "transformers_version": "4.40.0.dev0"}
    if pad:
        cfg["pad_token_id"] = ids[pad]
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    gen = {"bos_token_id": ids[bos], "eos_token_id": ids[eos], "do_sample": True, "temperature": 0.6,
           "top_p": 0.9, "max_length": 4096, "transformers_version": "4.40.0.dev0"}
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2))
    weights = {k: v.to(torch.bfloat16) for k, v in load_file(str(out_dir / "model.safetensors")).items()}
    save_file(weights, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    vocab = tok.get_vocab(with_added_tokens=True)
    tok_cfg = {
        "added_tokens_decoder": {str(i): added_token(s) | {"special": True} for i, s in
                                 sorted((i, s) for s, i in vocab.items() if s.startswith("<") and s.endswith(">"))},
        "bos_token": bos,
        "clean_up_tokenization_spaces": True,
        "eos_token": eos,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 1000000000000000019884624838656,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    specials_map = {"bos_token": added_token(bos), "eos_token": added_token(eos)}
    if pad:
        tok_cfg["pad_token"] = {"__type": "AddedToken"} | added_token(pad)  # an older form, kept as it is
        specials_map["pad_token"] = added_token(pad)
    if template_in_source:
        tok_cfg["chat_template"] = get_template(template).jinja
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False))
    (out_dir / "special_tokens_map.json").write_text(json.dumps(specials_map, indent=2))
    return out_dir


def folder_differences(src, out) -> dict:
    """{file: difference} for every file of either folder: for JSON files {key: (source, export)}
    per differing top-level key; for safetensors {name: (source, export)} per tensor whose dtype,
    shape or value (compared in the source dtype) differs, plus "dtype" (source dtypes, export
    dtypes) when they differ; for other files "bytes"."""
    diffs = {}
    for name in sorted({f.name for f in src.iterdir()} | {f.name for f in out.iterdir()}):
        a, b = src / name, out / name
        if not (a.is_file() and b.is_file()):
            diffs[name] = "only in " + ("source" if a.is_file() else "export")
        elif name.endswith(".json"):
            ja, jb = json.loads(a.read_text()), json.loads(b.read_text())
            d = {k: (ja.get(k), jb.get(k)) for k in ja.keys() | jb.keys() if ja.get(k) != jb.get(k) or (k in ja) != (k in jb)}
            if d:
                diffs[name] = d
        elif name.endswith(".safetensors"):
            ta, tb = load_file(str(a)), load_file(str(b))
            d = {k: "missing" for k in ta.keys() ^ tb.keys()}
            d |= {k: "values" for k in ta.keys() & tb.keys()
                  if ta[k].shape != tb[k].shape or not torch.equal(ta[k], tb[k].to(ta[k].dtype))}
            dtypes = ({str(t.dtype) for t in ta.values()}, {str(t.dtype) for t in tb.values()})
            if dtypes[0] != dtypes[1]:
                d["dtype"] = dtypes
            if d:
                diffs[name] = d
        elif a.read_bytes() != b.read_bytes():
            diffs[name] = "bytes"
    return diffs


@pytest.mark.parametrize("case", list(HUB_CASES))
def test_export_differs_from_the_source_only_where_training_changed_it(case, tmp_path):
    from lion_min.core.chat import get_template
    from lion_min.formats.tokenizer import Tokenizer

    src = hub_checkpoint(case, tmp_path / "src")
    tok = Tokenizer.from_dir(src)
    t = get_template(HUB_CASES[case][-1])
    save_model(load_model(src), tmp_path / "out", tokenizer=tok, chat_template=t.jinja)
    eos, eot = tok.eos_id, tok.token_id(t.end_of_turn)
    ALLOWED = {
        # lion_min loaded the weights in fp32 and wrote them as they were (values equal in bf16).
        "config.json": {"torch_dtype": ("bfloat16", "float32")},
        "model.safetensors": {"dtype": ({"torch.bfloat16"}, {"torch.float32"})},
        # Generation stops at the end of a reply: the template's end-of-turn joins the eos ids.
        "generation_config.json": {"eos_token_id": (eos, [eos, eot])},
        # The chat template the model was trained with, the official text byte for byte.
        "tokenizer_config.json": {"chat_template": (None, t.jinja)},
    }
    assert folder_differences(src, tmp_path / "out") == ALLOWED
    exported = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["chat_template"]
    assert exported.encode() == (Path(__file__).parent / "data" / "chat_templates" / f"{t.name}.jinja").read_bytes()


def test_export_of_an_instruct_checkpoint_in_its_own_dtype_is_the_source(tmp_path):
    """A source that already has its template, exported in its dtype with no template given: the
    same files, except the end-of-turn token joining the eos ids of generation_config.json."""
    from lion_min.formats.tokenizer import Tokenizer

    src = hub_checkpoint("gemma", tmp_path / "src", template_in_source=True)
    save_model(load_model(src), tmp_path / "out", tokenizer=Tokenizer.from_dir(src), dtype=torch.bfloat16)
    assert folder_differences(src, tmp_path / "out") == {"generation_config.json": {"eos_token_id": (1, [1, 107])}}
    for name in ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.json"):  # not even reformatted
        assert (src / name).read_bytes() == (tmp_path / "out" / name).read_bytes(), name


def test_template_file_of_a_transformers5_folder_is_where_the_template_goes(tmp_path):
    """transformers >= 4.5x saves the template as chat_template.jinja and reads that file before the
    config's key: an export of such a folder must update the file, or the old template would win."""
    from lion_min.formats.tokenizer import Tokenizer

    src = hub_checkpoint("chatml", tmp_path / "src")
    (src / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    tok = Tokenizer.from_dir(src)
    assert tok.chat_template == "{{ messages[0]['content'] }}"
    save_model(load_model(src), tmp_path / "out", tokenizer=tok, chat_template="chatml", dtype=torch.bfloat16)
    diffs = folder_differences(src, tmp_path / "out")
    assert diffs.pop("chat_template.jinja") == "bytes" and diffs.pop("generation_config.json")
    assert diffs == {}  # tokenizer_config.json untouched
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    from lion_min.core.chat import get_template
    assert hf.chat_template == get_template("chatml").jinja


def test_stale_export_files_are_removed_and_permissions_are_ordinary(tmp_path):
    """Exports get 0644 files in a 0755 folder under umask 022 (mkdtemp would give 0700, and
    safetensors writes 0600); a second export into the same folder removes the tokenizer files and
    shards of the first that it does not write itself, and keeps everything else."""
    from lion_min.formats.tokenizer import Tokenizer

    src = hub_checkpoint("gemma", tmp_path / "src")
    model, tok = load_model(src), Tokenizer.from_dir(src)
    old = os.umask(0o022)
    try:
        out = save_model(model, tmp_path / "out", tokenizer=tok, max_shard_size="40KB")
        assert stat.S_IMODE(out.stat().st_mode) == 0o755
        assert {f.name: stat.S_IMODE(f.stat().st_mode) for f in out.iterdir()} == {f.name: 0o644 for f in out.iterdir()}
        assert len(list(out.glob("model-*.safetensors"))) > 2
        (out / "chat_template.jinja").write_text("stale")
        (out / "metrics.jsonl").write_text("{}\n")  # a run's own file
        os.umask(0o027)
        save_model(model, out, tokenizer=None)
    finally:
        os.umask(old)
    names = {f.name for f in out.iterdir()}
    assert names == {"config.json", "generation_config.json", "model.safetensors", "metrics.jsonl"}
    assert stat.S_IMODE((out / "model.safetensors").stat().st_mode) == 0o640


# --- local path or hub id (lion_min/formats/hub.py) ----------------------------------------------------------


def hub_exception(name: str, message: str = "first line\nsecond line"):
    """A real huggingface_hub exception, built without the HTTP response its __init__ asks for."""
    import huggingface_hub.errors

    cls = getattr(huggingface_hub.errors, name)
    e = cls.__new__(cls)
    Exception.__init__(e, message)
    return e


@pytest.fixture
def no_hub(monkeypatch):
    """snapshot_download replaced by a recorder that fails like an unreachable hub."""
    import huggingface_hub

    calls = []

    def fake(repo_id, **kw):
        calls.append(repo_id)
        raise hub_exception("LocalEntryNotFoundError")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    return calls


def test_a_missing_local_looking_path_is_a_missing_folder_not_a_hub_id(no_hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out" / "debug" / "sft").mkdir(parents=True)
    for name in ["./nope", "../nope", str(tmp_path / "nope"), "~/no-such-lion-min-folder", "out/nope"]:
        with pytest.raises(CheckpointError, match=r"^[^\n]*: no such checkpoint folder$"):
            load_model(name)
    with pytest.raises(CheckpointError, match=r"^out/debug/sfft: no such checkpoint folder \(did you mean "
                                              r"out/debug/sft\?\)$"):
        load_model("out/debug/sfft")
    assert no_hub == []  # none of them was looked up on the hub
    with pytest.raises(CheckpointError, match=r"^org/model: could not get it from the Hugging Face hub"):
        load_model("org/model")  # no ./org folder here: a hub id
    assert no_hub == ["org/model"]


@pytest.mark.parametrize("kind, why", [
    ("LocalEntryNotFoundError", "the hub could not be reached and there is no cached copy"),
    ("RepositoryNotFoundError", r"no such repo, or it is private \(log in with `hf auth login`\)"),
    ("GatedRepoError", "the repo is gated: accept its terms"),
    ("RevisionNotFoundError", "no revision 'v9' in the repo"),
    ("ConnectionError", "ConnectionError: first line"),
])
def test_hub_errors_are_one_line_and_say_how_to_work_offline(kind, why, monkeypatch):
    import builtins

    import huggingface_hub

    error = getattr(builtins, kind, None)
    error = error("first line\nsecond line") if error else hub_exception(kind)

    def fail(repo_id, **kw):
        raise error

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(CheckpointError) as info:
        load_model("org/model", revision="v9")
    msg = str(info.value)
    assert "\n" not in msg
    assert re.match(rf"org/model at revision v9: could not get it from the Hugging Face hub \({why}.*\); to work "
                    rf"offline, set HF_HUB_OFFLINE=1 with a cached copy, or give a local path instead$", msg), msg
