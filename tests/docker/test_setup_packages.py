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


# Run with the editable install's import hooks removed: what a --target or wheel install
# sees when Python is started inside the checkout (its folder comes first on sys.path).
CHECKOUT_IMPORT = """
import sys
sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
import longact.workers.plugin
print(longact.workers.__file__)
"""


def test_checkout_imports_the_plugin_as_installed():
    """Inside a checkout ``import longact`` finds the source folder first; the plugin
    (top-level workers/, installed as longact.workers) must be found there too, or verl
    silently runs its stock engine."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", CHECKOUT_IMPORT],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = Path(proc.stdout.strip().splitlines()[-1])
    assert found == REPO / "longact" / "workers" / "__init__.py"
    assert found.resolve() == (REPO / "workers" / "__init__.py").resolve()
