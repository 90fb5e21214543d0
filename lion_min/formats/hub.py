"""Local path or Hugging Face hub id: the one rule for --model, --ref_model, --judge and --data, and
the one-line message when the hub cannot deliver.

No network here; checkpoint.resolve_path and data_files.resolve_files call huggingface_hub themselves.
"""

import os
from difflib import get_close_matches
from pathlib import Path
from typing import Optional

OFFLINE_HINT = "to work offline, set HF_HUB_OFFLINE=1 with a cached copy, or give a local path instead"
CACHE_HINT = "download it once with network access, or give a local path instead"


def looks_local(name: str) -> bool:
    """True when `name` is meant as a local path, so a missing one is a typo to report, never a hub id
    to fetch: it starts with . / or ~ (./x, ../x, /x, ~/x), or its first component is a folder that
    exists here (out/debug/sfft beside an out/ folder)."""
    if name.startswith((".", "/", "~")):
        return True
    first = name.split("/", 1)[0]
    return "/" in name and Path(first).is_dir()


def goes_to_hub(name: str) -> bool:
    """Whether checkpoint.resolve_path would fetch `name` from the hub (an org/name that is not here)."""
    return not Path(name).expanduser().exists() and not looks_local(name) and name.count("/") == 1


def did_you_mean(path: str) -> str:
    """" (did you mean x?)" naming the closest existing entry beside a missing path, else ""."""
    p = Path(path).expanduser()
    if not p.parent.is_dir():
        return ""
    near = get_close_matches(p.name, [c.name for c in p.parent.iterdir()], n=1)
    return f" (did you mean {p.parent / near[0]}?)" if near else ""


def hub_error(name: str, e: Exception, revision: Optional[str] = None) -> str:
    """One line saying why huggingface_hub could not get `name`, and how to work without it.
    (huggingface_hub's own messages run over several lines; the class says enough.)"""
    kinds = {c.__name__ for c in type(e).__mro__}
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
    hint = OFFLINE_HINT
    if "GatedRepoError" in kinds:
        why = "the repo is gated: accept its terms on huggingface.co, then log in with `hf auth login`"
    elif "RepositoryNotFoundError" in kinds:
        why = "no such repo, or it is private (log in with `hf auth login`)"
    elif "RevisionNotFoundError" in kinds:
        why = f"no revision {revision!r} in the repo"
    elif "HFValidationError" in kinds:
        why = "not a valid hub id (org/name)"
    elif "LocalEntryNotFoundError" in kinds and offline:
        why, hint = "HF_HUB_OFFLINE is set and there is no cached copy", CACHE_HINT
    elif "LocalEntryNotFoundError" in kinds:
        why = "the hub could not be reached and there is no cached copy"
    else:
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
        why = f"{type(e).__name__}: {first[:160]}"
    at = f" at revision {revision}" if revision else ""
    return f"{name}{at}: could not get it from the Hugging Face hub ({why}); {hint}"
