"""The layout draws the architecture (writer/__init__.py): each room of writer/ imports only
from the rooms below it, blissdata/ never imports writer/, no import cycle, and no module or
class grows past the size a reader takes in at once. Read from the source, not by importing."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("writer", "blissdata")

# room -> the rooms of writer/ it may import (writer/__init__.py says why)
ALLOWED = {
    "hdf5": set(),
    "state": {"hdf5"},
    "scan": {"state", "hdf5"},
    "protocols": {"scan", "state", "hdf5"},
    "service": {"protocols", "scan", "state", "hdf5"},
    "web": {"state"},
    "commands": {"service", "protocols", "scan", "state", "hdf5", "web"},
}
# what writer/hdf5 may use of blissdata: helpers that never talk to Redis
HDF5_MAY_USE = {"blissdata.bslz4", "blissdata.json_points", "blissdata.point_shapes",
                "blissdata.encoding", "blissdata.h5values", "blissdata.exceptions"}
MAX_MODULE_LINES = 500
MAX_CLASS_LINES = 320  # "about 300" (issue 21): a few lines of class knobs over are fine


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "node_modules" in path.parts:
                continue
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = modules()


def imports_of(name: str, source: str, is_package: bool = False) -> set[str]:
    """The project's modules that module `name` imports, anywhere in it (functions too)."""
    package = name if is_package else name.rpartition(".")[0]
    tree = ast.parse(source)
    # imports for type checkers only are never run: no cycle, no dependency
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and getattr(block.test, "id", None) == "TYPE_CHECKING"
                   for n in ast.walk(block)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module
            # `from pkg import mod` imports the module pkg.mod
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
                       for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:  # `import a.b.c`: the deepest known
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


GRAPH = {name: imports_of(name, path.read_text(), path.name == "__init__.py")
         for name, path in MODULES.items()}


def room(name: str) -> str | None:
    """The room of writer/ that module `name` is in (None: not in one)."""
    parts = name.split(".")
    return parts[1] if parts[0] == "writer" and len(parts) > 1 and parts[1] in ALLOWED else None


def test_every_module_of_writer_is_in_a_room():
    loose = [n for n in MODULES if n.startswith("writer.") and room(n) not in ALLOWED]
    assert not loose, f"modules of writer/ outside the rooms of writer/__init__.py: {loose}"


def wrong_imports(graph: dict) -> list[str]:
    wrong = []
    for name, targets in graph.items():
        mine = room(name)
        if mine is None:
            continue
        for target in targets:
            theirs = room(target)
            if theirs is not None and theirs != mine and theirs not in ALLOWED[mine]:
                wrong.append(f"{name} imports {target} ({mine} may import "
                             f"{sorted(ALLOWED[mine]) or 'no other room'})")
            if mine == "hdf5" and target.startswith("blissdata") and target not in HDF5_MAY_USE:
                wrong.append(f"{name} imports {target}: writer/hdf5 uses no Redis")
            if target == "writer":
                wrong.append(f"{name} imports the writer package itself")
    return wrong


def test_rooms_import_only_the_rooms_below_them():
    wrong = wrong_imports(GRAPH)
    assert not wrong, "\n".join(wrong)


def test_blissdata_never_imports_the_writer():
    wrong = [f"{n} imports {t}" for n, ts in GRAPH.items() if n.startswith("blissdata")
             for t in ts if t.startswith("writer")]
    assert not wrong, "\n".join(wrong)


def import_cycles(graph: dict) -> list[str]:
    cycles, state = [], {}

    def visit(name, stack):
        state[name] = "open"
        stack.append(name)
        for target in sorted(graph.get(name, ())):
            # a package's __init__ is imported with each of its modules: not a cycle
            if name.startswith(target + "."):
                continue
            if state.get(target) == "open":
                cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target, stack)
        stack.pop()
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
    return cycles


def test_no_import_cycle():
    cycles = import_cycles(GRAPH)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_modules_and_classes_stay_readable_sizes():
    big = []
    for name, path in MODULES.items():
        text = path.read_text()
        lines = text.count("\n")
        if lines > MAX_MODULE_LINES:
            big.append(f"module {name}: {lines} lines (at most {MAX_MODULE_LINES})")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef):
                size = node.end_lineno - node.lineno + 1
                if size > MAX_CLASS_LINES:
                    big.append(f"class {name}.{node.name}: {size} lines "
                               f"(at most {MAX_CLASS_LINES})")
    assert not big, "\n".join(big)


def test_the_checks_catch_a_wrong_import_and_a_cycle():
    """The checks are not vacuous: a module of hdf5 importing the service, or Redis, and two
    modules importing each other are caught."""
    graph = dict(GRAPH)
    graph["writer.hdf5.bad"] = imports_of(
        "writer.hdf5.bad", "from ..service.service import WriterService\n"
        "def f():\n    from blissdata.store import DataStore\n")
    assert graph["writer.hdf5.bad"] == {"writer.service.service", "blissdata.store"}
    wrong = wrong_imports(graph)
    assert len(wrong) == 2 and all(w.startswith("writer.hdf5.bad imports") for w in wrong)
    graph["writer.hdf5.files"] = GRAPH["writer.hdf5.files"] | {"writer.hdf5.bad"}
    graph["writer.hdf5.bad"] = {"writer.hdf5.files"}
    assert import_cycles(graph) != []


def test_the_docs_name_modules_that_exist():
    """docs/architecture.md walks the code by module paths (so do comments): a move must
    update them."""
    missing = []
    sources = [path for folder in ("writer", "blissdata", "tests", "bench")
               for path in sorted((ROOT / folder).rglob("*.py"))]
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sources]:
        for path in re.findall(r"(?<![\w/.])((?:writer|blissdata)/[\w/]+\.(?:py|json))",
                               doc.read_text()):
            if not (ROOT / path).exists():
                missing.append(f"{doc.name}: {path}")
    assert not missing, "docs name modules that do not exist:\n" + "\n".join(missing)
