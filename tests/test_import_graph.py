"""The package's import graph: no circle, and the config below the model and the trainer.

The graph is read from the source with `ast`, not from `sys.modules`: every `import` and
`from ... import` in a module counts, at its top or inside a function (a lazy import is
still a dependency), except under `if TYPE_CHECKING:` (never run). An edge goes to the
module named, or to the submodule when a `from` import names one. A package's
`__init__` is an edge only when it is named (Python also runs the parents of a module
it imports, which is how a package works, not a dependency of the module's own).

`python tests/test_import_graph.py` prints the circles and the config's upward imports.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "mmpo_jax"


def _modules() -> dict[str, Path]:
    """Module name -> file, for every module of the package."""
    out: dict[str, Path] = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, module: str, is_package: bool) -> list[tuple[str, list[str]]]:
    """(base module, names) of each import statement that runs, TYPE_CHECKING blocks skipped."""
    found: list[tuple[str, list[str]]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend((alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.append((base, [alias.name for alias in node.names]))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports when it runs (lazy imports included)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        edges: set[str] = set()
        for base, names in _imports(tree, name, path.name == "__init__.py"):
            if not base.startswith(PACKAGE):
                continue
            subs = [f"{base}.{n}" for n in names if f"{base}.{n}" in modules]
            if subs:
                edges.update(subs)
                if len(subs) < len(names):  # also names defined in the package's __init__
                    edges.add(base)
                continue
            target = base
            while target and target not in modules:  # `import mmpo_jax.a.b` of a name that is not a module
                target = target.rpartition(".")[0]
            if target:
                edges.add(target)
        edges.discard(name)
        graph[name] = edges
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
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
            connect(v)
    return found


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        v = todo.pop()
        for w in graph.get(v, ()):
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


CONFIG_MODULES = ("mmpo_jax.config", "mmpo_jax.config_schema")
ABOVE_CONFIG = ("mmpo_jax.train", "mmpo_jax.models", "mmpo_jax.eval", "mmpo_jax.data", "mmpo_jax.commands")


def upward_imports(graph: dict[str, set[str]]) -> dict[str, list[str]]:
    """Config module -> the modules above it (trainer, model, data, eval, commands) it reaches."""
    return {m: sorted(w for w in reachable(graph, m) if w.startswith(ABOVE_CONFIG)) for m in CONFIG_MODULES}


def test_the_graph_is_read() -> None:
    """Negative control: the reader sees known edges, a lazy one included, and finds a planted circle."""
    graph = import_graph()
    assert "mmpo_jax.config_schema" in graph["mmpo_jax.config"]
    assert len(graph) > 100
    planted = {**graph, "mmpo_jax.errors": graph["mmpo_jax.errors"] | {"mmpo_jax.config"}}
    assert any("mmpo_jax.errors" in c and "mmpo_jax.config" in c for c in circles(planted))
    tree = ast.parse("def f():\n    from mmpo_jax.x import y\nif TYPE_CHECKING:\n    import mmpo_jax.z\n")
    assert _imports(tree, "mmpo_jax.m", False) == [("mmpo_jax.x", ["y"])]


def test_no_import_circle() -> None:
    assert circles(import_graph()) == []


def test_the_config_imports_nothing_above_it() -> None:
    """`mmpo_jax.config` and its schema read no model, trainer, data or command module, lazily or not."""
    assert upward_imports(import_graph()) == {m: [] for m in CONFIG_MODULES}


def package_edges(graph: dict[str, set[str]], source: str, target: str) -> list[tuple[str, str]]:
    """The (module, imported module) edges from subpackage `source` into subpackage `target`."""
    return sorted((a, b) for a, bs in graph.items() for b in bs
                  if a.startswith(source + ".") and b.startswith(target + "."))


def test_train_and_eval_are_layered() -> None:
    """eval/ builds on train/ (the trainer, its step); train/ imports nothing of eval/."""
    assert package_edges(import_graph(), "mmpo_jax.train", "mmpo_jax.eval") == []


if __name__ == "__main__":
    g = import_graph()
    for c in circles(g):
        print("circle:", " ".join(c))
    for m, ups in upward_imports(g).items():
        if ups:
            print(f"{m} reaches:", " ".join(ups))
    for a, b in package_edges(g, "mmpo_jax.train", "mmpo_jax.eval"):
        print("train -> eval:", a, b)
