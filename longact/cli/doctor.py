"""``longact doctor``: check this install, or a run before it starts.

- ``longact doctor``: versions, the verl platform, the engine and rollouts LongAct
  registered with verl, and what the hf and vllm rollouts run here.
- ``longact doctor recipe=dapo_cpu actor_rollout_ref.model.path=... ...``: the same
  arguments as ``longact-train``; composes the run's config without starting Ray and
  reports its settings, what verl's v1 trainer will ignore, keys without effect, and
  whether the model and data are readable (``longact.train.doctor``). Exit code 1 when
  it finds a problem that would stop the run.
- ``longact doctor --model DIR [--ratio R]``: reads only ``DIR/config.json`` and prints
  what LongAct would do to that model (``longact.core.arch.report``): the layers it
  applies to, W_Q/W_K rows per layer and how many the ratio keeps, RoPE pairing,
  capture points. Exit code 1 for a model LongAct does not support (the error says why
  and lists the supported model types).
"""

from __future__ import annotations

import sys

from longact.cli.main import UsageError


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
    p.add_argument(
        "--model",
        metavar="DIR",
        help="report what LongAct would do to this model (reads only DIR/config.json)",
    )
    p.add_argument(
        "--ratio",
        type=float,
        default=0.3,
        help="with --model: the kept fraction of W_Q/W_K rows to count (default 0.3)",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    if args.model is not None:
        if args.overrides:
            raise UsageError("--model reports on one model; it takes no run overrides")
        return model_report(args.model, args.ratio)
    if args.overrides:
        from longact.train.doctor import diagnose

        report = diagnose(args.overrides)
        print(report.render())
        return 1 if report.problems else 0
    return environment()


def model_report(model_dir: str, ratio: float) -> int:
    """Print what LongAct would do to the model at ``model_dir`` (its config.json only)."""
    import json
    from pathlib import Path

    from transformers import AutoConfig

    from longact.core.arch.report import describe
    from longact.core.masks import validate_ratio

    try:
        validate_ratio(ratio)
    except ValueError as e:
        raise UsageError(f"--ratio: {e}") from None
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise UsageError(f"{path} has no config.json (pass a Hugging Face model directory)")
    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except ValueError as e:
        raise UsageError(f"{path / 'config.json'} is not valid JSON: {e}") from None
    try:
        from longact.core.arch import get_adapter

        get_adapter(str(model_type))  # unsupported: say why before transformers is asked
        config = AutoConfig.from_pretrained(path)
        print(f"{path}:")
        print(describe(config, ratio))
    except ValueError as e:
        print(f"longact doctor: {e}", file=sys.stderr)
        return 1
    return 0


def environment() -> int:
    import torch
    import verl
    from verl.plugin.platform import get_platform
    from verl.workers.engine.base import EngineRegistry
    from verl.workers.rollout.base import _ROLLOUT_REGISTRY

    from longact.train.doctor import rollout_engine
    from longact.train.plugin_check import plugin_problem

    for device in ("cpu", "cuda"):
        problem = plugin_problem(device)
        if problem:
            print(f"longact doctor: LongAct's plugin is not loaded: {problem}", file=sys.stderr)
            return 1
    platform = get_platform()
    engine = EngineRegistry.get_engine_cls("language_model", "fsdp2")
    print(f"torch {torch.__version__}  verl {verl.__version__}  cuda={torch.cuda.is_available()}")
    print(f"verl platform: {platform.device_name} ({type(platform).__name__})")
    print(f"fsdp2 engine: {engine.__module__}.{engine.__qualname__}")
    print(f"rollouts: {sorted({name for name, _ in _ROLLOUT_REGISTRY})}")
    for name in ("hf", "vllm"):
        print(f"  {name}: {rollout_engine(name, platform.device_name)}")
    return 0
