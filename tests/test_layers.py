"""The layering of style.md, checked from the import statements themselves.

The codec, the hub, the router and the session are pure: they may not import
the transports, the listener, the loop or a socket, and no module of the
package may be part of an import cycle. A change that breaks either fails
here, long before anyone notices the layers have blurred.
"""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "muxserver"
PURE = ("framing", "protocol", "names", "hub", "router", "session", "history")
FORBIDDEN = (
    "muxserver.transport",
    "muxserver.listener",
    "muxserver.loop",
    "socket",
    "selectors",
    "ssl",
)


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Absolute names of what a module imports at its top level or in functions."""
    tree = ast.parse(path.read_text())
    here = _module_name(path).split(".")
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here if is_pkg else here[:-1]
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            # "from . import protocol" names a module too
            found.update(f"{mod}.{alias.name}" for alias in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        graph[name] = {m for m in _imports(path) if m in modules and m != name}
    return graph


def test_pure_layers_import_no_io():
    graph_files = {_module_name(p): p for p in PKG.rglob("*.py")}
    for short in PURE:
        name = f"muxserver.{short}"
        if name not in graph_files:
            continue
        bad = sorted(
            m for m in _imports(graph_files[name])
            if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)
        )  # fmt: skip
        assert not bad, f"{name} imports {bad}: it must stay free of I/O"


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (depth-first), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycles():
    graph = _graph()
    assert "muxserver.server" in graph["muxserver.cli"]  # the graph is really read
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_module_sizes():
    for path in PKG.rglob("*.py"):
        lines = len(path.read_text().splitlines())
        assert lines <= 700, f"{path.name} has {lines} lines (keep modules under ~700)"
    assert len((PKG / "server.py").read_text().splitlines()) < 400
