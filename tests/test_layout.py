"""The package layout: every module imports only from its own stage or the stages below it.

The layers are listed bottom-up; a module may import a module of its own layer or of a lower
one, never of a higher one, and the import graph between modules has no cycle. Type-only
imports (under ``if TYPE_CHECKING:``) count too: the layout is about what depends on what.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import prunekit

PACKAGE = Path(prunekit.__file__).parent

# bottom-up; a top-level module or subpackage of prunekit per entry
LAYERS: tuple[frozenset[str], ...] = (
    frozenset({"errors", "version"}),
    frozenset({"runtime"}),
    frozenset({"contract"}),
    frozenset({"formats"}),
    frozenset({"structured"}),
    frozenset({"load"}),
    frozenset({"calibrate"}),
    frozenset({"pruners"}),
    frozenset({"engine"}),
    frozenset({"validate"}),
    frozenset({"run"}),
    frozenset({"testing"}),
    frozenset({"library", "api"}),
    frozenset({"cli"}),
    frozenset({"__init__", "__main__"}),
)


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(root: Path) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The prunekit modules ``path`` imports (``from prunekit.x import y`` counts as x.y when
    x.y is a module, else as x)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "prunekit")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            if module.split(".")[0] != "prunekit":
                continue
            for alias in node.names:
                full = f"{module}.{alias.name}"
                found.add(full if full in known else module)
    return found - {name}


def layer_of(module: str) -> int:
    """The layer of a module: that of its first component under prunekit."""
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    if module.endswith("__main__"):
        top = "__main__"
    for index, names in enumerate(LAYERS):
        if top in names:
            return index
    raise AssertionError(f"{module} is in no layer: add {top!r} to LAYERS in {__file__}")


def violations(root: Path) -> list[str]:
    """Upward imports, then import cycles between modules, as one line each."""
    found = modules(root)
    known = set(found)
    graph = {name: imports_of(name, path, known) & known for name, path in found.items()}
    problems = [
        f"{name} (layer {layer_of(name)}) imports {dep} (layer {layer_of(dep)})"
        for name, deps in sorted(graph.items())
        for dep in sorted(deps)
        if layer_of(dep) > layer_of(name)
    ]
    # a package's __init__ re-exporting its own modules is not a cycle worth reporting
    edges = {
        name: {d for d in deps if not (found[name].name == "__init__.py" and d.startswith(name))}
        for name, deps in graph.items()
    }
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(edges[node]):
            if state.get(dep) == 1:
                cycle = [*stack[stack.index(dep) :], dep] if dep in stack else [node, dep]
                problems.append("import cycle: " + " -> ".join(cycle))
            elif dep not in state:
                visit(dep, [*stack, dep])
        state[node] = 2

    for name in sorted(edges):
        if name not in state:
            visit(name, [name])
    return problems


def test_every_module_imports_only_downward_and_without_cycles() -> None:
    assert violations(PACKAGE) == []


def test_every_subpackage_says_what_it_holds_and_may_import() -> None:
    for init in sorted(PACKAGE.glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc, f"{init.parent.name}/__init__.py needs a docstring"
        assert "import" in doc.lower(), f"{init.parent.name}: say what it may import"


def copy_package(tmp_path: Path) -> Path:
    target = tmp_path / "prunekit"
    for source in PACKAGE.rglob("*.py"):
        dest = target / source.relative_to(PACKAGE)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(source.read_text())
    return target


@pytest.mark.parametrize(
    ("module", "planted", "expected"),
    [
        (
            "contract/pruner.py",
            "from prunekit.engine.masks import select\n",
            "prunekit.contract.pruner (layer 2) imports prunekit.engine.masks (layer 8)",
        ),
        (
            "calibrate/fisher.py",
            "from prunekit.run import pipeline\n",
            "prunekit.calibrate.fisher (layer 6) imports prunekit.run.pipeline (layer 10)",
        ),
    ],
)
def test_a_planted_upward_import_fails(
    tmp_path: Path, module: str, planted: str, expected: str
) -> None:
    root = copy_package(tmp_path)
    path = root / module
    path.write_text(planted + path.read_text())
    assert expected in violations(root)


def test_a_planted_cycle_inside_a_layer_fails(tmp_path: Path) -> None:
    root = copy_package(tmp_path)
    masks = root / "engine" / "masks.py"
    masks.write_text("from prunekit.engine import schedule\n" + masks.read_text())
    assert any(p.startswith("import cycle:") and "engine.masks" in p for p in violations(root))
