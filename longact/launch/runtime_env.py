"""The Ray job that ``longact submit`` sends: entrypoint, runtime_env and upload checks.

The job's ``working_dir`` is the repository (or any folder the user names), copied into
a staging folder so that what the cluster receives is exactly what was checked:

- files matched by ``EXCLUDES`` (checkpoints, model weights, run outputs, virtualenvs,
  wandb folders, data files), by Ray's own default excludes and by ``.gitignore`` /
  ``.rayignore`` are left out, with the same matcher Ray's upload uses; the stage is
  shipped without an ``excludes`` key, since Ray would apply those patterns again to
  the whole stage, the staged package included;
- LongAct's source folders are not copied as they lie: setup.py maps the top-level
  ``workers/``, ``recipes/`` and ``hydra_configs/`` folders into the ``longact``
  package, so a plain copy of the repository would hold a ``longact/`` without
  ``longact.workers``. With ``code="local"`` (the default) the staging folder gets
  ``longact/`` in its installed layout instead, so the driver and every Ray worker
  (working_dir goes first on their ``PYTHONPATH``) import the submitter's code; with
  ``code="installed"`` no ``longact/`` is shipped and the cluster's installed package
  is used. Either way the cluster needs LongAct installed (``longact-train`` on PATH,
  verl's ``verl.plugins`` entry point), as the Docker image has it;
- the total is refused above a limit (default 100 MB), naming the biggest files.

The entrypoint is ``longact-train <overrides>`` plus two overrides that keep verl's
``ray.init`` from passing ``num_cpus`` / ``num_gpus``, which Ray rejects when
connecting to an existing cluster (the job's driver always does).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = "longact"
# subpackages setup.py maps from top-level folders (package_dir)
MAPPED_SUBPACKAGES = ("workers", "recipes", "hydra_configs")

# gitignore-style patterns, matched relative to the working_dir (as Ray matches them)
EXCLUDES = [
    # environments, caches and build output
    ".git/",
    ".venv/",
    "venv/",
    "__pycache__/",
    "*.pyc",
    ".pytest_cache/",
    ".ruff_cache/",
    "*.egg-info/",
    "build/",
    "dist/",
    # run outputs and checkpoints (verl writes global_step_N/ under trainer.default_local_dir)
    "runs/",
    "outputs/",
    "checkpoints/",
    "ckpt/",
    "global_step_*/",
    "wandb/",
    # model weights and tensors
    "*.safetensors",
    "*.bin",
    "*.pt",
    "*.pth",
    "*.ckpt",
    "*.distcp",
    "*.gguf",
    "*.onnx",
    "*.h5",
    "*.npy",
    "*.npz",
    "/models/",
    # data sets: reference them by a path the cluster can read, never upload them
    "*.parquet",
    "*.arrow",
]

# Hydra overrides appended to every submitted run: the job's driver connects to the
# existing cluster, and ray.init() raises when given num_cpus/num_gpus there.
RAY_INIT_OVERRIDES = [
    "++ray_kwargs.ray_init.num_cpus=null",
    "++ray_kwargs.ray_init.num_gpus=null",
]

# Environment every LongAct job gets.
BASE_ENV = {
    "PYTHONWARNINGS": "ignore::UserWarning,ignore::FutureWarning,ignore::DeprecationWarning",
    "TOKENIZERS_PARALLELISM": "false",
    "HYDRA_FULL_ERROR": "1",
    # verl's driver calls ray.init(runtime_env={env_vars: ...}) inside the job; Ray refuses
    # to merge it with the job's runtime_env when a key is in both (e.g. PYTHONHASHSEED
    # passed with --env) unless this is set. The values are the same ones either way.
    "RAY_OVERRIDE_JOB_RUNTIME_ENV": "1",
}

# Variables copied from the submitter's environment when set there. WANDB_API_KEY is
# not among them: job environments are shown in the Ray dashboard. Pass it explicitly
# (--env WANDB_API_KEY) or run `wandb login` on the nodes.
FORWARD_ENV = (
    "WANDB_MODE",
    "WANDB_PROJECT",
    "WANDB_ENTITY",
    "WANDB_BASE_URL",
    "WANDB_DIR",
    "WANDB_RUN_GROUP",
    "HF_ENDPOINT",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "VERL_LOGGING_LEVEL",
)

# what is left out of LongAct's own package when it is staged
PACKAGE_EXCLUDES = ["__pycache__/", "*.pyc", "*.egg-info/"]
IGNORE_FILES = (".gitignore", ".rayignore")

DEFAULT_MAX_UPLOAD_MB = 100.0
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class LaunchError(ValueError):
    """Bad input for a submission: the message names the value and what is allowed."""


@dataclass
class JobSpec:
    """A staged job, ready for ``JobSubmissionClient.submit_job``."""

    entrypoint: str
    runtime_env: dict
    stage_dir: Path
    """The folder shipped as working_dir; remove it (``cleanup``) once submitted."""
    files: list[tuple[str, int]] = field(default_factory=list)
    """(relative path, bytes) of every staged file."""
    excludes: list[str] = field(default_factory=list)
    """The patterns the working_dir was filtered with (before staging)."""

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)

    def cleanup(self) -> None:
        shutil.rmtree(self.stage_dir.parent, ignore_errors=True)


def find_repo_root() -> Path | None:
    """The source checkout this ``longact`` was imported from, if any (editable install)."""
    import longact

    root = Path(longact.__file__).resolve().parent.parent
    if (root / "setup.py").is_file() and (root / "workers" / "plugin.py").is_file():
        return root
    return None


def default_working_dir() -> Path:
    """The repository root for a source checkout, else the current directory."""
    return find_repo_root() or Path.cwd()


def package_sources() -> dict[str, Path]:
    """Where ``longact`` and its mapped subpackages live on this machine."""
    import importlib.util

    out = {}
    for name in (PACKAGE, *(f"{PACKAGE}.{sub}" for sub in MAPPED_SUBPACKAGES)):
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise LaunchError(f"cannot locate package {name}; is LongAct installed here?")
        out[name] = Path(list(spec.submodule_search_locations)[0]).resolve()
    return out


def check_overrides(overrides: list[str]) -> None:
    """Every argument must look like a Hydra override (or a Hydra flag and its value)."""
    if not overrides:
        raise LaunchError(
            "no training overrides given; pass them after `--`, e.g. `longact submit "
            "--address http://HEAD:8265 -- recipe=grpo actor_rollout_ref.model.path=/models/m`"
        )
    prev_flag = False
    for arg in overrides:
        if arg.startswith("-"):
            prev_flag = True
            continue
        if "=" not in arg and not arg.startswith("~") and not prev_flag:
            raise LaunchError(
                f"{arg!r} is not a Hydra override; use KEY=VALUE, +KEY=VALUE, ++KEY=VALUE "
                f"or ~KEY (a recipe is picked with recipe=NAME)"
            )
        prev_flag = False


def build_entrypoint(overrides: list[str], train_cmd: str = "longact-train") -> str:
    """``longact-train <overrides>`` as one shell command, each argument quoted."""
    check_overrides(overrides)
    cmd = shlex.split(train_cmd)
    if not cmd:
        raise LaunchError("--train-cmd is empty")
    return shlex.join([*cmd, *overrides, *RAY_INIT_OVERRIDES])


def parse_env(items: list[str], environ: dict[str, str] | None = None) -> dict[str, str]:
    """``KEY=VAL`` pairs; a bare ``KEY`` copies the submitter's value of it."""
    environ = os.environ if environ is None else environ
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not _ENV_KEY.match(key):
            raise LaunchError(
                f"--env {item!r}: expected KEY=VALUE with KEY like [A-Za-z_][A-Za-z0-9_]*"
            )
        if not sep:
            if key not in environ:
                raise LaunchError(f"--env {key}: not set in this shell; pass --env {key}=VALUE")
            value = environ[key]
        out[key] = value
    return out


def job_env(extra: dict[str, str], environ: dict[str, str] | None = None) -> dict[str, str]:
    """BASE_ENV, then FORWARD_ENV values set here, then the user's --env values."""
    environ = os.environ if environ is None else environ
    env = dict(BASE_ENV)
    env.update({k: environ[k] for k in FORWARD_ENV if environ.get(k)})
    env.update(extra)
    return env


def collect_files(root: Path, excludes: list[str], skip: set[Path] = frozenset()):
    """(relative path, bytes) of the files Ray would upload from ``root`` with ``excludes``.

    Walks with Ray's own traversal and matchers (ray is pinned in requirements/), so
    .gitignore / .rayignore files and Ray's default excludes count exactly as in an
    upload of ``root``. ``skip`` holds absolute folders left out entirely.
    """
    import logging

    from ray._private import ray_constants
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    root = root.resolve()
    patterns = [*ray_constants.get_runtime_env_default_excludes(), *excludes]
    include_gitignore = os.environ.get(ray_constants.RAY_RUNTIME_ENV_IGNORE_GITIGNORE, "0") != "1"
    skip = {p.resolve() for p in skip}
    files: list[tuple[str, int]] = []

    def skipped(path: Path) -> bool:
        return path.resolve() in skip

    def handler(path: Path) -> None:
        if path.is_file():
            files.append((str(path.relative_to(root)), path.stat().st_size))

    quiet = logging.getLogger("longact.launch.quiet")
    quiet.setLevel(logging.ERROR)
    _dir_travel(
        root, [_get_excludes(root, patterns), skipped], handler, include_gitignore, logger=quiet
    )
    return files


def check_size(files: list[tuple[str, int]], max_bytes: float, where: Path) -> None:
    """Refuse an upload over ``max_bytes``, naming the biggest files."""
    total = sum(size for _, size in files)
    if total <= max_bytes:
        return
    ranked = sorted(files, key=lambda f: -f[1])
    # the few files that matter: the top five, without those under 1% of the total
    biggest = [f for f in ranked[:5] if f[1] >= total / 100] or ranked[:1]
    listed = ", ".join(f"{name} ({size / 1e6:.1f} MB)" for name, size in biggest)
    raise LaunchError(
        f"working_dir {where} would upload {total / 1e6:.1f} MB after excludes "
        f"(limit {max_bytes / 1e6:.0f} MB). Biggest files: {listed}. Leave them out with "
        f"--exclude PATTERN or a .rayignore file, put data and weights on storage the "
        f"cluster reads, or raise --max-upload-mb"
    )


def stage_job(
    working_dir: Path,
    code: str = "local",
    extra_excludes: list[str] = (),
    max_bytes: float = DEFAULT_MAX_UPLOAD_MB * 1e6,
) -> tuple[Path, list[tuple[str, int]]]:
    """Copy what will be shipped into a fresh folder; returns (folder, files)."""
    if code not in ("local", "installed"):
        raise LaunchError(f"code={code!r}; valid: local, installed")
    working_dir = Path(working_dir).expanduser().resolve()
    if not working_dir.is_dir():
        raise LaunchError(f"working_dir {working_dir} is not a directory")
    sources = package_sources()
    # LongAct's own source folders inside the working_dir (a checkout) are never copied
    # as they lie; see the module docstring.
    skip = {p for p in sources.values() if p.parent == working_dir}
    if code == "installed":  # nothing may shadow the cluster's installed package
        skip.add(working_dir / PACKAGE)
    if code == "local" and (working_dir / PACKAGE).exists() and sources[PACKAGE] not in skip:
        raise LaunchError(
            f"{working_dir / PACKAGE} exists but this longact is imported from "
            f"{sources[PACKAGE]}; submit from the install you mean to ship (pip install -e "
            f"the checkout), pick another --working-dir, or use --code installed"
        )
    files = collect_files(working_dir, [*EXCLUDES, *extra_excludes], skip)
    # ignore files have been applied; copied into the stage, Ray would apply them again,
    # to the staged longact/ package too (a `data/` line would strip longact/data)
    files = [(rel, size) for rel, size in files if Path(rel).name not in IGNORE_FILES]
    pkg_files: list[tuple[str, Path, int]] = []  # (staged path, source, size)
    if code == "local":
        pkg_root = sources[PACKAGE]
        mapped = {sources[f"{PACKAGE}.{sub}"]: sub for sub in MAPPED_SUBPACKAGES}
        for rel, size in collect_files(pkg_root, PACKAGE_EXCLUDES):
            pkg_files.append((f"{PACKAGE}/{rel}", pkg_root / rel, size))
        for src, sub in mapped.items():
            # already inside: a non-editable install, or a checkout's longact/workers link
            if src.parent == pkg_root or (pkg_root / sub).exists():
                continue
            for rel, size in collect_files(src, PACKAGE_EXCLUDES):
                pkg_files.append((f"{PACKAGE}/{sub}/{rel}", src / rel, size))
    all_files = files + [(rel, size) for rel, _, size in pkg_files]
    check_size(all_files, max_bytes, working_dir)

    stage = Path(tempfile.mkdtemp(prefix="longact-submit-")) / "working_dir"
    copies = [(rel, working_dir / rel) for rel, _ in files] + [(r, s) for r, s, _ in pkg_files]
    for rel, src in copies:
        dst = stage / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
    stage.mkdir(parents=True, exist_ok=True)
    return stage, all_files


def prepare_job(
    overrides: list[str],
    working_dir: Path | None = None,
    env: dict[str, str] | None = None,
    code: str = "local",
    extra_excludes: list[str] = (),
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
    train_cmd: str = "longact-train",
) -> JobSpec:
    """Validate the overrides, stage the working_dir and build the runtime_env."""
    if max_upload_mb <= 0:
        raise LaunchError(f"--max-upload-mb={max_upload_mb} must be > 0")
    entrypoint = build_entrypoint(overrides, train_cmd)
    working_dir = Path(working_dir) if working_dir else default_working_dir()
    stage, files = stage_job(working_dir, code, list(extra_excludes), max_upload_mb * 1e6)
    # No `excludes` key: the stage is already filtered, and Ray would apply unanchored
    # patterns to the staged longact/ package as well.
    runtime_env = {"working_dir": str(stage), "env_vars": job_env(env or {})}
    return JobSpec(
        entrypoint=entrypoint,
        runtime_env=runtime_env,
        stage_dir=stage,
        files=files,
        excludes=[*EXCLUDES, *extra_excludes],
    )
