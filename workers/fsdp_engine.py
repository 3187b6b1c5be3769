"""verl's FSDP/FSDP2 language-model engine, registered for the ``cpu`` platform.

The stock ``FSDPEngineWithLMHead`` is registered for cuda and npu only. On the CPU it
works as it is with one exception: a forward-only engine (the reference policy) is
wrapped with ``CPUOffloadPolicy(pin_memory=True)``, and pinning needs an accelerator.
The subclass below builds the module with the offload policy's ``pin_memory`` off
when the platform is the CPU, and changes nothing else.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

_REGISTERED = False


@contextlib.contextmanager
def _unpinned_offload_policy() -> Iterator[None]:
    """Inside the block, verl's engine module builds CPUOffloadPolicy without pinning."""
    from verl.workers.engine.fsdp import transformer_impl

    original = transformer_impl.CPUOffloadPolicy

    def unpinned(*args, **kwargs):
        kwargs["pin_memory"] = False
        return original(*args, **kwargs)

    transformer_impl.CPUOffloadPolicy = unpinned
    try:
        yield
    finally:
        transformer_impl.CPUOffloadPolicy = original


def engine_class():
    """The engine class LongAct registers (created lazily: verl is imported here)."""
    from verl.utils.device import get_device_name
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    class CPUFriendlyFSDPEngine(FSDPEngineWithLMHead):
        def _build_fsdp_module(self, module):
            if get_device_name() != "cpu":
                return super()._build_fsdp_module(module)
            with _unpinned_offload_policy():
                return super()._build_fsdp_module(module)

    return CPUFriendlyFSDPEngine


def register() -> None:
    """Register the engine for language models on the ``cpu`` device (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from verl.workers.engine.base import EngineRegistry

    registry = EngineRegistry._engines.get("language_model", {})
    if "cpu" in registry.get("fsdp2", {}):
        _REGISTERED = True
        return
    EngineRegistry.register(model_type="language_model", backend=["fsdp", "fsdp2"], device="cpu")(
        engine_class()
    )
    _REGISTERED = True
