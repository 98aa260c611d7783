"""The layer rules of docs/architecture.md, read from the import graph of the source.

io -> data -> diffusion | nets -> train -> infer -> uq -> score -> demo -> cli:
a module may import its own package, the base modules and lower layers only;
diffusion and nets never import each other; no import cycles; typer and rich
only inside cli/.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "vstain_cli"
BASE = {"errors", "progress", "provenance", "runtime", "seeding", "presets", ""}
LAYERS = {"io": 1, "data": 2, "diffusion": 3, "nets": 3, "train": 4, "infer": 5, "uq": 6, "score": 7,
          "demo": 8, "cli": 9}
CLI_ONLY = {"typer", "rich", "click"}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imports_of(path: Path, name: str) -> set[str]:
    """Every module imported anywhere in the file (lazy imports inside functions included)."""
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            for a in node.names:  # `from vstain_cli.infer import stitch` imports a module too
                found.add(f"{base}.{a.name}")
    return found


def package_of(name: str) -> str:
    """The layer key of a vstain_cli module: its first component below vstain_cli."""
    parts = name.split(".")
    pkg = parts[1] if len(parts) > 1 else ""
    return "cli" if pkg == "__main__" else pkg  # `python -m vstain_cli` is the CLI


def layer(name: str) -> int:
    pkg = package_of(name)
    return 0 if pkg in BASE else LAYERS[pkg]


def internal_graph() -> dict[str, set[str]]:
    mods = modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        graph[name] = {i for i in imports_of(path, name) if i in mods and i != name}
    return graph


def test_every_package_has_a_layer():
    for name in modules():
        pkg = package_of(name)
        assert pkg in BASE or pkg in LAYERS, f"{name}: add its package to the layer table (docs/architecture.md)"


def test_no_upward_imports():
    bad = []
    for name, deps in internal_graph().items():
        for dep in deps:
            same = package_of(dep) == package_of(name)
            if same:
                continue
            if layer(dep) > layer(name) or (layer(dep) == layer(name) and layer(name) != 0):
                bad.append(f"{name} -> {dep}")
    assert not bad, "imports against the layer order:\n" + "\n".join(sorted(bad))


def test_no_import_cycles():
    graph = internal_graph()
    # a package __init__ that re-exports its own modules is not a cycle of logic
    edges = {m: {d for d in deps if not (m.startswith(d + ".") or d.startswith(m + "."))}
             for m, deps in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(edges[m]):
            if state.get(d) == 1:
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize("name", sorted(n for n in modules() if package_of(n) != "cli"))
def test_core_never_imports_the_cli_libraries(name):
    used = {i.split(".")[0] for i in imports_of(modules()[name], name)}
    assert not used & CLI_ONLY, f"{name} imports {used & CLI_ONLY}: only vstain_cli.cli may"


def test_io_is_numpy_only():
    for name, path in modules().items():
        if package_of(name) == "io":
            used = {i.split(".")[0] for i in imports_of(path, name)}
            assert "torch" not in used, f"{name} imports torch"


def test_no_reference_outside_the_repository():
    repo = ROOT.parent
    offenders = []
    for p in [*repo.glob("*.md"), *(repo / "docs").rglob("*.md"), *ROOT.rglob("*.py"), *(repo / "bench").rglob("*.py"),
              *(repo / "tests").rglob("*.py")]:
        if p.name == Path(__file__).name:
            continue
        text = p.read_text()
        if "DESIGN.md" in text or "../shared" in text:
            offenders.append(str(p.relative_to(repo)))
    assert not offenders, f"files that cite documents outside the repository: {offenders}"
