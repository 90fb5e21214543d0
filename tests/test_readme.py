"""README's "Read these" table names the method's functions and their lengths: each must exist
where the table says, with that many lines, so the table a reader starts from stays true."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROW = re.compile(r"^\| `(lion_min/[\w/]+\.py):([\w.]+)` \| .+ \| (\d+) \|$", re.M)


def function_lines(path: Path, name: str) -> int | None:
    """Lines of a top-level function or class, or of Class.method (decorators excluded); None if absent."""
    body = ast.parse(path.read_text()).body
    for part in name.split("."):
        node = next((n for n in body if getattr(n, "name", None) == part), None)
        if node is None:
            return None
        body = getattr(node, "body", [])
    return node.end_lineno - node.lineno + 1


def table_problems(text: str, root: Path = ROOT) -> list[str]:
    problems = []
    for path, name, lines in ROW.findall(text):
        if not (root / path).is_file():
            problems.append(f"{path}: no such file")
            continue
        n = function_lines(root / path, name)
        if n is None:
            problems.append(f"{path}:{name}: not defined there")
        elif n != int(lines):
            problems.append(f"{path}:{name}: {n} lines, the table says {lines}")
    return problems


def test_read_these_table_is_true():
    text = (ROOT / "README.md").read_text()
    rows = ROW.findall(text)
    assert len(rows) >= 15, "the Read these table is missing or its rows do not parse"
    assert all(path.startswith("lion_min/core/") for path, _, _ in rows), "the table reads the method's folder"
    assert not table_problems(text), "\n".join(table_problems(text))


def test_readme_stays_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200


def test_the_check_sees_a_wrong_row():
    good = "| `lion_min/core/losses.py:global_mean` | x | {} |".format(
        function_lines(ROOT / "lion_min/core/losses.py", "global_mean"))
    assert table_problems(good) == []
    assert table_problems(good.replace("global_mean", "global_meann")) == [
        "lion_min/core/losses.py:global_meann: not defined there"]
    wrong = re.sub(r"\| \d+ \|$", "| 999 |", good)
    assert table_problems(wrong)[0].endswith("the table says 999")
    assert table_problems("| `lion_min/core/nope.py:f` | x | 3 |") == ["lion_min/core/nope.py: no such file"]
