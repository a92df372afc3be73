"""The installed package's import graph: no cycles between modules, and each layer imports only the layers below it
(docs/architecture.md). Read from the source with ast, every import counted, also those inside functions."""
from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import os
from pathlib import Path

import pytest
import sparrow

ROOT = Path(sparrow.__file__).absolute().parent  # not resolved: a developer build links the files
# What each subpackage may import from Sparrow besides itself (the C core comes in through sparrow.runtime).
ALLOWED = {
    "runtime": set(),
    "converters": {"runtime"},
    "bench_device": {"runtime", "converters"},
    "training": {"runtime", "converters"},
    "models": set(),
}


def _module_name(path: Path, root: Path) -> str:
    parts = ["sparrow", *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _files(root: Path) -> dict[str, Path]:
    """Module name -> file, through the links a developer build uses (Path.rglob does not follow them)."""
    out: dict[str, Path] = {}
    for sub in [root, *(p for p in root.iterdir() if p.is_dir() and (p / "__init__.py").exists())]:
        files = sub.glob("*.py") if sub == root else [f for f in sub.rglob("*.py")]
        for f in files:
            if "__pycache__" not in f.parts and "results" not in f.parts:
                out[_module_name(f, root)] = f
    return out


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """module -> the Sparrow modules it imports (a `from pkg import name` counts name when it is a module)."""
    files = _files(root)
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        deps: set[str] = set()
        for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.split(".")[0] == "sparrow")
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.split(".")[0] != "sparrow":
                    continue
                for a in node.names:
                    sub = f"{target}.{a.name}"
                    if sub in files:
                        deps.add(sub)
                    elif not (files[target].name == "__init__.py" and _is_extension(sub)):  # the C binding: a leaf
                        deps.add(target)
        graph[mod] = {d for d in deps if d in files and d != mod}
    return graph


def _runtime_nodes(tree: ast.AST):
    """Every node except those under `if TYPE_CHECKING:` (imports for annotations only, never executed)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and isinstance(child.test, ast.Name) and child.test.id == "TYPE_CHECKING":
                todo.extend(child.orelse)
                continue
            todo.append(child)


def _is_extension(name: str) -> bool:
    spec = importlib.util.find_spec(name)
    return spec is not None and spec.origin is not None and not spec.origin.endswith(".py")


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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

    for v in graph:
        if v not in index:
            visit(v)
    return out


def _layer(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ALLOWED else "apps"


def test_the_package_has_its_layers():
    graph = import_graph()
    assert {"sparrow.runtime.native", "sparrow.runtime.store", "sparrow.bench_device.suite", "sparrow.cli",
            "sparrow.converters.blockffn"} <= set(graph)
    assert "sparrow.runtime.store" in graph["sparrow.runtime.launch"]


def test_no_import_cycles():
    assert _cycles(import_graph()) == []


def test_layers_point_down():
    bad = [f"{mod} imports {dep}" for mod, deps in import_graph().items() for dep in sorted(deps)
           if _layer(mod) != "apps" and _layer(dep) != _layer(mod)
           and (_layer(dep) == "apps" or _layer(dep) not in ALLOWED[_layer(mod)])]
    assert bad == []


def test_the_checks_catch_what_they_claim():
    """The graph code finds a cycle and a layer violation in a small package of its own."""
    g = {"sparrow.runtime.a": {"sparrow.runtime.b"}, "sparrow.runtime.b": {"sparrow.runtime.a"},
         "sparrow.runtime.c": {"sparrow.bench_device.x"}, "sparrow.bench_device.x": set()}
    assert _cycles(g) == [["sparrow.runtime.a", "sparrow.runtime.b"]]
    assert _layer("sparrow.bench_device.x") not in ALLOWED[_layer("sparrow.runtime.c")]


@pytest.mark.skipif(bool(os.environ.get("SPARROW_BUILD_DIR")), reason="a developer build is not installed")
def test_the_wheel_installs_one_package():
    """`pip install .` puts `sparrow` and its dist-info into site-packages, nothing else (no `runtime`, `models`, ...)
    that an app's own modules could collide with; the command goes to bin/."""
    dist = importlib.metadata.distribution("sparrow")
    tops = {f.parts[0] for f in dist.files if f.parts[0] != ".."}
    assert tops == {"sparrow", f"sparrow-{dist.version}.dist-info"}
    site = Path(dist.locate_file("")).resolve()
    assert ROOT.resolve() == site / "sparrow"
    assert not any((site / name).exists() for name in ("runtime", "converters", "bench_device", "training", "models"))
    assert any(f.name == "sparrow" and f.parts[0] == ".." for f in dist.files)  # the console script
    assert {"sparrow/runtime/lib/libsparrow.so", "sparrow/runtime/include/sparrow.h"} <= {str(f) for f in dist.files}
