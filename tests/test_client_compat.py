"""client/ runs on old hosts: Python 3.6 syntax, standard library only (optional imports guarded)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

CLIENT = Path(__file__).resolve().parent.parent / "client"
# Optional accelerators/extras a client module may use only inside try/except ImportError.
OPTIONAL = {"numpy", "primesieve", "socks", "sockshandler", "certifi"}
# Modules of the bundle itself.
BUNDLE = {path.stem for path in CLIENT.glob("*.py")}


def client_files():
    return sorted(CLIENT.glob("*.py"))


def imports(tree):
    """(module, guarded) for each import; guarded = inside a try whose handlers catch ImportError."""
    found = []

    def visit(node, guarded):
        if isinstance(node, ast.Try):
            catches = any(
                h.type is None or any(name in ast.dump(h.type) for name in ("ImportError", "ModuleNotFoundError",
                                                                             "Exception"))
                for h in node.handlers)
            for child in node.body:
                visit(child, guarded or catches)
            for child in node.handlers + node.orelse + node.finalbody:
                visit(child, guarded)
            return
        if isinstance(node, ast.Import):
            found.extend((alias.name.split(".")[0], guarded) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module.split(".")[0], guarded))
        for child in ast.iter_child_nodes(node):
            visit(child, guarded)

    visit(tree, False)
    return found


@pytest.mark.parametrize("path", client_files(), ids=lambda p: p.name)
def test_parses_as_python_36(path):
    ast.parse(path.read_text(), filename=str(path), feature_version=(3, 6))


@pytest.mark.parametrize("path", client_files(), ids=lambda p: p.name)
def test_imports_stdlib_or_guarded(path):
    tree = ast.parse(path.read_text())
    for module, guarded in imports(tree):
        if module in sys.stdlib_module_names or module in BUNDLE or module == "__future__":
            continue
        assert module in OPTIONAL and guarded, f"{path.name} imports {module} (not stdlib, not guarded)"


def test_no_future_annotations_or_fstring_equals():
    for path in client_files():
        text = path.read_text()
        assert "from __future__ import annotations" not in text, path.name
