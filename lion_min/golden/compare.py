"""Golden numbers: what a model and a data file must produce under lion_min's objectives, written in
a format another training stack can check itself against (docs/golden.md). This module is that
format and the comparison (another stack needs nothing else); golden_compute.py makes the numbers.

    python -m lion_min golden --model=DIR_OR_HUB_ID --data=FILE --chat_template=chatml --out=DIR
    python -m lion_min golden compare EXPECTED ACTUAL [--rtol=R --atol=A --partial=true]

The first writes DIR/golden.json (versions, settings, sha256 fingerprints of the inputs, the loss and
its statistics, gradient norms, and with --lr the parameter change after one AdamW step) and
DIR/golden.safetensors (per example: token ids, loss mask, per-token log-probs). Conversations give
the SFT objective; preference pairs give DPO against --ref_model. The second prints a table of every
quantity with its largest difference and where, and exits 0 within tolerance, 1 otherwise;
`compare()` / `assert_matches()` are the same for pytest.

Everything is computed (golden_compute.py) by the package's own pieces (chat template, packer,
model, losses), exactly as the training scripts compute it; nothing is a second implementation of
them. The command line is cli.golden_main.
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lion_min.formats.hf import atomic_dir
from lion_min.run.config import ConfigError

FORMAT = "lion_min.golden/1"
FILES = ("golden.json", "golden.safetensors")

# Default tolerances of `compare`, by the dtype of the two sides (the looser one when they differ):
# about 25x (fp32) and 3x (bf16) the differences between transformers and lion_min measured on the
# shipped vectors (docs/golden.md; these small random models have large logits on purpose).
TOLERANCES = {"float32": {"rtol": 1e-4, "atol": 1e-4}, "bfloat16": {"rtol": 2e-2, "atol": 1e-1}}

# golden.safetensors holds, per example k, `{name}.{k}` for each name below (docs/golden.md gives the
# layout), and for DPO the per-pair tensors below.
TOKEN_TENSORS = ("input_ids", "loss_mask", "token_logps", "ref_token_logps")
PAIR_TENSORS = ("policy_logps", "reference_logps", "dpo_losses")


@dataclass
class Golden:
    meta: dict
    """Everything in golden.json."""
    tensors: dict[str, torch.Tensor]
    """Everything in golden.safetensors."""


def write(golden: Golden, out_dir: str | Path) -> Path:
    """golden.json and golden.safetensors into out_dir, atomically; refuses a folder holding other files."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out={out_dir}: is a file, not a folder")
    if out_dir.exists():
        other = sorted(f.name for f in out_dir.iterdir() if f.name not in FILES)
        if other:
            raise ConfigError(f"--out={out_dir}: holds other files ({', '.join(other[:3])}); "
                              "give an empty or new folder")
    with atomic_dir(out_dir) as tmp:
        (tmp / "golden.json").write_text(json.dumps(golden.meta, indent=2, ensure_ascii=False) + "\n")
        save_file(golden.tensors, str(tmp / "golden.safetensors"), metadata={"format": FORMAT})
    return out_dir


LFS_POINTER = b"version https://git-lfs.github.com/spec/"
"""How a Git LFS pointer file begins (a clone without git-lfs holds these in place of the files)."""


def load(path: str | Path) -> Golden:
    """A golden folder (or its golden.json) -> Golden."""
    path = Path(path)
    folder = path.parent if path.name == "golden.json" else path
    for name in FILES:
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name}: not found (a golden folder holds {' and '.join(FILES)})")
    try:
        meta = json.loads((folder / "golden.json").read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{folder / 'golden.json'}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{folder / 'golden.json'}: 'format' is not {FORMAT!r}")
    tensors = folder / "golden.safetensors"
    try:
        return Golden(meta=meta, tensors=load_file(str(tensors)))
    except SafetensorError as e:  # (exit status 2 in the command line, not the 1 of numbers that differ)
        with open(tensors, "rb") as f:
            lfs = f.read(len(LFS_POINTER)) == LFS_POINTER
        raise ValueError(f"{tensors}: " + ("a Git LFS pointer, not the file (git lfs pull fetches it)" if lfs else
                                           f"not a safetensors file ({e})")) from None


# --- comparing -----------------------------------------------------------------------------------


@dataclass
class Row:
    quantity: str
    largest: str
    """The largest difference (floats) or the count of differing entries (integers)."""
    at: str
    """Where the largest difference is."""
    first: str
    """Where the first entry beyond tolerance is (examples in order, tokens in order)."""
    status: str
    """ok | FAIL | missing | skipped"""


@dataclass
class Comparison:
    rows: list[Row]
    notes: list[str]
    rtol: float
    atol: float
    partial: bool = False

    @property
    def ok(self) -> bool:
        bad = ("FAIL",) if self.partial else ("FAIL", "missing")
        return not any(r.status in bad for r in self.rows)

    def table(self) -> str:
        head = ("quantity", "largest diff", "at", "first beyond tolerance", "result")
        cells = [head] + [(r.quantity, r.largest, r.at, r.first, r.status) for r in self.rows]
        widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
        lines = ["  ".join(c[i].ljust(widths[i]) for i in range(len(head))).rstrip() for c in cells]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append(f"tolerance: |actual - expected| <= {self.atol:g} + {self.rtol:g} * |expected|; "
                     f"{'PASS' if self.ok else 'FAIL'}")
        return "\n".join(lines + [f"note: {n}" for n in self.notes])

    def __str__(self) -> str:
        return self.table()


def _example_name(kind: str, k: int) -> str:
    return f"pair {k // 2} {('chosen', 'rejected')[k % 2]}" if kind == "dpo" else f"example {k}"


def _examples(tensors: dict, name: str) -> dict[int, torch.Tensor]:
    return {int(key.rsplit(".", 1)[1]): t for key, t in tensors.items() if key.rsplit(".", 1)[0] == name}


class _Worst:
    """Tracks the largest difference and the first entry beyond tolerance."""

    def __init__(self, rtol: float, atol: float):
        self.rtol, self.atol = rtol, atol
        self.largest, self.at, self.first = 0.0, "", ""

    def add(self, expected: torch.Tensor, actual: torch.Tensor, where) -> None:
        e, a = expected.double().flatten(), actual.double().flatten()
        diff = (a - e).abs()
        diff = torch.where(torch.isnan(diff), math.inf, diff)  # NaN on either side is never "close"
        if diff.numel() and diff.max().item() > self.largest:
            i = int(diff.argmax())
            self.largest, self.at = diff[i].item(), f"{where(i)}: {e[i].item():.6g} vs {a[i].item():.6g}"
        beyond = torch.nonzero(diff > self.atol + self.rtol * e.abs()).flatten()
        if len(beyond) and not self.first:
            i = int(beyond[0])
            self.first = f"{where(i)}: {e[i].item():.6g} vs {a[i].item():.6g}"

    def row(self, quantity: str) -> Row:
        return Row(quantity, f"{self.largest:.3g}", self.at or "-", self.first or "-", "FAIL" if self.first else "ok")


def _compare_ints(name: str, e: dict, a: dict, agree: dict, kind: str) -> Row:
    """input_ids or loss_mask: equal, example by example. For input_ids, records in `agree` how many
    leading tokens of each example are the same; masks are compared over those tokens only."""
    differ, first = 0, ""
    for k in sorted(e):
        if k not in a:
            differ += 1
            first = first or f"{_example_name(kind, k)}: missing"
            continue
        x, y = e[k].long(), a[k].long()
        if name == "loss_mask" and k in agree:
            x, y = x[: agree[k]], y[: agree[k]]
        n = min(len(x), len(y))
        bad = torch.nonzero(x[:n] != y[:n]).flatten()
        j = int(bad[0]) if len(bad) else (n if len(x) != len(y) else -1)
        if name == "input_ids":
            agree[k] = n if j < 0 else j
        if j >= 0:
            differ += 1
            at = [str(int(t[j])) if j < len(t) else "end" for t in (x, y)]
            first = first or f"{_example_name(kind, k)}, token {j}: {at[0]} vs {at[1]} (length {len(x)} vs {len(y)})"
    return Row(name, f"{differ} example(s) differ" if differ else "0", first or "-", first or "-",
               "FAIL" if differ else "ok")


def _compare_tokens(exp: Golden, act: Golden, kind: str, rtol: float, atol: float) -> list[Row]:
    # Masks and log-probs are compared only up to the first token where the ids disagree: past it the
    # two sides are not about the same tokens (the input_ids row reports that disagreement).
    rows, agree = [], {}
    for name in TOKEN_TENSORS:  # input_ids first: it fills `agree`
        e, a = _examples(exp.tensors, name), _examples(act.tensors, name)
        if not e:
            continue
        if not a:
            rows.append(Row(name, "-", "-", "-", "missing"))
        elif name in ("input_ids", "loss_mask"):
            rows.append(_compare_ints(name, e, a, agree, kind))
        else:
            w = _Worst(rtol, atol)
            for k in sorted(set(e) & set(a)):
                n = min(agree.get(k, len(e[k])), len(e[k]), len(a[k]))
                w.add(e[k][:n], a[k][:n], lambda j, k=k: f"{_example_name(kind, k)}, token {j}")
            rows.append(w.row(name))
    return rows


def _compare_numbers(exp: Golden, act: Golden, rtol: float, atol: float) -> list[Row]:
    rows = []
    for name in PAIR_TENSORS:
        if name not in exp.tensors:
            continue
        e, a = exp.tensors[name], act.tensors.get(name)
        if a is None or a.shape != e.shape:
            shapes = "missing" if a is None else f"shape {tuple(e.shape)} vs {tuple(a.shape)}"
            rows.append(Row(name, "-", shapes, shapes, "missing" if a is None else "FAIL"))
            continue
        w = _Worst(rtol, atol)
        # (P, 2) flattens to chosen, rejected, chosen, ...; (P,) to one entry per pair.
        w.add(e, a, lambda i: f"pair {i // 2} {('chosen', 'rejected')[i % 2]}" if e.ndim == 2 else f"pair {i}")
        rows.append(w.row(name))
    e_s, a_s = exp.meta.get("scalars", {}), act.meta.get("scalars", {})
    for name, value in e_s.items():
        if name not in a_s:
            rows.append(Row(name, "-", "-", "-", "missing"))
        elif isinstance(value, int) and not isinstance(value, bool):  # counts: exact
            same = a_s[name] == value
            rows.append(Row(name, "0" if same else str(abs(a_s[name] - value)), f"{value} vs {a_s[name]}",
                            "-" if same else f"{value} vs {a_s[name]}", "ok" if same else "FAIL"))
        else:
            w = _Worst(rtol, atol)
            w.add(torch.tensor([float(value)]), torch.tensor([float(a_s[name])]), lambda i: "value")
            rows.append(w.row(name))
    e_g, a_g = exp.meta.get("grad_norm", {}), act.meta.get("grad_norm", {})
    groups = [("grad_norm.total", e_g.get("total"), a_g.get("total")),
              ("grad_norm.per_tensor", e_g.get("per_tensor"), a_g.get("per_tensor")),
              ("update_norm", exp.meta.get("update_norm"), act.meta.get("update_norm"))]
    for name, e, a in groups:
        if e is None:
            continue
        if a is None:
            rows.append(Row(name, "-", "-", "-", "missing"))
            continue
        w = _Worst(rtol, atol)
        if isinstance(e, dict):
            for t, value in e.items():
                got = a.get(t, math.nan)  # a tensor the other side lacks is a failure (NaN)
                w.add(torch.tensor([float(value)]), torch.tensor([float(got)]), lambda i, t=t: t)
        else:
            w.add(torch.tensor([float(e)]), torch.tensor([float(a)]), lambda i: "value")
        rows.append(w.row(name))
    return rows


def compare(expected: str | Path | Golden, actual: str | Path | Golden, rtol: Optional[float] = None,
            atol: Optional[float] = None, partial: bool = False) -> Comparison:
    """Every quantity of EXPECTED against ACTUAL. Integers (ids, masks, counts) must be equal;
    floats within |a - e| <= atol + rtol * |e|, the defaults (TOLERANCES) set by the dtype of
    either side, the looser. A quantity ACTUAL lacks fails, unless partial (then it is 'missing'
    but does not fail; useful for a stack that computes only the forward)."""
    exp = expected if isinstance(expected, Golden) else load(expected)
    act = actual if isinstance(actual, Golden) else load(actual)
    dtypes = {g.meta.get("settings", {}).get("dtype", "float32") for g in (exp, act)}
    defaults = TOLERANCES["bfloat16" if "bfloat16" in dtypes else "float32"]
    rtol = defaults["rtol"] if rtol is None else rtol
    atol = defaults["atol"] if atol is None else atol
    kind, other = exp.meta.get("kind", "sft"), act.meta.get("kind", "sft")
    if kind != other:  # nothing of one compares with the other
        return Comparison(rows=[Row("kind", "-", f"{kind} vs {other}", f"EXPECTED is {kind}, ACTUAL is {other}",
                                    "FAIL")], notes=[f"the kinds differ: {kind} vs {other}; compare a vector with one "
                                                     f"of the same kind"], rtol=rtol, atol=atol, partial=partial)
    notes = []
    for section in ("settings", "fingerprints"):
        e, a = exp.meta.get(section, {}), act.meta.get(section, {})
        differ = [k for k in e if k in a and e[k] != a[k]]
        if differ:
            notes.append(f"{section} differ: " + ", ".join(f"{k} ({e[k]!r} vs {a[k]!r})" for k in differ))
    known = {key.rsplit(".", 1)[0] for key in exp.tensors}
    extra = sorted({key.rsplit(".", 1)[0] for key in act.tensors} - known)
    if extra:
        notes.append(f"not in EXPECTED, not compared: {', '.join(extra)}")
    rows = _compare_tokens(exp, act, kind, rtol, atol) + _compare_numbers(exp, act, rtol, atol)
    return Comparison(rows=rows, notes=notes, rtol=rtol, atol=atol, partial=partial)


def assert_matches(expected, actual, **tolerances) -> None:
    """compare() for pytest: raises AssertionError with the table unless within tolerance."""
    result = compare(expected, actual, **tolerances)
    assert result.ok, "golden numbers differ:\n" + result.table()


# --- command line --------------------------------------------------------------------------------


COMPARE_USAGE = """python -m lion_min golden compare EXPECTED ACTUAL [--rtol=R --atol=A --partial=true]

Compares two golden folders (or their golden.json) quantity by quantity: a table of each one's
largest difference and where; exit status 0 within tolerance, 1 otherwise."""


@dataclass
class CompareConfig:
    rtol: Optional[float] = None
    """Default: TOLERANCES by dtype (float32 1e-4, bfloat16 2e-2)."""
    atol: Optional[float] = None
    """Default: TOLERANCES by dtype (float32 1e-4, bfloat16 0.1)."""
    partial: bool = False
    """Quantities ACTUAL lacks are listed, not failed."""
