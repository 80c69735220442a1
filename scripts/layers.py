"""The import structure of core/ and explorer/: cycles, floors (layers) and in-function imports.

    python scripts/layers.py            # floors, any cycle, and imports made inside functions

A floor is a module's depth in the graph of project imports made at module level: a module
that imports no project module is on floor 0, one that imports only floor-0 modules on floor 1.
Imports made inside functions are listed apart; an import a cycle would refuse at module level
shows up as a cycle once it is counted (--with-local)."""
from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "explorer")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def resolve(mod: str, node: ast.ImportFrom | ast.Import, is_pkg: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    if node.level:
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    # "from pkg import mod" names a module where one exists
    return [target] + [f"{target}.{a.name}" for a in node.names]


def graph(with_local: bool) -> tuple[dict[str, set[str]], list[tuple[str, int, str]]]:
    files = {module_name(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in files}
    local: list[tuple[str, int, str]] = []
    for mod, path in files.items():
        tree = ast.parse(path.read_text())
        top = set(id(n) for n in tree.body)
        top |= {id(n) for s in tree.body if isinstance(s, (ast.If, ast.Try)) for n in ast.walk(s)}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            targets = [t for t in resolve(mod, node, path.name == "__init__.py") if t in files and t != mod]
            if not targets:
                continue
            if id(node) in top or with_local:
                edges[mod].update(targets)
            if id(node) not in top:
                local += [(mod, node.lineno, t) for t in targets]
    return edges, local


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]; counter[0] += 1
        stack.append(v); on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w); low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop(); on.discard(w); comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in edges:
        if v not in index:
            visit(v)
    return out


def floors(edges: dict[str, set[str]]) -> dict[str, int]:
    memo: dict[str, int] = {}

    def floor(v, seen=()):
        if v not in memo:
            deps = [w for w in edges[v] if w not in seen]
            memo[v] = 1 + max((floor(w, seen + (v,)) for w in deps), default=-1)
        return memo[v]

    for v in edges:
        floor(v)
    return memo


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--with-local", action="store_true", help="count imports inside functions as edges too")
    args = ap.parse_args()
    edges, local = graph(args.with_local)
    found = cycles(edges)
    level = floors(edges)
    core_floors = 1 + max(f for m, f in level.items() if m.startswith("core"))
    print(f"core: {sum(m.startswith('core') for m in edges)} modules on {core_floors} floors")
    for f in range(core_floors):
        print(f"  floor {f}: " + ", ".join(sorted(m[5:] for m, lv in level.items() if lv == f and m.startswith("core"))))
    print(f"cycles: {len(found)}")
    for c in found:
        print("  " + " <-> ".join(c))
    print(f"imports inside functions: {len(local)}")
    for mod, line, target in sorted(local):
        print(f"  {mod}:{line} -> {target}")
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main())
