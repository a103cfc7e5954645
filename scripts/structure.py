"""The structure of the supervisor and the runtime, drawn from their imports.

A room is a module at the top of `openedge_function/` (the message path) or a folder of it (a side
system); the runtime is a room of its own but for what both sides must agree on: its generated
stubs (`runtime_python._pb`, from protos/function.proto) and `runtime_python.wire`. Every import counts: at the top of a module, inside a
function, under TYPE_CHECKING. A room's floor is one above the highest floor of the rooms it
imports, so a structure without circles has no import that runs back up (the members of a circle
are drawn as one node).

    python scripts/structure.py             floors, and what each room imports
    python scripts/structure.py --modules   the same for single modules
"""
from __future__ import annotations

import ast
import os
import sys
from typing import Dict, List, Set

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("openedge_function", "runtime_python")


def modules() -> Dict[str, str]:
    """{dotted module name: path} of both packages, without the generated stubs."""
    found = {}
    for package in PACKAGES:
        for directory, dirs, files in os.walk(os.path.join(ROOT, package)):
            dirs[:] = [d for d in dirs if d not in ("__pycache__", "_pb")]
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(directory, name)
                    dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                    found[dotted[:-len(".__init__")] if dotted.endswith(".__init__") else dotted] = path
    found["runtime_python._pb"] = os.path.join(ROOT, "runtime_python", "_pb", "__init__.py")   # generated
    return found


def imports(name: str, path: str, known: Set[str]) -> Set[str]:
    """The modules of ours that module `name` imports, anywhere in it."""
    if name == "runtime_python._pb":
        return set()   # generated from protos/function.proto
    with open(path, encoding="utf-8") as fh:
        tree = ast.parse(fh.read(), path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[:len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def room(module: str) -> str:
    """The room a module is in."""
    parts = module.split(".")
    if parts[0] == "runtime_python":
        return module if module in ("runtime_python.wire", "runtime_python._pb") else "runtime_python"
    if len(parts) == 1:
        return "openedge_function (package)"
    if len(parts) == 2 and not os.path.isdir(os.path.join(ROOT, *parts)):
        return parts[1]
    return parts[1] + "/"


def graph(by_room: bool = True) -> Dict[str, Set[str]]:
    """{room: the rooms it imports} (or the same for modules)."""
    found = modules()
    known = set(found)
    edges: Dict[str, Set[str]] = {}
    for name, path in found.items():
        source = room(name) if by_room else name
        targets = {room(t) if by_room else t for t in imports(name, path, known)}
        edges.setdefault(source, set()).update(targets - {source})
    return edges


def circles(edges: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components of more than one node (Tarjan's)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []
    sys.setrecursionlimit(10000)

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(edges.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
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

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def floors(edges: Dict[str, Set[str]]) -> Dict[str, int]:
    """Each node's floor: 0 for one that imports none of ours, else one above its highest import
    (the graph must have no circles)."""
    floor: Dict[str, int] = {}

    def of(node: str) -> int:
        if node not in floor:
            floor[node] = 1 + max((of(t) for t in edges.get(node, ())), default=-1)
        return floor[node]

    for node in edges:
        of(node)
    return floor


def condensed(edges: Dict[str, Set[str]]) -> Dict[str, Set[str]]:
    """`edges` with each circle merged into one node (`a + b`), so that floors can be drawn."""
    merged = {member: " + ".join(c) for c in circles(edges) for member in c}
    out: Dict[str, Set[str]] = {}
    for node, targets in edges.items():
        source = merged.get(node, node)
        out.setdefault(source, set()).update(merged.get(t, t) for t in targets)
        out[source].discard(source)
    return out


def draw(by_room: bool = True) -> str:
    edges = graph(by_room)
    found = circles(edges)
    out = ["circles: " + ("; ".join(" <-> ".join(c) for c in found) if found else "none")]
    edges = condensed(edges)
    levels = floors(edges)
    for level in sorted(set(levels.values()), reverse=True):
        out.append(f"floor {level}")
        out.extend(f"  {node:32} {', '.join(sorted(edges.get(node, ()))) or '-'}"
                   for node in sorted(n for n, lev in levels.items() if lev == level))
    return "\n".join(out)


if __name__ == "__main__":
    print(draw(by_room="--modules" not in sys.argv))
