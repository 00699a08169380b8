"""The tree stays the picture of the pipeline: small modules, short functions, imports flowing one way.

Read from the source's AST (not from a list kept by hand), so the checks cannot drift from the code:
- no module over 600 lines and no function over 100 lines;
- no import cycle between modules, function-level imports included;
- imports flow top -> stages -> floor: the floor (config, data, models, ...) and the pure math (losses/) import no
  stage, and no stage imports the command line.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "distill"
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 100
TOP = {"distill", "cli", "api", "__main__", "demo"}  # "distill": the package's own __init__ (`distill.run`)
STAGES = {"student", "cache", "generate", "train", "report"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """Every distill module `name` imports, at any depth of the file (function-level imports count)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            # `from distill.x import y` imports distill.x, and distill.x.y when y is a module
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name and target != "distill":
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: imported_modules(name, path, known) for name, path in found.items()}


def room(name: str) -> str:
    """The top-level room of a module: 'cli', 'train', 'losses', 'config', ..."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "distill"


def test_the_graph_is_read():
    graph = import_graph()
    assert "distill.train.loop" in graph and "distill.losses.dense" in graph["distill.train.parallel"] | set().union(
        *graph.values()
    )


@pytest.mark.parametrize("name", sorted(modules()))
def test_no_module_is_over_600_lines(name):
    lines = modules()[name].read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_MODULE_LINES, f"{name}: {lines} lines"


def test_no_function_is_over_100_lines():
    long = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {length} lines")
    assert not long, "; ".join(long)


def test_no_import_cycle():
    graph = import_graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "; ".join(cycles)


def test_imports_flow_from_the_top_to_the_floor():
    wrong = []
    for name, imports in import_graph().items():
        here = room(name)
        for target in imports:
            there = room(target)
            if here not in TOP and there in TOP:
                wrong.append(f"{name} -> {target} (a stage or the floor imports the command line)")
            elif here not in TOP | STAGES and there in STAGES:
                wrong.append(f"{name} -> {target} (the floor imports a stage)")
    assert not wrong, "; ".join(sorted(wrong))
