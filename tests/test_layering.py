"""The layering: ``cli -> HTTP -> orchestrator -> storage`` is the only
direction, and the orchestrator's modules import each other without a cycle.

Read from the source with ``ast``, every import wherever it sits: at module
level, under ``if TYPE_CHECKING:`` and inside functions (a deferred import
hides a cycle from Python, not from the reader). An import names the most
specific module it reaches (``from orchestrator import jobs`` is an edge to
``orchestrator.jobs``); parent packages are not counted as edges.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def module_names(root: Path, package: str) -> dict[str, Path]:
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path) -> set[str]:
    """Every module name ``path`` imports (as written, relative ones resolved)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Edges between the modules of ``package`` (to the most specific one named)."""
    mods = module_names(root, package)
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        edges = set()
        for imported in imports_of(name, path):
            if imported in mods and imported != name:
                edges.add(imported)
        # ``from orchestrator.dispatch import base`` named both the package and
        # the module: the module is the edge, not the package.
        graph[name] = {m for m in edges if not any(o.startswith(m + ".") for o in edges)}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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


def foreign_imports(root: Path, package: str, forbidden: tuple[str, ...]) -> list[str]:
    problems = []
    for name, path in module_names(root, package).items():
        for imported in sorted(imports_of(name, path)):
            if imported.split(".")[0] in forbidden:
                problems.append(f"{path.relative_to(root)} imports {imported}")
    return problems


# --- the checks on this repository ---------------------------------------------------


def test_cli_imports_nothing_from_the_server() -> None:
    assert module_names(ROOT, "cli"), "no cli modules found"
    assert foreign_imports(ROOT, "cli", ("orchestrator", "storage")) == []


def test_storage_imports_nothing_from_the_orchestrator() -> None:
    assert module_names(ROOT, "storage"), "no storage modules found"
    assert foreign_imports(ROOT, "storage", ("orchestrator", "cli")) == []


def test_orchestrator_modules_import_each_other_without_a_cycle() -> None:
    graph = import_graph(ROOT, "orchestrator")
    # The graph is really read: the wiring module reaches its components.
    assert {"orchestrator.control", "orchestrator.policy", "orchestrator.roles",
            "orchestrator.dispatch.local", "orchestrator.jobs"} <= graph["orchestrator.server"]
    assert cycles(graph) == []


def test_the_job_entry_points_import_no_orchestrator_module() -> None:
    # APScheduler's stored jobs name ``orchestrator.jobs:run_target`` and its
    # siblings by text; the server reaches them, never the other way round.
    graph = import_graph(ROOT, "orchestrator")
    assert graph["orchestrator.jobs"] == set()


def test_the_single_process_server_loads_no_run_queue_code(tmp_path: Path) -> None:
    # --role all wires the in-process runner only: Procrastinate (and the
    # PostgreSQL driver it needs) stay out until a scale-out role asks.
    code = ("import orchestrator.server, orchestrator.api, sys; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'procrastinate' "
            "or m == 'orchestrator.dispatch.procrastinate'))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


# --- the checks can fail -----------------------------------------------------------------


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_a_cycle_hidden_under_type_checking_or_in_a_function_is_found(tmp_path: Path) -> None:
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                    "    from pkg.b import B\n",
        "pkg/b.py": "def f():\n    from . import a\n",
        "pkg/c.py": "import pkg.a\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/d.py": "from ..c import x\n",
    })
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.b"] == {"pkg.a"}
    assert graph["pkg.sub.d"] == {"pkg.c"}
    assert cycles(graph) == [["pkg.a", "pkg.b"]]


def test_a_forbidden_import_is_found(tmp_path: Path) -> None:
    _write(tmp_path, {"cli/__init__.py": "",
                      "cli/x.py": "def f():\n    from orchestrator.errors import E\n"})
    assert foreign_imports(tmp_path, "cli", ("orchestrator", "storage")) == [
        "cli/x.py imports orchestrator.errors", "cli/x.py imports orchestrator.errors.E"]
