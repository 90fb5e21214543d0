"""lion_min.formats.data: schemas, validation messages, mixtures, Parquet and hub resolution (no network)."""

import fnmatch
import json
import re
import shutil
import sys
from pathlib import Path

import pytest

from lion_min.formats.data import Source, load_conversations, load_preferences, parse_mixture, train_eval_split
from lion_min.formats.data_files import DataError
from lion_min.formats.schemas import Preference
from lion_min.formats.data_files import resolve_files


def write_jsonl(path: Path, records: list) -> Path:
    """Dicts are written as JSON; strings are written as raw lines (for malformed records)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def chat(*turns: str) -> list[dict]:
    """chat("u:hi", "a:hello") -> messages."""
    roles = {"s": "system", "u": "user", "a": "assistant"}
    return [{"role": roles[t[0]], "content": t[2:]} for t in turns]


def numbered(n: int, start: int = 0) -> list[dict]:
    return [{"messages": chat(f"u:q{i}", f"a:r{i}")} for i in range(start, start + n)]


def ids(convs) -> list[str]:
    return [c[0]["content"] for c in convs]


# --- SFT schemas ---------------------------------------------------------------------------------


def test_messages_schema_keeps_role_and_content_only(tmp_path):
    f = write_jsonl(tmp_path / "ultrachat.jsonl", [
        {"prompt_id": "x", "messages": [{"role": "system", "content": ""}, {"role": "user", "content": "hi"},
                                        {"role": "assistant", "content": "hello", "name": "bot"}]},
        {"messages": chat("u:a", "a:b", "u:c", "a:d")},
    ])
    convs, stats = load_conversations(str(f))
    assert convs == [chat("s:", "u:hi", "a:hello"), chat("u:a", "a:b", "u:c", "a:d")]
    assert (stats.read, stats.skipped, stats.kept) == (2, 0, 2)
    assert stats.sources[0].files == [str(f)]


def test_sharegpt_role_mapping(tmp_path):
    f = write_jsonl(tmp_path / "slimorca.jsonl", [
        {"conversations": [{"from": "system", "value": "be brief"}, {"from": "human", "value": "2+2?"},
                           {"from": "gpt", "value": "4", "weight": None}]},
        {"conversations": [{"from": "user", "value": "hi"}, {"from": "assistant", "value": "hey"}]},
    ])
    convs, _ = load_conversations(f)
    assert convs == [chat("s:be brief", "u:2+2?", "a:4"), chat("u:hi", "a:hey")]


def test_prompt_response_column_mapping_metamathqa(tmp_path):
    f = write_jsonl(tmp_path / "metamath.jsonl", [
        {"query": "What is 3*4?", "response": "12", "type": "GSM_Rephrased", "original_question": "..."},
    ])
    convs, _ = load_conversations(f, columns={"prompt": "query", "response": "response"})
    assert convs == [chat("u:What is 3*4?", "a:12")]


def test_prompt_response_detected_and_system_column(tmp_path):
    f = write_jsonl(tmp_path / "pr.jsonl", [{"prompt": "p", "response": "r", "sys": "S", "system": "ignored"}])
    assert load_conversations(f)[0] == [chat("u:p", "a:r")]  # a system key is read only when mapped
    assert load_conversations(f, columns={"system": "sys"})[0] == [chat("s:S", "u:p", "a:r")]


def test_schema_can_be_forced(tmp_path):
    f = write_jsonl(tmp_path / "both.jsonl", [
        {"messages": chat("u:from messages", "a:x"), "conversations": [{"from": "human", "value": "from sharegpt"},
                                                                       {"from": "gpt", "value": "y"}]},
    ])
    assert ids(load_conversations(f)[0]) == ["from messages"]  # detection prefers `messages`
    assert ids(load_conversations(f, schema="sharegpt")[0]) == ["from sharegpt"]


def test_undetectable_schema_and_bad_options(tmp_path):
    f = write_jsonl(tmp_path / "odd.jsonl", [{"\n": 1}, {"text": "hello"}])
    with pytest.raises(DataError, match=r"odd.jsonl: line 1: cannot tell the schema from the keys \['\\n'\]"):
        load_conversations(f)
    with pytest.raises(DataError, match="unknown schema 'hh_rlhf'; expected one of messages, sharegpt"):
        load_conversations(f, schema="hh_rlhf")
    with pytest.raises(DataError, match=r"columns \['promt'\] are not fields"):
        load_conversations(f, columns={"promt": "q"})


# --- preference schemas --------------------------------------------------------------------------


def test_text_pairs(tmp_path):
    f = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "P", "chosen": "good", "rejected": "bad"},
                                               {"question": "Q", "a": "A", "b": "B", "sys": "S"}])
    prefs, stats = load_preferences(f, skip_bad=True)  # the second line lacks `prompt`
    assert prefs == [Preference(chat("u:P"), chat("a:good"), chat("a:bad"))]
    assert stats.skipped == 1 and "pairs.jsonl: line 2: 'prompt': missing" in stats.sources[0].errors[0]
    mapped = write_jsonl(tmp_path / "mapped.jsonl", [{"question": "Q", "a": "A", "b": "B", "sys": "S"}])
    prefs, _ = load_preferences(mapped, columns={"prompt": "question", "chosen": "a", "rejected": "b",
                                                 "system": "sys"})
    assert prefs == [Preference(chat("s:S", "u:Q"), chat("a:A"), chat("a:B"))]


def test_ultrafeedback_prefix_is_split_off(tmp_path):
    f = write_jsonl(tmp_path / "uf.jsonl", [
        {"prompt": "hi", "chosen": chat("u:hi", "a:good"), "rejected": chat("u:hi", "a:bad"), "score_chosen": 8.0},
        {"prompt": "ignored", "chosen": chat("s:sys", "u:a", "a:b", "u:c", "a:good"),
         "rejected": chat("s:sys", "u:a", "a:b", "u:c", "a:bad")},
        {"chosen": chat("u:same", "a:same"), "rejected": chat("u:same", "a:same")},  # identical: kept as is
    ])
    prefs, stats = load_preferences(f)
    assert prefs == [
        Preference(chat("u:hi"), chat("a:good"), chat("a:bad")),
        Preference(chat("s:sys", "u:a", "a:b", "u:c"), chat("a:good"), chat("a:bad")),
        Preference(chat("u:same"), chat("a:same"), chat("a:same")),
    ]
    assert stats.kept == 3


@pytest.mark.parametrize("chosen, rejected, expected", [
    (chat("u:hi", "a:x"), chat("u:hello", "a:y"),
     r"line 1: 'chosen/rejected': chosen and rejected do not share the prompt \(they differ at prompt turn 1"),
    (chat("u:hi", "a:x", "u:more", "a:z"), chat("u:hi", "a:y"),
     r"line 1: 'chosen/rejected': chosen and rejected do not share the prompt \(they differ at prompt turn 2"),
    (chat("u:hi", "a:x", "u:more"), chat("u:hi", "a:y"),
     r"line 1: 'chosen\[2\].content': the last turn is a user turn, expected the assistant's response"),
    (chat("u:hi", "a:x"), chat("u:hi", "a:  "), r"line 1: 'rejected\[1\].content': empty assistant turn"),
    (chat("a:x"), chat("a:y"), r"line 1: 'chosen': no user turn before the response"),
    (chat("s:sys", "a:x"), chat("s:sys", "a:y"), r"line 1: 'chosen': no user turn before the response"),
    ([], chat("u:hi", "a:y"), r"line 1: 'chosen': empty conversation"),
])
def test_message_pairs_errors(tmp_path, chosen, rejected, expected):
    f = write_jsonl(tmp_path / "uf.jsonl", [{"chosen": chosen, "rejected": rejected}])
    with pytest.raises(DataError, match=rf"uf.jsonl: {expected}"):
        load_preferences(f)


HH_PROMPT = "\n\nHuman: What is a cat?\n\nAssistant: An animal.\n\nHuman: Is it nice?"


def test_hh_rlhf_multi_turn(tmp_path):
    f = write_jsonl(tmp_path / "hh.jsonl", [
        {"chosen": HH_PROMPT + "\n\nAssistant: Usually, yes.", "rejected": HH_PROMPT + "\n\nAssistant: No."},
        {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"},
    ])
    prefs, _ = load_preferences(f)
    assert prefs == [
        Preference(chat("u:What is a cat?", "a:An animal.", "u:Is it nice?"), chat("a:Usually, yes."), chat("a:No.")),
        Preference(chat("u:hi"), chat("a:hello"), chat("a:go away")),
    ]


@pytest.mark.parametrize("chosen, rejected, expected", [
    (HH_PROMPT + "\n\nAssistant: yes", "\n\nHuman: other\n\nAssistant: no",
     r"'chosen/rejected': chosen and rejected do not share the prompt"),
    (HH_PROMPT, HH_PROMPT + "\n\nAssistant: no", r"'chosen turn 3': the last turn is a user turn"),
    (HH_PROMPT + "\n\nAssistant: yes", HH_PROMPT + "\n\nAssistant: ", r"'rejected turn 4': empty assistant turn"),
    ("Human: hi\n\nAssistant: yes", "\n\nHuman: hi\n\nAssistant: no",
     r"'chosen': expected text starting with '\\n\\nHuman:'"),
])
def test_hh_rlhf_errors(tmp_path, chosen, rejected, expected):
    f = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": chosen, "rejected": rejected}])
    with pytest.raises(DataError, match=rf"hh.jsonl: line 1: {expected}"):
        load_preferences(f)


# --- bad records ---------------------------------------------------------------------------------

GOOD = {"messages": chat("u:q", "a:r")}


@pytest.mark.parametrize("bad, expected, reason", [
    ('{"messages": [', r"line 3: malformed JSON: Expecting value", "malformed JSON"),
    ("[1, 2]", r"line 3: expected a JSON object, got list", "wrong type"),
    ({"messages": "hi"}, r"line 3: 'messages': expected list, got str", "wrong type"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "r"}]},
     r"line 3: 'messages\[0\].content': missing \(keys present: role\)", "missing key"),
    ({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "r"}]},
     r"line 3: 'messages\[0\].content': expected str, got int", "wrong type"),
    ({"messages": chat("u:q", "a:")}, r"line 3: 'messages\[1\].content': empty assistant turn", "empty assistant turn"),
    ({"messages": [{"role": "bot", "content": "q"}]},
     r"line 3: 'messages\[0\].role': unknown role 'bot' \(expected system, user or assistant\)", "unknown role"),
    ({"messages": chat("u:q", "u:again")}, r"line 3: 'messages': no assistant turn", "no assistant turn"),
    ({"messages": chat("u:q", "s:late", "a:r")},
     r"line 3: 'messages\[1\].content': a system message may only be the first message", "misplaced system message"),
    ({"text": "x"}, r"line 3: 'messages': missing \(keys present: text\)", "missing key"),
])
def test_bad_record_error_names_file_line_and_key(tmp_path, bad, expected, reason):
    f = write_jsonl(tmp_path / "sft.jsonl", [GOOD, "", bad, GOOD])  # the blank line 2 still counts as a line
    with pytest.raises(DataError, match=rf"^{re.escape(str(f))}: {expected}") as e:
        load_conversations(f)
    assert (e.value.path, e.value.location, e.value.reason) == (str(f), "line 3", reason)
    convs, stats = load_conversations(f, skip_bad=True)
    assert convs == [GOOD["messages"]] * 2
    assert (stats.read, stats.skipped, stats.kept, dict(stats.reasons)) == (3, 1, 2, {reason: 1})


def test_sharegpt_bad_records(tmp_path):
    f = write_jsonl(tmp_path / "sg.jsonl", [
        {"conversations": [{"from": "human", "value": "q"}, {"from": "bard", "value": "r"}]},
        {"conversations": [{"from": "human"}, {"from": "gpt", "value": "r"}]},
    ])
    with pytest.raises(DataError, match=r"sg.jsonl: line 1: 'conversations\[1\].from': unknown role 'bard'"):
        load_conversations(f)
    with pytest.raises(DataError, match=r"all 2 records are bad; first: .*sg.jsonl: line 1"):
        load_conversations(f, skip_bad=True)  # a source with nothing valid is an error even when skipping


def test_skip_bad_counts_every_reason_and_summary(tmp_path):
    f = write_jsonl(tmp_path / "mixed.jsonl", [
        GOOD, "{oops", {"messages": chat("u:q", "a:")}, {"messages": chat("u:q", "a:")}, GOOD,
        {"messages": [{"role": "tool", "content": "x"}]}, {"nothing": 1},
    ])
    convs, stats = load_conversations(f, skip_bad=True)
    assert len(convs) == 2
    assert (stats.read, stats.skipped, stats.kept) == (7, 5, 2)
    assert dict(stats.reasons) == {"malformed JSON": 1, "empty assistant turn": 2, "unknown role": 1,
                                   "missing key": 1}
    summary = stats.summary()
    assert "7 records read, 5 skipped, 2 kept" in summary
    assert "empty assistant turn: 2" in summary
    assert f"skipped {f}: line 2: malformed JSON" in summary


def test_missing_paths_and_empty_sources(tmp_path):
    with pytest.raises(DataError, match=rf"{re.escape(str(tmp_path))}/nope.jsonl: no such file or folder"):
        load_conversations(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match=r"no files match this glob"):
        load_conversations(str(tmp_path / "*.jsonl"))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match=r"empty_dir: folder holds no .parquet, .jsonl, .json files"):
        load_conversations(str(tmp_path / "empty_dir"))
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match=r"blank.jsonl: no records in"):
        load_conversations(str(tmp_path / "blank.jsonl"))
    (tmp_path / "notes.txt").write_text("{}")
    with pytest.raises(DataError, match=r"notes.txt: unsupported file type"):
        load_conversations(str(tmp_path / "notes.txt"))
    with pytest.raises(DataError, match=r"data/train.jsonl: no such file or folder"):
        load_conversations("data/train.jsonl")  # a missing relative file is never tried on the hub


def test_globs_folders_and_json_files(tmp_path):
    write_jsonl(tmp_path / "d" / "b.jsonl", numbered(2, 10))
    write_jsonl(tmp_path / "d" / "a.jsonl", numbered(2, 0))
    (tmp_path / "d" / "sub").mkdir()
    (tmp_path / "d" / "sub" / "c.json").write_text(json.dumps(numbered(2, 20), indent=2))  # a JSON array
    write_jsonl(tmp_path / "d" / "lines.json", numbered(1, 30))  # JSON lines named .json
    assert ids(load_conversations(str(tmp_path / "d" / "*.jsonl"))[0]) == ["q0", "q1", "q10", "q11"]
    convs, stats = load_conversations(str(tmp_path / "d"))
    assert ids(convs) == ["q0", "q1", "q10", "q11", "q30", "q20", "q21"]
    assert len(stats.sources[0].files) == 4
    assert ids(load_conversations(str(tmp_path / "d" / "**" / "*.json"))[0]) == ["q30", "q20", "q21"]
    (tmp_path / "arr.json").write_text(json.dumps([GOOD, {"messages": []}]))
    with pytest.raises(DataError, match=r"arr.json: item 2: 'messages': no assistant turn"):
        load_conversations(str(tmp_path / "arr.json"))



def test_json_array_and_json_lines_with_a_utf8_bom(tmp_path):
    # Windows editors (Notepad, PowerShell's Out-File utf8) start a file with a BOM.
    (tmp_path / "arr.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(numbered(2, 0), indent=2).encode())
    (tmp_path / "lines.jsonl").write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in numbered(2, 5)).encode())
    assert ids(load_conversations(str(tmp_path / "arr.json"))[0]) == ["q0", "q1"]
    assert ids(load_conversations(str(tmp_path / "lines.jsonl"))[0]) == ["q5", "q6"]


# --- Parquet -------------------------------------------------------------------------------------


def test_parquet_nested_messages_and_row_numbers(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = numbered(3) + [{"messages": chat("u:q", "a:")}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train-00000.parquet", row_group_size=2)
    convs, stats = load_conversations(str(tmp_path / "train-00000.parquet"), skip_bad=True)
    assert ids(convs) == ["q0", "q1", "q2"] and stats.skipped == 1
    with pytest.raises(DataError, match=r"train-00000.parquet: row 4: 'messages\[1\].content': empty assistant turn"):
        load_conversations(str(tmp_path / "train-00000.parquet"))
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"broken.parquet: not a readable Parquet file"):
        load_conversations(str(tmp_path / "broken.parquet"))
    prefs = [{"prompt": "P", "chosen": chat("u:P", "a:c"), "rejected": chat("u:P", "a:r")}]
    pq.write_table(pa.Table.from_pylist(prefs), tmp_path / "uf.parquet")
    assert load_preferences(str(tmp_path / "uf.parquet"))[0] == [Preference(chat("u:P"), chat("a:c"), chat("a:r"))]


def test_parquet_without_pyarrow_names_the_package(tmp_path, monkeypatch):
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # `import pyarrow...` now raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match=r"x.parquet: reading Parquet files needs pyarrow.*pip install pyarrow"):
        load_conversations(str(tmp_path / "x.parquet"), skip_bad=True)


# --- mixtures ------------------------------------------------------------------------------------


@pytest.fixture
def two_files(tmp_path):
    return (str(write_jsonl(tmp_path / "a.jsonl", numbered(10, 0))),
            str(write_jsonl(tmp_path / "b.jsonl", numbered(30, 100))))


def test_parse_mixture_grammar():
    assert parse_mixture("a.jsonl:0.5, b.jsonl,org/name:train:weight=2,c/*.parquet:fraction=1.5") == [
        Source("a.jsonl", fraction=0.5), Source("b.jsonl"), Source("org/name:train", weight=2.0),
        Source("c/*.parquet", fraction=1.5)]
    assert parse_mixture('[{"path": "m.jsonl", "weight": 1, "columns": {"prompt": "query"}}]') == [
        Source("m.jsonl", weight=1, columns={"prompt": "query"})]
    assert parse_mixture(Path("x.jsonl")) == [Source("x.jsonl")]
    assert parse_mixture("a.jsonl:-1") == [Source("a.jsonl:-1")]  # not a fraction: part of the path
    for bad, expected in [
        ([{"path": "a", "fraction": 0.5, "weight": 1}], "a fraction or a weight, not both"),
        ([{"path": "a", "fration": 0.5}], r"unknown: \['fration'\]"),
        ([{"fraction": 0.5}], "needs 'path'"),
        ([{"path": "a", "weight": 0}], "weight must be a positive number"),
        ([{"path": "a", "fraction": "0.5"}], "fraction must be a positive number"),
        ("a.jsonl:weight=x", "weight must be a number"),
        ([], "non-empty list"),
    ]:
        with pytest.raises(DataError, match=expected):
            parse_mixture(bad)


def test_fractions_subsample_and_repeat(two_files):
    a, b = two_files
    convs, stats = load_conversations(f"{a}:0.5,{b}:2.5", seed=1)
    assert [s.kept for s in stats.sources] == [5, 75] and len(convs) == 80
    a_part, b_part = ids(convs[:5]), ids(convs[5:])
    assert len(set(a_part)) == 5 and set(a_part) <= {f"q{i}" for i in range(10)}
    assert a_part == sorted(a_part, key=lambda s: int(s[1:]))  # file order kept
    assert b_part[:60] == [f"q{i}" for i in range(100, 130)] * 2  # two whole copies, then 15 distinct
    assert len(set(b_part[60:])) == 15 and set(b_part[60:]) <= set(b_part[:30])
    assert (stats.read, stats.kept) == (40, 80)
    assert len(load_conversations(f"{a}:0.25")[0]) == 3  # 2.5 rounds half up


def test_weights_share_the_group_size(two_files):
    a, b = two_files
    _, stats = load_conversations([{"path": a, "weight": 1}, {"path": b, "weight": 1}])
    assert [s.kept for s in stats.sources] == [20, 20]  # equal weights -> equal shares of 10 + 30
    _, stats = load_conversations([{"path": a, "weight": 1.0}, {"path": b, "weight": 2.0}])
    assert [s.kept for s in stats.sources] == [13, 27]  # 40 / 3 = 13.33, 26.67: largest remainder
    _, stats = load_conversations(f"{a}:0.5,{b}:weight=2")  # a fraction stands alone; b is the whole group
    assert [s.kept for s in stats.sources] == [5, 30]


def test_mixture_is_deterministic_given_the_seed(two_files):
    a, b = two_files
    spec = [{"path": a, "fraction": 0.3}, {"path": b, "weight": 1}, {"path": a, "weight": 3}]
    first, _ = load_conversations(spec, seed=7)
    assert first == load_conversations(spec, seed=7)[0]
    assert first != load_conversations(spec, seed=8)[0]
    assert len(first) == 3 + 10 + 30


def test_mixture_entries_keep_their_own_schema_and_columns(tmp_path):
    uc = write_jsonl(tmp_path / "uc.jsonl", [{"messages": chat("u:uc", "a:x")}])
    mm = write_jsonl(tmp_path / "mm.jsonl", [{"query": "mm", "response": "y"}])
    sg = write_jsonl(tmp_path / "sg.jsonl", [{"conversations": [{"from": "human", "value": "sg"},
                                                                {"from": "gpt", "value": "z"}]}])
    convs, stats = load_conversations([str(uc), {"path": str(mm), "columns": {"prompt": "query"}}, str(sg)])
    assert convs == [chat("u:uc", "a:x"), chat("u:mm", "a:y"), chat("u:sg", "a:z")]
    assert len(stats.sources) == 3


def test_train_eval_split():
    items = list(range(100))
    train, ev = train_eval_split(items, 0.1, seed=3)
    assert len(ev) == 10 and len(train) == 90 and sorted(train + ev) == items
    assert train == sorted(train) and ev == sorted(ev)
    assert (train, ev) == train_eval_split(items, 0.1, seed=3)
    assert ev != train_eval_split(items, 0.1, seed=4)[1]
    assert train_eval_split(items[:5], 0.01)[1] != []  # at least one eval item
    assert train_eval_split(items, 0.0) == (items, [])
    with pytest.raises(ValueError, match="leaves nothing to train on"):
        train_eval_split([1], 0.5)


# --- hub -----------------------------------------------------------------------------------------


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """A fake huggingface_hub: repo org/ds with splits as files; every call is recorded."""
    import huggingface_hub

    repo = tmp_path / "repo"
    write_jsonl(repo / "data" / "train-00000-of-00001.jsonl", numbered(2, 0))
    write_jsonl(repo / "data" / "train_prefs-00000-of-00001.jsonl",
                [{"chosen": chat("u:p", "a:c"), "rejected": chat("u:p", "a:r")}])
    write_jsonl(repo / "data" / "test-00000-of-00001.jsonl", numbered(1, 50))
    (repo / "dataset_infos.json").write_text("{}")
    (repo / "README.md").write_text("card")
    calls = []

    def snapshot_download(repo_id, *, repo_type=None, revision=None, allow_patterns=None, **kw):
        calls.append(("snapshot", repo_id, repo_type, revision, allow_patterns))
        out = tmp_path / f"snapshot{len(calls)}"  # only what allow_patterns lets through, as the real one
        for f in repo.rglob("*"):
            rel = f.relative_to(repo).as_posix()
            if f.is_file() and any(fnmatch.fnmatch(rel, p) for p in allow_patterns):
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(f, out / rel)
        return str(out)

    def hf_hub_download(repo_id, filename, *, repo_type=None, revision=None, **kw):
        calls.append(("file", repo_id, repo_type, revision, filename))
        return str(repo / filename)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    return calls


def test_hub_split_selects_whole_word_files_and_passes_revision(fake_hub):
    convs, stats = load_conversations("org/ds:train", revision="abc123")
    assert ids(convs) == ["q0", "q1"]  # train_prefs is not the train split
    assert [Path(f).name for f in stats.sources[0].files] == ["train-00000-of-00001.jsonl"]
    kind, repo_id, repo_type, revision, _ = fake_hub[-1]
    assert (kind, repo_id, repo_type, revision) == ("snapshot", "org/ds", "dataset", "abc123")

    prefs, _ = load_preferences("hf://datasets/org/ds@v1.0:train_prefs")
    assert prefs == [Preference(chat("u:p"), chat("a:c"), chat("a:r"))]
    assert fake_hub[-1][3] == "v1.0"
    load_conversations("org/ds@refs%2Fconvert%2Fparquet:test")
    assert fake_hub[-1][3] == "refs/convert/parquet"
    with pytest.raises(DataError, match=r"org/ds@v1:test: revision 'v1' in the spec and 'v2' given; pick one"):
        load_conversations("org/ds@v1:test", revision="v2")


def test_hub_patterns_and_single_files(fake_hub):
    convs, _ = load_conversations("org/ds/data/test-*.jsonl")
    assert ids(convs) == ["q50"] and fake_hub[-1][4] == ["data/test-*.jsonl"]
    convs, _ = load_conversations("org/ds/data/test-00000-of-00001.jsonl", revision="r9")
    assert ids(convs) == ["q50"]
    assert fake_hub[-1] == ("file", "org/ds", "dataset", "r9", "data/test-00000-of-00001.jsonl")
    # A mixture of hub sources, each with its own split.
    convs, stats = load_conversations("org/ds:train:0.5,org/ds:test")
    assert len(convs) == 2 and [s.kept for s in stats.sources] == [1, 1]


def test_hub_without_pattern_reads_one_file_type(fake_hub):
    files = resolve_files("org/ds")  # jsonl beats json, so dataset_infos.json is not data
    assert sorted(f.name for f in files) == ["test-00000-of-00001.jsonl", "train-00000-of-00001.jsonl",
                                            "train_prefs-00000-of-00001.jsonl"]
    with pytest.raises(DataError, match=r"org/ds:validation: hub dataset org/ds: no data files match split "
                                        r"'validation'; data files found: (none|.*)"):
        resolve_files("org/ds:validation")


def test_hub_failure_is_a_data_error(monkeypatch):
    import huggingface_hub

    def fail(*a, **k):
        raise OSError("gated repo")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    with pytest.raises(DataError, match=r"^org/private:train: hub dataset org/private: could not get it from the "
                                        r"Hugging Face hub \(OSError: gated repo\); to work offline, set "
                                        r"HF_HUB_OFFLINE=1 with a cached copy, or give a local path instead$"):
        load_conversations("org/private:train")


def test_a_missing_local_looking_source_is_never_looked_up_on_the_hub(fake_hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mydata").mkdir()
    for spec in ["mydata/train", "mydata/train:sft", "./org/ds", "../org/ds", "~/org/ds", str(tmp_path / "x")]:
        with pytest.raises(DataError, match=rf"^{re.escape(spec)}: no such file or folder$"):
            resolve_files(spec)
    write_jsonl(tmp_path / "mydata" / "train.jsonl", numbered(1))
    with pytest.raises(DataError, match=r"^mydata/trian.jsonl: no such file or folder \(did you mean "
                                        r"mydata/train.jsonl\?\)$"):
        resolve_files("mydata/trian.jsonl")
    assert fake_hub == []
    resolve_files("org/ds:train")  # no ./org folder: a hub dataset
    assert fake_hub[-1][:2] == ("snapshot", "org/ds")
    (tmp_path / "org").mkdir()  # now org/ds reads as a local path; hf:// still means the hub
    with pytest.raises(DataError, match=r"^org/ds: no such file or folder$"):
        resolve_files("org/ds")
    resolve_files("hf://org/ds:train")
    assert fake_hub[-1][:2] == ("snapshot", "org/ds") and len(fake_hub) == 2


def _cached_dataset(cache: Path, repo_id: str, files: dict[str, list]) -> None:
    """Lay out a dataset in the huggingface_hub cache format, as a past download would leave it."""
    commit = "a" * 40
    root = cache / ("datasets--" + repo_id.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    for name, records in files.items():
        write_jsonl(root / "snapshots" / commit / name, records)


def test_hf_hub_offline_uses_the_cache_or_says_so(tmp_path, monkeypatch):
    from huggingface_hub import constants

    # huggingface_hub reads these variables at import, so the constants are patched as well.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    _cached_dataset(tmp_path / "cache", "org/cached", {"data/train.jsonl": numbered(2), "data/test.jsonl": numbered(1)})
    assert ids(load_conversations("org/cached:train")[0]) == ["q0", "q1"]
    assert ids(load_conversations("org/cached/data/test.jsonl")[0]) == ["q0"]
    with pytest.raises(DataError, match=r"^org/missing: hub dataset org/missing: could not get it from the Hugging "
                                        r"Face hub \(HF_HUB_OFFLINE is set and there is no cached copy\); download it "
                                        r"once with network access, or give a local path instead$"):
        load_conversations("org/missing")
