"""The package's shape, checked from its source with `ast` (no imports run): no import cycle anywhere in
krea_sweeps/ (function-level imports count too: a cycle hidden in a function is still a cycle), and the parts that
plug into a job — `metrics/`, `interventions/` — never import the layers that plan and run jobs (`plan`, `context`,
`task`, `runner`, `sweeps`, `batch`): a metric is handed its `JobContext` and asks it for what it needs."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "krea_sweeps"
JOB_LAYERS = ("krea_sweeps.plan", "krea_sweeps.context", "krea_sweeps.task", "krea_sweeps.runner",
              "krea_sweeps.sweeps", "krea_sweeps.batch")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The krea_sweeps modules `path` imports, anywhere in its body (relative imports resolved)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(without_type_checking_blocks(ast.parse(path.read_text()))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            candidates = [target] + [f"{target}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        found |= {c for c in candidates if c in modules}
    return found - {name}


def without_type_checking_blocks(tree: ast.Module) -> ast.Module:
    """`tree` less its `if TYPE_CHECKING:` blocks: names imported for annotations only are never imported at run
    time, so they cannot close a cycle."""
    for node in ast.walk(tree):
        for name in ("body", "orelse"):
            block = getattr(node, name, None)
            if isinstance(block, list):
                setattr(node, name, [n for n in block if not _is_type_checking(n)])
    return tree


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None) if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imported_modules(path, set(files)) for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), plus modules that import themselves."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_is_read_from_the_source():
    graph = import_graph()
    assert "krea_sweeps.runner" in graph and "krea_sweeps.metrics.word_maps" in graph
    assert "krea_sweeps.plan" in graph["krea_sweeps.runner"]  # a known edge: the check can see edges


def test_annotation_only_imports_are_not_edges():
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .task import X\nimport os\n")
    kept = without_type_checking_blocks(tree)
    assert [type(n).__name__ for n in kept.body] == ["ImportFrom", "Import"]


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_krea_sweeps_has_no_import_cycle():
    assert cycles(import_graph()) == []


def test_metrics_and_interventions_do_not_import_the_job_layers():
    upward = {name: sorted(d for d in deps if d in JOB_LAYERS) for name, deps in import_graph().items()
              if name.startswith(("krea_sweeps.metrics", "krea_sweeps.interventions"))}
    assert {name: deps for name, deps in upward.items() if deps} == {}


def documented_layers() -> list[list[str]]:
    """The layer picture of docs/ARCHITECTURE.md ("Layers and imports"), top line first: the module names each line
    starts with (`context.py`, `metrics/`)."""
    text = (PACKAGE.parent / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    block = text.split("## Layers and imports", 1)[1].split("```")[1]
    layers = []
    for line in block.strip("\n").splitlines():
        names = []
        for word in line.split():
            if not word.endswith((".py", "/")):
                break
            names.append(word.removesuffix(".py").removesuffix("/"))
        layers.append(names)
    return layers


def test_the_documented_layers_are_the_imports():
    """What docs/ARCHITECTURE.md draws is what the code does: a module imports only from its own line or below."""
    layers = documented_layers()
    level = {name: i for i, names in enumerate(layers) for name in names}
    graph = import_graph()

    def top(module: str) -> str:
        return module.split(".")[1] if "." in module else module

    upward = sorted(f"{m} -> {d}" for m, deps in graph.items() for d in deps
                    if top(m) in level and top(d) in level and level[top(d)] < level[top(m)])
    assert upward == []
    assert {"plan", "context", "task", "runner", "metrics", "interventions"} <= set(level)
