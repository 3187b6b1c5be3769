"""setup.py lists its packages by hand (folders map to import names): every package folder
under longact/ must be in that list, or a non-editable install (the Docker images, a
wheel) silently leaves it out."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _listed() -> set[str]:
    tree = ast.parse((REPO / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "packages":
            return {elt.value for elt in node.value.elts}
    raise AssertionError("setup.py has no packages= list")


def test_every_package_folder_is_installed():
    on_disk = {
        ".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "longact").rglob("__init__.py")
    }
    missing = sorted(on_disk - _listed())
    assert not missing, f"add to setup.py packages: {missing}"
