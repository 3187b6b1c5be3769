"""The saliency coordinator: merges Q/K statistics from every training rank and
publishes versioned masks.

A plain Python class (unit-tested without Ray); ``create`` makes it a named Ray actor
shared by all ranks of a run, and ``longact.distributed.client`` is how a rank talks to
either form. Protocol, once per refresh:

1. every rank calls ``exchange(rank, step, stats_state)`` at the same optimizer step,
   sending its partial, token-weighted statistics (sums, counts and maxima: small);
2. partials are merged as they arrive (exact: each statistic by its declared reduction,
   ``longact.core.scores``; memory does not grow with ranks); when the last rank's
   arrives, the merged window is folded into the running statistics (EMA), masks are
   computed with the configured policy and published as the next version;
3. every rank's call returns that same version, and each rank applies it from this
   optimizer step on, so all ranks switch together and never run a mix.

The coordinator's state (running statistics, masks, version, refresh history) is what
a checkpoint stores (``state_dict``) and what resume restores (``restore``, which every
rank calls with the state it saved itself, so node-local checkpoint disks work).

Faults (none of them may hang a rank):

- a refresh either publishes masks or fails, and every rank of it gets the same answer:
  an error inside ``submit`` (a bad partial, a failing policy) becomes the step's
  published ``{"error": ...}``, which ranks still on their way receive too;
- non-finite statistics (NaN / Inf from any rank) are left out of the running
  statistics and the previous masks stay in force (``longact/nonfinite_refresh`` = 1 in
  that refresh's metrics, ``longact/nonfinite_refreshes`` counts them); at the first
  refresh there are no previous masks, and the refresh fails with a clear error;
- ``exchange`` waits at most ``timeout_s`` for the other ranks, then fails the step for
  all of them, naming the ranks that never sent;
- after Ray restarts a coordinator that died, it holds no masks; the first rank to call
  with a mask version of its own is told to ``recover`` it from the masks it holds.

Placement: ``create`` is called by the job's task runner (see ``longact.train.entry``)
before any worker starts, so the coordinator is owned by the run and not by a training
rank, and it is placed on the head node (no CPU or GPU reserved), which lives as long
as the cluster; ranks find it by name (``lookup``).

The wire format between ranks and coordinator (flat statistics payloads: which fields,
how they are read and merged; bit-packed masks) is in ``longact.distributed.wire``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import torch

from longact.config import LongActConfig
from longact.core.arch import QKLayout
from longact.core.masks import MaskSet, build_masks
from longact.core.stats import QKStats, ema
from longact.distributed.wire import (  # noqa: F401 (stats_payload re-exported: bench, tests)
    MASS_SCORE,
    _packed,
    merge_fields_,
    payload_fields,
    read_payload,
    stats_payload,
)

ACTOR_PREFIX = "longact_coordinator_"
HEAD_RESOURCE = "node:__internal_head__"  # Ray's marker resource of the head node


class SaliencyCoordinator:
    """Aggregates per-rank statistics into versioned masks (see module docstring).

    ``layout`` and ``world_size`` may be left None when the coordinator is created before
    the model is loaded (the driver); the ranks then ``attach`` them, and every rank must
    agree."""

    def __init__(
        self,
        config: LongActConfig | dict[str, Any] | None,
        layout: QKLayout | None = None,
        world_size: int | None = None,
    ):
        if world_size is not None and world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.config = LongActConfig.coerce(config)
        self.layout = layout
        self.world_size = world_size
        self.version = 0
        self.masks: MaskSet | None = None
        self.first_masks: MaskSet | None = None  # drift is measured from it (a metric)
        self.running: QKStats | None = None  # statistics after EMA, across refreshes
        self.history: list[dict[str, Any]] = []
        self.nonfinite_refreshes = 0
        self._restored: dict[str, Any] | None = None  # what ranks restored from checkpoints
        self._attached: set[int] = set()  # ranks that started LongAct
        self._pending: dict[int, dict[str, Any]] = {}  # step -> partial merge
        self._done: dict[int, dict[str, Any]] = {}  # step -> published payload (or error)
        self._events: dict[int, asyncio.Event] = {}

    def _where(self, step: int) -> str:
        return f"LongAct run {self.config.run_id or '(unnamed)'}, refresh at step {step}"

    # ---- the ranks join ----------------------------------------------------------------
    def attach(self, layout: QKLayout, world_size: int, rank: int | None = None) -> dict:
        """A rank's layout and world size: the first sets them, the others must match.
        Returns ``{"version": ...}`` (0 on a fresh coordinator)."""
        if rank is not None:
            self._attached.add(int(rank))
        if self.layout is None:
            self.layout = layout
        elif layout != self.layout:
            raise ValueError(
                f"LongAct run {self.config.run_id}: a rank's q/k layout {layout} differs "
                f"from the coordinator's {self.layout}"
            )
        if self.world_size is None:
            self.world_size = int(world_size)
        elif int(world_size) != self.world_size:
            raise ValueError(
                f"LongAct run {self.config.run_id}: a rank reports world size {world_size}, "
                f"the coordinator serves {self.world_size}"
            )
        return {"version": self.version}

    def ping(self) -> dict[str, Any]:
        """Liveness, and what the driver checks: which ranks attached, and the version."""
        return {
            "version": self.version,
            "attached": sorted(self._attached),
            "world_size": self.world_size,
        }

    # ---- the protocol ------------------------------------------------------------------
    def submit(self, rank: int, step: int, stats_state: dict[str, Any]) -> bool:
        """Add one rank's partial statistics for the refresh at ``step``.

        Returns True when the step's answer is out: the last rank arrived and masks were
        published, or the refresh failed (``get(step)`` holds ``{"error": ...}``).
        """
        if step in self._done:
            if "error" in self._done[step]:
                return True  # a failed refresh answers late ranks with its error
            raise ValueError(f"refresh at step {step} is already published")
        try:
            return self._submit(rank, step, stats_state)
        except Exception as e:  # every rank of this refresh must hear of it
            self._fail(step, f"{type(e).__name__}: {e}")
            return True

    def _submit(self, rank: int, step: int, stats_state: dict[str, Any]) -> bool:
        if self.layout is None or self.world_size is None:
            raise ValueError("no rank attached its layout before sending statistics")
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside [0, {self.world_size})")
        slot = self._pending.setdefault(
            step, {"ranks": set(), "stats": None, "t0": time.time(), "nonfinite": set()}
        )
        if rank in slot["ranks"]:
            raise ValueError(f"rank {rank} sent statistics for step {step} twice")
        part = read_payload(stats_state, self._flat_layout, payload_fields(self.config.score))
        if _finite(part):
            slot["stats"] = self._merge(slot["stats"], part)
        else:
            slot["nonfinite"].add(rank)
        slot["ranks"].add(rank)
        if len(slot["ranks"]) < self.world_size:
            return False
        del self._pending[step]
        if slot["nonfinite"]:
            self._keep_previous(step, sorted(slot["nonfinite"]))
            return True
        acc = slot["stats"]
        window = QKStats.from_fields(self._flat_layout, acc) if isinstance(acc, dict) else acc
        self._publish(step, window, slot["t0"])
        return True

    def _fail(self, step: int, message: str) -> None:
        """Publish an error as the answer of the refresh at ``step``."""
        self._pending.pop(step, None)
        self._done[step] = {"error": f"{self._where(step)}: {message}"}
        event = self._events.get(step)
        if event is not None:
            event.set()

    def _keep_previous(self, step: int, ranks: list[int]) -> None:
        """Non-finite statistics: keep the masks in force, or fail the first refresh."""
        if self.masks is None:
            self._fail(
                step,
                f"statistics from rank(s) {ranks} hold NaN or Inf, and there is no previous "
                "mask to keep at the first refresh. The training forwards produced non-finite "
                "activations: lower the learning rate, check the data and bf16 overflow, or "
                "choose the first mask by calibration (longact.calibration.enable=true)",
            )
            return
        self.nonfinite_refreshes += 1
        metrics = {
            "longact/version": float(self.version),
            "longact/step": step,
            "longact/nonfinite_refresh": 1.0,
            "longact/nonfinite_refreshes": float(self.nonfinite_refreshes),
        }
        self.history.append({"version": self.version, "step": step, "metrics": metrics})
        self._answer(
            step, {"version": self.version, "masks": _packed(self.masks), "metrics": metrics}
        )

    def _answer(self, step: int, payload: dict[str, Any]) -> None:
        self._done[step] = payload
        # keep only the latest payloads: ranks of one refresh all read before the next
        for old in sorted(self._done)[:-4]:
            self._done.pop(old, None)
            self._events.pop(old, None)

    @property
    def _flat_layout(self) -> list[tuple[tuple[int, str], int]]:
        """(key, channels) in ``QKStats.to_fields`` order (sorted keys) for this layout."""
        return sorted(self.layout.row_counts().items())

    def _merge(self, acc: dict | QKStats | None, part: dict | QKStats) -> dict | QKStats:
        """Exact merge; flat partials are merged in place (no per-rank allocation)."""
        if acc is None:
            return {f: v.clone() for f, v in part.items()} if isinstance(part, dict) else part
        if isinstance(acc, dict) and isinstance(part, dict):
            return merge_fields_(acc, part)
        flat = self._flat_layout
        a = QKStats.from_fields(flat, acc) if isinstance(acc, dict) else acc
        return a.merge(QKStats.from_fields(flat, part) if isinstance(part, dict) else part)

    def get(self, step: int) -> dict[str, Any] | None:
        """The payload published for the refresh at ``step`` (None while incomplete)."""
        return self._done.get(step)

    async def exchange(
        self, rank: int, step: int, stats_state: dict[str, Any], rank_version: int = 0
    ) -> dict:
        """``submit`` then wait until every rank has sent; returns the new masks, or
        ``{"error": ...}`` for every rank, or ``{"recover": True}`` when this coordinator
        was restarted and lost what the rank attached and the masks it holds (version
        ``rank_version``)."""
        if self.layout is None or (rank_version > self.version and self.masks is None):
            return {"recover": True, "version": self.version}
        event = self._events.setdefault(step, asyncio.Event())
        if self.submit(rank, step, stats_state):
            event.set()
        timeout = float(self.config.timeout_s)
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except asyncio.TimeoutError:
            if step in self._done:  # answered just as the wait ran out
                return self._done[step]
            slot = self._pending.get(step)
            arrived = slot["ranks"] if slot else set()
            missing = sorted(set(range(self.world_size or 0)) - arrived)
            self._fail(
                step,
                f"rank(s) {missing} sent no statistics within longact.timeout_s={timeout:g} "
                "s (a rank died, hangs, or runs another step); the run cannot continue",
            )
        return self._done[step]

    def current(self) -> dict[str, Any] | None:
        """The masks in force (after a resume: the restored ones)."""
        if self.masks is None:
            return None
        return {"version": self.version, "masks": _packed(self.masks), "metrics": {}}

    def recover(self, version: int, masks_state: dict[str, Any]) -> dict[str, Any]:
        """Rebuild a restarted coordinator from a rank's masks in force. The first rank
        sets them; later ranks must hold the same version. Running statistics restart
        empty (with ``ema`` > 0, the history before the loss is dropped)."""
        if self.masks is None and version > self.version:
            self.masks = MaskSet.from_state_dict(masks_state)
            self.version = int(version)
        elif version != self.version:
            raise ValueError(
                f"LongAct run {self.config.run_id}: ranks hold different mask versions "
                f"({version} vs {self.version}) after the coordinator restarted"
            )
        return {"version": self.version}

    # ---- refresh -------------------------------------------------------------------------
    def _publish(self, step: int, window: QKStats, t0: float) -> None:
        cfg = self.config
        decay = float(cfg.ema)
        if self.running is None or (decay == 0.0 and self._covers(window)):
            self.running = window  # = ema(running, window, 0) up to rounding, ~15 ms less
        else:
            self.running = ema(self.running, window, decay)
        self.version += 1
        new = build_masks(
            self.running,
            self.layout,
            ratio=float(cfg.ratio),
            policy=cfg.policy,
            score=cfg.score,
            granularity=cfg.granularity,
            seed=int(cfg.seed),
            version=self.version,
        )
        if self.first_masks is None:
            self.first_masks = new
        metrics = self._metrics(new, step)
        # real tokens behind this refresh, over all ranks (every key sees every token)
        metrics["longact/window_tokens"] = window.token_count(min(window.keys()))
        metrics["longact/refresh_s"] = time.time() - t0
        self.masks = new
        record = {"version": self.version, "step": step, "metrics": metrics}
        self.history.append(record)
        self._answer(step, {"version": self.version, "masks": _packed(new), "metrics": metrics})

    def _covers(self, window: QKStats) -> bool:
        """Every key of the running statistics has tokens in the window (otherwise an EMA
        with decay 0 keeps the running entry of a key without tokens)."""
        assert self.running is not None
        return all(k in window and window.token_count(k) > 0 for k in self.running.keys())

    def _metrics(self, new: MaskSet, step: int) -> dict[str, float]:
        """Kept fraction, |x| mass kept, and overlap (Jaccard) with the previous mask and
        with the run's first mask (after a coordinator recovery: the first one since),
        per projection."""
        out: dict[str, float] = {"longact/version": float(self.version), "longact/step": step}
        kept = new.kept_fraction(per_key=True)
        mass = new.mass_kept(self.running, score=MASS_SCORE, per_key=True)
        jac = new.jaccard(self.masks, per_key=True) if self.masks is not None else None
        first = new.jaccard(self.first_masks, per_key=True)  # mask drift since the first
        for proj in ("q", "k"):
            keys = [k for k in new.keys() if k[1] == proj]
            if not keys:
                continue
            out[f"longact/kept_fraction_{proj}"] = sum(kept[k] for k in keys) / len(keys)
            out[f"longact/mass_kept_{proj}"] = sum(mass[k] for k in keys) / len(keys)
            if jac is not None:
                out[f"longact/jaccard_prev_{proj}"] = sum(jac[k] for k in keys) / len(keys)
            out[f"longact/jaccard_first_{proj}"] = sum(first[k] for k in keys) / len(keys)
        return out

    # ---- checkpointing ----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "world_size": self.world_size,
            "version": self.version,
            "masks": None if self.masks is None else self.masks.state_dict(),
            "first_masks": None if self.first_masks is None else self.first_masks.state_dict(),
            "running": None if self.running is None else self.running.state_dict(),
            "history": list(self.history),
            "nonfinite_refreshes": self.nonfinite_refreshes,
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.version = int(sd["version"])
        self.masks = None if sd["masks"] is None else MaskSet.from_state_dict(sd["masks"])
        first = sd.get("first_masks")  # absent in checkpoints of older versions
        self.first_masks = None if first is None else MaskSet.from_state_dict(first)
        self.running = None if sd["running"] is None else QKStats.from_state_dict(sd["running"])
        self.history = list(sd.get("history", []))
        self.nonfinite_refreshes = int(sd.get("nonfinite_refreshes", 0))
        self._pending.clear()
        self._done.clear()
        self._events.clear()

    def restore(self, rank: int, sd: dict[str, Any]) -> dict[str, Any]:
        """Resume: each rank sends the coordinator state it saved itself. The first
        loads it; the others must have saved the same version and refresh count (ranks
        restoring different checkpoints fail here, before training)."""
        mine = {"version": int(sd["version"]), "refreshes": len(sd.get("history", []))}
        if self._restored is None:
            self.load_state_dict(sd)
            self._restored = mine
        elif mine != self._restored:
            raise ValueError(
                f"LongAct run {self.config.run_id}: rank {rank} restored a checkpoint with "
                f"{mine}, another rank one with {self._restored}; resume every rank from "
                "the same global_step folder"
            )
        return self.summary()

    def summary(self) -> dict[str, Any]:
        return {"version": self.version, "refreshes": len(self.history)}


def _finite(part: dict[str, torch.Tensor] | QKStats) -> bool:
    """No NaN or Inf anywhere in a rank's partial statistics."""
    if isinstance(part, dict):
        return all(bool(torch.isfinite(v).all()) for v in part.values())
    return all(bool(torch.isfinite(v).all()) for v in part.to_fields().values())


def actor_name(run_id: str) -> str:
    return ACTOR_PREFIX + run_id


def create(config: LongActConfig, layout: QKLayout | None = None, world_size: int | None = None):
    """The run's coordinator as a named Ray actor, owned by the caller (the job's task
    runner) and placed on the head node; Ray restarts it up to
    ``config.coordinator_restarts`` times if it dies. Returns the existing one if this
    run already has it."""
    import ray

    opts: dict[str, Any] = {
        "name": actor_name(config.run_id),
        "get_if_exists": True,
        "num_cpus": 0,
        "max_concurrency": 1024,
        "max_restarts": int(config.coordinator_restarts),
        "max_task_retries": 0,
    }
    if HEAD_RESOURCE in ray.cluster_resources():
        opts["resources"] = {HEAD_RESOURCE: 0.001}
    return ray.remote(SaliencyCoordinator).options(**opts).remote(config, layout, world_size)
