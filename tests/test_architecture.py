"""The architecture holds (issue 8): imports flow one way between fkdiff's packages and `teachers`, and no library
module imports an entry point.

The graph is built from the source with `ast` (every import statement, function-level ones included, since a lazy
import is still a dependency). Its nodes are components: each direct child of `fkdiff` (a module such as
`fkdiff.diffusion` or a package such as `fkdiff.data`, `fkdiff.smc`), the package `fkdiff` itself (its __init__), and
`teachers`. Entry points (modules with an `if __name__ == "__main__":` block: `fkdiff.distill`, `fkdiff.sample`,
`teachers.train`) are nodes of their own: they may import anything, nothing may import them.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fkdiff", "teachers")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _is_entry_point(tree: ast.Module) -> bool:
    for node in tree.body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Compare):
            names = [n.id for n in ast.walk(node.test) if isinstance(n, ast.Name)]
            consts = [n.value for n in ast.walk(node.test) if isinstance(n, ast.Constant)]
            if "__name__" in names and "__main__" in consts:
                return True
    return False


def _imported_modules(name: str, path: Path, tree: ast.Module) -> set[str]:
    """The fkdiff / teachers modules that module `name` imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            subs = {f"{base}.{a.name}" for a in node.names} & set(MODULES)
            out |= subs if len(subs) == len(node.names) else subs | {base}  # names defined in `base` itself
    known = set()
    for m in out:  # `import a.b.c` depends on a.b.c; keep the longest known prefix
        while m and m not in MODULES:
            m = m.rpartition(".")[0]
        if m:
            known.add(m)
    return known


def _component(module: str, entry_points: set[str]) -> str:
    if module in entry_points:
        return module
    parts = module.split(".")
    return "teachers" if parts[0] == "teachers" else ".".join(parts[:2])


def _graph():
    trees = {m: ast.parse(p.read_text(), filename=str(p)) for m, p in MODULES.items()}
    entry_points = {m for m, t in trees.items() if _is_entry_point(t)}
    imports = {m: _imported_modules(m, MODULES[m], t) for m, t in trees.items()}
    edges: dict[str, set[str]] = {}
    for m, targets in imports.items():
        a = _component(m, entry_points)
        for t in targets:
            b = _component(t, entry_points)
            if a != b:
                edges.setdefault(a, set()).add(b)
    return entry_points, imports, edges


def _find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        stack.append(v)
        for w in sorted(edges.get(v, ())):
            if state.get(w) == 1:
                return stack[stack.index(w):] + [w]
            if w not in state and (c := visit(w)):
                return c
        state[v] = 2
        stack.pop()
        return None

    for v in sorted(edges):
        if v not in state and (c := visit(v)):
            return c
    return None


def test_entry_points_are_found():
    entry_points, _, _ = _graph()
    assert {"fkdiff.distill", "fkdiff.sample", "teachers.train"} <= entry_points


def test_no_library_module_imports_an_entry_point():
    entry_points, imports, _ = _graph()
    bad = {m: sorted(t & entry_points) for m, t in imports.items() if m not in entry_points and t & entry_points}
    assert not bad, f"library modules importing entry points: {bad}"


def test_component_graph_is_acyclic():
    entry_points, _, edges = _graph()
    library = {a: {b for b in bs if b not in entry_points} for a, bs in edges.items() if a not in entry_points}
    cycle = _find_cycle(library)
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}\ngraph: {library}"


def test_data_and_teachers_do_not_know_each_other_by_name():
    """fkdiff.data takes distributions as objects (the config wiring resolves preset names), and the teachers library
    (its entry point aside) does not build datamodules."""
    entry_points, imports, _ = _graph()
    data = {m for m in imports if m == "fkdiff.data" or m.startswith("fkdiff.data.")}
    assert not any(t == "teachers" or t.startswith("teachers.") for m in data for t in imports[m]), \
        {m: imports[m] for m in data}
    lib_teachers = {m for m in imports if m.split(".")[0] == "teachers" and m not in entry_points}
    assert not any(t.startswith("fkdiff.data") for m in lib_teachers for t in imports[m])


def test_the_checker_sees_cycles_and_lazy_imports():
    """The graph builder is not blind: a function-level import counts, and a two-node loop is a cycle."""
    tree = ast.parse("def f():\n    from fkdiff.data import build_datamodule\n    import teachers.presets\n")
    assert _imported_modules("fkdiff.x", ROOT / "fkdiff" / "x.py", tree) == {"fkdiff.data", "teachers.presets"}
    assert _find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    assert _find_cycle({"a": {"b"}, "b": {"c"}}) is None
