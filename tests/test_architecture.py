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


# ----------------------------------------------------------------------------- one home per rule
# The "one home per rule" table of docs/architecture.md, read from the syntax of the source.
# KNOWN_REMAINING lists the places that still break a rule and are being fixed; each entry names
# the module and the rule. It only ever shrinks: an entry that no longer breaks its rule fails too.

RUN_FOLDER_NAMES = {"config.json", "weights.safetensors", "state.pt", "metrics.jsonl", "calibration.json"}
RANK_VARIABLES = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"}
SEEDING_CALLS = {"manual_seed", "manual_seed_all", "default_rng", "RandomState", "SeedSequence", "Generator"}
PUBLISH_CALLS = {("os", "replace"), ("os", "rename"), ("shutil", "move")}
TEMP_MARKS = (".partial", ".tmp", ".old-")
# Modules of algorithms: they raise ValueError/TypeError; the pipeline entry points turn those into InputError.
ALGORITHMS = ("vstain_cli.diffusion.", "vstain_cli.infer.stitch.", "vstain_cli.score.metrics",
              "vstain_cli.score.table1", "vstain_cli.uq.intervals", "vstain_cli.io.resample", "vstain_cli.io.masks",
              "vstain_cli.io.grid", "vstain_cli.data.warp", "vstain_cli.data.augment", "vstain_cli.train.objectives",
              "vstain_cli.train.ema", "vstain_cli.nets.unet", "vstain_cli.nets.discriminator",
              "vstain_cli.nets.stainnet")
# Besides provenance and io/outputs: the two folders a command resumes decide themselves whether an
# existing folder is resumed, refused or (--force) started over.
RESUMERS = {"vstain_cli.train.run_folder", "vstain_cli.data.tiling"}

KNOWN_REMAINING: set[tuple[str, str]] = set()  # (module, rule); empty: every rule holds


def _trees() -> dict[str, ast.AST]:
    return {name: ast.parse(path.read_text(), str(path)) for name, path in modules().items()}


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def _strings(tree: ast.AST) -> list[tuple[int, str]]:
    """String constants in code (docstrings left out), with their line."""
    skip = _docstrings(tree)
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in skip]


def _calls(tree: ast.AST) -> list[tuple[int, str, str]]:
    """(line, receiver, attribute) of every ``receiver.attribute(...)`` call (receiver "" when not a name)."""
    out = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute):
            v = n.func.value
            recv = v.id if isinstance(v, ast.Name) else v.attr if isinstance(v, ast.Attribute) else ""
            out.append((n.lineno, recv, n.func.attr))
    return out


def _raised(tree: ast.AST, error: str) -> list[int]:
    return [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Raise) and isinstance(n.exc, ast.Call)
            and isinstance(n.exc.func, ast.Name) and n.exc.func.id == error]


def home_violations() -> dict[tuple[str, str], list[str]]:
    """(module, rule) -> the offending lines, for every rule of the homes table checked here."""
    found: dict[tuple[str, str], list[str]] = {}

    def add(name: str, rule: str, line: int, what: str) -> None:
        found.setdefault((name, rule), []).append(f"{modules()[name].relative_to(ROOT.parent)}:{line}: {what}")

    for name, tree in _trees().items():
        for line, s in _strings(tree):
            if s in RUN_FOLDER_NAMES and name != "vstain_cli.train.run_folder":
                add(name, "run-folder names", line, f"{s!r} (use train/run_folder's constants)")
            if s in RANK_VARIABLES and name != "vstain_cli.runtime":
                add(name, "torchrun variables", line, f"{s!r} (use runtime.place())")
            if s.startswith("--device") and name not in ("vstain_cli.runtime", "vstain_cli.cli.common"):
                add(name, "--device", line, f"{s!r} (runtime.resolve_device names the flag)")
            if any(m in s for m in TEMP_MARKS) and name not in ("vstain_cli.provenance", "vstain_cli.io.outputs"):
                add(name, "temp names", line, f"{s!r} (use provenance.tmp_name / atomic_output)")
        for line, recv, attr in _calls(tree):
            if attr in SEEDING_CALLS and name != "vstain_cli.seeding":
                add(name, "seeding", line, f"{recv}.{attr}(...) (use seeding's generators)")
            if ((recv, attr) in PUBLISH_CALLS or attr == "rename") and name not in ("vstain_cli.provenance",):
                add(name, "publishing", line, f"{recv}.{attr}(...) (use provenance.atomic_output or a SlideOutput)")
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name == "resolve_device" and name != "vstain_cli.runtime":
                add(name, "--device", node.lineno, "a second resolve_device")
            if (isinstance(node, ast.ClassDef) and name != "vstain_cli.progress"
                    and package_of(name) != "cli"
                    and {"start", "advance", "finish", "warn"} <= {f.name for f in node.body
                                                                     if isinstance(f, ast.FunctionDef)}):
                add(name, "progress", node.lineno, f"class {node.name} implements Progress (progress.py, cli/)")
        if name not in ("vstain_cli.provenance", "vstain_cli.io.outputs") and name not in RESUMERS:
            for line in _raised(tree, "OutputExistsError"):
                add(name, "output checks", line, "OutputExistsError (use a SlideOutput or provenance.check_output_file)")
        if name.startswith(ALGORITHMS):
            for line in _raised(tree, "InputError"):
                add(name, "algorithms raise ValueError", line, "InputError in an algorithm")
    return found


def test_every_rule_has_one_home():
    found = home_violations()
    new = {k: v for k, v in found.items() if k not in KNOWN_REMAINING}
    assert not new, "rules outside their home (docs/architecture.md, 'One home per rule'):\n" + "\n".join(
        line for k in sorted(new) for line in new[k])


def test_known_remaining_entries_still_apply():
    found = home_violations()
    fixed = sorted(k for k in KNOWN_REMAINING if k not in found)
    assert not fixed, f"fixed: remove these entries from KNOWN_REMAINING: {fixed}"


def test_the_home_checks_catch_what_they_look_for():
    tree = ast.parse("import os, torch\n"
                     "def f(p):\n"
                     "    torch.manual_seed(0)\n"
                     "    os.replace(p, p / 'config.json')\n"
                     "    return os.environ.get('RANK')\n")
    assert sorted(s for _, s in _strings(tree)) == ["RANK", "config.json"]
    assert {(r, a) for _, r, a in _calls(tree)} >= {("torch", "manual_seed"), ("os", "replace")}
