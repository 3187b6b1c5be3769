"""The saliency coordinator: merges Q/K statistics from every training rank and
publishes versioned masks.

A plain Python class (unit-tested without Ray); ``get_or_create`` makes it a named Ray
actor shared by all ranks of a run. Protocol, once per refresh:

1. every rank calls ``exchange(rank, step, stats_state)`` at the same optimizer step,
   sending its partial, token-weighted statistics (sums, counts and maxima: small);
2. partials are merged as they arrive (exact sums; memory does not grow with ranks);
   when the last rank's arrives, the merged window is folded into the running
   statistics (EMA), masks are computed with the configured policy and published as
   the next version;
3. every rank's call returns that same version, and each rank applies it from this
   optimizer step on, so all ranks switch together and never run a mix.

The coordinator's state (running statistics, masks, version, refresh history) is what
a checkpoint stores (``state_dict``) and what resume restores (``load_state_dict``).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from longact.core.adapters import QKLayout
from longact.core.masks import MaskSet, build_masks
from longact.core.stats import QKStats, ema

ACTOR_PREFIX = "longact_coordinator_"


class SaliencyCoordinator:
    """Aggregates per-rank statistics into versioned masks (see module docstring)."""

    def __init__(self, config: dict[str, Any], layout: QKLayout, world_size: int):
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.config = dict(config)
        self.layout = layout
        self.world_size = world_size
        self.version = 0
        self.masks: MaskSet | None = None
        self.running: QKStats | None = None  # statistics after EMA, across refreshes
        self.history: list[dict[str, Any]] = []
        self._pending: dict[int, dict[str, Any]] = {}  # step -> partial merge
        self._done: dict[int, dict[str, Any]] = {}  # step -> published payload
        self._events: dict[int, asyncio.Event] = {}

    # ---- the protocol ------------------------------------------------------------------
    def submit(self, rank: int, step: int, stats_state: dict[str, Any]) -> bool:
        """Add one rank's partial statistics for the refresh at ``step``.

        Returns True when this was the last rank and the new masks are published.
        """
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside [0, {self.world_size})")
        if step in self._done:
            raise ValueError(f"refresh at step {step} is already published")
        slot = self._pending.setdefault(step, {"ranks": set(), "stats": None, "t0": time.time()})
        if rank in slot["ranks"]:
            raise ValueError(f"rank {rank} sent statistics for step {step} twice")
        part = QKStats.from_state_dict(stats_state)
        slot["stats"] = part if slot["stats"] is None else slot["stats"].merge(part)
        slot["ranks"].add(rank)
        if len(slot["ranks"]) < self.world_size:
            return False
        del self._pending[step]
        self._publish(step, slot["stats"], slot["t0"])
        return True

    def get(self, step: int) -> dict[str, Any] | None:
        """The payload published for the refresh at ``step`` (None while incomplete)."""
        return self._done.get(step)

    async def exchange(self, rank: int, step: int, stats_state: dict[str, Any]) -> dict:
        """``submit`` then wait until every rank has sent; returns the new masks."""
        event = self._events.setdefault(step, asyncio.Event())
        if self.submit(rank, step, stats_state):
            event.set()
        await event.wait()
        return self._done[step]

    def current(self) -> dict[str, Any] | None:
        """The masks in force (after a resume: the restored ones)."""
        if self.masks is None:
            return None
        return {"version": self.version, "masks": self.masks.state_dict(), "metrics": {}}

    # ---- refresh -------------------------------------------------------------------------
    def _publish(self, step: int, window: QKStats, t0: float) -> None:
        cfg = self.config
        decay = float(cfg.get("ema", 0.0))
        self.running = window if self.running is None else ema(self.running, window, decay)
        self.version += 1
        new = build_masks(
            self.running,
            self.layout,
            ratio=float(cfg.get("ratio", 0.3)),
            policy=cfg.get("policy", "topk"),
            score=cfg.get("score", "mean_abs"),
            granularity=cfg.get("granularity", "channel"),
            seed=int(cfg.get("seed", 0)),
            version=self.version,
        )
        metrics = self._metrics(new, step)
        metrics["longact/refresh_s"] = time.time() - t0
        self.masks = new
        record = {"version": self.version, "step": step, "metrics": metrics}
        self.history.append(record)
        self._done[step] = {"version": self.version, "masks": new.state_dict(), "metrics": metrics}
        # keep only the latest payloads: ranks of one refresh all read before the next
        for old in sorted(self._done)[:-4]:
            self._done.pop(old, None)
            self._events.pop(old, None)

    def _metrics(self, new: MaskSet, step: int) -> dict[str, float]:
        """Kept fraction, overlap with the previous mask and |x| mass kept, per projection."""
        out: dict[str, float] = {"longact/version": float(self.version), "longact/step": step}
        kept = new.kept_fraction(per_key=True)
        mass = new.mass_kept(self.running, score="mean_abs", per_key=True)
        jac = new.jaccard(self.masks, per_key=True) if self.masks is not None else None
        for proj in ("q", "k"):
            keys = [k for k in new.keys() if k[1] == proj]
            if not keys:
                continue
            out[f"longact/kept_fraction_{proj}"] = sum(kept[k] for k in keys) / len(keys)
            out[f"longact/mass_kept_{proj}"] = sum(mass[k] for k in keys) / len(keys)
            if jac is not None:
                out[f"longact/jaccard_prev_{proj}"] = sum(jac[k] for k in keys) / len(keys)
        return out

    # ---- checkpointing ----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "config": dict(self.config),
            "world_size": self.world_size,
            "version": self.version,
            "masks": None if self.masks is None else self.masks.state_dict(),
            "running": None if self.running is None else self.running.state_dict(),
            "history": list(self.history),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.version = int(sd["version"])
        self.masks = None if sd["masks"] is None else MaskSet.from_state_dict(sd["masks"])
        self.running = None if sd["running"] is None else QKStats.from_state_dict(sd["running"])
        self.history = list(sd.get("history", []))
        self._pending.clear()
        self._done.clear()
        self._events.clear()

    def summary(self) -> dict[str, Any]:
        return {"version": self.version, "refreshes": len(self.history)}


def get_or_create(run_id: str, config: dict, layout: QKLayout, world_size: int):
    """The run's coordinator as a named Ray actor (created by the first rank to ask)."""
    import ray

    actor_cls = ray.remote(num_cpus=0, max_concurrency=1024)(SaliencyCoordinator)
    return actor_cls.options(name=ACTOR_PREFIX + run_id, get_if_exists=True).remote(
        config, layout, world_size
    )
