"""``longact doctor``: check this install, or a run before it starts.

- ``longact doctor``: versions, the verl platform, the engine and rollouts LongAct
  registered with verl.
- ``longact doctor recipe=dapo_cpu actor_rollout_ref.model.path=... ...``: the same
  arguments as ``longact-train``; composes the run's config without starting Ray and
  reports its settings, what verl's v1 trainer will ignore, keys without effect, and
  whether the model and data are readable (``longact.train.doctor``). Exit code 1 when
  it finds a problem that would stop the run.
"""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser(
        "doctor",
        help="check the install, or a longact-train run's overrides before it starts",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="OVERRIDE",
        help="longact-train's arguments (recipe=NAME and Hydra overrides)",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    if args.overrides:
        from longact.train.doctor import diagnose

        report = diagnose(args.overrides)
        print(report.render())
        return 1 if report.problems else 0
    return environment()


def environment() -> int:
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
