"""The package's layering, checked from the source (no import is executed):

- no import cycle between sidecar modules (function-local imports count too);
- no module imports another module's ``_private`` name;
- ``judge`` imports nothing of the sidecar but ``judge`` (and the lazy-import helper); the data plane (``plane``) and
  everything it imports reach no generated protobuf module and no transport;
- at most about a dozen modules sit directly in ``sidecar/``.
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PKG = REPO / "sidecar"
GENERATED = ("sidecar.api", "sidecar._tfproto")


def _modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(REPO).with_suffix("")
        name = ".".join(rel.parts)
        if name.startswith(GENERATED):
            continue
        out[name.removesuffix(".__init__")] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, list[str]]]:
    """(absolute module, names imported from it) for every import in ``path``."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names = [a.name for a in node.names]
            out.append((mod, names))
            out += [(f"{mod}.{n}", []) for n in names if f"{mod}.{n}" in MODULES]  # from pkg import module
    return out


def _edges() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for name, path in MODULES.items():
        for mod, _ in _imports(name, path):
            while mod and mod not in MODULES and not mod.startswith(GENERATED):
                mod = mod.rpartition(".")[0]
            if mod and mod != name and (mod in MODULES or mod.startswith(GENERATED)):
                graph[name].add(mod)
    return graph


def test_no_import_cycle():
    graph = _edges()
    # a package's __init__ importing its own modules is not a cycle of layers
    deps = {m: {d for d in ds if not (m.startswith(d + ".") and d in MODULES)} for m, ds in graph.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in deps.get(m, ()):
            if d not in deps:
                continue
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in deps:
        if m not in state:
            visit(m, [m])
    assert cycles == []


def test_no_module_imports_another_modules_private_names():
    found = []
    for name, path in MODULES.items():
        for mod, names in _imports(name, path):
            if mod.startswith("sidecar") and not mod.startswith(GENERATED):
                found += [f"{name}: {mod}.{n}" for n in names if n.startswith("_") and not n.startswith("__")]
    assert found == []


def _reach(start: str, graph: dict[str, set[str]]) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        for d in graph.get(m, ()):
            if d not in seen:
                seen.add(d)
                todo.append(d)
    return seen


def test_judge_is_pure_and_the_data_plane_speaks_no_wire_protocol():
    graph = _edges()
    for name in MODULES:
        if name.startswith("sidecar.judge."):
            # sidecar.lazy: the import-on-first-use helper, a leaf that imports nothing of ours
            assert {d for d in graph[name] if not d.startswith("sidecar.judge") and d != "sidecar.lazy"} == set(), name
    reached = _reach("sidecar.plane.dataplane", graph)
    assert {m for m in reached if m.startswith(GENERATED) or m == "sidecar.wire.tfapi"} == set()
    assert {m for m in reached if m.startswith("sidecar.transport")} == set()


def test_the_top_level_holds_about_a_dozen_modules():
    top = [p.name for p in PKG.glob("*.py")]
    assert len(top) <= 13, sorted(top)
