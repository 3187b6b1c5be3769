"""The ``verl.plugins`` entry point: verl imports this in every process it starts.

Registered through setup.py, so ``import verl`` anywhere LongAct is installed (driver,
Ray workers, torchrun ranks) loads it, with no environment variable to export. It
only adds entries to verl's own registries:

- the ``cpu`` platform, chosen by verl's probe when no CUDA device is visible;
- verl's FSDP engine registered for the ``cpu`` device;
- the ``hf`` rollout backend;
- the ``vllm`` replica on PyPI's CPU build of vLLM (verl's own on any other build).

It also stops ``python -m verl.trainer.main_ppo`` given ``longact.*`` overrides, which
would otherwise train as plain RL.

Failures are raised, not swallowed here; verl itself logs a failed plugin at debug
level, so ``longact doctor`` imports this module directly to surface errors.
"""

from __future__ import annotations

import re
import sys

_LONGACT_OVERRIDE = re.compile(r"^\+{0,2}longact\.")


def refuse_plain_verl_entry(argv: list[str] | None = None) -> None:
    """verl's own ``main_ppo`` given a ``longact:`` section would train as plain RL (only
    ``longact-train`` hands the section to the ranks): stop it with the fix.

    Raises SystemExit, which verl's plugin loader (it catches ``Exception``) lets through.
    """
    argv = list(getattr(sys, "orig_argv", sys.argv) if argv is None else argv)
    entry = next(
        (
            i
            for i, a in enumerate(argv)
            if a == "verl.trainer.main_ppo" or a.endswith("main_ppo.py")
        ),
        None,
    )
    if entry is None:
        return
    args = argv[entry + 1 :]
    found = [a for a in args if _LONGACT_OVERRIDE.match(a)]
    found += [a for a in args if a.startswith("--config-name") and _names_recipe(a, args)]
    if found:
        raise SystemExit(
            f"longact: verl.trainer.main_ppo ignores LongAct's section ({' '.join(found)}) "
            "and would train plain RL; run `longact-train recipe=...` with the same overrides"
        )


def _names_recipe(arg: str, args: list[str]) -> bool:
    """``--config-name=NAME`` (or ``--config-name NAME``) picks a LongAct recipe, whose
    ``longact:`` section only longact-train reads."""
    from longact.train.config import available_recipes

    if "=" in arg:
        name = arg.split("=", 1)[1]
    else:
        i = args.index(arg)
        name = args[i + 1] if i + 1 < len(args) else ""
    return name in (*available_recipes(), "longact_trainer")


def register_all() -> None:
    from . import cpu_platform, fsdp_engine, hf_rollout, vllm_cpu

    cpu_platform.register()
    fsdp_engine.register()
    hf_rollout.register()
    vllm_cpu.register()


refuse_plain_verl_entry()
register_all()
