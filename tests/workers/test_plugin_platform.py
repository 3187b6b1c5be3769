"""LongAct's ``verl.plugins`` entry point: the cpu platform, the engine and rollout
registrations, the torch.cuda-shaped CPU device module and the gloo wrapper."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from longact.workers import cpu_platform

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*engine is not available:UserWarning"),
    pytest.mark.filterwarnings("ignore:Ray state API:DeprecationWarning"),
]

PROBE = """
import json
import verl
from verl.plugin.platform import get_platform
from verl.workers.engine.base import EngineRegistry
from verl.workers.rollout.base import _ROLLOUT_REGISTRY
from verl.workers.rollout.replica import RolloutReplicaRegistry
from verl.utils import distributed
p = get_platform()
e = EngineRegistry.get_engine_cls("language_model", "fsdp2")
print("RESULT " + json.dumps({
    "device": p.device_name,
    "backend": p.communication_backend_name(),
    "engine": e.__module__ + "." + e.__qualname__,
    "rollouts": sorted({n for n, _ in _ROLLOUT_REGISTRY}),
    "replica_hf": RolloutReplicaRegistry.get("hf").__name__,
    "gloo": getattr(distributed.initialize_global_process_group_ray, "__longact_gloo__", False),
}))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the cpu platform yields to CUDA")
def test_verl_import_alone_loads_the_plugin():
    env = {k: v for k, v in os.environ.items() if k not in ("VERL_PLATFORM", "LONGACT_CONFIG")}
    proc = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    got = json.loads(line[len("RESULT ") :])
    assert got["device"] == "cpu"
    assert got["backend"] == "gloo"
    assert got["engine"].startswith("longact.workers.fsdp_engine.")
    assert got["engine"].endswith("LongActFSDPEngine")
    assert "hf" in got["rollouts"]
    assert got["replica_hf"] == "HFReplica"
    assert got["gloo"] is True


def test_cpu_device_module_behaves():
    mod = cpu_platform.make_cpu_device_module()
    assert mod.is_available() is True
    assert mod.device_count() == 1
    assert mod.current_device() == torch.device("cpu")
    free, total = mod.mem_get_info()
    assert isinstance(free, int) and isinstance(total, int)
    assert 0 < free <= total
    for fn in ("memory_allocated", "memory_reserved", "max_memory_allocated"):
        assert getattr(mod, fn)() == 0
    for fn in ("set_device", "synchronize", "empty_cache", "reset_peak_memory_stats"):
        assert getattr(mod, fn)(0) is None
    assert mod.get_device_name() == "cpu"
    state = mod.get_rng_state()
    a = torch.rand(3)
    mod.set_rng_state(state)
    assert torch.equal(torch.rand(3), a)
    mod.manual_seed(7)
    b = torch.rand(2)
    mod.manual_seed_all(7)
    assert torch.equal(torch.rand(2), b)
    with mod.stream(mod.current_stream()):
        pass


def test_ray_init_overrides():
    assert cpu_platform.ray_init_overrides(2) == {"num_gpus": 2, "num_cpus": 12}
    assert cpu_platform.ray_init_overrides(1)["num_cpus"] >= 8
    for bad in (0, -3):
        with pytest.raises(ValueError, match=f"got {bad}"):
            cpu_platform.ray_init_overrides(bad)


def test_patch_process_group_init_is_idempotent():
    from verl.utils import distributed

    names = ("initialize_global_process_group", "initialize_global_process_group_ray")
    cpu_platform.patch_process_group_init()
    first = {n: getattr(distributed, n) for n in names}
    cpu_platform.patch_process_group_init()
    for n in names:
        fn = getattr(distributed, n)
        assert fn is first[n]
        assert fn.__longact_gloo__ is True
        assert fn.__name__ == n
        assert not getattr(fn.__wrapped__, "__longact_gloo__", False)  # wrapped once


@pytest.mark.skipif(torch.cuda.is_available(), reason="the wrapper only acts on the cpu device")
def test_gloo_wrapper_forces_plain_gloo(monkeypatch):
    def initialize_global_process_group_ray(timeout_second=10, backend=None):
        return ("ray", backend)

    def initialize_global_process_group(timeout_second=10):
        raise AssertionError("the torchrun initializer must not be called on the cpu")

    ray_init = cpu_platform._gloo_only(initialize_global_process_group_ray)
    assert ray_init(5, backend="cpu:gloo,cpu:gloo") == ("ray", "gloo")
    assert ray_init() == ("ray", "gloo")

    calls = []
    monkeypatch.setattr(
        cpu_platform, "_init_torchrun_gloo", lambda *a, **k: calls.append((a, k)) or (0, 0, 1)
    )
    torchrun_init = cpu_platform._gloo_only(initialize_global_process_group)
    assert torchrun_init(timeout_second=3) == (0, 0, 1)
    assert calls == [((), {"timeout_second": 3})]


def test_register_is_idempotent():
    from verl.plugin.platform.platform_manager import PlatformRegistry
    from verl.workers.rollout import base

    from longact.workers import fsdp_engine, hf_rollout

    cls = PlatformRegistry.get("cpu")
    cpu_platform.register()
    fsdp_engine.register()
    hf_rollout.register()
    assert PlatformRegistry.get("cpu") is cls
    assert base._ROLLOUT_REGISTRY[("hf", "async")] == "longact.workers.hf_rollout.HFServerAdapter"


def test_cpu_platform_claims_only_processes_whose_torch_has_no_accelerator(monkeypatch):
    """A process of a GPU node that Ray gave no GPU keeps verl's nvidia platform."""
    from verl.plugin.platform.platform_manager import PlatformRegistry

    from longact.workers import cpu_platform

    cpu_platform.register()
    platform = PlatformRegistry.get("cpu")
    platform = platform() if isinstance(platform, type) else platform
    monkeypatch.setattr(torch.version, "cuda", "13.0")  # a CUDA build, no device visible
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert platform.is_platform_available() is False
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    assert platform.is_platform_available() is True


def test_verl_main_ppo_with_a_longact_section_is_refused():
    """Launched through verl's own entry point, LongAct's section would never reach the
    ranks: the plugin stops the run before Hydra or Ray start."""
    from longact.workers.plugin import refuse_plain_verl_entry

    refuse_plain_verl_entry(["python", "-m", "verl.trainer.main_ppo", "trainer.nnodes=1"])
    refuse_plain_verl_entry(["longact-train", "recipe=grpo", "longact.ratio=0.3"])
    refuse_plain_verl_entry(["python", "-m", "verl.trainer.main_ppo", "--config-name=ppo_trainer"])
    for recipe in (["--config-name=grpo_cpu"], ["--config-name", "dapo"]):
        with pytest.raises(SystemExit, match=f"ignores LongAct's section \\({recipe[0]}"):
            refuse_plain_verl_entry(["python", "-m", "verl.trainer.main_ppo", *recipe])
    proc = subprocess.run(
        [sys.executable, "-m", "verl.trainer.main_ppo", "+longact.enable=true"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "verl.trainer.main_ppo ignores LongAct's section (+longact.enable=true)" in proc.stderr
    assert "longact-train" in proc.stderr
