"""Every module in kernels/ is a leaf: it imports the standard library, torch and triton, and
its siblings in kernels/ (relative imports), never the rest of fastlora."""
import ast
import pathlib
import sys

import pytest

KERNELS = pathlib.Path(__file__).resolve().parents[1] / "kernels"
ALLOWED = {"torch", "triton"}


@pytest.mark.parametrize("path", sorted(KERNELS.glob("*.py")), ids=lambda p: p.name)
def test_kernel_module_is_a_leaf(path):
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            roots.add((node.module or "").split(".")[0])
    foreign = {r for r in roots if r not in ALLOWED and r not in sys.stdlib_module_names}
    assert not foreign, f"{path.name} imports {sorted(foreign)}"
