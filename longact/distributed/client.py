"""How one training rank talks to the saliency coordinator (distribution layer).

A rank sees one small interface, whatever the coordinator is:

- ``send(step, payload, version)`` starts the refresh at ``step`` and returns a handle;
- ``result(handle)`` waits for the answer: the published masks, ``{"error": ...}``, or
  ``{"recover": True}`` (a restarted coordinator asks the rank to rebuild it);
- ``call(method, *args)`` runs any other coordinator method (attach, state, restore).

:class:`LocalClient` serves an in-process :class:`SaliencyCoordinator` (one rank, no
Ray: benchmarks, notebooks, tests). :class:`RayClient` talks to the run's named Ray
actor, and bounds every wait: a coordinator that does not answer within
``timeout_s`` (plus a grace for the coordinator's own timeout to speak first) raises
:class:`RefreshError`; one that died raises :class:`CoordinatorLost`, which the runtime
may answer by rebuilding it (``longact.coordinator_restarts``).

Ray is imported inside :class:`RayClient` only.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from longact.config import LongActConfig
from longact.distributed.coordinator import SaliencyCoordinator, actor_name

GRACE_S = 30.0
"""Extra seconds a rank waits for any coordinator call beyond ``timeout_s``: the
coordinator, which times out first, then names the missing ranks, and a coordinator
that is still starting has time to come up."""


class RefreshError(RuntimeError):
    """A refresh failed; the message names the run, the step and what to do."""


class CoordinatorLost(RuntimeError):
    """The coordinator died or cannot be reached."""


class LocalClient:
    """An in-process coordinator for exactly one rank."""

    def __init__(self, coordinator: SaliencyCoordinator, threaded: bool = False):
        if coordinator.world_size not in (None, 1):
            raise ValueError(
                "an in-process coordinator serves exactly one rank; got one for "
                f"{coordinator.world_size} (use the Ray actor for several ranks)"
            )
        self.coordinator = coordinator
        self._pool = (
            ThreadPoolExecutor(1, thread_name_prefix="longact-refresh") if threaded else None
        )

    def send(self, rank: int, step: int, payload: dict, version: int) -> Future:
        def run() -> dict:
            self.coordinator.submit(rank, step, payload)
            return self.coordinator.get(step)

        if self._pool is not None:
            return self._pool.submit(run)
        done: Future = Future()
        done.set_result(run())
        return done

    def result(self, handle: Future) -> dict:
        return handle.result()

    def call(self, method: str, *args) -> Any:
        return getattr(self.coordinator, method)(*args)

    def wait_alive(self, where: str) -> None:
        """An in-process coordinator cannot die without its rank."""


class RayClient:
    """The run's named Ray actor, with every wait bounded by ``cfg.timeout_s``."""

    def __init__(self, cfg: LongActConfig):
        self.cfg = cfg
        self.actor = lookup(cfg.run_id, cfg.timeout_s)

    def send(self, rank: int, step: int, payload: dict, version: int) -> Any:
        return self.actor.exchange.remote(rank, step, payload, version)

    def result(self, handle: Any) -> dict:
        return self._get(handle)

    def call(self, method: str, *args) -> Any:
        return self._get(getattr(self.actor, method).remote(*args))

    def _get(self, ref: Any) -> Any:
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        timeout = self.cfg.timeout_s + GRACE_S
        try:
            return ray.get(ref, timeout=timeout)
        except GetTimeoutError:
            raise RefreshError(
                f"LongAct run {self.cfg.run_id}: the saliency coordinator did not answer "
                f"within {timeout:g} s (longact.timeout_s={self.cfg.timeout_s:g} plus "
                f"{GRACE_S:g})"
            ) from None
        except RayActorError as e:
            raise CoordinatorLost(str(e).strip().splitlines()[0][:300]) from None

    def wait_alive(self, where: str) -> None:
        """Wait (at most ``timeout_s``) for Ray to bring a restarted coordinator back."""
        import ray
        from ray.exceptions import ActorDiedError, RayActorError

        deadline = time.monotonic() + self.cfg.timeout_s
        while True:
            try:
                ray.get(self.actor.ping.remote(), timeout=max(1.0, deadline - time.monotonic()))
                return
            except ActorDiedError:
                raise RefreshError(
                    f"{where}: the saliency coordinator died and Ray will not restart it "
                    f"(longact.coordinator_restarts={self.cfg.coordinator_restarts} used up); "
                    "resume from the last checkpoint (trainer.resume_mode=auto)"
                ) from None
            except (RayActorError, ray.exceptions.GetTimeoutError):
                if time.monotonic() > deadline:
                    raise RefreshError(
                        f"{where}: the saliency coordinator died and was not back within "
                        f"longact.timeout_s={self.cfg.timeout_s:g} s"
                    ) from None
                time.sleep(0.5)


def lookup(run_id: str, timeout_s: float) -> Any:
    """The named coordinator actor of ``run_id``; waits up to ``timeout_s`` for it."""
    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return ray.get_actor(actor_name(run_id))
        except ValueError:
            if time.monotonic() > deadline:
                raise RefreshError(
                    f"LongAct run {run_id}: no saliency coordinator named {actor_name(run_id)!r} "
                    f"appeared within longact.timeout_s={timeout_s:g} s. longact-train creates "
                    "it before the workers start; a run launched another way must call "
                    "longact.distributed.coordinator.create(config) first"
                ) from None
            time.sleep(0.5)


def make_client(cfg: LongActConfig, coordinator: SaliencyCoordinator | None = None):
    """A client for the in-process ``coordinator``, or for the run's Ray actor."""
    if coordinator is not None:
        return LocalClient(coordinator, threaded=cfg.refresh_async)
    return RayClient(cfg)
