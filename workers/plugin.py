"""The ``verl.plugins`` entry point: verl imports this in every process it starts.

Registered through setup.py, so ``import verl`` anywhere LongAct is installed (driver,
Ray workers, torchrun ranks) loads it, with no environment variable to export. It
only adds entries to verl's own registries:

- the ``cpu`` platform, chosen by verl's probe when no CUDA device is visible;
- verl's FSDP engine registered for the ``cpu`` device;
- the ``hf`` rollout backend.

Failures are raised, not swallowed here; verl itself logs a failed plugin at debug
level, so ``longact doctor`` imports this module directly to surface errors.
"""

from __future__ import annotations


def register_all() -> None:
    from . import cpu_platform, fsdp_engine, hf_rollout

    cpu_platform.register()
    fsdp_engine.register()
    hf_rollout.register()


register_all()
