"""The built-in demo, shortened: each script runs on its defaults (plus a step cap), the SFT loss
falls, and what each stage exports is a Hugging Face folder transformers loads with equal logits."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import transformers

import lion_min

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_dpo  # noqa: E402
import train_online  # noqa: E402
import train_sft  # noqa: E402


def lines(folder):
    return [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


@pytest.mark.slow
def test_demo_pipeline_short(tmp_path):
    sft, dpo, online = tmp_path / "sft", tmp_path / "dpo", tmp_path / "online"
    train_sft.main([f"--out_dir={sft}", "--max_steps=40", "--device=cpu"])  # no model, no data: the demo
    m = lines(sft)
    assert m[0]["step"] == 1 and m[-1]["step"] == 40
    assert m[-1]["loss"] < 0.5 * m[0]["loss"]
    summary = json.loads((sft / "summary.json").read_text())
    assert summary["packing_efficiency"] > 0.85
    # The demo started from its own initialised checkpoint, written beside the run.
    assert json.loads((sft / "train_config.json").read_text())["model"] == str(tmp_path / "demo_data" / "init_model")

    hf = transformers.AutoModelForCausalLM.from_pretrained(sft, dtype=torch.float32).eval()
    ours = lion_min.load_model(sft)
    x = torch.randint(0, ours.args.vocab_size, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(x), atol=1e-4, rtol=0)

    train_dpo.main(["--preset=demo", f"--model={sft}", f"--out_dir={dpo}", "--max_steps=4", "--device=cpu"])
    d = lines(dpo)
    assert d[0]["loss"] == pytest.approx(0.6931, abs=1e-3)
    assert "demo_accuracy_start" in json.loads((dpo / "summary.json").read_text())

    train_online.main(["--preset=demo", f"--model={dpo}", f"--out_dir={online}", "--rounds=1", "--max_steps=2",
                       "--device=cpu"])
    rounds = [json.loads(x) for x in (online / "round_0.jsonl").read_text().splitlines()]
    assert len(rounds) == 256 and all(len(r["samples"]) == 5 for r in rounds)
    s = json.loads((online / "summary.json").read_text())
    # Each stage evaluates its starting model again: the figures must equal the previous stage's own.
    sft_acc = json.loads((sft / "summary.json").read_text())["demo_accuracy"]
    dpo_summary = json.loads((dpo / "summary.json").read_text())
    assert dpo_summary["demo_accuracy_start"] == sft_acc and s["demo_accuracy_start"] == dpo_summary["demo_accuracy"]

    # The closing plot finds the earlier stages through the real train_config.json files.
    from lion_min.run import plot
    assert plot.earlier_runs(dpo) == {"dpo": dpo, "sft": sft}
    curves = plot.collect_curves(sft, dpo, online)
    assert curves["sft"]["step"] == list(range(1, 41)) and curves["dpo"]["step"] == list(range(1, 7))
    assert curves["judged"]["mean_reward"] == [s["mean_reward_start"], s["mean_reward_final"]]
    if importlib.util.find_spec("matplotlib"):
        assert (online / "curves.png").read_bytes()[:4] == b"\x89PNG"
