"""``longact-train``: verl's PPO trainer with LongAct, as a Hydra app.

The config is one recipe from ``recipes/``, built on ``hydra_configs/longact_trainer.yaml``
(verl's own ``ppo_trainer``, found through Hydra's search path, plus LongAct's
``longact:`` section):

    longact-train recipe=dapo actor_rollout_ref.model.path=/models/Qwen3-8B longact.ratio=0.3

``recipe=NAME`` picks ``recipes/NAME.yaml`` (default: grpo where the run has GPUs,
counted on the Ray cluster the driver joins, else grpo_cpu); everything else is a plain
Hydra override. The config is validated before Ray or any worker starts, then handed to
verl's ``run_ppo``; ``longact.enable=false`` is verl's plain RL.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from longact.config import CONFIG_ENV, LongActConfig, register_schema
from longact.train.config import ConfigError, available_recipes, prepare_config
from longact.train.console import QUIET_WARNINGS, RunConsole, quiet_known_noise
from longact.train.sampling import DynamicSamplingExhausted
from longact.train.task_runner import task_runner_class

register_schema()  # the `longact:` section of every recipe (hydra_configs/longact_trainer.yaml)

VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--config-dir", "-cd", "--experimental-rerun"}
SEARCH_PATH = "hydra.searchpath=[pkg://longact.hydra_configs,pkg://verl.trainer.config]"


def default_recipe(overrides: list[str] = ()) -> str:
    """grpo where the run's GPUs are, grpo_cpu where there are none, and one line saying
    which. The GPUs counted are the cluster's when the driver joins one (see
    ``resolve_address``: a head node often has none of its own), else this host's."""
    from longact.train.config import _say, cluster_gpus, resolve_address

    init = {}
    for arg in overrides:  # ray_kwargs.ray_init.address=... (and _temp_dir) from the shell
        key, _, value = arg.lstrip("+").partition("=")
        if key in ("ray_kwargs.ray_init.address", "ray_kwargs.ray_init._temp_dir"):
            init[key.rsplit(".", 1)[1]] = value if value not in ("", "null") else None
    address = resolve_address(init.get("address"), init.get("_temp_dir"))
    if address is None:
        import torch

        gpus, where = torch.cuda.device_count(), "this host"
    else:
        gpus, where = cluster_gpus(address), f"the Ray cluster at {address}"
    recipe = "grpo" if gpus > 0 else "grpo_cpu"
    _say(f"no recipe= given: {where} has {gpus:g} GPUs, so recipe={recipe}")
    return recipe


def hydra_argv(argv: list[str]) -> list[str]:
    """Turn ``recipe=NAME ...`` into Hydra's arguments.

    Each recipe is a primary config in ``longact.recipes`` (built on the base
    ``longact_trainer``), so the recipe picks ``--config-name``; verl's and LongAct's
    config folders join Hydra's search path.
    """
    recipe, overrides, flags = None, [], []
    args = iter(argv)
    for arg in args:
        if arg.startswith("recipe="):
            recipe = arg.split("=", 1)[1]
        elif arg in VALUE_FLAGS:  # Hydra flags that take a value: keep the pair together
            flags += [arg, next(args, "")]
        elif arg.startswith("-"):
            flags.append(arg)
        else:
            overrides.append(arg)
    known = available_recipes()
    if recipe is None:
        recipe = default_recipe(overrides)
    if recipe not in known:
        raise ConfigError(f"unknown recipe {recipe!r}; available: {', '.join(known)}")
    return ["--config-name", recipe, SEARCH_PATH, *overrides, *flags]


def run(config: DictConfig) -> None:
    """Validate, then run verl's trainer (the v1 trainer unless trainer.use_v1=false)."""
    from verl.trainer.main_ppo import TaskRunnerV1, run_ppo
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    from longact.train.plugin_check import plugin_problem

    problem = plugin_problem(str(config.trainer.get("device") or "cuda"))
    if problem:  # verl would run its stock engine (plain RL) and say nothing
        raise ConfigError(f"LongAct's verl plugin is not loaded: {problem}")
    config = prepare_config(config)
    longact = LongActConfig.from_dict(OmegaConf.to_container(config.longact, resolve=True))
    # Every Ray worker reads LongAct's section from its environment (the engine has no
    # access to the full config): the local cluster inherits the driver's environment,
    # and an existing cluster gets it through the job's runtime_env.
    longact_yaml = longact.to_yaml()
    exported = {CONFIG_ENV: longact_yaml}
    if config.trainer.get("device") == "cpu":  # ask for the CPU platform explicitly
        exported["VERL_PLATFORM"] = "cpu"
    exported.update(quiet_env(config))
    os.environ.update(exported)
    with open_dict(config):
        runtime_env = config.ray_kwargs.ray_init.runtime_env
        if runtime_env.get("env_vars") is None:
            runtime_env.env_vars = {}
        runtime_env.env_vars.update(exported)
    try:
        validate_config(
            config=config,
            use_reference_policy=need_reference_policy(config),
            use_critic=need_critic(config),
        )
    except Exception as e:  # verl's own checks, reported before any worker starts
        hint = ""
        path = str(config.actor_rollout_ref.model.path)
        if "actor_rollout_ref.model" in str(e) and not Path(path).is_dir():
            hint = f"model path {path!r} is not a local directory, so it was taken as a hub id: "
        raise ConfigError(f"{hint}{type(e).__name__}: {e}") from e
    runner = task_runner_class(longact) if longact.enable else TaskRunnerV1  # stock verl
    try:
        run_ppo(config, task_runner_class=runner)
    except DynamicSamplingExhausted as e:  # Ray re-raises it as a subclass of the cause
        traceback.print_exc()  # to the run's log; the console shows one line
        raise RunError(str(getattr(e, "cause", None) or e).strip().splitlines()[-1]) from e


class RunError(RuntimeError):
    """The run stopped for a reason the user can act on: one line, no traceback."""


def quiet_env(config: DictConfig) -> dict[str, str]:
    """Environment for every process of the run: known-noise filters, and on a CPU host
    the transfer queue's torch threads sized to the cores this machine has."""
    env = {}
    filters = [w for w in os.environ.get("PYTHONWARNINGS", "").split(",") if w]
    env["PYTHONWARNINGS"] = ",".join(filters + [q for q in QUIET_WARNINGS if q not in filters])
    if config.trainer.get("device") == "cpu" and "TQ_NUM_THREADS" not in os.environ:
        import psutil

        env["TQ_NUM_THREADS"] = str(max(1, min(8, psutil.cpu_count(logical=False) or 1)))
    return env


@hydra.main(config_path="pkg://longact.recipes", config_name="grpo", version_base=None)
def _hydra_main(config: DictConfig) -> None:
    try:
        with _console(config):
            run(config)
    except ConfigError as e:  # Hydra would print a traceback: one clear line instead
        print(f"longact-train: error: {e}", file=sys.stderr)
        sys.exit(2)
    except RunError as e:
        print(f"longact-train: error: {e}", file=sys.stderr)
        sys.exit(1)


def _console(config: DictConfig):
    """The run's console: a line per step, the rest in Hydra's output folder."""
    if not RunConsole.enabled():
        return contextlib.nullcontext()
    from hydra.core.hydra_config import HydraConfig

    log = Path(HydraConfig.get().runtime.output_dir) / "train.log"
    return RunConsole(log, config.trainer.get("total_training_steps"))


def main() -> None:
    quiet_known_noise()  # this process imports verl too
    try:
        sys.argv = [sys.argv[0], *hydra_argv(sys.argv[1:])]
    except ConfigError as e:
        print(f"longact-train: error: {e}", file=sys.stderr)
        sys.exit(2)
    _hydra_main()


if __name__ == "__main__":
    main()
