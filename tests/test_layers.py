"""The package's import graph: folders are layers of the pipeline and imports point down, never up, and
there are no cycles (the guide's shape: cli and api > recipes > outputs > methods > models > engine > data >
base)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "loracl"
# Higher layers may import lower ones (and their own); top-level modules not listed form the base layer.
LAYERS = {
    "cli": 7, "__main__": 7, "api": 7, "recipes": 6, "outputs": 5, "methods": 4, "models": 3, "engine": 2,
    "data": 1,
}
# The package root forwards `loracl.run` & co. to the Python API on first access (inside its __getattr__,
# so `import loracl` loads nothing): the one import that points up, from a facade nothing below imports
# for it (they import the root only for __version__).
FACADE = {("loracl", "loracl.api")}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.get(parts[1], 0) if len(parts) > 1 else 0


def imports_of(path: Path) -> set[str]:
    """Every loracl module `path` imports, at module level or inside functions (absolute names)."""
    found = set()
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] != "loracl":
                continue
            for alias in node.names:  # `from loracl.engine import distributed` names a module
                candidate = f"{base}.{alias.name}"
                is_module = (PACKAGE.parent / (candidate.replace(".", "/") + ".py")).is_file()
                found.add(candidate if is_module else base)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "loracl")
    return found


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) - {module_name(p)} for p in PACKAGE.rglob("*.py")}


def test_no_module_imports_a_higher_layer() -> None:
    upward = [
        f"{source} -> {target}"
        for source, targets in graph().items()
        for target in targets
        if layer(target) > layer(source) and (source, target) not in FACADE
    ]
    assert not upward


def test_the_import_graph_has_no_cycle() -> None:
    edges = graph()
    # A package's __init__ re-exporting its own modules is not a cycle of the design.
    edges = {s: {t for t in ts if not s.startswith(t + ".")} for s, ts in edges.items()}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*path, node, nxt]
            if nxt not in state and (cycle := visit(nxt, [*path, node])):
                return cycle
        state[node] = 2
        return None

    first_cycle = next((c for m in sorted(edges) if m not in state and (c := visit(m, []))), None)
    assert first_cycle is None
