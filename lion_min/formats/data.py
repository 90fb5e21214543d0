"""Training data sources: files, globs, folders, hub datasets and mixtures -> records, which
lion_min/formats/schemas.py turns into conversations and preference pairs.

No tokenization here; lion_min.core.chat turns messages into ids.

Sources
-------
A source names where records come from: a local file, a glob, a folder or a hub dataset
(lion_min/formats/data_files.py lists the forms and how each is found; `resolve_files` there).

File formats: JSONL, one JSON object per line (blank lines ignored); .json, either a JSON array of
objects or JSON lines; Parquet (needs the optional pyarrow package).

Schemas (record -> conversation or preference pair): see lion_min/formats/schemas.py.

Mixtures
--------
`source` may be one source or a mixture: a list whose entries are source strings or dicts
`{"path": ..., "fraction" | "weight": ..., "schema": ..., "columns": {...}, "revision": ...}`,
or the same as a JSON string (starting with `[`), or a compact string of comma-separated entries
`SOURCE[:FRACTION]` or `SOURCE:weight=W`, e.g.

    "a.jsonl:0.5,b.jsonl,org/name:train:weight=2"

    [{"path": "teknium/OpenHermes-2.5"},
     {"path": "meta-math/MetaMathQA", "columns": {"prompt": "query"}, "fraction": 0.5},
     {"path": "HuggingFaceH4/ultrachat_200k:train_sft", "revision": "<commit>"}]

- fraction f (default 1 when neither is given): take k = round(f * n) (half up) of the source's n
  valid records: a random subset without replacement when k < n; when k > n every record
  floor(k / n) times plus a random subset of k mod n. Independent of the other sources.
- weight w: the sources with a weight form one group whose size is the sum of their valid record
  counts (so the group is as big as concatenating them); that size is divided among them in
  proportion to their weights (largest remainder rounding, so the counts sum exactly), each then
  taken like a fraction. Equal weights give equal counts whatever the source sizes.

Sampling is deterministic given `seed` (each source draws from its own generator seeded with the
seed, its index and its spec). The result is the sources' records concatenated in mixture order,
each source's records in file order; it is not shuffled (the training loader shuffles). Repeated
records are the same objects: treat the results as read-only.

Bad records
-----------
A bad record raises one DataError naming the file, the 1-based line (JSONL), item (JSON array) or
row (Parquet), and the key, e.g. `a.jsonl: line 3: 'messages[1].role': unknown role 'bot' ...`.
With skip_bad=True it is skipped and counted by reason in the returned LoadStats instead; a
source whose records are all bad is still an error. Problems that are not about one record (no
such file, an empty file, a schema that cannot be detected, a malformed JSON array or Parquet file,
pyarrow missing (an ImportError), hub failures) always raise.
"""

import json
import math
import random
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from lion_min.formats.data_files import DataError, names_hub, resolve_files
from lion_min.formats.schemas import (
    PARSERS,
    PREFERENCE_SCHEMAS,
    SCHEMA_FIELDS,
    SFT_SCHEMAS,
    BadRecord,
    Columns,
    Conversation,
    Preference,
    detect,
)

_ERRORS_KEPT = 5  # skipped-record messages kept per source for the run summary


@dataclass
class Source:
    """One entry of a mixture; see the module docstring for the grammar and the mixing rules."""

    path: str
    fraction: Optional[float] = None
    weight: Optional[float] = None
    schema: Optional[str] = None
    columns: Optional[dict[str, str]] = None
    revision: Optional[str] = None


@dataclass
class SourceStats:
    source: str
    files: list[str] = field(default_factory=list)
    read: int = 0  # records read (blank lines are not records)
    skipped: int = 0  # bad records skipped (skip_bad=True)
    kept: int = 0  # records in the result, after the mixture's subsampling or repetition
    reasons: Counter = field(default_factory=Counter)  # reason -> skipped count
    errors: list[str] = field(default_factory=list)  # the first few skipped-record messages

    @property
    def valid(self) -> int:
        return self.read - self.skipped


@dataclass
class LoadStats:
    sources: list[SourceStats] = field(default_factory=list)

    @property
    def read(self) -> int:
        return sum(s.read for s in self.sources)

    @property
    def skipped(self) -> int:
        return sum(s.skipped for s in self.sources)

    @property
    def kept(self) -> int:
        return sum(s.kept for s in self.sources)

    @property
    def reasons(self) -> Counter:
        return sum((s.reasons for s in self.sources), Counter())

    def summary(self) -> str:
        lines = [f"data: {len(self.sources)} source(s), {self.read} records read, {self.skipped} skipped, "
                 f"{self.kept} kept"]
        for s in self.sources:
            line = f"  {s.source}: {len(s.files)} file(s), read {s.read}, skipped {s.skipped}, kept {s.kept}"
            if s.reasons:
                line += " (" + ", ".join(f"{r}: {n}" for r, n in s.reasons.most_common()) + ")"
            lines.append(line)
            lines += [f"    skipped {e}" for e in s.errors]
        return "\n".join(lines)


# --- public API ----------------------------------------------------------------------------------


def load_conversations(source: Any, *, schema: Optional[str] = None, columns: Optional[dict[str, str]] = None,
                       skip_bad: bool = False, seed: int = 0,
                       revision: Optional[str] = None) -> tuple[list[Conversation], LoadStats]:
    """SFT conversations from a source or a mixture. schema, columns and revision apply to the
    sources that do not set their own."""
    return _load(source, SFT_SCHEMAS, schema, columns, skip_bad, seed, revision)


def load_preferences(source: Any, *, schema: Optional[str] = None, columns: Optional[dict[str, str]] = None,
                     skip_bad: bool = False, seed: int = 0,
                     revision: Optional[str] = None) -> tuple[list[Preference], LoadStats]:
    """Preference pairs from a source or a mixture; arguments as for load_conversations."""
    return _load(source, PREFERENCE_SCHEMAS, schema, columns, skip_bad, seed, revision)


def check_sources(source: Any, *, preferences: bool, schema: Optional[str] = None,
                  columns: Optional[dict[str, str]] = None, skip_bad: bool = False) -> None:
    """Before anything heavy loads (lion_min/stages/preflight.py): the mixture spec parses, each local source
    exists and its first good record parses. A hub dataset is left to loading, which downloads it."""
    schemas = PREFERENCE_SCHEMAS if preferences else SFT_SCHEMAS
    for src in parse_mixture(source):
        if not names_hub(src.path):
            _read_source(src, schemas, schema, columns, None, skip_bad, SourceStats(source=src.path), head=1)


def parse_mixture(spec: Any) -> list[Source]:
    """A source or mixture spec (string, compact string, JSON string, dict, Source, Path or a list
    of these) -> a list of Source."""
    if isinstance(spec, (Source, dict, Path)):
        spec = [spec]
    elif isinstance(spec, str):
        text = spec.strip()
        if text.startswith(("[", "{")):
            try:
                spec = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"mixture spec: malformed JSON: {e}") from None
            spec = [spec] if isinstance(spec, dict) else spec
        elif Path(_parse_compact_entry(text).path).expanduser().exists():
            spec = [text]  # an existing path with a comma in its name is that file, not a mixture
        else:
            spec = [e.strip() for e in text.split(",")]
            for a, b in zip(spec, spec[1:]):
                if Path(_parse_compact_entry(f"{a},{b}").path).expanduser().exists():
                    raise DataError(f"mixture spec {text!r}: {a},{b} has a comma in its name, which separates the "
                                    f"sources; give the mixture as JSON: '[{{\"path\": \"{a},{b}\"}}, ...]'")
    if not isinstance(spec, (list, tuple)) or not spec:
        raise DataError(f"mixture spec: expected a source or a non-empty list of sources, got {spec!r}")
    sources = []
    for entry in spec:
        if isinstance(entry, Source):
            src = replace(entry)  # a copy: _check_source normalises it
        elif isinstance(entry, Path):
            src = Source(str(entry))
        elif isinstance(entry, str):
            src = _parse_compact_entry(entry)
        elif isinstance(entry, dict):
            unknown = set(entry) - {"path", "fraction", "weight", "schema", "columns", "revision"}
            if unknown or "path" not in entry:
                raise DataError(f"mixture entry {entry!r}: needs 'path'; allowed keys are path, fraction, weight, "
                                f"schema, columns, revision" + (f" (unknown: {sorted(unknown)})" if unknown else ""))
            src = Source(**entry)
        else:
            raise DataError(f"mixture entry {entry!r}: expected a string or a dict")
        _check_source(src)
        sources.append(src)
    return sources


def train_eval_split(items: Sequence, eval_fraction: float, seed: int = 0) -> tuple[list, list]:
    """Split items into (train, eval) deterministically: round(eval_fraction * n) items chosen at
    random (at least one when eval_fraction > 0) go to eval. Both keep the original order."""
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    n = len(items)
    n_eval = max(1, _round(eval_fraction * n)) if eval_fraction > 0 else 0
    if n_eval >= n and n_eval > 0:
        raise ValueError(f"eval_fraction {eval_fraction} of {n} items leaves nothing to train on")
    in_eval = set(random.Random(f"split:{seed}").sample(range(n), n_eval))
    return [x for i, x in enumerate(items) if i not in in_eval], [x for i, x in enumerate(items) if i in in_eval]


# --- mixing --------------------------------------------------------------------------------------


def _load(spec, schemas, schema, columns, skip_bad, seed, revision):
    sources = parse_mixture(spec)
    stats = LoadStats()
    per_source = []
    for src in sources:
        st = SourceStats(source=src.path)
        stats.sources.append(st)
        per_source.append(_read_source(src, schemas, schema, columns, revision, skip_bad, st))

    counts = _mixture_counts(sources, [len(x) for x in per_source])
    for src, items, k in zip(sources, per_source, counts):
        if k == 0:  # (a mistake: a source that is read but adds nothing)
            share = f"fraction {src.fraction}" if src.fraction is not None else f"weight {src.weight}"
            raise DataError(f"{src.path}: its {share} keeps 0 of its {len(items)} records; raise it or leave the "
                            f"source out of the mixture", path=src.path)
    out = []
    for i, (src, items, k, st) in enumerate(zip(sources, per_source, counts, stats.sources)):
        taken = _take(items, k, random.Random(f"{seed}:{i}:{src.path}"))
        st.kept = len(taken)
        out += taken
    return out, stats


def _mixture_counts(sources: list[Source], sizes: list[int]) -> list[int]:
    counts = [_round((s.fraction if s.fraction is not None else 1.0) * n) for s, n in zip(sources, sizes)]
    weighted = [i for i, s in enumerate(sources) if s.weight is not None]
    if weighted:
        total = sum(sizes[i] for i in weighted)
        w_sum = sum(sources[i].weight for i in weighted)
        exact = {i: total * sources[i].weight / w_sum for i in weighted}
        for i in weighted:
            counts[i] = math.floor(exact[i])
        # Largest remainder, ties by mixture order, so the group's counts sum to exactly `total`.
        by_remainder = sorted(weighted, key=lambda i: (-(exact[i] - counts[i]), i))
        for i in by_remainder[: total - sum(counts[i] for i in weighted)]:
            counts[i] += 1
    return counts


def _take(items: list, k: int, rng: random.Random) -> list:
    """k items: all of them floor(k / n) times, then a random subset of k mod n, in file order."""
    n = len(items)
    if k == n:
        return list(items)
    whole, rest = divmod(k, n)
    subset = sorted(rng.sample(range(n), rest))
    return items * whole + [items[i] for i in subset]


def _round(x: float) -> int:
    return math.floor(x + 0.5)  # half up, not Python's half-to-even


_NUMBER = re.compile(r"^[0-9]*\.?[0-9]+(e[-+]?[0-9]+)?$", re.IGNORECASE)


def _parse_compact_entry(entry: str) -> Source:
    head, sep, tail = entry.rpartition(":")
    if sep and _NUMBER.match(tail):
        return Source(head, fraction=float(tail))
    for key in ("fraction", "weight"):
        if sep and tail.startswith(key + "="):
            value = tail[len(key) + 1:]
            if not _NUMBER.match(value):
                raise DataError(f"mixture entry {entry!r}: {key} must be a number, got {value!r}")
            return Source(head, **{key: float(value)})
    return Source(entry)


def _check_source(src: Source) -> None:
    name = f"mixture entry {src.path!r}"
    if not isinstance(src.path, (str, Path)) or not str(src.path):
        raise DataError(f"mixture entry {src!r}: 'path' must be a non-empty string")
    src.path = str(src.path)
    if src.fraction is not None and src.weight is not None:
        raise DataError(f"{name}: give a fraction or a weight, not both")
    for key in ("fraction", "weight"):
        value = getattr(src, key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0
                                  or math.isinf(value)):
            raise DataError(f"{name}: {key} must be a positive number, got {value!r}")
    if src.columns is not None and not (isinstance(src.columns, dict)
                                        and all(isinstance(v, str) for v in src.columns.values())):
        raise DataError(f"{name}: columns must map field names to key names, got {src.columns!r}")


# --- reading one source --------------------------------------------------------------------------


def _read_source(src: Source, schemas, schema, columns, revision, skip_bad, st: SourceStats, head: int = 0) -> list:
    """The source's records parsed (its first `head` good ones, when head > 0)."""
    schema = src.schema or schema
    columns = src.columns if src.columns is not None else (columns or {})
    if schema is not None and schema not in schemas:
        raise DataError(f"{src.path}: unknown schema {schema!r}; expected one of {', '.join(schemas)}", path=src.path)
    allowed = set().union(*(SCHEMA_FIELDS[s] for s in ([schema] if schema else schemas)))
    if set(columns) - allowed:
        raise DataError(f"{src.path}: columns {sorted(set(columns) - allowed)} are not fields of "
                        f"{schema or ' or '.join(schemas)}; fields: {', '.join(sorted(allowed))}", path=src.path)
    files = resolve_files(src.path, src.revision or revision)
    st.files = [str(f) for f in files]
    col = Columns(columns)

    out = []
    parse: Optional[Callable] = None
    for path, location, record in _records(files):
        st.read += 1
        try:
            if isinstance(record, BadRecord):
                raise record
            if not isinstance(record, dict):
                raise BadRecord("wrong type", "", f"expected a JSON object, got {type(record).__name__}")
            if parse is None:  # the schema is fixed by the source's first record
                name = schema or detect(record, schemas, col)
                if name is None:
                    raise DataError(f"{path}: {location}: cannot tell the schema from the keys {sorted(record)}"
                                    f"{looks_like(record, schemas)}; pass --schema= (one of {', '.join(schemas)})"
                                    + (" and --columns= to map field names to keys" if schemas == SFT_SCHEMAS else ""),
                                    path=str(path), location=location)
                parse = PARSERS[name]
            out.append(parse(record, col))
            if len(out) == head:
                break
        except BadRecord as bad:
            key = f"'{bad.key}': " if bad.key else ""
            message = f"{path}: {location}: {key}{bad.detail}"
            if not skip_bad:
                raise DataError(message, str(path), location, bad.key, bad.reason) from None
            st.skipped += 1
            st.reasons[bad.reason] += 1
            if len(st.errors) < _ERRORS_KEPT:
                st.errors.append(message)
    if st.read == 0:
        raise DataError(f"{src.path}: no records in {', '.join(st.files)}", path=src.path)
    if not out:
        raise DataError(f"{src.path}: all {st.read} records are bad; first: {st.errors[0]}", path=src.path)
    return out


MAX_LINE_BYTES = 16 << 20
"""The longest JSON line read: 16 MiB is some 4M tokens, 30 times the longest context of the recipes;
a longer line is a broken file (a whole data set on one line), and encoding it could exhaust memory."""


def looks_like(record: dict, schemas) -> str:
    """", which look like SFT conversations (...)" when a record the stage cannot read is one of the
    other stage's (a DPO run given an SFT file, or the reverse), else ""."""
    other = PREFERENCE_SCHEMAS if schemas == SFT_SCHEMAS else SFT_SCHEMAS
    name = detect(record, other, Columns())
    if name is None:
        return ""
    what = "SFT conversations, for train_sft.py" if other == SFT_SCHEMAS else "preference pairs, for train_dpo.py"
    return f", which look like {what} (schema {name})"


def _records(files: list[Path]) -> Iterator[tuple[Path, str, Any]]:
    """(file, "line 3" | "item 3" | "row 3", record or BadRecord) for each record, all positions 1-based."""
    for path in files:
        if path.suffix == ".parquet":
            yield from _parquet_records(path)
            continue
        with open(path, "rb") as f:
            head = f.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip()  # a UTF-8 BOM (json.load skips it too)
            f.seek(0)
            if path.suffix == ".json" and head.startswith(b"["):
                try:
                    items = json.load(f)
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    # One malformed array spoils the whole file, so it is not a skippable record.
                    raise DataError(f"{path}: malformed JSON: {e}", path=str(path)) from None
                for i, item in enumerate(items, 1):
                    yield path, f"item {i}", item
                continue
            for n, raw in enumerate(iter(lambda: f.readline(MAX_LINE_BYTES + 1), b""), 1):
                if len(raw) > MAX_LINE_BYTES:  # read no further: under a memory limit it would abort the run
                    raise DataError(f"{path}: line {n} is longer than {MAX_LINE_BYTES >> 20} MiB, the most a record "
                                    f"may hold (data.MAX_LINE_BYTES)", path=str(path), location=f"line {n}")
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    record = BadRecord("malformed JSON", "", f"malformed JSON: {e}")
                yield path, f"line {n}", record


def _parquet_records(path: Path) -> Iterator[tuple[Path, str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"{path}: reading Parquet files needs pyarrow, which is not installed "
                          f"(pip install pyarrow)") from None
    try:
        table = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own error types for a corrupt or truncated file
        raise DataError(f"{path}: not a readable Parquet file: {e}", path=str(path)) from None
    row = 0
    for batch in table.iter_batches():
        for record in batch.to_pylist():
            row += 1
            yield path, f"row {row}", record
