"""Where a data source's files are: a local file, glob or folder, or a hub dataset (lion_min/formats/data.py
reads their records and mixes sources).

Sources
-------
A source names where records come from:

    data/train.jsonl            a local file (.jsonl, .json or .parquet)
    data/*.jsonl, data/**/*.parquet
                                a glob (sorted; ** recurses)
    data/                       a folder: every .parquet, .jsonl and .json file under it, sorted
    org/name                    a hub dataset: its data files (see below)
    org/name:train_sft          ... only the files whose path within the repo contains the split as
                                a whole word (letters, digits and _ are word characters), so
                                `train` matches train-0000.parquet, data/train/x.parquet and
                                train.jsonl but not train_prefs-0000.parquet
    org/name/data/*.parquet     ... only files matching a pattern within the repo (fnmatch, `*`
                                also crosses folders); a plain file name fetches just that file
    org/name@v1.0               ... at a revision (branch, tag or commit); a revision holding `/`
                                is written URL-encoded (refs%2Fconvert%2Fparquet) or given as the
                                `revision` option instead
    hf://org/name...            always the hub, never a local path (hf://datasets/org/name too)

The forms combine in this order: `[hf://]org/name[@revision][/pattern][:split]`. A string is
local when it names an existing file or folder or a glob that matches something; a missing one
that looks local (starts with . / or ~, or its first folder exists here: data/trian.jsonl) is an
error, never a hub look-up; otherwise it is a hub dataset if it looks like one (org/name, not ending
in a data-file extension). Hub files come through huggingface_hub (`hf_hub_download` for one
file, else `snapshot_download`, both with repo_type="dataset"), so HF_HUB_OFFLINE=1 reads only the
local cache. Without a pattern, the repo's .parquet files are used, else its .jsonl files, else its
.json files (never a mix of types, so a dataset_infos.json beside parquet files is not read as data).
"""

import fnmatch
import glob
import os
import re
from pathlib import Path
from typing import Optional
from urllib.parse import unquote

from lion_min.formats.hub import did_you_mean, hub_error, looks_local

EXTENSIONS = (".parquet", ".jsonl", ".json")  # also the preference order for hub repos


class DataError(ValueError):
    """A bad record or source. `path`, `location` ("line 3"), `key` and `reason` (a short category
    such as "missing key", used to count skipped records) are kept for callers."""

    def __init__(self, message: str, path: str = "", location: str = "", key: str = "", reason: str = ""):
        super().__init__(message)
        self.path, self.location, self.key, self.reason = path, location, key, reason


def resolve_files(path: str, revision: Optional[str] = None) -> list[Path]:
    """A source string (local path, glob, folder or hub spec; not a mixture) -> its data files."""
    local = None if path.startswith("hf://") else _local_files(path)
    if local is not None:
        return local
    hub = _parse_hub_spec(path)
    if hub is None:
        what = "no files match this glob" if glob.has_magic(path) else "no such file or folder"
        hint = did_you_mean(path) if looks_local(path) else " (and not a hub dataset like org/name)"
        raise DataError(f"{path}: {what}{hint}", path=path)
    return _hub_files(path, *hub, revision=revision)


def names_hub(path: str) -> bool:
    """True when `path` names a hub dataset, not local files (resolve_files would go to the hub)."""
    return path.startswith("hf://") or (_local_files(path) is None and _parse_hub_spec(path) is not None)


# --- files: local and hub ------------------------------------------------------------------------


def _local_files(path: str) -> Optional[list[Path]]:
    """The data files a local path, glob or folder names; None when it names nothing local."""
    p = Path(path).expanduser()
    if p.is_dir():
        _no_dangling_links(p.rglob("*"))
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in EXTENSIONS)
        if not files:
            raise DataError(f"{path}: folder holds no {', '.join(EXTENSIONS)} files", path=path)
        return files
    if p.is_file():
        return [_check_extension(p)]
    _no_dangling_links([p])
    if glob.has_magic(path):
        matches = sorted(Path(m) for m in glob.glob(os.path.expanduser(path), recursive=True))
        _no_dangling_links(matches)
        files = [m for m in matches if m.is_file()]
        if files:
            return [_check_extension(f) for f in files]
    return None


def _no_dangling_links(paths) -> None:
    """A link to nothing where data was expected (a file moved or not yet copied) is named, never
    passed over: the data would silently lack that file."""
    for f in paths:
        if f.is_symlink() and not f.exists():
            raise DataError(f"{f}: a link to {os.readlink(f)}, which does not exist", path=str(f))


def _check_extension(p: Path) -> Path:
    if p.suffix not in EXTENSIONS:
        raise DataError(f"{p}: unsupported file type; expected {', '.join(EXTENSIONS)}", path=str(p))
    return p


_REPO = re.compile(r"^([A-Za-z0-9][\w.-]*/[\w.-]+?)(?:@([^/:]+))?(?:/(.+?))?(?::([\w.-]+))?$")


def _parse_hub_spec(spec: str) -> Optional[tuple[str, Optional[str], Optional[str], Optional[str]]]:
    """`[hf://]org/name[@revision][/pattern][:split]` -> (repo_id, revision, pattern, split), or
    None when the string does not look like a hub dataset."""
    explicit = spec.startswith("hf://")
    rest = spec.removeprefix("hf://")
    if explicit:
        rest = rest.removeprefix("datasets/")
    m = _REPO.match(rest)
    if m is None:
        if explicit:
            raise DataError(f"{spec}: not a hub spec of the form hf://org/name[@revision][/pattern][:split]", path=spec)
        return None
    repo_id, revision, pattern, split = m.groups()
    # A missing local file such as data/train.jsonl is a typo, not a hub dataset.
    if not explicit and (pattern is None and repo_id.endswith(EXTENSIONS) or looks_local(spec)):
        return None
    return repo_id, unquote(revision) if revision else None, pattern, split


def _split_matches(relpath: str, split: str) -> bool:
    return re.search(rf"(?<![A-Za-z0-9_]){re.escape(split)}(?![A-Za-z0-9_])", relpath) is not None


def _hub_files(spec: str, repo_id: str, spec_revision: Optional[str], pattern: Optional[str],
               split: Optional[str], revision: Optional[str]) -> list[Path]:
    if spec_revision and revision and spec_revision != revision:
        raise DataError(f"{spec}: revision {spec_revision!r} in the spec and {revision!r} given; pick one", path=spec)
    revision = spec_revision or revision
    where = f"{spec}: hub dataset {repo_id}" + (f" at revision {revision}" if revision else "")
    import huggingface_hub

    try:
        if pattern and not glob.has_magic(pattern):  # one named file
            files = [Path(huggingface_hub.hf_hub_download(repo_id, pattern, repo_type="dataset", revision=revision))]
            relpaths = [pattern]
        else:
            if pattern:
                allow = [pattern]
            else:  # fnmatch's * crosses folders, so this fetches a superset of the split's files
                allow = [f"*{split or ''}*{ext}" for ext in EXTENSIONS]
            root = Path(huggingface_hub.snapshot_download(repo_id, repo_type="dataset", revision=revision,
                                                          allow_patterns=allow))
            found = sorted(f for f in root.rglob("*") if f.is_file() and f.suffix in EXTENSIONS)
            relpaths = [f.relative_to(root).as_posix() for f in found]
            files = found
    except Exception as e:  # offline without a cached copy, unknown repo, gated, revision not found...
        raise DataError(hub_error(where, e), path=spec) from e

    pairs = list(zip(relpaths, files))
    if pattern:
        pairs = [(r, f) for r, f in pairs if fnmatch.fnmatch(r, pattern)]
    if split:
        pairs = [(r, f) for r, f in pairs if _split_matches(r, split)]
    if not pattern:  # one file type only, preferring parquet (see the module docstring)
        for ext in EXTENSIONS:
            if any(r.endswith(ext) for r, _ in pairs):
                pairs = [(r, f) for r, f in pairs if r.endswith(ext)]
                break
    if not pairs:
        listed = ", ".join(relpaths[:20]) or "none"
        raise DataError(f"{where}: no data files match" + (f" pattern {pattern!r}" if pattern else "")
                        + (f" split {split!r}" if split else "") + f"; data files found: {listed}", path=spec)
    return [_check_extension(f) for _, f in pairs]
