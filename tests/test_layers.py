"""The package's layers (docs/walkthrough.md, README "Architecture"): a module imports only from its
own layer or the layers below, never in a cycle, and every module has a place.

The imports are read from the source with ast, imports inside functions included, so a lazy
`from lion_min.x import y` counts like one at the top. The block under `if __name__ == "__main__":`
is left out: it runs only when the file is run as a script (`python -m lion_min.sample`), which is
the top layer's business, and it never runs on import.

LION_MIN_ROOT=/path/to/a/checkout points the test at another tree (to see it fail on old code).
"""

import ast
import os
from pathlib import Path

PACKAGE = Path(os.environ.get("LION_MIN_ROOT", Path(__file__).parent.parent)) / "lion_min"

# Bottom to top. Within a layer a module may import another of the same layer (without a cycle).
LAYERS = [
    # 1. facts and kernels: nothing of the package below them
    ["choices", "attention", "losses", "tokenizer", "schemas", "hub", "deberta"],
    # 2. the model and the formats it reads and writes
    ["model", "chat", "data_files", "data", "checkpoint", "packing", "flops", "parallel", "pairrm", "__init__"],
    # 3. options: the config dataclasses and value checks, then the --key=value parser over them
    ["config", "flags"],
    # 4. machinery every stage shares: the starting model, the data cache, the run folder, the batch
    #    plan, the loop, the sampler, the judges, the plots; the golden files and their comparison
    ["policy", "prepare", "run_dir", "train_state", "batches", "report", "train", "sample", "judges", "plot",
     "golden"],
    # 5. the stages (each owns its encoding and objective), and the golden numbers made with them
    ["sft", "dpo", "online", "golden_compute"],
    # 6. the demo and the experiments: they import stages; no stage imports them
    #    The checks a command makes before any weights load (they read what the stages read).
    ["demo", "experiment_runs", "experiments", "preflight"],
    # 7. the command lines: flags to stages, presets, the no-flag demo (then train_*.py and bench/)
    ["cli", "tiny"],
]
LAYER = {m: i for i, names in enumerate(LAYERS) for m in names}


def _is_main_block(node: ast.AST) -> bool:
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__")


def _imported(node: ast.AST, modules: set[str]) -> set[str]:
    """The package modules one import statement names (`from . import x`, `from lion_min import x`,
    `from lion_min.x import y`, `import lion_min.x`; `from lion_min import load_model` is __init__)."""
    if isinstance(node, ast.Import):
        return {a.name.split(".")[1] for a in node.names if a.name.startswith("lion_min.")} | (
            {"__init__"} if any(a.name == "lion_min" for a in node.names) else set())
    if not isinstance(node, ast.ImportFrom):
        return set()
    if node.level > 1:
        raise AssertionError(f"line {node.lineno}: an import from above the package")
    if node.level == 1 and node.module:
        return {node.module.split(".")[0]}
    if node.module and node.module.startswith("lion_min."):
        return {node.module.split(".")[1]}
    if node.level == 1 or node.module == "lion_min":  # from . import x / from lion_min import x
        return {a.name if a.name in modules else "__init__" for a in node.names}
    return set()


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the package modules it imports (anywhere in the file but its __main__ block)."""
    modules = {p.stem for p in package.glob("*.py")}
    graph = {}
    for m in sorted(modules):
        tree = ast.parse((package / f"{m}.py").read_text())
        main_blocks = [n for n in tree.body if _is_main_block(n)]
        skip = {id(x) for b in main_blocks for x in ast.walk(b)}
        graph[m] = set().union(*(_imported(n, modules) for n in ast.walk(tree) if id(n) not in skip)) - {m}
    return graph


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


def test_every_module_has_a_layer():
    graph = import_graph()
    assert sum(map(len, LAYERS)) == len(LAYER), "a module is named in two layers"
    unplaced = sorted(set(graph) - set(LAYER))
    assert not unplaced, f"modules in no layer (add them to LAYERS): {unplaced}"
    gone = sorted(set(LAYER) - set(graph))
    assert not gone, f"LAYERS names modules that do not exist: {gone}"


def test_no_import_from_a_lower_layer_to_a_higher_one():
    graph = import_graph()
    upward = [f"{m} (layer {LAYER[m] + 1}) imports {d} (layer {LAYER[d] + 1})"
              for m, deps in graph.items() for d in sorted(deps)
              if m in LAYER and d in LAYER and LAYER[d] > LAYER[m]]
    assert not upward, "\n".join(upward)


def test_no_import_cycle():
    found = cycles(import_graph())
    assert not found, f"import cycles: {found}"


def test_the_checker_sees_what_it_must():
    """The rules catch what they are for: a function-level upward import and a two-module cycle."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    tree = ast.parse("def f():\n    from lion_min.cli import run_cli\n    from . import demo\n"
                     "import lion_min.sft\nfrom lion_min import load_model\n"
                     "if __name__ == '__main__':\n    from lion_min.cli import x\n")
    mods = {"cli", "demo", "sft"}
    seen = set().union(*(_imported(n, mods) for n in ast.walk(tree)))
    assert seen == {"cli", "demo", "sft", "__init__"}
    assert _is_main_block(tree.body[-1]) and not _is_main_block(tree.body[0])
