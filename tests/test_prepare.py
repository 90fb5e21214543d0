"""Prepared data (lion_min/run/data_cache.py): the batched encoder against encode_chat, the rows on disk
against packing.pack, the fingerprint, interrupted preparations, and 1 rank == 2 ranks."""

import dataclasses
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lion_min.core import dpo as core_dpo
from lion_min.stages import dpo
from lion_min.run import data_cache as prepare
from lion_min.stages import sft
from lion_min.core.chat import encode_chat, encode_chats
from lion_min.core.parallel import Dist
from lion_min.stages.sft import load_sft_data, sft_rows
from lion_min.run.config import SFTConfig
from lion_min.formats.tokenizer import Tokenizer
from tokenizers_for_tests import build_chatml_tokenizer, build_gemma_chatml_tokenizer, build_gemma_tokenizer, \
    build_llama3_tokenizer

ROOT = Path(__file__).resolve().parents[1]
ONE = Dist(rank=0, world=1, local_rank=0, device="cpu")
BUILDERS = {"llama3": build_llama3_tokenizer, "gemma": build_gemma_tokenizer, "gemma3": build_gemma_tokenizer,
            "chatml": build_chatml_tokenizer}


def random_text(rng: random.Random) -> str:
    """Words, whitespace the templates strip or keep, emoji split over byte tokens, other scripts."""
    words = ["the", "cat", "Paris", "42", "café", "你好", "😀", "👍🏽", "def f(x):", "\n", "  ", "\t", "naïve", "."]
    text = " ".join(rng.choice(words) for _ in range(rng.randint(0, 40)))
    return rng.choice(["", " ", "\n", "\n\n"]) + text + rng.choice(["", " ", "\n"])


def random_conversations(n: int, seed: int = 0, system: bool = True, reply_end: str = "") -> list[list[dict]]:
    """reply_end: appended to every assistant turn (the data loader refuses empty replies)."""
    rng = random.Random(seed)
    convs = []
    for _ in range(n):
        turns = [{"role": "system", "content": random_text(rng)}] if system and rng.random() < 0.3 else []
        for _ in range(rng.randint(1, 3)):
            turns += [{"role": "user", "content": random_text(rng)},
                      {"role": "assistant", "content": random_text(rng) + reply_end}]
        if rng.random() < 0.2:  # ends on a user turn: nothing after it trains
            turns.append({"role": "user", "content": random_text(rng)})
        convs.append(turns)
    return convs


@pytest.mark.parametrize("template", ["llama3", "gemma", "gemma3", "chatml"])
def test_encode_chats_equals_encode_chat(template, tmp_path):
    tok = Tokenizer.from_dir(BUILDERS[template](tmp_path / template))
    convs = random_conversations(150, seed=1, system=template != "gemma")
    for train_on in ("assistant", "last", "all"):
        batch = encode_chats(tok, convs, template, train_on)
        assert batch.starts[-1] == len(batch.input_ids) == len(batch.loss_mask)
        trained = 0
        for k, conv in enumerate(convs):
            ref = encode_chat(tok, conv, template, train_on)
            a, b = batch.starts[k], batch.starts[k + 1]
            assert batch.input_ids[a:b].tolist() == ref.input_ids, (train_on, k)
            assert batch.loss_mask[a:b].tolist() == ref.loss_mask, (train_on, k)
            trained += sum(ref.loss_mask)
        assert 0 < trained < len(batch.input_ids)  # the masks are not trivially all one value


def write_chats(path: Path, convs) -> Path:
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    return path


@pytest.fixture(scope="module")
def chat_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("prep")
    tok_dir = build_gemma_chatml_tokenizer(root / "tok")
    data = write_chats(root / "chats.jsonl", random_conversations(120, seed=2, reply_end=" ok"))
    return {"root": root, "tok_dir": tok_dir, "tok": Tokenizer.from_dir(tok_dir), "data": data}


def config(setup, cache, **over) -> SFTConfig:
    return SFTConfig(**{"model": str(setup["tok_dir"]), "data": str(setup["data"]), "seq_len": 320,
                        "data_cache": str(cache)} | over)


def prepared(cfg, tok, d=ONE) -> prepare.Prepared:
    return sft.prepare_sft(cfg, tok, d, load=lambda: load_sft_data(cfg))


def assert_rows_equal(store: sft.PreparedRows, packed):
    """Every row, taken from the disk in a scrambled order, equals pack()'s, as do the counters."""
    n = len(packed.rows["tokens"])
    assert len(store) == n > 5
    sel = np.random.default_rng(0).permutation(n)
    rows = store.take(sel)
    for k, v in packed.rows.items():
        assert rows[k].dtype == v.dtype and np.array_equal(rows[k], v[sel]), k
    assert np.array_equal(store.row_targets, (packed.rows["targets"] != -100).sum(1))
    for field in ("num_examples", "num_packed", "num_truncated", "num_dropped", "real_tokens", "row_tokens",
                  "target_tokens"):
        assert getattr(store.counts, field) == getattr(packed, field), field


@pytest.mark.parametrize("over", [
    {},  # packed, truncate, assistant
    {"packing": False, "overflow": "drop", "seq_len": 256},
    {"loss_mask": False, "eval_fraction": 0.2, "seq_len": 200},
    {"train_on": "last", "system_prompt": "", "overflow": "drop", "seq_len": 300},
])
def test_prepared_rows_equal_sft_rows(chat_setup, tmp_path, over):
    cfg = config(chat_setup, tmp_path / "cache", **over)
    fresh = prepared(cfg, chat_setup["tok"])
    assert fresh.seconds > 0
    convs, eval_convs, _ = load_sft_data(cfg)
    packed = sft_rows(convs, chat_setup["tok"], cfg)
    assert packed.num_truncated + packed.num_dropped > 0  # the cut-off paths are exercised
    assert_rows_equal(fresh.train, packed)
    if eval_convs:
        assert_rows_equal(fresh.eval, sft_rows(eval_convs, chat_setup["tok"], cfg))
    # A later run reuses the folder (nothing loaded) and reads the same rows.
    cached = sft.prepare_sft(cfg, chat_setup["tok"], ONE, load=lambda: pytest.fail("the cache was not used"))
    assert cached.seconds == 0 and cached.folder == fresh.folder
    assert_rows_equal(cached.train, packed)


def test_shards_merge_to_the_same_folder(chat_setup, tmp_path):
    """What 3 ranks prepare (each a contiguous share) is byte for byte what 1 prepares."""
    convs, _, _ = load_sft_data(config(chat_setup, tmp_path))
    args = (chat_setup["tok"], "chatml", "assistant", None, 200, "truncate")
    dtype = prepare.token_dtype(chat_setup["tok"].vocab_size)
    sft.encode_shard(convs, tmp_path / "one" / "0", *args)
    sft.merge_shards([tmp_path / "one" / "0"], tmp_path / "one" / "rows", 200, True, "truncate", 0, dtype)
    cuts = [0, 7, 80, len(convs)]
    shards = [tmp_path / "three" / str(i) for i in range(3)]
    for i, s in enumerate(shards):
        sft.encode_shard(convs[cuts[i] : cuts[i + 1]], s, *args)
    sft.merge_shards(shards, tmp_path / "three" / "rows", 200, True, "truncate", 0, dtype)
    files = sorted(p.name for p in (tmp_path / "one" / "rows").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "three" / "rows").iterdir())
    for name in files:
        assert (tmp_path / "one" / "rows" / name).read_bytes() == (tmp_path / "three" / "rows" / name).read_bytes()


def test_fingerprint_changes_with_what_changes_the_tokens(chat_setup, tmp_path):
    tok = chat_setup["tok"]
    base = config(chat_setup, tmp_path)
    fp = sft.sft_cache_key(base, tok)[0]
    # Not the training settings, the output folder, the cache folder, or a seed that samples nothing.
    for same in ({"lr": 1.0, "batch_size": 7, "max_steps": 3, "out_dir": "elsewhere", "epochs": 9, "seed": 5},
                 {"data_cache": str(tmp_path / "other")}):
        assert sft.sft_cache_key(config(chat_setup, tmp_path, **same), tok)[0] == fp, same
    # A copy of the data file elsewhere is the same data.
    copy = shutil.copy(chat_setup["data"], tmp_path / "copy.jsonl")
    assert sft.sft_cache_key(config(chat_setup, tmp_path, data=str(copy)), tok)[0] == fp
    changed = [{"seq_len": 321}, {"chat_template": "gemma"}, {"packing": False}, {"loss_mask": False},
               {"train_on": "last"}, {"overflow": "drop"}, {"system_prompt": ""}, {"eval_fraction": 0.1}]
    for over in changed:
        assert sft.sft_cache_key(config(chat_setup, tmp_path, **over), tok)[0] != fp, over
    # The seed matters once the data is sampled.
    half = config(chat_setup, tmp_path, data=f"{chat_setup['data']}:0.5")
    assert sft.sft_cache_key(half, tok)[0] != sft.sft_cache_key(dataclasses.replace(half, seed=1), tok)[0]
    # One byte more in the data, another tokenizer.
    edited = tmp_path / "edited.jsonl"
    edited.write_bytes(chat_setup["data"].read_bytes() + b"\n")
    assert sft.sft_cache_key(config(chat_setup, tmp_path, data=str(edited)), tok)[0] != fp
    other_tok = Tokenizer.from_dir(build_gemma_tokenizer(tmp_path / "gemma_tok"))
    assert sft.sft_cache_key(base, other_tok)[0] != fp


def test_hub_files_are_identified_by_commit_and_path(tmp_path):
    commit = "0123456789abcdef0123456789abcdef01234567"
    f = tmp_path / "datasets--org--name" / "snapshots" / commit / "data" / "train-0.parquet"
    f.parent.mkdir(parents=True)
    f.write_bytes(b"not read")
    assert prepare.file_identity(f) == f"hub:datasets--org--name/snapshots/{commit}/data/train-0.parquet"
    local = tmp_path / "train.jsonl"
    local.write_bytes(b"{}\n")
    assert prepare.file_identity(local) == prepare._sha256_file(local) != prepare.file_identity(f)


def test_an_interrupted_preparation_is_redone(chat_setup, tmp_path, monkeypatch, capsys):
    """Ctrl-C (or any error) while preparing removes the temporary folder; one left by a process
    that was killed (kill -9) is removed by the next preparation; another machine's is left alone."""
    import socket

    cfg = config(chat_setup, tmp_path / "cache")

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed while laying out the rows")

    with monkeypatch.context() as m:
        m.setattr(sft, "merge_shards", crash)
        with pytest.raises(KeyboardInterrupt):
            prepared(cfg, chat_setup["tok"])
    fp = sft.sft_cache_key(cfg, chat_setup["tok"])[0]
    assert not list((tmp_path / "cache").iterdir())  # no empty <fingerprint>.tmp-<id> folder left
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    for name, host in (("killed", socket.gethostname()), ("elsewhere", "another-host")):
        (tmp_path / "cache" / f"{fp}.tmp-{name}").mkdir()
        (tmp_path / "cache" / f"{fp}.tmp-{name}" / "owner.json").write_text(
            json.dumps({"host": host, "pid": int(gone.stdout)}))
    capsys.readouterr()
    again = prepared(cfg, chat_setup["tok"])
    out = capsys.readouterr().out
    assert f"note: removed {tmp_path / 'cache' / fp}.tmp-killed, an unfinished preparation" in out
    assert "1 unfinished preparation(s) of this data" in out
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [fp, f"{fp}.tmp-elsewhere"]
    assert again.seconds > 0 and again.folder.name == fp
    convs, _, _ = load_sft_data(cfg)
    assert_rows_equal(again.train, sft_rows(convs, chat_setup["tok"], cfg))


def test_cli_prepares_then_finds_the_folder(chat_setup, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "lion_min", "prepare", "sft", f"--model={chat_setup['tok_dir']}",
           f"--data={chat_setup['data']}", "--seq_len=320", f"--data_cache={tmp_path}"]
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "120 records read" in first.stdout and "packed 120 conversations into" in first.stdout
    assert "prepared in" in first.stdout
    second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert "prepared before" in second.stdout
    folder = first.stdout.strip().rsplit(": ", 1)[1]
    assert folder == second.stdout.strip().rsplit(": ", 1)[1] and Path(folder, "meta.json").is_file()


def test_cli_prepares_dpo_pairs(tiny_chat_model, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "lion_min", "prepare", "dpo", f"--model={tiny_chat_model['model']}",
           f"--data={tiny_chat_model['prefs']}", "--max_len=40", "--max_prompt_len=20", "--eval_fraction=0.1",
           f"--data_cache={tmp_path}"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "36 pairs: 36 kept" in res.stdout and "eval: 4 pairs: 4 kept" in res.stdout, res.stdout
    bad = subprocess.run(cmd[:4] + ["ppo"] + cmd[5:], capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "expected sft or dpo" in bad.stderr


# --- the stage on the prepared path -----------------------------------------------------------------


def sft_args(tiny, out, **over):
    a = dict(model=tiny["model"], data=tiny["data"], out_dir=out, seq_len=96, batch_size=4, micro_batch_size=1,
             max_steps=3, lr=1e-3, warmup_ratio=0.0, lr_schedule="constant", seed=0, device="cpu",
             eval_fraction=0.1) | over
    return [f"--{k}={v}" for k, v in a.items()]


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_stage_metrics_equal_with_and_without_the_cache(tiny_chat_model, tmp_path):
    sys.path.insert(0, str(ROOT))
    import train_sft

    train_sft.main(sft_args(tiny_chat_model, tmp_path / "off", data_cache="off"))
    train_sft.main(sft_args(tiny_chat_model, tmp_path / "cold", data_cache=tmp_path / "cache"))
    train_sft.main(sft_args(tiny_chat_model, tmp_path / "warm", data_cache=tmp_path / "cache"))
    ref = metrics(tmp_path / "off")
    assert len(ref) == 4 and "eval/loss" in ref[-1]
    for run in ("cold", "warm"):
        for a, b in zip(ref, metrics(tmp_path / run)):
            assert {k: v for k, v in a.items() if "time" not in k and "per_s" not in k and k != "memory_gib"} == \
                   {k: v for k, v in b.items() if "time" not in k and "per_s" not in k and k != "memory_gib"}, run
    summary = json.loads((tmp_path / "cold" / "summary.json").read_text())
    assert summary["conversations"] == 43 and summary["target_tokens"] > 0


def test_each_run_records_its_own_data_not_the_copy_that_filled_the_cache(tiny_chat_model, tmp_path, capsys):
    """Two users' copies of the same bytes share one prepared folder, and each run prints and writes
    into summary.json the path it was given; the cache's meta.json names no path at all."""
    sys.path.insert(0, str(ROOT))
    import train_sft

    copies = [tmp_path / user / "chats.jsonl" for user in ("alice", "bob")]
    for copy in copies:
        copy.parent.mkdir()
        shutil.copy(tiny_chat_model["data"], copy)
    for copy in copies:
        capsys.readouterr()
        train_sft.main(sft_args(tiny_chat_model, copy.parent / "run", data=copy, data_cache=tmp_path / "cache",
                                max_steps=1))
        out = capsys.readouterr().out
        data_row = next(line for line in out.splitlines() if line.strip().startswith(f"{copy}:"))
        assert "read 48, skipped 0, kept 48" in data_row
        recorded = json.loads((copy.parent / "run" / "summary.json").read_text())["data"]
        assert str(copy) in recorded and "alice" not in recorded.replace(str(copy), "")
    [folder] = (tmp_path / "cache").iterdir()
    assert "alice" not in (folder / "meta.json").read_text() and "{input 0}" in (folder / "meta.json").read_text()


@pytest.mark.slow
def test_two_ranks_prepare_and_train_on_the_same_global_batches(tiny_chat_model, tmp_path):
    """2 ranks prepare the data together (cold cache) and train exactly as 1 rank with the old path."""
    sys.path.insert(0, str(ROOT))
    import train_sft

    train_sft.main(sft_args(tiny_chat_model, tmp_path / "one", data_cache="off"))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train_sft.py"), *sft_args(tiny_chat_model, tmp_path / "two", data_cache=tmp_path / "cache")]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "data: prepared in" in res.stdout
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert len(one) == len(two) == 4 and "eval/loss" in two[-1]
    for a, b in zip(one, two):
        assert a.keys() == b.keys() and a.get("tokens") == b.get("tokens")
        for k in {"loss", "eval/loss"} & a.keys():
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), (k, a, b)
    prepared_folder = next(p for p in (tmp_path / "cache").iterdir())
    assert not prepared_folder.name.count(".tmp-") and (prepared_folder / "meta.json").is_file()
    assert not (prepared_folder / "shards").exists()


def test_encode_pairs_equals_encode_chat_per_side(tmp_path, monkeypatch):
    """The batched DPO encoder (both sides of many pairs per tokenizer call) == encode_chat on each
    side then truncate(), counts included; batches of 7 pairs so several batches are crossed."""
    from lion_min.formats.schemas import Preference

    monkeypatch.setattr(core_dpo, "PAIRS_PER_CALL", 7)
    tok = Tokenizer.from_dir(build_chatml_tokenizer(tmp_path / "tok"))
    rng = random.Random(3)
    convs = random_conversations(40, seed=3, reply_end=" ok")
    prefs = [Preference(prompt=c[:-1], chosen=[c[-1]], rejected=[{"role": "assistant", "content": random_text(rng)}])
             for c in convs if c[-1]["role"] == "assistant"]
    for max_len, max_prompt_len in ((96, 48), (512, 256)):
        pairs, st = core_dpo.encode_pairs(prefs, tok, "chatml", max_len, max_prompt_len, system_prompt="")
        want = []
        for p in prefs:
            sides = [core_dpo.truncate(*encode_chat(tok, [{"role": "system", "content": ""}] * (p.prompt[0]["role"] != "system")
                                               + p.prompt + r, "chatml", "last"), max_len, max_prompt_len)
                     for r in (p.chosen, p.rejected)]
            if all(any(s[1]) for s in sides):
                want.append([tuple(s[:2]) for s in sides])
        assert [[tuple(p.chosen), tuple(p.rejected)] for p in pairs] == want
        assert st.pairs == len(prefs) > 20 and st.pairs - st.dropped == len(want)
        if max_len == 96:  # the cut-off paths are exercised
            assert st.prompt_truncated > 0 and st.response_truncated > 0


def test_prepared_pairs_equal_encode_pairs(tiny_chat_model, tmp_path):
    from lion_min.stages.dpo import load_dpo_data
    from lion_min.run.config import DPOConfig
    from lion_min.core.dpo import encode_pairs

    tok = Tokenizer.from_dir(tiny_chat_model["model"])
    cfg = DPOConfig(model=str(tiny_chat_model["model"]), data=str(tiny_chat_model["prefs"]), max_len=40,
                    max_prompt_len=20, eval_fraction=0.2, system_prompt="", data_cache=str(tmp_path / "cache"))
    prep = dpo.prepare_dpo(cfg, tok, ONE, load=lambda: load_dpo_data(cfg))
    assert prep.seconds > 0
    prefs, eval_prefs, _ = load_dpo_data(cfg)
    for store, items in ((prep.train, prefs), (prep.eval, eval_prefs)):
        want, st = encode_pairs(items, tok, "chatml", 40, 20, "")
        assert len(store) == len(want) > 5 and list(store) == want
        assert store[-1] == want[-1] and store[np.int64(2)] == want[2] and store[1:4] == want[1:4]
        assert store.stats == dataclasses.asdict(st)
    assert prep.train.stats["prompt_truncated"] > 0 and prep.train.stats["response_truncated"] > 0
    with pytest.raises(IndexError):
        prep.train[len(prep.train)]
    cached = dpo.prepare_dpo(cfg, tok, ONE, load=lambda: pytest.fail("the cache was not used"))
    assert cached.seconds == 0 and list(cached.train) == list(prep.train)
    # Shards: two ranks' halves merge to the same bytes as one rank's whole.
    args = (tok, "chatml", 40, 20, "")
    dpo.encode_pair_shard(prefs, tmp_path / "one" / "0", *args)
    dpo.merge_pair_shards([tmp_path / "one" / "0"], tmp_path / "one" / "m", np.dtype(np.uint16))
    halves = [tmp_path / "two" / "0", tmp_path / "two" / "1"]
    dpo.encode_pair_shard(prefs[:13], halves[0], *args)
    dpo.encode_pair_shard(prefs[13:], halves[1], *args)
    dpo.merge_pair_shards(halves, tmp_path / "two" / "m", np.dtype(np.uint16))
    for name in ("tokens.bin", "mask.bin", "docs.npy", "split.json"):
        assert (tmp_path / "one" / "m" / name).read_bytes() == (tmp_path / "two" / "m" / name).read_bytes() == \
               (prep.train.folder / name).read_bytes(), name


def test_dpo_stage_metrics_equal_with_and_without_the_cache(tiny_chat_model, tmp_path):
    sys.path.insert(0, str(ROOT))
    import train_dpo

    def args(out, cache):
        a = dict(model=tiny_chat_model["model"], data=tiny_chat_model["prefs"], out_dir=out, max_len=64,
                 max_prompt_len=32, batch_size=4, micro_batch_size=2, max_steps=3, lr=1e-3, warmup_ratio=0.0,
                 lr_schedule="constant", seed=0, device="cpu", eval_fraction=0.2, data_cache=cache)
        return [f"--{k}={v}" for k, v in a.items()]

    train_dpo.main(args(tmp_path / "off", "off"))
    train_dpo.main(args(tmp_path / "cold", tmp_path / "cache"))
    train_dpo.main(args(tmp_path / "warm", tmp_path / "cache"))
    ref = metrics(tmp_path / "off")
    assert len(ref) == 4 and "eval/loss" in ref[-1]
    drop = ("step_time_s", "tokens_per_s", "memory_gib")
    for run in ("cold", "warm"):
        got = metrics(tmp_path / run)
        assert [{k: v for k, v in m.items() if k not in drop} for m in got] == \
               [{k: v for k, v in m.items() if k not in drop} for m in ref], run
    assert json.loads((tmp_path / "warm" / "summary.json").read_text())["pairs"] == \
           json.loads((tmp_path / "off" / "summary.json").read_text())["pairs"] > 0


def test_a_cache_folder_other_ranks_cannot_see_fails_at_once(chat_setup, tmp_path, monkeypatch):
    """Rank 1 of 2 whose --data_cache is not rank 0's (here: rank 0 never writes to it) stops with
    one clear error as soon as the temporary folder fails to appear, instead of waiting forever."""
    import torch.distributed as dist

    monkeypatch.setattr(dist, "broadcast_object_list", lambda objects, src=0: None)  # rank 0 is elsewhere
    monkeypatch.setattr(dist, "all_gather_object", lambda seen, mine: seen.__setitem__(slice(None), [mine] * 2))  # agreeing
    monkeypatch.setattr(prepare, "VISIBLE_WITHIN_S", 0.5)
    monkeypatch.setenv("RAYON_NUM_THREADS", "1")
    rank1 = Dist(rank=1, world=2, local_rank=1, device="cpu")
    cfg = config(chat_setup, tmp_path / "not_shared")
    with pytest.raises(prepare.DataCacheError, match="not visible to this rank.*every rank shares"):
        prepared(cfg, chat_setup["tok"], rank1)
