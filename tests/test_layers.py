"""The package's layers, read from its folders (README "Read these", docs/walkthrough.md): a module
imports only from its own folder or the folders below it, never in a cycle.

    core -> formats -> pairrm -> run -> stages -> golden -> demo -> the command line

core/ is the method and imports only torch, numpy, tokenizers, the standard library and itself.
Nothing imports the command line (lion_min/cli.py, lion_min/__main__.py), and no module but
__main__.py has an `if __name__ == "__main__":` block: `python -m lion_min COMMAND` is the one way
in. Imports are read from the source with ast, imports inside functions included, so a lazy
`from lion_min.x import y` counts like one at the top.

LION_MIN_ROOT=/path/to/a/checkout points the test at another tree (to see it fail on old code).
"""

import ast
import os
import sys
from pathlib import Path

PACKAGE = Path(os.environ.get("LION_MIN_ROOT", Path(__file__).parent.parent)) / "lion_min"

# Bottom to top. The package's own __init__.py (the public API: load_model, save_model, Tokenizer)
# sits with formats, whose names it re-exports; cli.py and __main__.py are the top.
LAYERS = ["core", "formats", "pairrm", "run", "stages", "golden", "demo", "command line"]
COMMAND_LINE = {"cli", "__main__"}
CORE_MAY_IMPORT = {"torch", "numpy", "tokenizers"}


def layer_of(module: str) -> str:
    """'core.model' -> 'core'; the top-level modules by name."""
    top = module.split(".")[0]
    if top in COMMAND_LINE:
        return "command line"
    return "formats" if top == "__init__" else top


def module_name(path: Path, package: Path = PACKAGE) -> str:
    rel = path.relative_to(package).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" and len(rel.parts) > 1 else rel.parts
    return ".".join(parts)


def _is_main_block(node: ast.AST) -> bool:
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__")


def _imported(node: ast.AST, here: str, modules: set[str], is_package: bool = False) -> set[str]:
    """The package modules one import statement names (`import lion_min.a.b`, `from lion_min.a import
    b`, `from lion_min import x`, relative forms); `from lion_min import load_model` is __init__."""
    def known(dotted: str) -> str:
        while dotted and dotted not in modules:  # lion_min.core.model.Transformer -> core.model
            dotted = dotted.rpartition(".")[0]
        return dotted or "__init__"

    if isinstance(node, ast.Import):
        return {known(a.name.removeprefix("lion_min.")) for a in node.names
                if a.name == "lion_min" or a.name.startswith("lion_min.")}
    if not isinstance(node, ast.ImportFrom):
        return set()
    if node.level:
        base = here.split(".")[: len(here.split(".")) - node.level + is_package]  # an __init__ is its package
        module = ".".join(base + ([node.module] if node.module else []))
    elif node.module == "lion_min" or (node.module or "").startswith("lion_min."):
        module = node.module.removeprefix("lion_min").lstrip(".")
    else:
        return set()
    return {known(f"{module}.{a.name}".lstrip(".")) for a in node.names}


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the package modules it imports."""
    files = {module_name(p, package) or "__init__": p for p in package.rglob("*.py")}
    return {m: set().union(*(_imported(n, m, set(files), p.name == "__init__.py")
                             for n in ast.walk(ast.parse(p.read_text())))) - {m}
            for m, p in sorted(files.items())}


def third_party(path: Path) -> set[str]:
    """The top-level names of the non-package modules a file imports."""
    names = set()
    for n in ast.walk(ast.parse(path.read_text())):
        if isinstance(n, ast.Import):
            names |= {a.name.split(".")[0] for a in n.names}
        elif isinstance(n, ast.ImportFrom) and not n.level:
            names.add(n.module.split(".")[0])
    return names - {"lion_min"} - set(sys.stdlib_module_names)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_module_is_in_a_layer_folder():
    unplaced = sorted(m for m in import_graph() if layer_of(m) not in LAYERS)
    assert not unplaced, f"modules outside the layer folders {LAYERS}: {unplaced}"


def test_no_import_from_a_lower_layer_to_a_higher_one():
    rank = {name: i for i, name in enumerate(LAYERS)}
    upward = [f"{m} ({layer_of(m)}) imports {d} ({layer_of(d)})"
              for m, deps in import_graph().items() for d in sorted(deps)
              if rank[layer_of(d)] > rank[layer_of(m)]]
    assert not upward, "\n".join(upward)


def test_nothing_imports_the_command_line():
    found = [f"{m} imports {d}" for m, deps in import_graph().items() for d in deps
             if layer_of(d) == "command line" and m != "__main__"]
    assert not found, found


def test_core_imports_only_torch_numpy_tokenizers():
    found = {str(p.relative_to(PACKAGE)): sorted(third_party(p) - CORE_MAY_IMPORT)
             for p in (PACKAGE / "core").rglob("*.py")}
    assert not any(found.values()), {k: v for k, v in found.items() if v}


def test_no_import_cycle():
    found = cycles(import_graph())
    assert not found, f"import cycles: {found}"


def test_one_entry_point():
    """Only __main__.py runs as a script: every command is `python -m lion_min COMMAND`."""
    scripts = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                     if p.name != "__main__.py" and any(map(_is_main_block, ast.parse(p.read_text()).body)))
    assert not scripts, f"modules with an `if __name__ == '__main__':` block: {scripts}"


def test_the_checker_sees_what_it_must():
    """The rules catch what they are for: a function-level upward import and a two-module cycle."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    tree = ast.parse("def f():\n    from lion_min.cli import run_cli\n    from lion_min.demo import task\n"
                     "import lion_min.stages.sft\nfrom lion_min import load_model\n"
                     "from lion_min.core.model import Transformer\n")
    mods = {"cli", "demo", "demo.task", "stages", "stages.sft", "core", "core.model", "__init__"}
    seen = set().union(*(_imported(n, "run.x", mods) for n in ast.walk(tree)))
    assert seen == {"cli", "demo.task", "stages.sft", "core.model", "__init__"}
    assert [layer_of(m) for m in ("core.model", "cli", "__main__", "__init__")] == [
        "core", "command line", "command line", "formats"]
    assert _is_main_block(ast.parse("if __name__ == '__main__':\n    pass\n").body[0])
