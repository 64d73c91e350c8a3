"""Structure figures of a package: lines, the intra-package import graph and its cycles, and how often
the settings that used to be threaded through signatures appear as parameters.

    python scripts/structure.py jaxdecode
"""

from __future__ import annotations

import ast
import collections
import sys
from pathlib import Path

THREADED = ("config", "attention_impl", "parallel", "plan", "stop_ids", "draft_config", "gamma", "budget", "sinks")
THREADED += ("buffer_size", "cache_len", "settings")


def main(root: Path) -> None:
    files = sorted(root.rglob("*.py"))
    graph: dict[str, set[str]] = collections.defaultdict(set)
    threaded: collections.Counter = collections.Counter()
    for path in files:
        module = ".".join(path.relative_to(root.parent).with_suffix("").parts)
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                names = [f"{base}.{node.module}"] if node.module else [f"{base}.{a.name}" for a in node.names]
                graph[module].update(n for n in names if not n.endswith("__init__"))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                threaded.update(a.arg for a in node.args.args + node.args.kwonlyargs if a.arg in THREADED)

    def cycle_from(start: str) -> list[str] | None:
        stack = [(start, [start])]
        while stack:
            node, trail = stack.pop()
            for nxt in sorted(graph.get(node, ())):
                if nxt == start:
                    return trail
                if nxt not in trail:
                    stack.append((nxt, [*trail, nxt]))
        return None

    cycles = {tuple(sorted(c)) for m in graph if not m.endswith("__init__") and (c := cycle_from(m))}
    print(f"lines {sum(len(p.read_text().splitlines()) for p in files)} in {len(files)} files")
    print(f"parameters named like threaded settings: {dict(threaded)}, total {sum(threaded.values())}")
    print(f"import cycles: {sorted(cycles) or 'none'}")
    for module in sorted(graph):
        if not module.endswith("__init__"):
            print(f"  {module} -> {', '.join(sorted(t.removeprefix(root.name + '.') for t in graph[module]))}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
