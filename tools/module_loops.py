#!/usr/bin/env python3
"""Import loops between the modules of a Rust crate (`make lint` runs it on core, the wasm glue
and the CLI; issue 22). A module is a top-level file or folder of `src/`; it uses another when
its code (not its comments, not its `#[cfg(test)]` part) names `crate::<other>`. Prints each
loop (a strongly connected set of modules, with the edges inside it) and exits 1 if there is
one; prints `0 loops` and exits 0 otherwise.

    python3 tools/module_loops.py filter/core/src [more src dirs ...]
"""

from __future__ import annotations

import re
import sys
from pathlib import Path


def uses(src: Path) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in sorted(src.rglob("*.rs")):
        name = path.relative_to(src).parts[0].removesuffix(".rs")
        if name in ("lib", "main"):
            continue
        out = graph.setdefault(name, set())
        text = path.read_text().split("#[cfg(test)]")[0]
        text = re.sub(r"//[^\n]*", "", text)
        for m in re.finditer(r"crate::(\w+)", text):
            out.add(m.group(1))
        for group in re.finditer(r"crate::\{([^}]*)\}", text):
            for part in group.group(1).split(","):
                out.add(part.strip().split("::")[0])
        out.discard(name)
        out.discard("")
    return {k: {v for v in vs if v in graph} for k, vs in graph.items()}


def loops(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
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
                found.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def main(dirs: list[str]) -> int:
    total = 0
    for d in dirs:
        graph = uses(Path(d))
        for comp in loops(graph):
            total += 1
            print(f"{d}: a loop of {len(comp)} modules:")
            for m in comp:
                print(f"  {m} -> {', '.join(sorted(graph[m] & set(comp)))}")
    print(f"{total} loops")
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["filter/core/src"]))
