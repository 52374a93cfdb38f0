#!/usr/bin/env python3
"""Structure checks import-linter does not make: no module-level import cycle between the modules of a
package, and no function longer than the limit.

python scripts/check_layers.py                 # megaslim/ for cycles, megaslim/ and bench/ for lengths
python scripts/check_layers.py --package DIR --lengths DIR [DIR ...] --max-lines 80

Imports count when they run at import time: module top level, including inside top-level if/try/with
blocks and class bodies, but not inside functions and not under `if TYPE_CHECKING:`. Relative imports
are resolved; `from a import b` is an edge to module a.b when that module exists, else to a. Cycles are
the strongly connected components of that graph (Tarjan), each reported with one cycle through it.
Function length: end_lineno - lineno + 1 of the `def` (decorators excluded), nested functions each on
their own. Prints every offender and exits 1 if there is any.
"""
from __future__ import annotations

import argparse
import ast
import sys
from collections import deque
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------
# the module-level import graph
# --------------------------------------------------------------------------------------------------
def package_modules(package_dir: Path) -> dict[str, Path]:
    """Dotted module name -> file for every .py under `package_dir` (named after its folder)."""
    package_dir = package_dir.resolve()
    out = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def import_time_imports(tree: ast.Module) -> Iterator[ast.Import | ast.ImportFrom]:
    """The import statements that run when the module is imported (not in functions / TYPE_CHECKING)."""
    todo = list(tree.body)
    while todo:
        node = todo.pop(0)
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            todo += node.orelse if _is_type_checking(node.test) else node.body + node.orelse
        elif isinstance(node, ast.Try) or (sys.version_info >= (3, 11) and isinstance(node, ast.TryStar)):
            todo += node.body + node.orelse + node.finalbody + [s for h in node.handlers for s in h.body]
        elif isinstance(node, (ast.With, ast.ClassDef, ast.For, ast.While)):
            todo += node.body + getattr(node, "orelse", [])


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module named by `from ... import` in `module` (relative levels resolved)."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
    return ".".join(base + ([node.module] if node.module else []))


def imported_modules(module: str, path: Path, known: set[str]) -> set[str]:
    """The modules in `known` that `module` imports at import time."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    out = set()
    for node in import_time_imports(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            base = _absolute(module, is_package, node)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        out |= {t for t in targets if t in known}
    return out


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    mods = package_modules(package_dir)
    return {m: imported_modules(m, p, set(mods)) for m, p in mods.items()}


# --------------------------------------------------------------------------------------------------
# cycles: Tarjan's strongly connected components
# --------------------------------------------------------------------------------------------------
def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative: no recursion limit); components in discovery order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == node:
                        break
                out.append(sorted(comp))
    return out


def one_cycle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """A shortest cycle through the component's first module, staying inside the component."""
    start, inside = component[0], set(component)
    prev: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for nxt in sorted(graph[node] & inside):
            if nxt == start:
                path = [node]
                while path[-1] != start:
                    path.append(prev[path[-1]])
                return path[::-1] + [start]
            if nxt not in prev:
                prev[nxt] = node
                queue.append(nxt)
    return [start, start]


def import_cycles(package_dir: Path) -> list[list[str]]:
    """One cycle (first module repeated at the end) per strongly connected component with a cycle."""
    graph = import_graph(package_dir)
    comps = [c for c in strongly_connected(graph) if len(c) > 1 or c[0] in graph[c[0]]]
    return [one_cycle(graph, c) for c in comps]


# --------------------------------------------------------------------------------------------------
# function length
# --------------------------------------------------------------------------------------------------
def long_functions(dirs: list[Path], max_lines: int) -> list[tuple[Path, int, str, int]]:
    """(file, line, qualified name, lines) of every function or method longer than `max_lines`."""
    out = []
    for d in dirs:
        for path in sorted(Path(d).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            out += _long_in(tree, path, max_lines)
    return out


def _long_in(tree: ast.AST, path: Path, max_lines: int, prefix: str = "") -> list[tuple[Path, int, str, int]]:
    out = []
    for node in ast.iter_child_nodes(tree):
        name = prefix + node.name if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) else ""
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = node.end_lineno - node.lineno + 1
            if n > max_lines:
                out.append((path, node.lineno, name, n))
            out += _long_in(node, path, max_lines, name + ".")
        elif isinstance(node, ast.ClassDef):
            out += _long_in(node, path, max_lines, name + ".")
        else:
            out += _long_in(node, path, max_lines, prefix)
    return out


# --------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------
def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--package", type=Path, default=ROOT / "megaslim", help="package checked for import cycles")
    ap.add_argument("--lengths", type=Path, nargs="+", default=[ROOT / "megaslim", ROOT / "bench"],
                    help="folders checked for long functions")
    ap.add_argument("--max-lines", type=int, default=80)
    args = ap.parse_args(argv)
    cycles = import_cycles(args.package)
    longs = long_functions(args.lengths, args.max_lines)
    for cycle in cycles:
        print(f"import cycle: {' -> '.join(cycle)}")
    for path, line, name, n in longs:
        print(f"{_rel(path)}:{line}: {name} is {n} lines (limit {args.max_lines})")
    if cycles or longs:
        print(f"check_layers: {len(cycles)} import cycle(s), {len(longs)} function(s) over {args.max_lines} "
              "lines", file=sys.stderr)
        return 1
    print(f"check_layers: no import cycle in {args.package.name}, no function over {args.max_lines} lines in "
          f"{', '.join(d.name for d in args.lengths)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
