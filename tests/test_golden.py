"""lion_min.golden.compare: the golden numbers against independent computations (transformers' forward and
autograd on the same tokens, DPO losses written out by hand), the compare command on real mistakes,
the documented file layout, and the shipped vectors against their regeneration."""

import dataclasses
import importlib.util
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lion_min.golden import compare as golden
from lion_min.golden import compute as golden_compute
from lion_min.cli import golden_main
from lion_min.run.config import ConfigError
from lion_min.formats.data_files import DataError

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden"
VECTORS = GOLDEN / "vectors"
DOC = ROOT / "docs" / "golden.md"


def _load_regenerate():
    spec = importlib.util.spec_from_file_location("golden_regenerate", GOLDEN / "regenerate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


regenerate = _load_regenerate()
SFT_FP32 = [n for n, s in regenerate.VECTORS.items() if n.startswith("sft") and s.get("dtype") != "bfloat16"]
DPO = [n for n in regenerate.VECTORS if n.startswith("dpo")]


def hf_model(folder: str, dtype=torch.float32):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(ROOT / folder, dtype=dtype)


def hf_logps(model, ids: torch.Tensor) -> torch.Tensor:
    """(n,) log p(token j | tokens < j) from transformers' logits, 0 at j = 0."""
    logits = model(ids[None]).logits[0].float()
    return torch.cat([logits.new_zeros(1), logits[:-1].log_softmax(-1).gather(1, ids[1:, None])[:, 0]])


def indices(g: golden.Golden) -> list[int]:
    return sorted(int(k.split(".")[1]) for k in g.tensors if k.startswith("input_ids."))


def squeeze(text: str) -> str:
    return "".join(text.split())


def grad_norms(model) -> dict[str, float]:
    return {n: p.grad.norm().item() for n, p in model.named_parameters()}


def check_grads(g: golden.Golden, model) -> None:
    ours = g.meta["grad_norm"]["per_tensor"]
    theirs = grad_norms(model)
    assert set(ours) == set(theirs)  # Hugging Face names, the tied head counted once
    for name in ours:
        assert ours[name] == pytest.approx(theirs[name], rel=1e-4, abs=1e-6), name
    assert g.meta["grad_norm"]["total"] == pytest.approx(math.sqrt(sum(v * v for v in theirs.values())), rel=1e-5)


def check_step(g: golden.Golden, model) -> None:
    """One AdamW step in plain torch (decay on matrices only) moves each tensor as recorded."""
    s = g.meta["settings"]
    if s["lr"] <= 0:
        assert "update_norm" not in g.meta
        return
    params = dict(model.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    torch.optim.AdamW([{"params": [p for p in params.values() if p.ndim >= 2], "weight_decay": s["weight_decay"]},
                       {"params": [p for p in params.values() if p.ndim < 2], "weight_decay": 0.0}],
                      lr=s["lr"], betas=(s["beta1"], s["beta2"])).step()
    for n, p in params.items():
        assert g.meta["update_norm"][n] == pytest.approx((p.detach() - before[n]).norm().item(), abs=1e-5), n


# --- the numbers are right -----------------------------------------------------------------------


@pytest.mark.parametrize("name", SFT_FP32)
def test_sft_vectors_equal_transformers(name):
    """Token ids from the official Jinja template and transformers' tokenizer; log-probs, the loss,
    its gradient and one AdamW step from transformers' model on those ids."""
    import jinja2
    import transformers

    g = golden.load(VECTORS / name)
    s = g.meta["settings"]
    tok = transformers.AutoTokenizer.from_pretrained(ROOT / s["model"])
    template = jinja2.Environment().from_string((ROOT / "tests/data/chat_templates" / f"{s['chat_template']}.jinja")
                                                .read_text())
    convs = [json.loads(line)["messages"] for line in (ROOT / s["data"]).read_text().splitlines()]
    model = hf_model(s["model"])
    assert indices(g) == list(range(len(convs)))  # no conversation dropped
    total, n_targets = 0.0, 0
    for k, conv in enumerate(convs):
        if s["system_prompt"] is not None and conv[0]["role"] != "system":
            conv = [{"role": "system", "content": s["system_prompt"]}] + conv
        text = template.render(messages=conv, bos_token=tok.bos_token, add_generation_prompt=False)
        ids = tok(text, add_special_tokens=False).input_ids[: s["seq_len"]]
        got, mask = g.tensors[f"input_ids.{k}"], g.tensors[f"loss_mask.{k}"].bool()
        assert got.tolist() == ids, k
        # The mask: every token but BOS without loss_mask; else exactly the trained replies and their
        # end-of-turn tokens (compared without whitespace: chatml trains the "\n\n" token that joins
        # the header to a reply starting with "\n").
        if not s["loss_mask"]:
            assert mask.tolist() == [False] + [True] * (len(ids) - 1)
        elif len(ids) < s["seq_len"]:
            eot = {"llama3": "<|eot_id|>", "gemma": "<end_of_turn>", "chatml": "<|im_end|>"}[s["chat_template"]]
            replies = [m["content"] for m in conv if m["role"] == "assistant"]
            replies = replies[-1:] if s["train_on"] == "last" else replies
            assert squeeze(tok.decode(got[mask])) == squeeze("".join(r + eot for r in replies)), k
        logp = hf_logps(model, got)
        torch.testing.assert_close(g.tensors[f"token_logps.{k}"], logp.detach(), atol=1e-5, rtol=0)
        total = total - (logp * mask).sum()
        n_targets += int(mask.sum())
    assert g.meta["scalars"]["num_target_tokens"] == n_targets
    loss = total / n_targets
    assert g.meta["scalars"]["sft_loss"] == pytest.approx(loss.item(), rel=1e-5)
    loss.backward()
    check_grads(g, model)
    check_step(g, model)


def hand_dpo_losses(h: torch.Tensor, beta: float, loss_type: str, eps: float) -> torch.Tensor:
    """The three objectives written out from their papers (not via lion_min.core.losses)."""
    sig = lambda x: 1 / (1 + torch.exp(-x))  # noqa: E731
    if loss_type == "sigmoid":  # DPO Eq. 7, with the label flipped with probability eps (cDPO)
        return -(1 - eps) * torch.log(sig(beta * h)) - eps * torch.log(sig(-beta * h))
    if loss_type == "ipo":  # (h - 1/(2 tau))^2
        return (h - 1 / (2 * beta)) ** 2
    return torch.clamp(1 - beta * h, min=0)  # hinge


@pytest.mark.parametrize("name", DPO)
def test_dpo_vectors_equal_hand_computed(name):
    import transformers

    g = golden.load(VECTORS / name)
    s = g.meta["settings"]
    policy, ref = hf_model(s["model"]), hf_model(s["ref_model"])
    tok = transformers.AutoTokenizer.from_pretrained(ROOT / s["model"])
    prefs = [json.loads(line) for line in (ROOT / s["data"]).read_text().splitlines()]
    P = g.meta["scalars"]["num_pairs"]
    assert P == len(prefs) and indices(g) == list(range(2 * P))
    pol, refs = torch.zeros(P, 2, dtype=torch.float64), torch.zeros(P, 2, dtype=torch.float64)
    pol_sums = []
    for k in range(2 * P):
        ids, mask = g.tensors[f"input_ids.{k}"], g.tensors[f"loss_mask.{k}"].bool()
        assert len(ids) <= s["seq_len"] and mask.any()
        # Only the final response and its end-of-turn token are scored (uncut sequences).
        if len(ids) < s["seq_len"]:
            reply = prefs[k // 2]["chosen" if k % 2 == 0 else "rejected"]
            assert squeeze(tok.decode(ids[mask])) == squeeze(reply + "<|eot_id|>"), k
        lp, ref_lp = hf_logps(policy, ids), hf_logps(ref, ids).detach()
        torch.testing.assert_close(g.tensors[f"token_logps.{k}"], lp.detach(), atol=1e-5, rtol=0)
        torch.testing.assert_close(g.tensors[f"ref_token_logps.{k}"], ref_lp, atol=1e-5, rtol=0)
        pol_sums.append((lp * mask).sum())
        pol[k // 2, k % 2], refs[k // 2, k % 2] = pol_sums[-1].item(), (ref_lp * mask).sum().item()
    torch.testing.assert_close(g.tensors["policy_logps"].double(), pol, atol=1e-4, rtol=1e-6)
    torch.testing.assert_close(g.tensors["reference_logps"].double(), refs, atol=1e-4, rtol=1e-6)

    # The formula, exactly, on lion_min's own sequence log-probs; then on transformers' (whose float32
    # sums differ in the last bits: IPO squares h, so its losses move by up to 3e-5 relative).
    g_pol, g_ref = g.tensors["policy_logps"].double(), g.tensors["reference_logps"].double()
    g_h = (g_pol[:, 0] - g_ref[:, 0]) - (g_pol[:, 1] - g_ref[:, 1])
    torch.testing.assert_close(g.tensors["dpo_losses"].double(),
                               hand_dpo_losses(g_h, s["beta"], s["loss_type"], s["label_smoothing"]),
                               atol=1e-6, rtol=1e-6)
    h = (pol[:, 0] - refs[:, 0]) - (pol[:, 1] - refs[:, 1])
    losses = hand_dpo_losses(h, s["beta"], s["loss_type"], s["label_smoothing"])
    torch.testing.assert_close(g.tensors["dpo_losses"].double(), losses, atol=1e-4, rtol=1e-4)
    sc = g.meta["scalars"]
    chosen, rejected = s["beta"] * (pol[:, 0] - refs[:, 0]), s["beta"] * (pol[:, 1] - refs[:, 1])
    assert sc["dpo_loss"] == pytest.approx(losses.mean().item(), rel=1e-4)
    assert sc["rewards_chosen"] == pytest.approx(chosen.mean().item(), abs=1e-5)
    assert sc["rewards_rejected"] == pytest.approx(rejected.mean().item(), abs=1e-5)
    assert sc["reward_margin"] == pytest.approx((chosen - rejected).mean().item(), abs=1e-5)
    assert sc["reward_accuracy"] == (chosen > rejected).double().mean().item()
    # The gradient of the mean loss through transformers' policy.
    pol_t = torch.stack(pol_sums).view(P, 2)
    h_t = (pol_t[:, 0] - refs[:, 0].float()) - (pol_t[:, 1] - refs[:, 1].float())
    hand_dpo_losses(h_t, s["beta"], s["loss_type"], s["label_smoothing"]).mean().backward()
    check_grads(g, policy)
    check_step(g, policy)


def test_bf16_vector_within_bf16_tolerance_of_transformers():
    """transformers in bf16 (log-softmax in float32) passes the bf16 vector at the default bf16
    tolerance, log-probs, loss and gradient norms; in float32 it does not (so the dtype matters)."""
    g = golden.load(VECTORS / "sft-llama-3.2-1b-bf16")
    results = {}
    for dtype in (torch.bfloat16, torch.float32):
        model, tensors, total = hf_model(g.meta["settings"]["model"], dtype), {}, 0.0
        for k in indices(g):
            ids, mask = g.tensors[f"input_ids.{k}"], g.tensors[f"loss_mask.{k}"]
            logp = hf_logps(model, ids)
            tensors |= {f"input_ids.{k}": ids, f"loss_mask.{k}": mask, f"token_logps.{k}": logp.detach()}
            total = total - (logp * mask).sum()
        loss = total / g.meta["scalars"]["num_target_tokens"]
        loss.backward()
        norms = grad_norms(model)
        meta = {"format": golden.FORMAT, "kind": "sft", "settings": g.meta["settings"],
                "scalars": {"sft_loss": loss.item()},
                "grad_norm": {"total": math.sqrt(sum(v * v for v in norms.values())), "per_tensor": norms}}
        results[dtype] = golden.compare(g, golden.Golden(meta, tensors), partial=True)
    assert results[torch.bfloat16].ok
    assert row(results[torch.bfloat16], "grad_norm.per_tensor").status == "ok"
    assert row(results[torch.float32], "token_logps").status == "FAIL"


def test_micro_batch_size_changes_nothing():
    settings = regenerate.VECTORS["sft-llama-3-8b-llama3"]
    cfg = {k: str(ROOT / v) if k in ("model", "data") else v for k, v in settings.items()}
    one = golden_compute.compute(golden_compute.GoldenConfig(**cfg, micro_batch_size=1))
    assert golden.compare(golden.load(VECTORS / "sft-llama-3-8b-llama3"), one, rtol=1e-6, atol=1e-6).ok


def test_reference_defaults_to_the_model():
    settings = regenerate.VECTORS["dpo-sigmoid"] | {"ref_model": "", "lr": 0.0}
    cfg = {k: str(ROOT / v) if k in ("model", "data") else v for k, v in settings.items()}
    g = golden_compute.compute(golden_compute.GoldenConfig(**cfg))
    torch.testing.assert_close(g.tensors["dpo_losses"], torch.full((6,), math.log(2)))
    assert g.meta["scalars"]["reward_margin"] == 0.0 and "ref_model" not in g.meta["fingerprints"]
    torch.testing.assert_close(g.tensors["policy_logps"], g.tensors["reference_logps"], atol=0, rtol=0)


# --- compare -------------------------------------------------------------------------------------


def row(result: golden.Comparison, quantity: str) -> golden.Row:
    return next(r for r in result.rows if r.quantity == quantity)


@pytest.mark.parametrize("name", ["sft-llama-3-8b-llama3", "dpo-sigmoid"])
def test_compare_passes_identical(name, capsys):
    result = golden.compare(VECTORS / name, VECTORS / name)
    assert result.ok and {r.status for r in result.rows} == {"ok"} and not result.notes
    assert golden_main(["compare", str(VECTORS / name), str(VECTORS / name / "golden.json")]) == 0
    assert "PASS" in capsys.readouterr().out


def test_compare_fails_on_a_projection_scaled_by_1_01(tmp_path, capsys):
    settings = regenerate.VECTORS["sft-llama-3-8b-llama3"]
    model = tmp_path / "model"
    shutil.copytree(ROOT / settings["model"], model)
    weights = load_file(str(model / "model.safetensors"))
    weights["model.layers.1.self_attn.v_proj.weight"] *= 1.01
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    cfg = {k: str(ROOT / v) if k == "data" else v for k, v in settings.items()} | {"model": str(model)}
    golden.write(golden_compute.compute(golden_compute.GoldenConfig(**cfg)), tmp_path / "actual")
    result = golden.compare(VECTORS / "sft-llama-3-8b-llama3", tmp_path / "actual")
    assert not result.ok
    assert row(result, "input_ids").status == "ok" and row(result, "token_logps").status == "FAIL"
    assert row(result, "grad_norm.per_tensor").status == "FAIL"
    assert any("fingerprints differ: model" in n for n in result.notes)
    assert golden_main(["compare", str(VECTORS / "sft-llama-3-8b-llama3"), str(tmp_path / "actual")]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_compare_fails_on_a_shifted_loss_mask():
    expected = golden.load(VECTORS / "sft-llama-3-8b-llama3")
    tensors = dict(expected.tensors)
    for k in indices(expected):
        m = tensors[f"loss_mask.{k}"]
        tensors[f"loss_mask.{k}"] = torch.cat([m.new_zeros(1), m[:-1]])  # each target one token late
    result = golden.compare(expected, golden.Golden(expected.meta, tensors))
    assert not result.ok
    assert row(result, "loss_mask").status == "FAIL" and row(result, "loss_mask").first.startswith("example 0, token")
    assert [r.quantity for r in result.rows if r.status != "ok"] == ["loss_mask"]


def test_compare_fails_on_a_double_bos():
    """A second BOS: the ids fail at token 1 of the first example; log-probs are compared only
    before that token, so the table points at the cause, not at its consequences."""
    expected = golden.load(VECTORS / "sft-llama-3-8b-llama3")
    model = hf_model(expected.meta["settings"]["model"])
    tensors = {}
    with torch.no_grad():
        for k in indices(expected):
            ids = expected.tensors[f"input_ids.{k}"]
            ids = torch.cat([ids[:1], ids])
            tensors |= {f"input_ids.{k}": ids, f"token_logps.{k}": hf_logps(model, ids),
                        f"loss_mask.{k}": torch.cat([torch.zeros(1, dtype=torch.uint8),
                                                     expected.tensors[f"loss_mask.{k}"]])}
    result = golden.compare(expected, golden.Golden(expected.meta, tensors))
    assert not result.ok
    assert row(result, "input_ids").first == "example 0, token 1: 653 vs 651 (length 36 vs 37)"
    assert row(result, "token_logps").status == "ok"


def test_compare_missing_partial_and_nan():
    expected = golden.load(VECTORS / "dpo-hinge")
    meta = {k: v for k, v in expected.meta.items() if k != "grad_norm"}
    lacking = golden.Golden(meta, {k: v for k, v in expected.tensors.items() if not k.startswith("ref_token_logps")})
    strict, partial = golden.compare(expected, lacking), golden.compare(expected, lacking, partial=True)
    assert not strict.ok and partial.ok
    assert {r.quantity for r in strict.rows if r.status == "missing"} == {"ref_token_logps", "grad_norm.total",
                                                                          "grad_norm.per_tensor"}
    tensors = dict(expected.tensors)
    tensors["token_logps.3"] = tensors["token_logps.3"].clone()
    tensors["token_logps.3"][5] = math.nan
    result = golden.compare(expected, golden.Golden(expected.meta, tensors))
    assert row(result, "token_logps").first.startswith("pair 1 rejected, token 5")


def test_default_tolerance_follows_dtype():
    bf16 = golden.load(VECTORS / "sft-llama-3.2-1b-bf16")
    result = golden.compare(bf16, bf16)
    assert (result.rtol, result.atol) == tuple(golden.TOLERANCES["bfloat16"].values())
    fp32 = golden.compare(VECTORS / "dpo-ipo", VECTORS / "dpo-ipo", rtol=1e-9)
    assert (fp32.rtol, fp32.atol) == (1e-9, golden.TOLERANCES["float32"]["atol"])


# --- layout, shipped vectors, regeneration -------------------------------------------------------


def documented(section: str) -> list[list[str]]:
    """Rows of the table under `### section` in docs/golden.md: cells, backticks removed."""
    text = DOC.read_text().split(f"### {section}\n", 1)[1].split("\n#", 1)[0]
    rows = [[c.strip().strip("`") for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| `")]
    assert rows, section
    return rows


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out |= flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v}
    return out


@pytest.mark.parametrize("name", list(regenerate.VECTORS))
def test_layout_is_as_documented(name):
    g = golden.load(VECTORS / name)
    kind, s = g.meta["kind"], g.meta["settings"]
    applies = {"all": True, "sft": kind == "sft", "dpo": kind == "dpo", "lr > 0": s["lr"] > 0,
               "dpo, ref_model": kind == "dpo" and bool(s["ref_model"])}
    # golden.json: every key present is documented, every documented key that applies is present.
    keys = set(flatten({k: v for k, v in g.meta.items() if k != "settings"})) | {f"settings.{k}" for k in s}
    patterns = {key: applies[when] for key, when, _ in documented("golden.json")}
    regex = lambda p: re.compile(re.escape(p).replace(r"\{name\}", r"[\w.]+").replace(r"\{field\}", r"\w+") + "$")  # noqa: E731
    for key in keys:
        assert any(regex(p).match(key) for p in patterns), f"undocumented key {key}"
    for p, needed in patterns.items():
        assert needed == any(regex(p).match(k) for k in keys), p
    assert {f"settings.{f.name}" for f in dataclasses.fields(golden_compute.GoldenConfig) if f.name != "overwrite"} == {
        k for k in keys if k.startswith("settings.")}  # --overwrite says how the files are written, not what they hold
    # golden.safetensors: names, dtypes and shapes.
    table = {key.split(".")[0]: (dtype, shape, applies[when])
             for key, dtype, shape, when, _ in documented("golden.safetensors")}
    lengths = {}
    for key, t in g.tensors.items():
        base = key.split(".")[0]
        assert base in table and table[base][2], f"undocumented tensor {key}"
        assert str(t.dtype).removeprefix("torch.") == table[base][0], key
        if table[base][1] == "(n,)":
            assert lengths.setdefault(key.split(".")[1], t.shape) == t.shape, key
        else:
            P = g.meta["scalars"]["num_pairs"]
            assert tuple(t.shape) == {"(P, 2)": (P, 2), "(P,)": (P,)}[table[base][1]], key
    for base, (_, _, needed) in table.items():
        assert needed == any(k.split(".")[0] == base for k in g.tensors), base


def test_shipped_files_are_small():
    sizes = {p: p.stat().st_size for p in GOLDEN.rglob("*") if p.is_file()}
    assert sum(sizes.values()) < 4_500_000  # 4.2 MB with the Gemma-2/3 models and vectors (3.3 MB before)
    for model in (GOLDEN / "models").iterdir():
        assert sum(s for p, s in sizes.items() if model in p.parents) < 700_000, model.name


@pytest.mark.parametrize("name", list(regenerate.VECTORS))
def test_regeneration_equals_checked_in(name, tmp_path):
    shipped = golden.load(VECTORS / name)
    fresh = golden.load(regenerate.generate(name, tmp_path / name))
    assert fresh.meta["settings"] == shipped.meta["settings"]
    assert fresh.meta["fingerprints"] == shipped.meta["fingerprints"]  # the same inputs, byte for byte
    # The numbers were made on one CPU; another rounds differently (other matmul kernels: AVX2, AVX-512,
    # AMX's bf16 tiles). Largest difference measured (smallest passing rtol = atol), torch 2.13.0: on the
    # AMD EPYC that made them, 0; on an Intel Xeon with AMX, float32 1.3e-6 (dpo-ipo: the IPO loss
    # squares a difference of sums of hundreds of log-probs, the others <= 6.2e-7), bfloat16 4.4e-4.
    # Hence 2e-5 and 2e-3: far below the default comparison tolerances (1e-4; 2e-2 and 0.1), 15x and 4.5x
    # above what was measured. (The same Xeon forced to AVX2 needs 8.5e-5 for dpo-ipo, and its bf16
    # SDPA stops there with torch's "pack_vnni2 is only supported when avx512 is supported".)
    tol = 2e-3 if shipped.meta["settings"]["dtype"] == "bfloat16" else 2e-5
    golden.assert_matches(shipped, fresh, rtol=tol, atol=tol)


def test_inputs_rebuild_to_the_checked_in_ones(tmp_path):
    tokenizers = regenerate.build_tokenizers(tmp_path)
    regenerate.build_models(tmp_path / "models", tokenizers)
    regenerate.write_data(tmp_path / "data")
    for f in (GOLDEN / "data").iterdir():
        assert (tmp_path / "data" / f.name).read_bytes() == f.read_bytes(), f.name
    for model in (GOLDEN / "models").iterdir():
        for name in ("tokenizer.json", "tokenizer_config.json"):
            assert (tmp_path / "models" / model.name / name).read_text() == (model / name).read_text()
        new = load_file(str(tmp_path / "models" / model.name / "model.safetensors"))
        old = load_file(str(model / "model.safetensors"))
        assert new.keys() == old.keys() and all(torch.equal(new[k], old[k]) for k in old), model.name


# --- the worked example and bad input ------------------------------------------------------------


def test_worked_example_in_the_docs(monkeypatch, capsys):
    """docs/golden.md's example runs, and each mistake shows in the table as the doc says."""
    code = DOC.read_text().split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(ROOT)
    ns = {}
    exec(compile(code, str(DOC), "exec"), ns)
    results = ns["results"]
    assert results[""].ok and results["positions_not_reset"].ok
    assert row(results["second_bos"], "input_ids").first.startswith("example 0, token 1:")
    assert row(results["loss_on_prompt"], "loss_mask").first.startswith("example 0, token 1:")
    assert row(results["loss_on_prompt"], "num_target_tokens").status == "FAIL"
    assert row(results["packed_no_isolation"], "token_logps").first.startswith("example 3, token 1:")
    # The doc shows this output: the same quantities with the same results, table by table (the
    # digits of differences near rounding noise may vary from one CPU to another).
    def verdicts(table: str) -> list[tuple[str, str]]:
        return [(line.split()[0], line.split()[-1]) for line in table.splitlines()
                if line.split() and line.split()[-1] in ("ok", "FAIL", "missing")]

    printed = [verdicts(t) for t in capsys.readouterr().out.split("=== ")[1:]]
    blocks = DOC.read_text().split("```python\n", 1)[1].split("```\n")[2::2]  # the code, then text / output
    shown = [v for v in map(verdicts, blocks) if v]
    assert printed == shown


def test_bad_input(tmp_path):
    settings = regenerate.VECTORS["sft-gemma-2b-gemma"]
    cfg = {k: str(ROOT / v) if k in ("model", "data") else v for k, v in settings.items()}
    with pytest.raises(ConfigError, match="--model is required"):
        golden_main([f"--data={cfg['data']}", f"--out={tmp_path / 'x'}"])
    with pytest.raises(ConfigError, match="--out is required"):
        golden_main([f"--data={cfg['data']}", f"--model={cfg['model']}"])
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="holds other files"):
        golden.write(golden.load(VECTORS / "sft-gemma-2b-gemma"), tmp_path / "busy")
    (tmp_path / "odd.jsonl").write_text('{"text": "hello"}\n')
    with pytest.raises(DataError, match="neither conversations .* nor preference pairs"):
        golden_compute.compute(golden_compute.GoldenConfig(**cfg | {"data": str(tmp_path / "odd.jsonl")}))
    with pytest.raises(DataError, match=r"^\S*missing.jsonl: no such file or folder"):
        golden_compute.compute(golden_compute.GoldenConfig(**cfg | {"data": str(tmp_path / "missing.jsonl")}))
    with pytest.raises(ValueError, match="chats.jsonl: message 0: system role not supported by the gemma"):
        golden_compute.compute(golden_compute.GoldenConfig(**cfg | {"data": str(GOLDEN / "data" / "chats.jsonl")}))
    with pytest.raises(ConfigError, match="--loss_type=kto"):
        golden_compute.compute(golden_compute.GoldenConfig(**cfg | {"loss_type": "kto"}))
    proc = subprocess.run([sys.executable, "-m", "lion_min", "golden", "compare", str(tmp_path / "nothing"),
                           str(VECTORS / "dpo-ipo")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "golden.json: not found" in proc.stderr


def test_help_names_compare_and_compare_help_exits_0():
    """A user reads `--help` first: the main help names the compare subcommand, and
    `golden compare --help` prints its usage and flags with exit status 0."""
    main = subprocess.run([sys.executable, "-m", "lion_min", "golden", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert main.returncode == 0 and "python -m lion_min golden compare EXPECTED ACTUAL" in main.stdout
    assert "--overwrite=" in main.stdout
    cmp = subprocess.run([sys.executable, "-m", "lion_min", "golden", "compare", "--help"], cwd=ROOT,
                         capture_output=True, text=True)
    assert cmp.returncode == 0 and cmp.stdout.startswith("python -m lion_min golden compare EXPECTED ACTUAL")
    assert "--rtol=" in cmp.stdout and "--partial=" in cmp.stdout and not cmp.stderr


def test_an_existing_golden_is_replaced_only_with_overwrite(tmp_path, capsys):
    settings = regenerate.VECTORS["sft-gemma-2b-gemma"]
    flags = [f"--{k}={ROOT / v if k in ('model', 'data') else v}" for k, v in settings.items()]
    out = tmp_path / "golden"
    shutil.copytree(VECTORS / "sft-gemma-2b-gemma", out)
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    with pytest.raises(ConfigError, match=r"--out=.*golden: holds golden numbers already; --overwrite=true replaces"):
        golden_main(flags + [f"--out={out}"])
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    assert golden_main(flags + [f"--out={out}", "--overwrite=true"]) == 0
    assert "overwrite" not in golden.load(out).meta["settings"]  # how it was written, not what it holds
    assert golden.compare(VECTORS / "sft-gemma-2b-gemma", out).ok


def test_comparing_an_sft_vector_with_a_dpo_vector_says_the_kinds_differ(capsys):
    result = golden.compare(VECTORS / "sft-llama-3-8b-llama3", VECTORS / "dpo-sigmoid")
    assert not result.ok and [(r.quantity, r.at, r.status) for r in result.rows] == [("kind", "sft vs dpo", "FAIL")]
    assert golden_main(["compare", str(VECTORS / "sft-llama-3-8b-llama3"), str(VECTORS / "dpo-sigmoid")]) == 1
    assert "the kinds differ: sft vs dpo" in capsys.readouterr().out
