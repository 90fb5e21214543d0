"""The offline DPO stage: ln 2 at the start, packed == separate, precomputed == live reference,
invariances, truncation, stale reference files."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import lion_min
from lion_min.core.dpo import encode_pairs, pair_micro
from lion_min.core.dpo import pair_logps, truncate
from lion_min.formats.schemas import Preference
from lion_min.formats.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_dpo  # noqa: E402


def args(tiny, out, **over):
    a = dict(model=tiny["model"], data=tiny["prefs"], out_dir=out, max_len=64, max_prompt_len=32, batch_size=4,
             micro_batch_size=2, max_steps=3, lr=1e-3, warmup_ratio=0.0, lr_schedule="constant", beta=0.1,
             seed=0, device="cpu", log_every=1, precompute_ref=False)
    return [f"--{k}={v}" for k, v in (a | over).items()]


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def weights(out):
    return load_file(str(Path(out) / "model.safetensors"))


def test_first_step_is_ln2_and_precomputed_equals_live(tiny_chat_model, tmp_path):
    train_dpo.main(args(tiny_chat_model, tmp_path / "live"))
    train_dpo.main(args(tiny_chat_model, tmp_path / "pre", precompute_ref=True))
    live, pre = metrics(tmp_path / "live"), metrics(tmp_path / "pre")
    first = live[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logratios/chosen"):
        assert first[k] == pytest.approx(0.0, abs=1e-6), k
    assert first["rewards/accuracies"] == 0.0  # ties are not counted as correct
    assert len(live) == len(pre) == 3
    for a, b in zip(live, pre):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7), (a, b)
        assert a["rewards/margins"] == pytest.approx(b["rewards/margins"], rel=1e-5, abs=1e-6)
    assert live[-1]["loss"] < live[0]["loss"] and live[-1]["rewards/margins"] > 0
    wl, wp = weights(tmp_path / "live"), weights(tmp_path / "pre")
    for k in wl:
        torch.testing.assert_close(wl[k], wp[k], atol=1e-6, rtol=1e-5)


def test_stale_reference_file_is_refused(tiny_chat_model, tmp_path):
    """The stored log-probs carry the fingerprint of what they describe; another fingerprint is
    refused (not overwritten), the same one is reused without computing anything."""
    import torch
    from safetensors import safe_open

    from lion_min.stages.dpo import load_or_compute_ref_logps
    from lion_min.core.parallel import Dist

    out = tmp_path / "pre"
    train_dpo.main(args(tiny_chat_model, out, precompute_ref=True, max_steps=1))
    file = out / "reference_logps.safetensors"
    before = file.read_bytes()
    with safe_open(str(file), "pt") as f:
        stored = f.metadata()["fingerprint"]
    d = Dist(0, 1, 0, torch.device("cpu"))
    never = lambda: pytest.fail("recomputed")  # noqa: E731
    with pytest.raises(ValueError, match="reference log-probs were computed for other data"):
        load_or_compute_ref_logps(file, "0" * 64, never, d)
    assert load_or_compute_ref_logps(file, stored, never, d).shape[1] == 2
    assert file.read_bytes() == before


def test_packed_pairs_equal_separate_forwards(tiny_chat_model):
    model = lion_min.load_model(tiny_chat_model["model"])
    tok = Tokenizer.from_dir(tiny_chat_model["model"])
    prefs = [Preference(prompt=[{"role": "user", "content": f"Question {i}?"}],
                        chosen=[{"role": "assistant", "content": f"Answer {i}." * (i + 1)}],
                        rejected=[{"role": "assistant", "content": "No."}]) for i in range(3)]
    pairs, _ = encode_pairs(prefs, tok, "chatml", max_len=128, max_prompt_len=64)
    micro = pair_micro(pairs, np.arange(3), 256, 0, "cpu")
    assert micro["tokens"].shape[0] == 1  # all six sequences share one row
    pc, pr = pair_logps(model, micro)
    (pc.sum() - 2 * pr.sum()).backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    total = 0
    for i, p in enumerate(pairs):
        for side, (ids, mask), w in (("c", p.chosen, 1.0), ("r", p.rejected, -2.0)):
            x = torch.tensor(ids)[None]
            tgt = torch.tensor([t if m else -100 for t, m in zip(ids[1:] + [0], mask[1:] + [False])])[None]
            lp = model(x, targets=tgt).sum()
            ref = pc[i] if side == "c" else pr[i]
            torch.testing.assert_close(lp, ref.detach(), atol=1e-5, rtol=1e-6)
            total = total + w * lp
    total.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, packed_grads[n], atol=1e-5, rtol=1e-4, msg=n)


def test_truncation_keeps_prompt_end_and_response_start():
    ids = list(range(100, 120)) + list(range(200, 215))  # prompt 20 tokens (100 is BOS), response 15
    mask = [False] * 20 + [True] * 15
    out, m, p_cut, r_cut = truncate(ids, mask, max_len=20, max_prompt_len=8)
    assert out == [100] + list(range(113, 120)) + list(range(200, 212))
    assert m == [False] * 8 + [True] * 12 and p_cut and r_cut
    out, m, p_cut, r_cut = truncate(ids, mask, max_len=64, max_prompt_len=32)
    assert (out, m, p_cut, r_cut) == (ids, mask, False, False)


def test_encode_pairs_counts_truncation(tiny_chat_model):
    tok = Tokenizer.from_dir(tiny_chat_model["model"])
    long_prompt = [{"role": "user", "content": "word " * 200}]
    prefs = [Preference(long_prompt, [{"role": "assistant", "content": "yes " * 100}], [{"role": "assistant", "content": "no"}]),
             Preference([{"role": "user", "content": "hi"}], [{"role": "assistant", "content": "a"}], [{"role": "assistant", "content": "b"}])]
    pairs, st = encode_pairs(prefs, tok, "chatml", max_len=48, max_prompt_len=24)  # "hi" prompt: 19 tokens
    assert (st.pairs, st.prompt_truncated, st.response_truncated, st.dropped) == (2, 1, 1, 0)
    assert all(len(p.chosen[0]) <= 48 and len(p.rejected[0]) <= 48 for p in pairs)
    assert pairs[0].chosen[0][0] == tok.bos_id  # BOS kept when the prompt start is cut
    # The scored part of the rejected side ends with <|im_end|>: the end-of-turn token is scored.
    ids, mask = pairs[1].rejected
    scored = [t for t, m in zip(ids, mask) if m]
    assert tok.decode(scored) == "b<|im_end|>"


def test_accumulation_and_two_ranks_equal_single(tiny_chat_model, tmp_path):
    train_dpo.main(args(tiny_chat_model, tmp_path / "mb2", micro_batch_size=2, precompute_ref=True))
    train_dpo.main(args(tiny_chat_model, tmp_path / "mb4", micro_batch_size=4, precompute_ref=True))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(ROOT / "train_dpo.py"), *args(tiny_chat_model, tmp_path / "ddp", micro_batch_size=1)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    ref = metrics(tmp_path / "mb2")
    for other in ("mb4", "ddp"):
        for a, b in zip(ref, metrics(tmp_path / other)):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6), (other, a, b)
        w, w_ref = weights(tmp_path / other), weights(tmp_path / "mb2")
        for k in w_ref:
            torch.testing.assert_close(w[k], w_ref[k], atol=2e-6, rtol=1e-5, msg=f"{other}: {k}")


@pytest.mark.parametrize("data_cache", ["auto", "off"])
def test_every_pair_with_identical_sides_names_the_cause(tiny_chat_model, tmp_path, capsys, data_cache):
    from lion_min.cli import run_cli

    same = tmp_path / "same.jsonl"
    same.write_text("".join(json.dumps({"prompt": f"Q{i}?", "chosen": f"A{i}.", "rejected": f"A{i}."}) + "\n"
                            for i in range(12)))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: train_dpo.main(args(tiny_chat_model, out, data=same, data_cache=data_cache,
                                            eval_fraction=0.0)))
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1, err
    assert err[0] == (f"error: --data={same}: only 0 of 12 pairs kept for --batch_size=4; "
                      f"12 pairs dropped: identical sides (chosen == rejected)")
    assert not out.exists()
