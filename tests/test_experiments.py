"""python -m lion_min.experiments, end to end at the tiny size (a few steps per run: the code paths,
not the figures; docs/experiments.md holds those)."""

import json

import pytest
import torch

from lion_min import experiments


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    out = tmp_path_factory.mktemp("experiments")
    experiments.main(["all", "--size=tiny", "--seeds=1", f"--out={out}"])
    return out


def rows(out, name):
    return json.loads((out / name / "results.json").read_text())


def test_every_experiment_writes_its_table_for_every_arm(ran):
    arms = {"demo": 3, "packing": 6, "dpo": 5, "online": 2, "margins": 1}
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
    from lion_min.chat import encode_chat
    from lion_min.checkpoint import load_model
    from lion_min.tokenizer import Tokenizer

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


def test_a_finished_run_is_reused(ran):
    result = ran / "packing" / experiments.slug("packing, reply loss") / "seed_0" / "result.json"
    before = result.stat().st_mtime_ns
    experiments.main(["packing", "--size=tiny", "--seeds=1", f"--out={ran}"])
    assert result.stat().st_mtime_ns == before


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
