"""Every code pointer in the docs resolves: `lion_min/x.py:name` (or `:Class.method`) names a
definition in that file, `tests/x.py::test_name` a test, and a named file exists. The walkthrough
and the README point into the code by name (no line numbers); a rename must carry them along."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "docs/walkthrough.md", "docs/golden.md", "docs/experiments.md", "docs/multinode.md",
        "docs/operations.md", "docs/results.md", "bench/README.md"]
POINTER = re.compile(r"((?:lion_min|tests|bench)/[\w/]+\.py|(?<![\w/])train_(?:sft|dpo|online)\.py)(?:::?([\w.]+))?")


def definitions(path: Path) -> dict[str, set[str]]:
    """Top-level name -> the names defined in its body (methods, nested classes, class attributes)."""
    out: dict[str, set[str]] = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            inner = set()
            for child in node.body:
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    inner.add(child.name)
                elif isinstance(child, ast.AnnAssign) and isinstance(child.target, ast.Name):
                    inner.add(child.target.id)
                elif isinstance(child, ast.Assign):
                    inner |= {t.id for t in child.targets if isinstance(t, ast.Name)}
            out[node.name] = inner
        elif isinstance(node, ast.Assign):
            out |= {t.id: set() for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out[node.target.id] = set()
    return out


def unresolved(text: str) -> list[str]:
    bad = []
    for m in POINTER.finditer(text):
        path, name = m.group(1), (m.group(2) or "").rstrip(".")
        if not (ROOT / path).is_file():
            bad.append(f"{path}: no such file")
            continue
        if name:
            first, *rest = name.split(".")
            defs = definitions(ROOT / path)
            if first not in defs or (rest and rest[0] not in defs[first]):
                bad.append(f"{path}:{name}: not defined there")
    return bad


@pytest.mark.parametrize("doc", DOCS)
def test_every_pointer_resolves(doc):
    text = (ROOT / doc).read_text()
    assert POINTER.search(text), f"{doc} holds no pointers: the pattern is wrong"
    assert not unresolved(text), "\n".join(unresolved(text))


def test_the_check_sees_a_stale_pointer():
    assert unresolved("`lion_min/core/chat.py:encode_chat`, `lion_min/core/chat.py:encode_chatt`") == [
        "lion_min/core/chat.py:encode_chatt: not defined there"]
    assert unresolved("`lion_min/core/packing.py:Packed.efficiencyy`") == [
        "lion_min/core/packing.py:Packed.efficiencyy: not defined there"]
    assert unresolved("`lion_min/no_such_module.py:with_system`") == ["lion_min/no_such_module.py: no such file"]
    assert unresolved("`lion_min/core/packing.py:Packed.efficiency`, `tests/test_layers.py::test_no_import_cycle`") == []
