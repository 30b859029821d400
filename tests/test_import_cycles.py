"""No import cycle among the project's modules (issue 14), read from the source, lazy imports
(inside functions) included: a cycle through a lazy import still ties the modules together and
was how the plugin -> provider -> algorithms -> plugin cycle hid."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("refound_core", "refound_qgis", "training")


def _modules() -> dict:
    """``{dotted module name: path}`` of every module of the project's packages."""
    out = {}
    for pkg in PACKAGES:
        for path in (REPO / pkg).rglob("*.py"):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict) -> set:
    """Project modules ``name`` imports (``from pkg import mod`` counts as ``pkg.mod`` when that
    is a module). A package's own ``__init__`` is not counted as imported by its submodules'
    ``from . import x`` (Python runs it first anyway; that is not a cycle of the code's making)."""
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                root = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                root = node.module or ""
            targets = [f"{root}.{a.name}" if f"{root}.{a.name}" in modules else root for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t and t != name and not name.startswith(t + "."):
                found.add(t)
    return found


def _cycles(graph: dict) -> list:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert _cycles(graph) == []


def test_cycle_finder_finds_a_cycle():
    # The check above is only meaningful if a cycle is reported.
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_plugin_modules_stay_small_and_hold_no_grid_arithmetic():
    """refound_qgis: no file over 300 lines, and the grid (ids, blocks) only from refound_core (issue 14)."""
    import re

    too_long, grid = [], []
    for path in sorted((REPO / "refound_qgis").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        if text.count("\n") > 300:
            too_long.append(f"{path.relative_to(REPO)}: {text.count(chr(10))} lines")
        if re.search(r"class _GridArithmetic|def _cell_ids|math\.floor\([^)]*cell_size", text):
            grid.append(str(path.relative_to(REPO)))
    assert too_long == [] and grid == []
