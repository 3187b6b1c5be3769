"""Unit tests for the job ``longact submit`` builds (no cluster needed)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from longact.cli.main import main
from longact.launch import runtime_env as rt
from longact.launch.runtime_env import LaunchError

REPO = Path(__file__).resolve().parents[2]

SHIPPED = ["README.md", "src/train_helper.py", "configs/my.yaml"]
NEVER_SHIPPED = [
    "checkpoints/global_step_10/actor/model_world_size_2_rank_0.pt",
    "my_ckpts/global_step_3/actor/huggingface/config.json",
    "model.safetensors",
    "weights/pytorch_model.bin",
    "weights/adapter.pth",
    "runs/demo/metrics.jsonl",
    "outputs/2026-11-23/train.log",
    "wandb/offline-run-1/run.wandb",
    ".venv/lib/site.py",
    ".git/HEAD",
    "data/train.parquet",
    "pkg/__pycache__/x.cpython-311.pyc",
    "ignored_by_rayignore.txt",
]


@pytest.fixture
def project(tmp_path) -> Path:
    root = tmp_path / "project"
    for rel in SHIPPED + NEVER_SHIPPED:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(f"content of {rel}\n")
    (root / ".rayignore").write_text("ignored_by_rayignore.txt\n")
    return root


def staged_files(spec) -> set[str]:
    root = spec.stage_dir
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_excludes_cover_checkpoints_weights_outputs_and_data():
    for pattern in ("checkpoints/", "global_step_*/", "runs/", "outputs/", "wandb/", ".venv/"):
        assert pattern in rt.EXCLUDES
    for pattern in ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.parquet"):
        assert pattern in rt.EXCLUDES


def test_staged_working_dir_never_ships_checkpoints_or_weights(project):
    spec = rt.prepare_job(["recipe=grpo_cpu"], working_dir=project)
    try:
        files = staged_files(spec)
        for rel in SHIPPED:
            assert rel in files
        for rel in NEVER_SHIPPED:
            assert rel not in files, rel
        # LongAct ships in its installed layout (setup.py's package_dir mapping)
        for rel in (
            "longact/__init__.py",
            "longact/workers/plugin.py",
            "longact/recipes/grpo_cpu.yaml",
            "longact/hydra_configs/platform/cpu.yaml",
            "longact/launch/runtime_env.py",
        ):
            assert rel in files, rel
        assert not any("__pycache__" in f for f in files)
        assert spec.runtime_env["working_dir"] == str(spec.stage_dir)
        assert "*.safetensors" in spec.excludes
        assert "excludes" not in spec.runtime_env  # applied before staging, not again
        assert {f for f, _ in spec.files} == files
    finally:
        spec.cleanup()
    assert not spec.stage_dir.exists()


def test_checkout_is_staged_in_installed_layout_and_imports_from_there():
    spec = rt.prepare_job(["recipe=grpo_cpu"], working_dir=REPO)
    try:
        files = staged_files(spec)
        assert "longact/workers/plugin.py" in files
        assert "setup.py" in files
        # each file counted once (the checkout's longact/workers link is the mapped folder)
        listed = [rel for rel, _ in spec.files]
        assert len(listed) == len(set(listed)), sorted(r for r in listed if listed.count(r) > 1)
        # the top-level source folders are not shipped as they lie
        assert not any(f.startswith(("workers/", "recipes/", "hydra_configs/")) for f in files)
        probe = (
            "import longact.workers, longact.recipes, longact.hydra_configs; "
            "print(longact.workers.__file__)"
        )
        env = {**os.environ, "PYTHONPATH": str(spec.stage_dir)}
        out = subprocess.run(
            [sys.executable, "-c", probe],
            env=env,
            cwd=spec.stage_dir,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        assert out == str(spec.stage_dir / "longact" / "workers" / "__init__.py")
    finally:
        spec.cleanup()


def test_ignore_files_do_not_strip_the_staged_package(project):
    # common .gitignore lines that would match subpackages of longact (data/, models/)
    (project / ".gitignore").write_text("data/\nmodels/\n*.log\n")
    (project / "models").mkdir()
    (project / "models" / "tokenizer.json").write_text("{}")
    (project / "train.log").write_text("x")
    spec = rt.prepare_job(["recipe=grpo"], working_dir=project)
    try:
        files = staged_files(spec)
        assert "longact/data/__init__.py" in files
        assert "longact/models/tiny.py" in files
        assert "models/tokenizer.json" not in files and "train.log" not in files
        assert ".gitignore" not in files and ".rayignore" not in files
    finally:
        spec.cleanup()


def test_code_installed_ships_no_package(project):
    spec = rt.prepare_job(["recipe=grpo"], working_dir=project, code="installed")
    try:
        assert not any(f.startswith("longact/") for f in staged_files(spec))
    finally:
        spec.cleanup()


def test_foreign_longact_folder_is_refused(project):
    (project / "longact").mkdir()
    (project / "longact" / "__init__.py").write_text("")
    with pytest.raises(LaunchError, match="but this longact is imported from"):
        rt.prepare_job(["recipe=grpo"], working_dir=project)
    spec = rt.prepare_job(["recipe=grpo"], working_dir=project, code="installed")
    try:  # never shipped: it would shadow the cluster's installed package
        assert not any(f.startswith("longact/") for f in staged_files(spec))
    finally:
        spec.cleanup()


def test_upload_over_the_limit_is_refused_naming_the_biggest_files(project):
    (project / "big_table.csv").write_bytes(os.urandom(1_500_000))
    (project / "medium.json").write_bytes(b"x" * 200_000)  # bigger than any source file
    with pytest.raises(LaunchError) as err:
        rt.prepare_job(["recipe=grpo"], working_dir=project, max_upload_mb=1)
    msg = str(err.value)
    assert "big_table.csv (1.5 MB)" in msg and "medium.json" in msg
    assert msg.index("big_table.csv") < msg.index("medium.json")
    assert "--max-upload-mb" in msg and "limit 1 MB" in msg
    # an extra exclude brings it under the limit
    spec = rt.prepare_job(
        ["recipe=grpo"], working_dir=project, max_upload_mb=1, extra_excludes=["*.csv"]
    )
    assert "big_table.csv" not in staged_files(spec)
    assert "*.csv" in spec.excludes
    spec.cleanup()


def test_env_vars(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_PROJECT", "longact")
    monkeypatch.setenv("WANDB_API_KEY", "secret")
    env = rt.job_env(rt.parse_env(["FOO=1", "WANDB_MODE=online", "BAR=a=b"]))
    assert env["TOKENIZERS_PARALLELISM"] == "false"
    assert "ignore::UserWarning" in env["PYTHONWARNINGS"]
    assert env["RAY_OVERRIDE_JOB_RUNTIME_ENV"] == "1"
    assert env["WANDB_PROJECT"] == "longact"  # forwarded
    assert env["WANDB_MODE"] == "online"  # --env wins over the forwarded value
    assert env["FOO"] == "1" and env["BAR"] == "a=b"
    assert "WANDB_API_KEY" not in env  # secrets only when asked for
    assert rt.parse_env(["WANDB_API_KEY"]) == {"WANDB_API_KEY": "secret"}


@pytest.mark.parametrize(
    "item, match",
    [("1BAD=x", "expected KEY=VALUE"), ("=x", "expected KEY=VALUE"), ("UNSET_X", "not set")],
)
def test_bad_env(item, match, monkeypatch):
    monkeypatch.delenv("UNSET_X", raising=False)
    with pytest.raises(LaunchError, match=match):
        rt.parse_env([item])


def test_entrypoint_quotes_overrides_and_drops_ray_init_resources():
    ep = rt.build_entrypoint(["recipe=dapo", "trainer.logger=[console,wandb]", "~foo"])
    assert ep.startswith("longact-train recipe=dapo 'trainer.logger=[console,wandb]' '~foo' ")
    assert ep.endswith("++ray_kwargs.ray_init.num_cpus=null ++ray_kwargs.ray_init.num_gpus=null")
    assert rt.build_entrypoint(["a=1"], "python -m longact.train.entry").startswith(
        "python -m longact.train.entry a=1"
    )


@pytest.mark.parametrize(
    "overrides, match",
    [([], "no training overrides"), (["grpo_cpu"], "not a Hydra override")],
)
def test_bad_overrides(overrides, match):
    with pytest.raises(LaunchError, match=match):
        rt.build_entrypoint(overrides)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_errors(capsys, monkeypatch, project):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # the CLI would switch this process to token
    assert main(["submit", "--address", "http://127.0.0.1:1"]) == 2
    assert "no training overrides" in capsys.readouterr().err

    url = f"http://127.0.0.1:{_closed_port()}"
    args = ["submit", "--working-dir", str(project), "--address", url, "--", "recipe=grpo_cpu"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "cannot reach a Ray cluster's dashboard at " + url in err

    args = ["submit", "--dry-run", "--working-dir", str(project / "nope"), "--", "recipe=grpo"]
    assert main(args) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_cli_dry_run(capsys, project):
    args = ["submit", "--dry-run", "--working-dir", str(project), "--env", "A=1", "--", "x=1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert '"entrypoint": "longact-train x=1 ++ray_kwargs' in out
    assert '"A": "1"' in out and "files," in out


def test_submit_address_defaults_to_ray_api_server_address(capsys, monkeypatch, project):
    """``export RAY_API_SERVER_ADDRESS=http://127.0.0.1:8265``, then ``longact submit``
    without ``--address`` submits there (ahead of ``RAY_ADDRESS``)."""
    url = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", url)
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:1")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # the CLI would switch this process to token
    assert main(["submit", "--working-dir", str(project), "--", "recipe=grpo_cpu"]) == 2
    assert "cannot reach a Ray cluster's dashboard at " + url in capsys.readouterr().err


# What a job with 'trainer.logger=[console,wandb]' trainer.project_name=longact sets up:
# verl's tracking, as its trainer calls it.
WANDB_JOB = """
from verl.utils.tracking import Tracking
tracking = Tracking("longact", None, default_backend=["console", "wandb"], config={"trainer": {}})
tracking.log({"critic/score/mean": 0.5}, step=1)
del tracking
"""


def test_offline_wandb_run_lands_in_wandb_dir_and_syncs(tmp_path, monkeypatch):
    """``WANDB_MODE=offline longact submit --env WANDB_MODE --env WANDB_DIR=/work/runs``:
    the job's environment carries both; the run's folder lands in
    ``$WANDB_DIR/wandb/offline-run-*``, not in the job's working_dir, and holds what
    ``wandb sync /shared/runs/wandb/offline-run-*`` uploads (its dry run finds it)."""
    runs, working_dir = tmp_path / "runs", tmp_path / "job"
    working_dir.mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    env = rt.job_env(rt.parse_env(["WANDB_MODE", f"WANDB_DIR={runs}"]))
    assert env["WANDB_MODE"] == "offline" and env["WANDB_DIR"] == str(runs)

    env = {**os.environ, **env, "HOME": str(tmp_path), "WANDB_SILENT": "true"}
    env.pop("WANDB_API_KEY", None)
    job = [sys.executable, "-c", WANDB_JOB]
    proc = subprocess.run(job, cwd=working_dir, env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not list(working_dir.iterdir())
    run_dirs = list((runs / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 1 and list(run_dirs[0].glob("run-*.wandb")), run_dirs

    sync = f"{Path(sys.executable).parent}/wandb sync --dry-run {runs}/wandb/offline-run-*"
    proc = subprocess.run(["bash", "-c", sync], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Would sync 1 run(s)" in out, out
