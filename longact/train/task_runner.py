"""verl's v1 task runner with LongAct's run-level duties (distribution layer).

``longact-train`` hands verl's ``run_ppo`` this task runner instead of verl's own when
``longact.enable`` is true. It is verl's ``TaskRunnerV1`` with three additions:

1. before the trainer starts, it creates the run's saliency coordinator
   (``longact.distributed.coordinator.create``): owned by the task runner, the actor
   that drives the run, so it lives exactly as long as the run; placed on the head node;
2. once verl has built its workers (before the first rollout), it checks that every
   training rank started LongAct, and stops the run if none or only some did (the
   workers lacked LongAct's verl plugin, or verl picked an engine LongAct does not
   extend), instead of letting it train as plain RL;
3. after the first training step, before its metrics are logged, it checks that the
   ranks' first refresh published masks and that the step's metrics carry LongAct's
   mask version.

With LongAct off, verl's own ``TaskRunnerV1`` runs, untouched.
"""

from __future__ import annotations

from typing import Any

from longact.config import LongActConfig


class LongActInactive(RuntimeError):
    """longact.enable=true, but the training ranks are not running LongAct."""


def check_ranks_started(ping: dict[str, Any], run_id: str) -> None:
    """Raise unless every training rank attached to the coordinator. The ranks that did
    attach report the world size of the training group (torch.distributed's own), so a
    partial start is caught as well as none at all."""
    attached, world = ping["attached"], ping["world_size"]
    if world is not None and len(attached) == world:
        return
    missing = "all" if world is None else sorted(set(range(world)) - set(attached))
    raise LongActInactive(
        f"LongAct run {run_id}: longact.enable=true, but {len(attached)} of "
        f"{'the' if world is None else world} training ranks started LongAct (missing: "
        f"{missing}). Their workers did not load LongAct's verl plugin (is longact installed "
        "in the workers' image? run `longact doctor` there), or verl chose an engine "
        "LongAct does not extend (it extends FSDP2 on NVIDIA GPUs and on the CPU). "
        "Nothing was trained."
    )


def check_first_step(ping: dict[str, Any], metrics: dict[str, Any], run_id: str) -> None:
    """Raise unless step 1 published masks and logged LongAct's mask version."""
    if ping["version"] >= 1 and any(k.endswith("longact/mask_version") for k in metrics):
        return
    raise LongActInactive(
        f"LongAct run {run_id}: after step 1 the coordinator is at mask version "
        f"{ping['version']} and the step's metrics carry no longact/mask_version: the "
        "training ranks never refreshed their masks, so the run would be plain RL"
    )


def task_runner_class(longact: LongActConfig):
    """The Ray actor class ``run_ppo`` starts (verl is imported here, not at module top)."""
    import ray
    from verl.trainer.main_ppo import TaskRunnerV1

    base = TaskRunnerV1.__ray_actor_class__

    class LongActTaskRunner(base):
        def run(self, config):
            from longact.distributed.coordinator import create

            self.longact_coordinator = create(longact)  # held for the run's lifetime
            return super().run(config)

        def _ping(self) -> dict[str, Any]:
            return ray.get(self.longact_coordinator.ping.remote(), timeout=longact.timeout_s)

        def init_agent_loop_manager(self):
            # verl calls this after its workers (and so every engine) are built
            check_ranks_started(self._ping(), longact.run_id)
            super().init_agent_loop_manager()
            self._watch_first_step()

        def _watch_first_step(self) -> None:
            # verl's trainer gathers each step's metrics in _compute_metrics, after the
            # actor update and before logging them: check once, at the first step
            trainer = self.trainer
            compute = trainer._compute_metrics
            runner = self

            def checked(batch, metrics, *args, **kwargs):
                out = compute(batch, metrics, *args, **kwargs)
                trainer._compute_metrics = compute  # once
                check_first_step(runner._ping(), metrics, longact.run_id)
                return out

            trainer._compute_metrics = checked

    LongActTaskRunner.__name__ = LongActTaskRunner.__qualname__ = "LongActTaskRunner"
    return ray.remote(LongActTaskRunner)
