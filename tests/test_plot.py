"""The curves PNG: the series come from the metrics files unchanged, the image is drawn, and
without matplotlib the plot is skipped with a message."""

import json
import sys

import pytest

from lion_min.run import plot
def write_run(folder, rows, config=None, evals=()):
    folder.mkdir(parents=True)
    lines = [json.dumps(r) for r in rows] + [json.dumps(e) for e in evals]
    (folder / "metrics.jsonl").write_text("".join(x + "\n" for x in lines))
    if config is not None:
        (folder / "train_config.json").write_text(json.dumps(config))


def dpo_rows(n, base):
    return [{"step": i + 1, "loss": base + i, "rewards/chosen": 0.1 * i, "rewards/rejected": -0.1 * i,
             "rewards/margins": 0.2 * i, "lr": 1e-5} for i in range(n)]


@pytest.fixture
def pipeline(tmp_path):
    sft, dpo, online = tmp_path / "sft", tmp_path / "dpo", tmp_path / "online"
    write_run(sft, [{"step": i + 1, "loss": 3.0 - i} for i in range(3)], {"model": ""},
              evals=[{"step": 3, "eval/loss": 1.5}])
    # As the stages write them: offline DPO scores against the SFT model (ref_model ""), every online
    # round against the offline DPO policy.
    write_run(dpo, dpo_rows(2, 10.0), {"model": str(sft), "ref_model": "", "beta": 0.1},
              evals=[{"step": 2, "eval/loss": 9.5}])
    write_run(online / "round_0", dpo_rows(2, 20.0), {"model": str(dpo), "ref_model": str(dpo), "beta": 0.1})
    write_run(online / "round_1", dpo_rows(3, 30.0), {"model": str(online / "round_0"), "ref_model": str(dpo),
                                                      "beta": 0.1}, evals=[{"step": 3, "eval/loss": 29.0}])
    (online / "summary.json").write_text(json.dumps(
        {"rounds": [{"round": 0, "mean_reward": 0.5}, {"round": 1, "mean_reward": 0.6}], "mean_reward_final": 0.7}))
    return sft, dpo, online


def test_curves_are_the_metrics_in_order(pipeline):
    sft, dpo, online = pipeline
    c = plot.collect_curves(sft, dpo, online)
    assert c["sft"] == {"step": [1, 2, 3], "loss": [3.0, 2.0, 1.0], "eval_step": [3], "eval_loss": [1.5]}
    # offline DPO's 2 steps, then round 0's 2 and round 1's 3 on one axis
    assert c["dpo"]["step"] == [1, 2, 3, 4, 5, 6, 7]
    assert c["dpo"]["loss"] == [10.0, 11.0, 20.0, 21.0, 30.0, 31.0, 32.0]
    assert c["dpo"]["rewards/margins"] == pytest.approx([0, 0.2, 0, 0.2, 0, 0.2, 0.4])
    assert c["dpo"]["starts"] == [(0, "offline DPO"), (2, "round 0"), (4, "round 1")]
    assert c["dpo"]["ref_changes"] == [2]  # SFT model -> offline DPO policy; the rounds keep theirs
    assert (c["dpo"]["eval_step"], c["dpo"]["eval_loss"]) == ([2, 7], [9.5, 29.0])
    assert c["judged"] == {"round": [0, 1, 2], "mean_reward": [0.5, 0.6, 0.7]}


def test_earlier_runs_follow_train_config(pipeline):
    sft, dpo, online = pipeline
    assert plot.earlier_runs(dpo) == {"dpo": dpo, "sft": sft}
    assert plot.earlier_runs(online / "round_1") == {"dpo": online / "round_1", "sft": sft}
    assert plot.earlier_runs(sft) == {"sft": sft}


def test_png_is_drawn(pipeline, tmp_path):
    image = pytest.importorskip("matplotlib.image")
    sft, dpo, online = pipeline
    out = plot.plot_pipeline(tmp_path / "figs" / "curves.png", sft=sft, dpo=dpo, online=online)
    assert out == tmp_path / "figs" / "curves.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["curves.png"]  # no temporary file left
    pixels = image.imread(out)
    assert 1.2 < pixels.shape[1] / pixels.shape[0] < 1.6  # four panels, 2 x 2
    # Lines in colour were drawn: a blank figure is all white/grey.
    rgb = pixels[..., :3]
    coloured = (rgb.max(axis=-1) - rgb.min(axis=-1)) > 0.3
    assert coloured.mean() > 0.002


def test_without_matplotlib_the_plot_is_skipped(pipeline, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    sft, dpo, online = pipeline
    assert plot.plot_pipeline(tmp_path / "curves.png", sft=sft, dpo=dpo, online=online) is None
    assert "matplotlib is not installed" in capsys.readouterr().out
    assert not (tmp_path / "curves.png").exists()


def test_malformed_metrics_line_is_named(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl: line 2: not JSON"):
        plot.collect_curves(sft=run)


def test_cli_names_a_missing_run(tmp_path):
    pytest.importorskip("matplotlib")
    with pytest.raises(FileNotFoundError, match=r"--dpo=.*nowhere: no metrics.jsonl there"):
        plot.main([f"--dpo={tmp_path / 'nowhere'}", f"--out={tmp_path / 'c.png'}"])
    assert not (tmp_path / "c.png").exists()


def test_step_axis_names_online_rounds_only_when_there_were_some(pipeline, tmp_path):
    sft, dpo, online = pipeline
    assert plot._step_label(plot.collect_curves(dpo=dpo)["dpo"]) == "step"
    assert plot._step_label(plot.collect_curves(dpo=dpo, online=online)["dpo"]) == \
        "step (offline DPO, then online rounds)"
    assert plot._step_label(plot.collect_curves(online=online)["dpo"]) == "step (online rounds)"
    assert plot.collect_curves(dpo=dpo)["dpo"]["ref_changes"] == []


def test_two_stages_draw_two_panels_side_by_side(pipeline, tmp_path):
    image = pytest.importorskip("matplotlib.image")
    sft, dpo, _ = pipeline
    pixels = image.imread(plot.plot_pipeline(tmp_path / "c.png", sft=sft))
    assert 1.2 < pixels.shape[1] / pixels.shape[0] < 1.6  # one panel
    pixels = image.imread(plot.plot_pipeline(tmp_path / "c.png", dpo=dpo))
    assert 2.4 < pixels.shape[1] / pixels.shape[0] < 3.2  # DPO loss and rewards, no empty row


def test_segment_names_fit_or_the_rounds_share_one():
    starts = [(0, "offline DPO"), (100, "round 0"), (200, "round 1")]
    # Room for every name: each at the middle of its segment.
    assert plot.segment_labels(starts, 300, 0, 1.0) == [(50, "offline DPO"), (150, "round 0"), (250, "round 1")]
    # Short rounds (the demo's): one name over all of them, kept inside the axis.
    starts = [(0, "offline DPO"), (125, "round 0"), (130, "round 1")]
    assert plot.segment_labels(starts, 135, 0, 1.0) == [(62.5, "offline DPO"), (130, "rounds 0-1")]
    assert plot.segment_labels(starts, 135, 0, 2.0) == [(62.5, "offline DPO"), (125, "rounds 0-1")]
    assert plot.segment_labels(starts[:2], 135, 0, 2.0) == [(62.5, "offline DPO"), (128, "round 0")]
    # A short first segment's name does not run off the left end either.
    assert plot.segment_labels([(0, "offline DPO"), (4, "round 0")], 400, 0, 1.0)[0] == (5.5, "offline DPO")
