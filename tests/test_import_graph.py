"""Tests for the project's import graph: imports point one way, and every module imports on its own.

The project modules are the ``*.py`` files at the repository root. Two views of one rule:

* statically, with ``ast``: the project modules each module imports at its top level form an
  acyclic graph, and no function or class body imports a project module (an import moved into a
  function to dodge a cycle hides the cycle instead of removing it);
* by running Python: each module is imported first with no other project module loaded (a child
  forked from one interpreter that holds only the third-party packages; on Windows a fresh
  interpreter each), then all the others after it. A cycle of ``from X import name`` imports fails there for whichever of its modules is
  imported first; a module that only works when another was imported before it fails too.

And the top of the graph: the entry points are the modules ARCHITECTURE.md's "Entry points" table
names. No project module imports one of them, each has a ``__main__`` block, and every module with a
``__main__`` block that no project module imports is in that table (a new tool cannot slip past the
rule by not being listed; a library's small command, like ``vocabulary.py build``, is a module
other modules import).
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(p.stem for p in ROOT.glob("*.py"))


def _imported_names(node: ast.Import | ast.ImportFrom) -> set[str]:
    """Top-level package names an import statement loads (relative imports name none here)."""
    if isinstance(node, ast.Import):
        return {alias.name.split(".")[0] for alias in node.names}
    if node.level == 0 and node.module:
        return {node.module.split(".")[0]}
    return set()


def _module_level_imports(body: list[ast.stmt]) -> set[str]:
    """Names imported by statements run at import time: the body and its if/try/with blocks,
    not function or class bodies."""
    names: set[str] = set()
    for stmt in body:
        if isinstance(stmt, (ast.Import, ast.ImportFrom)):
            names |= _imported_names(stmt)
        elif isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        else:
            for field in ("body", "orelse", "finalbody"):
                names |= _module_level_imports(getattr(stmt, field, []))
            for handler in getattr(stmt, "handlers", []):
                names |= _module_level_imports(handler.body)
    return names


def _deferred_imports(tree: ast.Module) -> list[tuple[int, str]]:
    """(line, name) of every import inside a function or class body."""
    found: list[tuple[int, str]] = []
    for outer in ast.walk(tree):
        if isinstance(outer, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            for node in ast.walk(outer):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    found.extend((node.lineno, name) for name in _imported_names(node))
    return sorted(set(found))


def _project_graph(modules: list[str], root: Path) -> dict[str, set[str]]:
    """Module -> the project modules it imports at its top level."""
    project = set(modules)
    graph = {}
    for name in modules:
        tree = ast.parse((root / f"{name}.py").read_text(encoding="utf-8"), filename=f"{name}.py")
        graph[name] = (_module_level_imports(tree.body) & project) - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path [a, b, ..., a], or None when the graph is acyclic (depth-first search)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        """Search below `node`; return the first cycle met."""
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start)
            if cycle:
                return cycle
    return None


def test_find_cycle_on_known_graphs(tmp_path: Path) -> None:
    """The checks below can fail: a cycle hidden in an if-block and a deferred import are both found."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    (tmp_path / "low.py").write_text("import os\nif True:\n    from high import x\n", encoding="utf-8")
    (tmp_path / "high.py").write_text("from low import y\n\ndef f():\n    import low\n", encoding="utf-8")
    graph = _project_graph(["high", "low"], tmp_path)
    assert graph == {"high": {"low"}, "low": {"high"}}
    assert find_cycle(graph) == ["high", "low", "high"]
    assert _deferred_imports(ast.parse((tmp_path / "high.py").read_text(encoding="utf-8"))) == [(4, "low")]


def test_project_imports_are_acyclic() -> None:
    """The project modules' top-level imports of each other form a directed acyclic graph."""
    assert len(MODULES) > 10
    graph = _project_graph(MODULES, ROOT)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_project_import_inside_functions() -> None:
    """No function or class body imports a project module (that would hide a cycle, not remove it)."""
    project = set(MODULES)
    hidden = {}
    for name in MODULES:
        tree = ast.parse((ROOT / f"{name}.py").read_text(encoding="utf-8"), filename=f"{name}.py")
        found = [(line, imported) for line, imported in _deferred_imports(tree) if imported in project]
        if found:
            hidden[name] = found
    assert hidden == {}


def _import_first(first: str) -> str:
    """Import `first` alone in a fresh interpreter, then every other project module; '' or the error."""
    others = [m for m in MODULES if m != first]
    code = "import importlib\n" + "\n".join(f"importlib.import_module({m!r})" for m in [first, *others])
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, encoding="utf-8", timeout=240, check=False)
    return "" if proc.returncode == 0 else proc.stderr[-3000:]


def _third_party_imports() -> list[str]:
    """The packages outside the project that project modules import at their top level."""
    project = set(MODULES)
    names: set[str] = set()
    for name in MODULES:
        names |= _module_level_imports(ast.parse((ROOT / f"{name}.py").read_text(encoding="utf-8")).body)
    return sorted(names - project - {"__future__"})


# One interpreter imports the third-party packages once, then forks a child per module: the child starts with no
# project module loaded and imports `first`, then the others. Third-party packages cannot take part in a cycle of
# project imports, so this checks what a fresh interpreter per module checks, without torch's seconds of start-up each.
_FORKED_CHECK = """
import importlib, json, os, sys, traceback
for package in PACKAGES:
    try:
        importlib.import_module(package)
    except ImportError:  # an optional dependency: the project module that needs it says so itself
        pass
failed = {}
for first in MODULES:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        code = 0
        try:
            for name in [first] + [m for m in MODULES if m != first]:
                importlib.import_module(name)
        except BaseException:
            os.write(write_end, traceback.format_exc()[-3000:].encode("utf-8"))
            code = 1
        os._exit(code)
    os.close(write_end)
    message = b""
    while True:
        chunk = os.read(read_end, 65536)
        if not chunk:
            break
        message += chunk
    os.close(read_end)
    _, status = os.waitpid(pid, 0)
    if status != 0:
        failed[first] = message.decode("utf-8", "replace") or f"exit status {status}"
print(json.dumps(failed))
"""


@pytest.mark.e2e
def test_each_module_imports_first_in_a_fresh_interpreter() -> None:
    """Every project module imports alone with no other project module loaded, and all the others import after it."""
    if hasattr(os, "fork"):
        code = f"PACKAGES = {_third_party_imports()!r}\nMODULES = {MODULES!r}\n{_FORKED_CHECK}"
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, encoding="utf-8", timeout=600, check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
        failed = json.loads(proc.stdout.strip().splitlines()[-1])
    else:  # Windows: one interpreter per module (torch makes each start take seconds), a few at a time
        with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
            errors = dict(zip(MODULES, pool.map(_import_first, MODULES)))
        failed = {name: error for name, error in errors.items() if error}
    assert not failed, "\n\n".join(f"importing {name} first:\n{error}" for name, error in failed.items())


# ---------------------------------------------------------------------------------------------- entry points


def _has_main_block(tree: ast.Module) -> bool:
    """Whether the module has a top-level `if __name__ == "__main__":` block."""
    for stmt in tree.body:
        if isinstance(stmt, ast.If) and isinstance(stmt.test, ast.Compare):
            sides = [stmt.test.left, *stmt.test.comparators]
            if any(isinstance(n, ast.Name) and n.id == "__name__" for n in sides) and any(
                isinstance(n, ast.Constant) and n.value == "__main__" for n in sides
            ):
                return True
    return False


def declared_entry_points(architecture: str) -> set[str]:
    """Module names in the first column of the "Entry points" table of ARCHITECTURE.md."""
    match = re.search(r"^\*\*Entry points[^\n]*\*\*\n(.*?)(?:\n\n|\Z)", architecture, re.M | re.S)
    if match is None:
        raise AssertionError('ARCHITECTURE.md has no "**Entry points ...**" table')
    names: set[str] = set()
    for line in match.group(1).splitlines():
        cells = line.split("|")
        if len(cells) > 2 and not set(cells[1].strip()) <= set("-: "):
            names |= set(re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)\.py`", cells[1]))
    return names


def entry_point_violations(graph: dict[str, set[str]], mains: set[str], declared: set[str]) -> list[str]:
    """What breaks the entry-point rule, one sentence each (empty when it holds)."""
    problems = [f"{name} is listed as an entry point but is not a module with a __main__ block" for name in sorted(declared - mains)]
    imported = set().union(*graph.values()) if graph else set()
    problems += [
        f"{name} has a __main__ block and no module imports it, so it is an entry point: list it in ARCHITECTURE.md's table"
        for name in sorted(mains - declared - imported)
    ]
    problems += [f"{name} imports the entry point {target}" for name in sorted(graph) for target in sorted(graph[name] & declared)]
    return problems


def test_entry_point_rule_catches_what_it_should(tmp_path: Path) -> None:
    """The rule's checks can fail: an entry point importing another, an unlisted tool, a listed library."""
    table = "**Entry points (top)**\n\n| module | owns |\n|---|---|\n| `tool_a.py` | a |\n| `tool_b.py` (+ `lib.py`) | b |\n"
    assert declared_entry_points("# x\n\n" + table + "\nmore\n") == {"tool_a", "tool_b", "lib"}
    sources = {
        "lib": "X = 1\n",
        "cli_lib": "from lib import X\nif __name__ == '__main__':\n    print(X)\n",
        "tool_a": "import lib\nif __name__ == '__main__':\n    pass\n",
        "tool_b": "from tool_a import f\nimport cli_lib\nif '__main__' == __name__:\n    pass\n",
        "tool_c": "import lib\nif __name__ == '__main__':\n    pass\n",
    }
    for name, text in sources.items():
        (tmp_path / f"{name}.py").write_text(text, encoding="utf-8")
    graph = _project_graph(sorted(sources), tmp_path)
    mains = {n for n in sources if _has_main_block(ast.parse(sources[n]))}
    assert mains == {"cli_lib", "tool_a", "tool_b", "tool_c"}
    assert entry_point_violations(graph, mains, {"tool_a", "tool_b"}) == [
        "tool_c has a __main__ block and no module imports it, so it is an entry point: list it in ARCHITECTURE.md's table",
        "tool_b imports the entry point tool_a",
    ]
    assert entry_point_violations(graph, mains, {"tool_a", "tool_c", "ghost"}) == [
        "ghost is listed as an entry point but is not a module with a __main__ block",
        "tool_b has a __main__ block and no module imports it, so it is an entry point: list it in ARCHITECTURE.md's table",
        "tool_b imports the entry point tool_a",
    ]
    # A library with a small command stays a library while modules import it.
    assert (
        entry_point_violations({"lib": set(), "tool_a": {"lib"}, "cli_lib": {"lib"}, "tool_c": {"cli_lib"}}, mains - {"tool_b"}, {"tool_a", "tool_c"})
        == []
    )


def test_no_module_imports_an_entry_point() -> None:
    """Entry points wire library modules and are the top of the graph: nothing imports them."""
    declared = declared_entry_points((ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8"))
    assert {"train_direct", "validation_loop", "export_model", "tag_images"} <= declared
    mains = {name for name in MODULES if _has_main_block(ast.parse((ROOT / f"{name}.py").read_text(encoding="utf-8")))}
    assert entry_point_violations(_project_graph(MODULES, ROOT), mains, declared) == []


# ---------------------------------------------------------------------------------------------- optional packages

# An optional package is imported by the one module it serves, so the rest installs and runs without it.
OPTIONAL_OWNERS = {"gradio": {"tag_app"}}


def _importers(package: str, modules: list[str], root: Path) -> set[str]:
    """Project modules that import `package` anywhere (top level or inside a function)."""
    found = set()
    for name in modules:
        tree = ast.parse((root / f"{name}.py").read_text(encoding="utf-8"), filename=f"{name}.py")
        if any(package in _imported_names(node) for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))):
            found.add(name)
    return found


def test_optional_packages_stay_with_their_owner(tmp_path: Path) -> None:
    """gradio is tag_app's alone: no other module imports it, and nothing imports tag_app (an entry point)."""
    (tmp_path / "page.py").write_text("def f():\n    import gradio.themes\n", encoding="utf-8")
    (tmp_path / "other.py").write_text("import os\n", encoding="utf-8")
    assert _importers("gradio", ["other", "page"], tmp_path) == {"page"}  # the check sees a deferred import too
    for package, owners in OPTIONAL_OWNERS.items():
        assert _importers(package, MODULES, ROOT) == owners
