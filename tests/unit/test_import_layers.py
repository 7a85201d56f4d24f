"""The import structure holds without help from the import order: no circle, nothing deferred to hide one.

import-linter (``make lint``) checks the layers and that siblings form no circle. These tests add what
it cannot see:

- every module imports on its own in a fresh interpreter, so a circle that only works because some
  other module happened to be imported first fails here with the partially-initialised-module error;
- the import graph of the gateway and the teller UI — function-local imports and ``TYPE_CHECKING``
  imports included, which a module-order test cannot see — has no circle between any two modules;
- a function-local import of the project's own code is one of the few kept on purpose (start-up cost
  or an optional dependency), never a new way to dodge a circle.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("gateway", "tui")

#: Function-local imports of the project's own modules, kept on purpose: (importer, imported) → why.
#: Each is checked by the graph test below like any other import, so none can hide a circle.
DEFERRED_ON_PURPOSE: dict[tuple[str, str], str] = {
    ("gateway.cli", "gateway.app"): "start-up cost: the HTTP API loads only for `serve` and the HSM commands",
    ("gateway.cli", "gateway.devinit"): "start-up cost: dev-init loads the HTTP API for the signer pool",
    ("gateway.cli", "gateway.supervisor"): "start-up cost: only `serve` with processes > 1",
    ("gateway.ledger.engines", "gateway.ledger.postgres"): "psycopg loads only for a PostgreSQL DSN",
    ("tui.device", "gateway.hardwallet.link"): "pyserial loads only when a teller opens a hard wallet",
    ("tui.launcher", "tui.app"): "optional dependency: Textual (the `tui` extra) is checked for first",
    # Redundant (the module is imported at the top already) and no circle; left to the branch that
    # is editing these two files now.
    ("gateway.offline.devices", "gateway.offline.rules"): "redundant; removed with that file's next change",
    ("tui.screens.devices", "tui.client"): "redundant; removed with that file's next change",
}


def _modules() -> list[str]:
    names = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            names.append(".".join(parts))
    return names


def _import_alone(module: str) -> tuple[str, int, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    return module, result.returncode, result.stderr[-2000:]


def test_every_module_imports_alone_in_a_fresh_interpreter() -> None:
    """Import circle hidden by import order: each module must import first, on its own."""
    modules = _modules()
    assert "gateway.signing" in modules and "tui.app" in modules  # the walk found the packages
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        results = list(pool.map(_import_alone, modules))
    failures = {module: stderr for module, code, stderr in results if code != 0}
    assert not failures, "modules that do not import on their own:\n" + "\n".join(
        f"--- {module}\n{stderr}" for module, stderr in failures.items())


def _cycles(graph: grimp.ImportGraph, modules: set[str]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    edges = {m: sorted(graph.find_modules_directly_imported_by(m) & modules) for m in modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in sorted(modules):
        if start in index:
            continue
        work = [(start, 0)]
        while work:
            node, position = work.pop()
            if position == 0:
                index[node] = low[node] = counter
                counter += 1
                stack.append(node)
                on_stack.add(node)
            successors = edges[node]
            if position < len(successors):
                work.append((node, position + 1))
                successor = successors[position]
                if successor not in index:
                    work.append((successor, 0))
                elif successor in on_stack:
                    low[node] = min(low[node], index[successor])
                continue
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
    return found


def test_the_import_graph_has_no_circle() -> None:
    """Import circle between modules, also through a deferred or type-only import."""
    graph = grimp.build_graph(*PACKAGES, exclude_type_checking_imports=False, cache_dir=None)
    modules = {m for m in graph.modules if m.split(".")[0] in PACKAGES}
    assert len(modules) > 80  # the whole gateway and UI, not a part of it
    cycles = _cycles(graph, modules)
    assert not cycles, f"import circles: {cycles}"


def test_cycle_finder_sees_a_circle() -> None:
    """Positive control: the finder reports a circle through a function-local import."""
    graph = grimp.ImportGraph()
    for name in ("pkg", "pkg.a", "pkg.b", "pkg.c"):
        graph.add_module(name)
    graph.add_import(importer="pkg.a", imported="pkg.b")
    graph.add_import(importer="pkg.b", imported="pkg.c")
    graph.add_import(importer="pkg.c", imported="pkg.a")  # as `def f(): from pkg import a` would add
    assert _cycles(graph, {"pkg.a", "pkg.b", "pkg.c"}) == [["pkg.a", "pkg.b", "pkg.c"]]


def _deferred_first_party_imports() -> set[tuple[str, str]]:
    found = set()
    for module in _modules():
        path = ROOT / Path(*module.split("."))
        source = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        tree = ast.parse(source.read_text(encoding="utf-8"))
        for function in ast.walk(tree):
            if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(function):
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    targets = [node.module]
                elif isinstance(node, ast.Import):
                    targets = [alias.name for alias in node.names]
                else:
                    continue
                found.update((module, target) for target in targets if target.split(".")[0] in PACKAGES)
    return found


def test_function_local_imports_of_our_code_are_only_the_ones_kept_on_purpose() -> None:
    """Circle dodged by deferring an import into a function."""
    unexpected = _deferred_first_party_imports() - set(DEFERRED_ON_PURPOSE)
    assert not unexpected, (
        f"function-local imports of gateway/tui code: {sorted(unexpected)}; import at the top of the module "
        "(move what makes a circle to the lower layer), or, for start-up cost only, add it to DEFERRED_ON_PURPOSE")
