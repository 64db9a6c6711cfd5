"""The layout of exporter/ as docs/architecture.md draws it: packages with a stated job, no import
cycles, pure layers kept pure, and a command line that loads no command before one is chosen."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "exporter"
ARCHITECTURE = ROOT / "docs" / "architecture.md"


def modules() -> dict[str, Path]:
    """exporter's modules by dotted name."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports_at_load(path: Path, known: set[str]) -> set[str]:
    """exporter modules that loading `path` imports: module-level statements, not those under
    `if TYPE_CHECKING:` or inside functions (which run later, if at all)."""
    tree = ast.parse(path.read_text())
    out: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, ast.Import):
                out.update(a.name for a in node.names if a.name in known)
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("exporter"):
                for a in node.names:
                    sub = f"{node.module}.{a.name}"
                    out.add(sub if sub in known else node.module)
            elif isinstance(node, (ast.If, ast.Try)):
                visit(node.body)
                visit(node.orelse)
                for h in getattr(node, "handlers", []):
                    visit(h.body)

    visit(tree.body)
    return out


def test_no_import_cycles():
    mods = modules()
    known = set(mods)
    graph = {name: imports_at_load(path, known) - {name} for name, path in mods.items()}
    # Importing a submodule imports its parent packages first; they are docstring-only here.
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(name: str) -> None:
        state[name] = 1
        stack.append(name)
        for dep in sorted(graph.get(name, ())):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                walk(dep)
        stack.pop()
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            walk(name)


def test_every_package_says_its_job_and_imports_nothing_itself():
    for init in sorted(PACKAGE.glob("*/__init__.py")):
        tree = ast.parse(init.read_text())
        doc = ast.get_docstring(tree)
        assert doc and len(doc) > 80, f"{init.relative_to(ROOT)}: say what the package does and may import"
        assert all(isinstance(n, ast.Expr) for n in tree.body), (
            f"{init.relative_to(ROOT)}: a package's __init__ is its docstring only")


def drawn_tree() -> set[str]:
    """The module paths of the tree drawn under "## The tree" in docs/architecture.md."""
    text = ARCHITECTURE.read_text().split("## The tree", 1)[1]
    block = text.split("```", 2)[1]
    drawn, package = set(), ""
    for line in block.splitlines()[1:]:
        name = line.split()[0] if line.strip() else ""
        depth = len(line) - len(line.lstrip())
        if name.endswith("/") and depth == 2:
            package = name
        elif name.endswith(".py"):
            drawn.add("exporter/" + (package if depth == 4 else "") + name)
    return drawn


def test_the_architecture_document_draws_the_tree_as_it_is():
    actual = {str(p.relative_to(ROOT)) for p in modules().values()
              if p.name not in ("__init__.py", "__main__.py")}
    drawn = drawn_tree()
    assert drawn == actual, (f"docs/architecture.md's tree is out of date: missing {sorted(actual - drawn)}, "
                             f"gone {sorted(drawn - actual)}")
    for mentioned in set(re.findall(r"exporter/[\w/]+\.py", ARCHITECTURE.read_text())):
        assert (ROOT / mentioned).exists(), f"docs/architecture.md names {mentioned}, which does not exist"


def test_help_loads_no_command_module():
    """`--help` builds the parser from the option table alone: no command's code, no Redis, no HTTP."""
    code = ("import sys\nfrom exporter.cli.main import build_parser\nbuild_parser('*')\n"
            "print('\\n'.join(sorted(sys.modules)))")
    loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                cwd=ROOT).stdout.split())
    heavy = {"redis", "aiohttp", "prometheus_client", "google.protobuf"}
    assert not loaded & heavy, f"the parser loads {sorted(loaded & heavy)}"
    commands = {"exporter.server.sidecar", "exporter.registrations.audit", "exporter.cleanup.sweep",
                "exporter.lifecycle.launcher", "exporter.devtools.demo", "exporter.devtools.emulator"}
    assert not loaded & commands, f"the parser loads {sorted(loaded & commands)}"
