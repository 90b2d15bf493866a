"""The packages depend one way: nodes -> engine -> tlora_core. tlora_core imports neither ComfyUI nor the other two;
engine never imports nodes. Read from the sources' import statements."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMFY = {"comfy", "comfy_api", "comfy_extras", "folder_paths", "server", "nodes", "execution"}


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """(pack packages this file imports relatively, absolute top-level modules it imports)."""
    package = path.relative_to(ROOT).parts[0]
    rel, absolute = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            depth = len(path.relative_to(ROOT).parts) - 1  # folders between the pack root and this file
            if node.level > depth + 1:
                raise AssertionError(f"{path}: import climbs above the pack")
            # up to `depth` dots stay inside this package; one more reaches the pack root, naming a package
            rel.add((node.module or "").split(".")[0] if node.level == depth + 1 else package)
        elif isinstance(node, ast.ImportFrom):
            absolute.add((node.module or "").split(".")[0])
        elif isinstance(node, ast.Import):
            absolute.update(a.name.split(".")[0] for a in node.names)
    return rel, absolute


@pytest.mark.parametrize(("package", "may_use", "may_import_comfy"), [
    ("tlora_core", {"tlora_core"}, False),
    ("engine", {"engine", "tlora_core"}, True),
    ("nodes", {"nodes", "engine", "tlora_core"}, True),
])
def test_dependencies_run_one_way(package, may_use, may_import_comfy):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files
    for f in files:
        rel, absolute = _imports(f)
        assert rel <= may_use, f"{f.relative_to(ROOT)} imports {sorted(rel - may_use)}"
        if not may_import_comfy:
            assert not (absolute & COMFY), f"{f.relative_to(ROOT)} imports ComfyUI: {sorted(absolute & COMFY)}"
