"""``longact doctor``: check that verl sees LongAct's plugin and which platform it picks."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("doctor", help="report versions, verl platform, engine and rollouts")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch
    import verl
    from verl.plugin.platform import get_platform
    from verl.workers.engine.base import EngineRegistry
    from verl.workers.rollout.base import _ROLLOUT_REGISTRY

    import longact.workers.plugin  # noqa: F401  (raises here if registration fails)

    platform = get_platform()
    engine = EngineRegistry.get_engine_cls("language_model", "fsdp2")
    print(f"torch {torch.__version__}  verl {verl.__version__}  cuda={torch.cuda.is_available()}")
    print(f"verl platform: {platform.device_name} ({type(platform).__name__})")
    print(f"fsdp2 engine: {engine.__module__}.{engine.__qualname__}")
    print(f"rollouts: {sorted({name for name, _ in _ROLLOUT_REGISTRY})}")
    return 0
