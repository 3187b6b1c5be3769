"""The CPU image, built and used.

``scripts/build_image.sh cpu`` builds ``docker/Dockerfile.cpu`` with docker where an engine
answers, else with buildah (chroot isolation, as root), on a base made from Debian's
packages (``--debian-base``: no registry pull), with pip's local wheel folder and CA
bundle mounted where this machine has them. Then, inside the image, as the user it
declares, writing to the mounted ``/work/runs``:

- ``scripts/image_check.py --tier cpu`` (torch's CPU build, verl loads LongAct's plugin,
  the entry points, ``pip check``) and the installed package's recipes and data files;
- ``longact tiny-model`` and ``longact data make``;
- a 2-step ``longact-train recipe=grpo_cpu`` with LongAct on, a checkpoint per step: here,
  every frozen W_Q/W_K row is bit-identical across each step, every trainable row and
  every other parameter moved;
- the image's own default command, until it shows it has started.

The build's layers are cached by the engine, so a second run on one machine rebuilds
nothing; the first takes several minutes (the CPU set is about 4 GB installed).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
from e2e_utils import check_step, load_weights, masks_at, step_metrics, step_weights  # noqa: E402

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TAG = "localhost/longact:cpu-test"


def _engine() -> str | None:
    if shutil.which("docker"):
        if subprocess.run(["docker", "info"], capture_output=True).returncode == 0:
            return "docker"
    if shutil.which("buildah") and shutil.which("debootstrap") and os.geteuid() == 0:
        return "buildah"
    return None


def _build_options() -> list[str]:
    """The folder holding the CPU torch wheel where pip is configured with one (as
    ``scripts/install.sh cpu`` finds it) and a CA bundle, so that the build installs
    what this machine can reach."""
    spec = importlib.util.spec_from_file_location(
        "torch_source", REPO / "scripts" / "torch_source.py"
    )
    ts = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ts)
    cfg = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True,
                         text=True).stdout  # fmt: skip
    opts = []
    for folder in ts.find_links(dict(os.environ), cfg):
        if ts.has_cpu_wheel(folder):
            opts += ["--wheels", str(folder)]
            break
    # the bundle pip is told to use, else the system's (a proxy's CA is added there)
    bundles = [os.environ.get(v, "") for v in ("PIP_CERT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE")]
    for bundle in [*bundles, "/etc/ssl/certs/ca-certificates.crt"]:
        if bundle and Path(bundle).is_file():
            return [*opts, "--ca-bundle", bundle]
    return opts


class Image:
    """Run commands in a built image with the engine that built it, ``runs`` mounted at
    /work/runs, as the image's own user."""

    def __init__(self, engine: str, tag: str, runs: Path):
        self.engine, self.tag, self.runs = engine, tag, runs
        self.ctr = None
        if engine == "buildah":  # a working container of the image, reused by each run
            ctr = subprocess.run(["buildah", "from", tag], capture_output=True, text=True,
                                 check=True).stdout.strip()  # fmt: skip
            self.ctr = ctr

    def run(self, *cmd: str, timeout: int = 300) -> subprocess.CompletedProcess:
        mount = f"{self.runs}:/work/runs"
        if self.engine == "docker":
            argv = ["docker", "run", "--rm", "--shm-size=2g", "-v", mount, self.tag, *cmd]
        else:
            argv = ["buildah", "run", "--isolation", "chroot", "-v", mount, self.ctr, "--", *cmd]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)

    def check(self, *cmd: str, timeout: int = 300) -> str:
        proc = self.run(*cmd, timeout=timeout)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"{' '.join(cmd[:3])} exited {proc.returncode}:\n{out[-5000:]}"
        return out

    def config(self, key: str):
        """A field of the image's config (``User``, ``Cmd``, ``WorkingDir``)."""
        if self.engine == "docker":
            argv, path = ["docker", "image", "inspect", self.tag], (0, "Config")
        else:
            argv, path = ["buildah", "inspect", "--type", "image", self.tag], ("OCIv1", "config")
        data = json.loads(subprocess.run(argv, capture_output=True, text=True, check=True).stdout)
        return data[path[0]][path[1]].get(key)

    def close(self) -> None:
        if self.ctr:
            subprocess.run(["buildah", "rm", self.ctr], capture_output=True)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    engine = _engine()
    if engine is None:
        pytest.skip(
            "no docker engine answers and buildah, debootstrap or root is missing, so the CPU "
            "image cannot be built here (Debian, as root: apt-get install buildah debootstrap)"
        )
    start = time.monotonic()
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "build_image.sh"), "cpu", "--tag", TAG,
         "--debian-base", "--engine", engine, *_build_options()],
        capture_output=True, text=True, timeout=1500,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    built = next(ln for ln in reversed(out.splitlines()) if ln.startswith("[build_image] built"))
    print(f"{built}; {time.monotonic() - start:.0f} s with the base image")
    runs = tmp_path_factory.mktemp("image_runs")
    runs.chmod(0o777)  # the image's user (uid 1000) writes here
    img = Image(engine, TAG, runs)
    yield img
    img.close()


def test_image_checks_itself_as_its_user(image):
    out = image.check("python", "/opt/longact/scripts/image_check.py", "--tier", "cpu")
    assert "image_check: ok" in out
    assert image.config("User") == "1000" and image.config("WorkingDir") == "/work"
    who = image.check("bash", "-c", "id -u; touch /work/runs/.w && echo writable")
    assert who.split() == ["1000", "writable"]
    # recipes and Hydra configs compose from the installed (non-editable) package
    cfg = image.check("longact-train", "recipe=grpo_cpu", "actor_rollout_ref.model.path=/m",
                      "--cfg", "job")  # fmt: skip
    assert "longact:" in cfg and "name: hf" in cfg and "n_gpus_per_node: 2" in cfg
    # every module and YAML file of the source tree (in /opt/longact) is in the installed,
    # non-editable package (setup.py's packages and package data)
    out = image.check("python", "-c", INSTALLED_TREE)
    assert out.strip().splitlines()[-1].startswith("/opt/venv/lib/"), out


INSTALLED_TREE = """
import pathlib, longact
pkg, src = pathlib.Path(longact.__file__).parent, pathlib.Path("/opt/longact")
files = [f for top in ("longact", "workers", "recipes", "hydra_configs")
         for f in (src / top).rglob("*") if f.suffix in (".py", ".yaml")]
rel = [f.relative_to(src) for f in files if "__pycache__" not in f.parts]
missing = [str(r) for r in rel
           if not (pkg / (r.relative_to("longact") if r.parts[0] == "longact" else r)).is_file()]
assert len(rel) > 50 and not missing, f"not in the installed package: {missing[:10]}"
print(pkg)
"""


def test_grpo_run_in_the_image_keeps_frozen_rows_exact(image):
    runs = image.runs
    shutil.copy(REPO / "tests" / "e2e" / "toy_reward.py", runs / "toy_reward.py")
    image.check("longact", "tiny-model", "--out", "/work/runs/model", "--size", "xxs")
    for name, n, seed in (("train", 40, 0), ("val", 8, 1)):
        image.check("longact", "data", "make", "--task", "niah_single", "--length", "96",
                    "--n", str(n), "--seed", str(seed), "--tokenizer", "/work/runs/model",
                    "--out", f"/work/runs/data/{name}.parquet")  # fmt: skip
    out = image.check(
        "env", "LONGACT_CONSOLE=full", "PYTHONWARNINGS=ignore",
        "longact-train", "recipe=grpo_cpu",
        "data.train_files=/work/runs/data/train.parquet",
        "data.val_files=/work/runs/data/val.parquet", "data.max_prompt_length=128",
        "actor_rollout_ref.model.path=/work/runs/model",
        "reward.custom_reward_function.path=/work/runs/toy_reward.py",
        "trainer.total_training_steps=2", "trainer.save_freq=1",
        "trainer.default_local_dir=/work/runs/ckpt", "trainer.experiment_name=image",
        "actor_rollout_ref.actor.optim.lr=1e-2",
        "actor_rollout_ref.actor.checkpoint.save_contents=[model,optimizer,extra,hf_model]",
        "longact.ratio=0.3", "longact.refresh_interval=1",
        timeout=900,
    )  # fmt: skip
    metrics = step_metrics(out)
    assert sorted(metrics) == [1, 2], out[-3000:]
    prev = load_weights(runs / "model" / "model.safetensors")
    for step in (1, 2):
        masks, _ = masks_at(runs / "ckpt", step)
        assert masks.version == step == metrics[step]["actor/longact/mask_version"]
        cur = step_weights(runs / "ckpt", step)
        check_step(prev, cur, masks)
        prev = cur


def test_default_command_starts_the_demo(image):
    """The image's default command is ``make demo``'s (same module, same arguments), its
    output in the mounted /work/runs/demo; it starts there as the image's user."""
    cmd = image.config("Cmd")
    recipe = re.search(r"^demo:.*\n\t\$\(PY\) (.*)$", (REPO / "Makefile").read_text(), re.M)
    assert recipe.group(1).split() == ["-m", "longact.demo.pipeline", "--out", "runs/demo"]
    assert cmd == ["python", "-m", "longact.demo.pipeline", "--out", "/work/runs/demo"], cmd
    proc = image.run("timeout", "-s", "INT", "40", *cmd, timeout=120)
    out = proc.stdout + proc.stderr
    assert "[model] done" in out, out[-3000:]
    assert (image.runs / "demo").is_dir()


def _dry(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(REPO / "scripts" / "build_image.sh"), *args, "--dry-run"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_build_script_passes_base_mounts_and_arguments(tmp_path):
    """``scripts/build_image.sh gpu`` and ``scripts/build_image.sh cpu`` with ``--dry-run``
    print the engine's command: the Dockerfile of the tier, the base as
    BASE_IMAGE, the wheel folder as the ``wheels`` build context, the CA bundle as the
    ``ca_bundle`` secret (never a COPY), and each ``--build-arg`` passed on."""
    (tmp_path / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    proc = _dry("gpu", "--engine", "docker", "--debian-base", "--wheels", str(wheels),
                "--ca-bundle", str(tmp_path / "ca.crt"), "--build-arg", "SKIP_FLASH_ATTN=1",
                "--build-arg", "TORCH_INDEX_URL=")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    cmd = proc.stdout.splitlines()[-1].split()
    assert cmd[:4] == ["env", "DOCKER_BUILDKIT=1", "docker", "build"]
    assert cmd[cmd.index("-f") + 1] == str(REPO / "docker" / "Dockerfile") and cmd[-1] == str(REPO)
    args = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--build-arg"]
    assert args == [
        "SKIP_FLASH_ATTN=1",
        "TORCH_INDEX_URL=",
        "BASE_IMAGE=localhost/longact-base:noble",
    ]
    assert cmd[cmd.index("--build-context") + 1] == f"wheels={wheels}"
    assert cmd[cmd.index("--secret") + 1] == f"id=ca_bundle\\,src={tmp_path / 'ca.crt'}"
    assert cmd[cmd.index("-t") + 1] == "longact:gpu"

    proc = _dry("cpu", "--engine", "docker", "--base", "python:3.11.7-slim-bookworm",
                "--tag", "me/longact:cpu")  # fmt: skip
    cmd = proc.stdout.splitlines()[-1].split()
    assert cmd[cmd.index("-f") + 1] == str(REPO / "docker" / "Dockerfile.cpu")
    assert "BASE_IMAGE=python:3.11.7-slim-bookworm" in cmd and "me/longact:cpu" in cmd
    assert "--secret" not in cmd and "--build-context" not in cmd


@pytest.mark.parametrize(
    "args, message",
    [
        (["tpu"], "first argument must be 'cpu' or 'gpu', got 'tpu'"),
        (["cpu", "--wheels", "/no/such/dir"], "--wheels /no/such/dir is not a folder"),
        (["cpu", "--ca-bundle", "/no/ca.crt"], "--ca-bundle /no/ca.crt is not a readable"),
        (["cpu", "--engine", "podman"], "--engine must be 'docker' or 'buildah', got 'podman'"),
        (["cpu", "--base", "x", "--debian-base"], "--base and --debian-base exclude each other"),
        (["cpu", "--tag"], "--tag needs a value"),
        (["cpu", "--squash"], "unknown option '--squash' (allowed: --tag, --base"),
    ],
)
def test_build_script_names_the_bad_value(args, message):
    proc = _dry(*args)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
