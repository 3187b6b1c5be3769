"""A verl platform for hosts with no accelerator: torch on the CPU, gloo collectives.

verl picks its platform by probing the registered ones in order (nvidia, npu, rocm, ...)
and falls back to nvidia, which asks for NCCL. This platform registers under the name
``cpu`` and reports itself available only where torch was built without CUDA or ROCm,
so it is picked on a CPU box and never shadows a GPU, not even in a process of a GPU
node that Ray gave no GPU (a task runner, a reward worker): those stay on verl's nvidia
platform. ``VERL_PLATFORM=cpu`` asks for it explicitly, which ``longact-train`` does for
recipes with ``trainer.device=cpu`` (a CUDA build of torch on a laptop without a GPU).

Ray scheduling: verl's placement groups ask for one unit of ``ray_resource_name()``
per training rank. We keep the name ``GPU`` so verl's resource plumbing is unchanged;
on a CPU host LongAct's launcher declares that many logical "GPU" slots to the local
Ray cluster (see :func:`longact.workers.cpu_platform.ray_init_overrides`).
"""

from __future__ import annotations

import os
import types
from contextlib import contextmanager
from typing import Any

import torch


def _mem_get_info(device: Any = None) -> tuple[int, int]:
    """(free, total) host memory in bytes: the CPU stand-in for cudaMemGetInfo."""
    try:
        import psutil

        vm = psutil.virtual_memory()
        return int(vm.available), int(vm.total)
    except ImportError:  # pragma: no cover - psutil ships with ray
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return pages, pages


def _zero(*args: Any, **kwargs: Any) -> int:
    return 0


def _noop(*args: Any, **kwargs: Any) -> None:
    return None


def make_cpu_device_module() -> types.ModuleType:
    """A ``torch.cuda``-shaped namespace backed by the CPU.

    verl calls ``get_torch_device().<fn>`` for streams, RNG, memory stats and cache
    management. On the CPU these are either torch.cpu's own functions or harmless no-ops
    (there is no cache to empty, no separate allocator to report).
    """
    mod = types.ModuleType("longact_cpu_device")
    mod.is_available = lambda: True
    mod.device_count = lambda: 1
    mod.current_device = lambda: torch.device("cpu")
    mod.set_device = _noop
    mod.synchronize = _noop
    mod.empty_cache = _noop
    mod.ipc_collect = _noop
    mod.reset_peak_memory_stats = _noop
    mod.set_per_process_memory_fraction = _noop
    mod.memory_allocated = _zero
    mod.memory_reserved = _zero
    mod.max_memory_allocated = _zero
    mod.max_memory_reserved = _zero
    mod.mem_get_info = _mem_get_info
    mod.get_device_name = lambda *a, **k: "cpu"
    mod.get_rng_state = lambda *a, **k: torch.get_rng_state()
    mod.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    mod.manual_seed = torch.manual_seed
    mod.manual_seed_all = torch.manual_seed
    mod.Stream = torch.cpu.Stream
    mod.Event = torch.cpu.Event
    mod.stream = torch.cpu.stream
    mod.current_stream = torch.cpu.current_stream
    return mod


def accelerator_build() -> bool:
    """torch was built for CUDA or ROCm (whether or not a device is visible here)."""
    return torch.version.cuda is not None or getattr(torch.version, "hip", None) is not None


def register() -> None:
    """Register the ``cpu`` platform in verl's PlatformRegistry (idempotent)."""
    from verl.plugin.platform.platform_base import PlatformBase
    from verl.plugin.platform.platform_manager import PlatformRegistry

    patch_process_group_init()
    if PlatformRegistry.get("cpu") is not None:
        return

    @PlatformRegistry.register(platform="cpu")
    class PlatformCPU(PlatformBase):
        _module = make_cpu_device_module()

        @property
        def device_name(self) -> str:
            return "cpu"

        @property
        def vendor_name(self) -> str:
            return "longact"

        @property
        def device_module(self) -> types.ModuleType:
            return self._module

        def is_available(self) -> bool:
            return True

        def is_platform_available(self, use_smi_check: bool = False) -> bool:
            # Only claim a process whose torch cannot use an accelerator at all: a GPU
            # node's process without a GPU of its own stays on the nvidia platform.
            # verl probes registered platforms in order, and this one comes last.
            return not accelerator_build()

        def current_device(self) -> torch.device:  # type: ignore[override]
            return torch.device("cpu")

        def device_count(self) -> int:
            return 1

        def set_device(self, device_index: int) -> None:
            return None

        def synchronize(self, device_index: int | None = None) -> None:
            return None

        def manual_seed(self, seed: int) -> None:
            torch.manual_seed(seed)

        def manual_seed_all(self, seed: int) -> None:
            torch.manual_seed(seed)

        def set_allocator_settings(self, settings: str) -> None:
            return None

        def empty_cache(self) -> None:
            return None

        def get_device_capability(self, device_index: int = 0) -> tuple[None, None]:
            return None, None

        def communication_backend_name(self) -> str:
            return "gloo"

        def visible_devices_envvar(self) -> str:
            return "CUDA_VISIBLE_DEVICES"

        @contextmanager
        def nvtx_range(self, msg: str):
            yield

        def profiler_start(self) -> None:
            return None

        def profiler_stop(self) -> None:
            return None

        def ray_resource_name(self) -> str:
            return "GPU"

        def ray_noset_envvars(self) -> list[str]:
            return ["RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"]

        def is_ipc_supported(self) -> bool:
            return False

        def rollout_env_vars(self) -> dict[str, str]:
            # Read by the CPU build of vLLM in each rollout server actor (workers/vllm_cpu):
            # its default binding ("auto") pins every engine of a host to the same cores and
            # asserts one NUMA node per local worker; "nobind" leaves placement to the OS.
            # The device name spares vLLM's probe, which would ask for CUDA first.
            return {
                "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "nobind"),
                "VLLM_TARGET_DEVICE": "cpu",
            }

        def cudart(self) -> None:
            return None


def _gloo_only(fn):
    """Wrap a verl process-group initializer so a CPU platform asks for plain gloo.

    verl builds the backend string ``f"cpu:gloo,{device}:{backend}"``; with device
    ``cpu`` that is ``cpu:gloo,cpu:gloo``, which torch rejects as a duplicate.
    """
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from verl.utils.device import get_device_name

        if get_device_name() == "cpu":
            if fn.__name__.endswith("_ray"):
                kwargs["backend"] = "gloo"
            else:  # the torchrun initializer takes no backend argument
                return _init_torchrun_gloo(*args, **kwargs)
        return fn(*args, **kwargs)

    wrapper.__longact_gloo__ = True
    return wrapper


def _init_torchrun_gloo(timeout_second: int = 36000):
    from datetime import timedelta

    import torch.distributed as dist

    dist.init_process_group(
        backend="gloo",
        timeout=timedelta(seconds=timeout_second),
        init_method=os.environ.get("DIST_INIT_METHOD", None),
    )
    return int(os.environ["LOCAL_RANK"]), int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def patch_process_group_init() -> None:
    """Make verl's process-group initializers use gloo alone on the CPU platform.

    verl's modules bind these functions by name at import, so the wrapper is set on the
    defining module (this runs while ``import verl`` executes, before its workers are
    imported) and on any importer already loaded.
    """
    import sys

    from verl.utils import distributed

    for name in ("initialize_global_process_group", "initialize_global_process_group_ray"):
        fn = getattr(distributed, name)
        if getattr(fn, "__longact_gloo__", False):
            continue
        wrapped = _gloo_only(fn)
        setattr(distributed, name, wrapped)
        for mod_name in ("verl.workers.engine_workers", "verl.checkpoint_engine.base"):
            mod = sys.modules.get(mod_name)
            if mod is not None and getattr(mod, name, None) is fn:
                setattr(mod, name, wrapped)


def ray_init_overrides(n_ranks: int, cpus_per_rank: int = 4) -> dict[str, int]:
    """Resources a local Ray cluster must declare so verl can place ``n_ranks`` workers.

    Each rank's bundle holds a few logical CPUs (verl colocates actor, rollout and
    reference roles) and one logical GPU slot; logical CPUs are scheduling tokens, not
    cores, so oversubscribing a 2-core host is fine for tiny models.
    """
    if n_ranks < 1:
        raise ValueError(f"number of ranks must be >= 1, got {n_ranks}")
    return {"num_gpus": n_ranks, "num_cpus": max(8, cpus_per_rank * n_ranks + 4)}
