"""No import circles among aip's modules: a static check of every import, and fresh interpreters for the bottom ones.

The static check reads each module's imports with `ast` and looks for cycles among aip modules, first through the
imports that run when a module is imported (module and class level), then through those inside functions too: a
function-level import that closes a circle only hides it until that function runs.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "aip"
# Modules at the bottom: what they may pull in of aip when imported alone in a fresh interpreter.
BOTTOM = {
    "aip.errors": {"aip", "aip.errors"},
    "aip.registry": {"aip", "aip.registry"},
    "aip.schema": {"aip", "aip.schema"},
    "aip.config_yaml": {"aip", "aip.config_yaml", "aip.errors", "aip.schema"},
    "aip.config": {"aip", "aip.config", "aip.config_yaml", "aip.errors", "aip.schema"},
    "aip.config_doc": {"aip", "aip.config", "aip.config_doc", "aip.config_yaml", "aip.errors", "aip.schema"},
}


def module_names(root: Path) -> dict[str, Path]:
    """Dotted name -> file of every module of the package at `root` (a package is its `__init__.py`)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.Module) -> list[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement with whether it runs inside a function; `if TYPE_CHECKING:` blocks never run."""
    found: list[tuple[ast.Import | ast.ImportFrom, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    visit(other, in_function)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append((child, in_function))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return found


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph(root: Path) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(module-level edges, function-level edges) between the modules of the package at `root`.

    Importing `a.b.c` also runs the packages `a` and `a.b` first, so those are edges too, except the importer's own
    ancestors (already being imported when it runs); a name imported from a package is that package's submodule
    when one of that name exists, else an edge to the package itself.
    """
    modules = module_names(root)
    top: dict[str, set[str]] = {m: set() for m in modules}
    inner: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node, in_function in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                if target not in modules:
                    continue  # another package: it cannot import aip back into a circle that aip starts
                implied = [a for a in _ancestors(target) if a in modules and a not in _ancestors(name)]
                for dest in (target, *implied):
                    if dest != name:
                        (inner if in_function else top)[name].add(dest)
    return top, inner


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a path whose last node is its first, or None when it has none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)) is not None:
            return cycle
    return None


def test_the_checker_finds_circles_of_any_length_and_at_either_level(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a.py": "from pkg import b\n",
        "b.py": "import pkg.sub.c\n",
        "sub/__init__.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n",
        "sub/c.py": "def f():\n    from pkg.a import x\n",
        "sub/d.py": "from pkg.sub import c\n",  # its own package: imported before it, no edge back
    }
    for rel, text in files.items():
        (pkg / rel).write_text(text)
    top, inner = import_graph(pkg)
    assert find_cycle(top) is None  # the TYPE_CHECKING import never runs; c imports a only inside f
    assert top["pkg.b"] == {"pkg.sub", "pkg.sub.c"} and top["pkg.sub.d"] == {"pkg.sub.c"}
    both = {m: top[m] | inner[m] for m in top}
    assert find_cycle(both) == ["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]
    (pkg / "sub" / "__init__.py").write_text("from pkg import a\n")
    cycle = find_cycle(import_graph(pkg)[0])
    assert cycle is not None and cycle[0] == cycle[-1] and {"pkg.a", "pkg.b", "pkg.sub"} <= set(cycle)


def test_no_module_of_aip_imports_one_that_imports_it_back() -> None:
    top, inner = import_graph(PACKAGE)
    assert len(top) > 30 and "aip.config" in top["aip.data"]  # the graph is really read
    cycle = find_cycle(top)
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])
    cycle = find_cycle({m: top[m] | inner[m] for m in top})
    assert cycle is None, "import circle through a function-level import: " + " -> ".join(cycle or [])


def test_config_and_errors_import_no_registry() -> None:
    top, inner = import_graph(PACKAGE)
    assert top["aip.errors"] == set() and inner["aip.errors"] == set()
    assert top["aip.schema"] | inner["aip.schema"] == set()
    assert top["aip.config"] | inner["aip.config"] == {"aip.config_yaml", "aip.errors", "aip.schema"}
    assert top["aip.config_yaml"] | inner["aip.config_yaml"] == {"aip.errors", "aip.schema"}
    assert {"aip.data", "aip.models", "aip.prune.importance", "aip.config"} <= top["aip.checks"]


def test_the_bottom_modules_import_alone_in_a_fresh_interpreter() -> None:
    code = (
        "import importlib, sys; importlib.import_module(sys.argv[1]); "
        "print(sorted(m for m in sys.modules if m == 'aip' or m.startswith('aip.')))"
    )
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-c", code, name], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for name in [*BOTTOM, "aip.checks", "aip.export"]
    }
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"import {name}: {err[-2000:]}"
        if name in BOTTOM:
            assert set(ast.literal_eval(out)) == BOTTOM[name], name


def test_the_task_registry_imports_a_task_only_when_it_is_asked_for() -> None:
    """`TASKS` holds both tasks by name; a classification run's task never imports the detection task."""
    code = (
        "import sys; from aip.config import config_from_dict; from aip.tasks import TASKS, task_for; "
        "task = task_for(config_from_dict({})); "
        "print([TASKS.names(), task.name, sorted(m for m in sys.modules if m.startswith('aip.tasks'))])"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    names, task, loaded = ast.literal_eval(out.stdout)
    assert names == ["classification", "detection"] and task == "classification"
    assert loaded == ["aip.tasks", "aip.tasks.base", "aip.tasks.classification"]
