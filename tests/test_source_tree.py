"""The source tree defines no top-level module that another distribution may own.

Run from the repository root (pytest, ``python -m``, the GPU machines' ``PYTHONPATH=<repo>``), the root comes
first on ``sys.path``: a top-level package there shadows an installed one of the same name. transformers 5.25
depends on Hugging Face's ``kernels`` and imports it when peft loads it; a ``kernels/__init__.py`` in the tree
stopped the suite at collection.
"""

import ast
import importlib.metadata
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_tree_defines_no_top_level_module_but_loopgraph_and_tests():
    defined = sorted(p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()) + \
        sorted(p.stem for p in ROOT.glob("*.py"))
    assert defined == ["loopgraph", "tests"], (
        f"top-level modules in the source tree: {defined}; any name but loopgraph (our distribution) and tests "
        "shadows an installed package of that name when run from the repository root")


def test_kernels_imported_from_the_repository_root_is_not_the_repositorys_folder():
    """With transformers and peft imported (they import Hugging Face's ``kernels`` when it is installed), the name
    ``kernels`` is the installed distribution's package, or at most an empty namespace portion that transformers
    treats as absent: never our ``kernels/`` folder as a regular package."""
    code = (
        "import importlib.util, json, sys\n"
        "import transformers, peft\n"
        "from transformers.utils import import_utils\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "module = None\n"
        "if spec is not None:\n"
        "    import kernels as module\n"
        "print(json.dumps({'found': spec is not None, 'file': getattr(module, '__file__', None),\n"
        "                  'available': import_utils.is_kernels_available(), 'path0': sys.path[0]}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["path0"] == "", "python -c puts the working directory (the repository root) first on sys.path"
    try:
        installed = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        installed = None
    if seen["file"] is not None:
        assert Path(seen["file"]).resolve().parent != ROOT / "kernels", f"`import kernels` found the tree's folder"
    if installed is not None:
        location = Path(installed.locate_file("kernels")).resolve()
        assert seen["file"] is not None and Path(seen["file"]).resolve().parent == location, seen
    else:
        assert not seen["available"], "transformers took a namespace portion of the tree for Hugging Face's kernels"


def architecture_map() -> set[str]:
    """The modules docs/how-compile-loop-works.md's "Architecture" table names, as paths under loopgraph/."""
    text = (ROOT / "docs" / "how-compile-loop-works.md").read_text()
    section = text.split("## Architecture", 1)[1].split("\n## ", 1)[0]
    named = set()
    for row in section.splitlines():
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        if len(cells) != 4 or not cells[1].startswith("`"):
            continue
        where = cells[1].strip("`")
        files = re.findall(r"`([a-z0-9_]+\.py)`", cells[2])
        assert where.endswith("/") == bool(files), f"row {cells[0]!r}: a package lists its files, a module none"
        named |= {where + f for f in files} if files else {where}
    return named


def test_the_architecture_table_names_every_module_of_the_package_and_nothing_else():
    package = ROOT / "loopgraph"
    tree = {str(p.relative_to(package)) for p in package.rglob("*.py") if p.name != "__init__.py"}
    named = architecture_map()
    assert named == tree, (f"in the tree, not in docs' Architecture table: {sorted(tree - named)}; "
                           f"in the table, not in the tree: {sorted(named - tree)}")


def imported_modules(tree: ast.AST, package: str = "tests") -> set[str]:
    """The modules an ``import`` or ``from ... import`` names (``from . import x`` names ``tests.x`` too), with those
    of Python code in string literals (scripts the tests run in a subprocess)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(filter(None, [package if node.level else "", node.module or ""]))
            found |= {base} | {f"{base}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "import" in node.value:
            try:
                found |= imported_modules(ast.parse(textwrap.dedent(node.value)), package)
            except SyntaxError:
                pass
    return found


def test_no_test_module_imports_a_test_module():
    """Loops, blocks and helpers that several test modules share live in tests/helpers.py; a test module imports
    no tests/test_*.py module (running one module alone, or moving a test, never depends on another)."""
    test_modules = {f"tests.{p.stem}" for p in (ROOT / "tests").glob("test_*.py")}
    offending = {}
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        found = imported_modules(ast.parse(path.read_text())) & test_modules
        if found:
            offending[path.name] = sorted(found)
    assert not offending, f"test modules importing test modules (move what they share to tests/helpers.py): {offending}"
