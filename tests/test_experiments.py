"""python -m lion_min experiments, end to end at the tiny size (a few steps per run: the code paths,
not the figures; docs/experiments.md holds those)."""

import json

import pytest
import torch

from lion_min.demo import experiments
@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    out = tmp_path_factory.mktemp("experiments")
    experiments.main(["all", "--size=tiny", "--seeds=1", f"--out={out}"])
    return out


def rows(out, name):
    return json.loads((out / name / "results.json").read_text())


def test_every_experiment_writes_its_table_for_every_arm(ran):
    arms = {"demo": 3, "packing": 6, "dpo": 5, "online": 2, "margins": 1, "scaling": 4, "margins_by_loss": 4}
    for name, n in arms.items():
        r = rows(ran, name)
        assert len(r) == n and [x["seed"] for x in r] == [0] * n
        assert all(0 <= x["accuracy"] <= 1 and 0 <= x["strict_accuracy"] <= x["accuracy"] for x in r)
        table = (ran / name / "table.md").read_text()
        assert all(f"| {x['arm']} | 1 |" in table for x in r)


def test_the_demo_over_seeds_chains_its_stages(ran):
    """Each stage starts from the previous stage's model, at the demo's own settings; the table says
    how each stage's accuracy moved on every seed."""
    demo_dir = ran / "demo"
    dpo = json.loads((demo_dir / "offline_DPO" / "seed_0" / "train_config.json").read_text())
    online = json.loads((demo_dir / "online_DPO" / "seed_0" / "run.json").read_text())["config"]
    assert dpo["model"] == str(ran / "sft" / "seed_0") and online["model"] == str(demo_dir / "offline_DPO" / "seed_0")
    assert (dpo["lr"], online["n_samples"]) == (experiments.demo.SETTINGS["dpo"]["lr"], 5)
    r = {x["arm"]: x for x in rows(ran, "demo")}
    assert r["SFT"] == {"arm": "SFT", "seed": 0} | json.loads((ran / "sft" / "seed_0" / "result.json").read_text())
    table = (demo_dir / "table.md").read_text()
    gain = r["online DPO"]["accuracy"] - r["offline DPO"]["accuracy"]
    assert f"accuracy (final answer), offline DPO -> online DPO: gain {gain:+.3f} on average" in table
    logodds = experiments.carry_logodds(ran / "sft" / "seed_0", experiments.Context(experiments.ExperimentConfig(
        out=str(ran), size="tiny", seeds=1)).test)
    assert logodds and "| SFT | " + " | ".join(f"{v:+.2f}" for v in logodds.values()) + " |" in table
    carry = json.loads((demo_dir / "carry.json").read_text())
    assert carry["SFT"]["seed_0"] == {str(u): pytest.approx(v) for u, v in logodds.items()}


def test_carry_logodds_is_the_scored_log_prob_difference(ran):
    """The batched read of the carry decision equals the log-prob path's own scores of "+" and "="
    after each prompt alone (one problem per units sum, so the means are the values); 19+11 has a
    "+1=" in its units step too ("9+1=10")."""
    from lion_min.core.chat import encode_chat
    from lion_min.formats.hf import load_model
    from lion_min.formats.tokenizer import Tokenizer

    folder = ran / "sft" / "seed_0"
    prompts = ["What is 19+11?", "What is 47+38?", "What is 99+99?", "What is 12+34?"]  # units 10, 15, 18; none
    got = experiments.carry_logodds(folder, prompts)
    assert list(got) == [10, 15, 18]
    model, tok = load_model(str(folder)).eval(), Tokenizer.from_dir(folder)
    for prompt, units in zip(prompts, got):
        a, b = experiments.demo.parse_problem(prompt)
        ids = encode_chat(tok, [{"role": "user", "content": prompt}], "chatml", add_generation_prompt=True).input_ids
        ids = torch.tensor([ids + tok.encode(f"{a % 10}+{b % 10}={a % 10 + b % 10}, {a // 10}+{b // 10}")])
        logp = {}
        for char in "+=":
            targets = torch.full_like(ids, -100)
            targets[0, -1] = tok.token_id(char)
            with torch.no_grad():
                logp[char] = model(ids, targets=targets)[0, -1].item()
        assert got[units] == pytest.approx(logp["+"] - logp["="], abs=1e-4)


def test_a_run_on_other_data_is_refused(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()

    def never(folder):
        pytest.fail("a finished or refused run must not train")

    for record, made in (({"data_version": 1}, "version 1"), ({}, "a version before")):
        (folder / "result.json").write_text(json.dumps({"accuracy": 0.5} | record))
        with pytest.raises(experiments.ConfigError, match=f"run/result.json: a run made from {made}"):
            experiments.run_once(folder, never)
    (folder / "result.json").write_text(json.dumps({"accuracy": 0.5, "data_version": experiments.demo.DATA_VERSION}))
    assert experiments.run_once(folder, never) == folder

    # A whole --out folder of old runs is refused before its data files are touched.
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "meta.json").write_text('{"version": 2, "seed": 0}\n')
    with pytest.raises(experiments.ConfigError, match=r"data/meta.json: these runs were made from version 2 .* "
                                                      r"use another --out"):
        experiments.main(["demo", "--size=tiny", f"--out={tmp_path}"])
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["meta.json"]


def test_the_packing_arms_train_what_they_say(ran):
    seen = set()
    for r in rows(ran, "packing"):
        cfg = json.loads((ran / "packing" / experiments.slug(r["arm"]) / "seed_0" / "train_config.json").read_text())
        seen.add((cfg["packing"], cfg["isolate_documents"], cfg["loss_mask"]))
        assert r["reply_loss"] > 0 and r["steps"] == 2
    assert seen == {(p, i, m) for p, i in ((False, True), (True, False), (True, True)) for m in (True, False)}


def test_dpo_arms_beta_and_reference(ran):
    r = {x["arm"]: x for x in rows(ran, "dpo")}
    assert set(r) == {"beta=0.01", "beta=0.05", "beta=0.1", "beta=0.5", "beta=0.1, reference = starting model"}
    for arm, x in r.items():
        cfg = json.loads((ran / "dpo" / experiments.slug(arm) / "seed_0" / "train_config.json").read_text())
        assert cfg["beta"] == float(arm.split(",")[0].removeprefix("beta="))
        assert cfg["ref_model"] == ("" if "reference" not in arm else str(ran / "data" / "init_model_seed_0"))
        assert x["logratio_margin"] == pytest.approx(x["reward_margin"] / cfg["beta"])


def test_margins_agree_with_the_dpo_runs_own_eval(ran):
    """The per-pair log-prob changes (the exported policy and the SFT model, loaded and scored apart)
    average to the loop's own eval figures for the same held-out pairs (reference = the SFT model)."""
    run = ran / "dpo" / experiments.slug("beta=0.1") / "seed_0"
    changes = [json.loads(x) for x in (run / "logp_changes.jsonl").read_text().splitlines()]
    assert len(changes) == experiments.SIZES["tiny"].eval_pairs
    metrics = (run / "metrics.jsonl").read_text().splitlines()
    last_eval = [json.loads(x) for x in metrics if "eval/loss" in x][-1]
    mean = torch.tensor([[c["chosen"], c["rejected"]] for c in changes]).mean(0)
    assert mean[0].item() == pytest.approx(last_eval["eval/logratios/chosen"], abs=1e-4)
    assert mean[1].item() == pytest.approx(last_eval["eval/logratios/rejected"], abs=1e-4)
    assert (ran / "margins" / "curves.json").is_file()


def test_online_and_offline_train_on_the_same_number_of_pairs(ran):
    r = {x["arm"]: x for x in rows(ran, "online")}
    assert r["online DPO"]["pairs"] == r["offline DPO, same number of pairs"]["pairs"] > 0
    assert all(x["right_answer_loss"] > 0 for x in r.values())
    # ... with the same optimizer settings (the online stage's), from the same SFT model.
    offline = json.loads((ran / "online" / experiments.slug("offline DPO, same number of pairs") / "seed_0"
                          / "train_config.json").read_text())
    online_round = json.loads((ran / "online" / experiments.slug("online DPO") / "seed_0" / "round_0"
                               / "train_config.json").read_text())
    for key in experiments.ONLINE_OPTIMIZER:
        assert offline[key] == online_round[key] == experiments.demo.SETTINGS["online"][key], key
    assert offline["model"] == str(ran / "sft" / "seed_0")


@pytest.mark.parametrize("name", ["packing", "scaling", "margins_by_loss"])
def test_a_finished_run_is_reused(ran, name):
    results = sorted((ran / name).glob("*/seed_*/result.json"))
    before = [r.stat().st_mtime_ns for r in results]
    table = (ran / name / "table.md").read_text()
    experiments.main([name, "--size=tiny", "--seeds=1", f"--out={ran}"])
    assert results and [r.stat().st_mtime_ns for r in results] == before
    assert (ran / name / "table.md").read_text() == table


def test_scaling_arms_read_accuracy_along_the_same_steps(ran):
    """Four preference-set sizes (1/8 .. all of the training pairs), the same steps and optimizer
    settings; each curve starts at the SFT model and ends at the exported model's accuracy."""
    size = experiments.SIZES["tiny"]
    n_all = len((ran / "data" / "dpo_train.jsonl").read_text().splitlines())
    r = rows(ran, "scaling")
    assert [x["pairs"] for x in r] == [n_all // 8, n_all // 4, n_all // 2, n_all]
    sft = json.loads((ran / "sft" / "seed_0" / "result.json").read_text())
    for x in r:
        folder = ran / "scaling" / experiments.slug(x["arm"]) / "seed_0"
        cfg = json.loads((folder / "train_config.json").read_text())
        assert (cfg["max_steps"], cfg["lr"], cfg["lr_schedule"], cfg["beta"]) == (
            size.scaling_steps, *(experiments.demo.SETTINGS["online"][k] for k in ("lr", "lr_schedule", "beta")))
        assert len((folder.parent / "pairs.jsonl").read_text().splitlines()) == x["pairs"]
        steps = list(range(0, size.scaling_steps + 1, size.scaling_every))
        assert [s for s, _ in x["curve"]] == steps and x["curve"][0][1] == sft["accuracy"]
        assert x["curve"][-1][1] == x["accuracy"] and [s for s, _ in x["reward_accuracy_curve"]] == steps[1:]
        assert x["saturation_step"] in steps and x["best_accuracy"] == max(a for _, a in x["curve"])
        assert not (folder / "checkpoints").exists()  # read, then removed
        assert x["reward_saturation_step"] in steps[1:]
    assert (ran / "scaling" / "table.md").read_text().count("the mean accuracy curve saturates at step") == 4


def test_a_checkpoint_is_read_with_its_own_weights(ran, tmp_path):
    """step_accuracy reads the model part of a resumable checkpoint: a checkpoint of the SFT
    model's weights, read into a DPO run's folder, scores what the SFT model scores."""
    from lion_min.formats.hf import load_model
    from lion_min.run.config import TrainConfig
    from lion_min.core.parallel import init_distributed
    from lion_min.core.train import make_optimizer
    from lion_min.run.resume import save_checkpoint

    ctx = experiments.Context(experiments.ExperimentConfig(out=str(ran), size="tiny", seeds=1))
    sft = load_model(str(ran / "sft" / "seed_0"))
    step_dir = save_checkpoint(tmp_path, 1, sft, make_optimizer(sft, TrainConfig()), TrainConfig(),
                               init_distributed("cpu"), {})
    run = ran / "scaling" / experiments.slug(rows(ran, "scaling")[-1]["arm"]) / "seed_0"
    got = experiments.step_accuracy(ctx, run, step_dir)
    assert got == ctx.accuracy(ran / "sft" / "seed_0")


def test_saturation_on_a_known_curve():
    curve = [[0, 0.50], [16, 0.70], [32, 0.85], [48, 0.90], [64, 0.91], [80, 0.905]]
    assert experiments.saturation(curve, tol=0.02) == {"saturation_step": 48, "best_accuracy": 0.91,
                                                       "last_step": False}
    assert experiments.saturation(curve, tol=0.1)["saturation_step"] == 32
    rising = [[0, 0.5], [16, 0.6], [32, 0.7]]
    assert experiments.saturation(rising) == {"saturation_step": 32, "best_accuracy": 0.7, "last_step": True}
    mean = experiments.mean_curve([[[0, 0.2], [8, 0.4]], [[0, 0.4], [8, 0.8]]])
    assert [s for s, _ in mean] == [0, 8] and [a for _, a in mean] == pytest.approx([0.3, 0.6])


def test_curve_shape_fits_a_known_parabola():
    xs = [i / 20 for i in range(1, 21)]
    cap = experiments.curve_shape(xs, [-3 * (x - 0.4) ** 2 + 1 for x in xs])
    assert cap["curvature"] == pytest.approx(-3) and cap["peak"] == pytest.approx(0.4)
    cup = experiments.curve_shape(xs, [2 * x * x - x for x in xs])  # bends up: highest at an end
    assert cup["curvature"] == pytest.approx(2) and cup["peak"] == pytest.approx(1.0)
    line = experiments.curve_shape([0.5, 1.0], [1.0, 2.0])
    assert line == {"curvature": 0.0, "peak": 1.0}


def test_margins_by_loss_calibrates_then_runs_each_loss(ran):
    """Each loss's calibration runs on seed 0; the chosen beta's run is the one in the table; the
    sigmoid arm is experiment 4's run (the DPO experiment's beta 0.1), not a new one."""
    r = rows(ran, "margins_by_loss")
    assert r[0]["arm"] == "DPO (sigmoid), beta=0.1"
    assert r[0]["chosen_change"] == rows(ran, "dpo")[2]["chosen_change"]
    table = (ran / "margins_by_loss" / "table.md").read_text()
    for x, (name, (loss, betas)) in zip(r[1:], experiments.LOSSES.items()):
        assert x["arm"].startswith(f"{name}, beta=")
        cfg = json.loads((ran / "margins_by_loss" / experiments.slug(x["arm"]) / "seed_0" / "train_config.json")
                         .read_text())
        assert cfg["loss_type"] == loss["loss_type"] and cfg["label_smoothing"] == loss.get("label_smoothing", 0.0)
        assert cfg["beta"] in betas and f"| {x['arm']} | {x['accuracy']:.3f} | chosen |" in table
        assert all(f"| {name}, beta={b} |" in table for b in betas)
    curves = json.loads((ran / "margins_by_loss" / "curves.json").read_text())
    assert list(curves) == [x["arm"] for x in r]
    run = curves["DPO (sigmoid), beta=0.1"][0]
    assert len(run["per_pair"]) == experiments.SIZES["tiny"].eval_pairs and run["x"][-1] == 1.0


def test_spread():
    s = experiments.spread([1.0, 2.0, 3.0])
    assert (s["mean"], s["sd"], s["min"], s["max"]) == (2.0, 1.0, 1.0, 3.0)
    assert experiments.spread([0.5])["sd"] == 0.0


def test_unknown_experiment_is_one_error():
    with pytest.raises(experiments.ConfigError, match="name one experiment"):
        experiments.main(["sft-ablation"])
    with pytest.raises(experiments.ConfigError, match=r"--seeds=0: must be in \[1, 100\]"):
        experiments.main(["dpo", "--seeds=0"])
    with pytest.raises(experiments.ConfigError, match="--size=huge: expected one of full, tiny"):
        experiments.main(["dpo", "--size=huge"])
