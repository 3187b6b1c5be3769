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

Wire cost (Qwen3-8B: 36 layers x (4096 + 1024) channels). A ``QKStats.state_dict()``
holds 4 tensors per key (288 here) and Ray pickles each separately (~35 ms per rank on
a CPU core, paid again to unpickle). The flat form from :func:`stats_payload` is one
float64 numpy vector per statistics field (``QKStats.to_fields``), which Ray ships
out-of-band: one copy into the object store, zero-copy reads. It carries only the fields
the masks and metrics need (:func:`payload_fields`): ``count`` and ``sum_abs`` always
(the ``mean_abs`` score and the |x| mass-kept metric), plus ``sum_sq`` for ``rms`` and
``max_abs`` for ``max_abs``; 1.41 MiB per rank at 8B instead of 4.22 MiB for all four.
The coordinator's running statistics then hold zeros in the fields nobody sent.
``submit`` accepts both forms. Flat partials are merged in place into one buffer per
field (the same additions in the same order as ``QKStats.merge``, so bit-identical);
others take the generic merge. The published mask dict pickles as one bit-packed buffer
(1/8 byte per row, small enough for Ray to inline in each reply) and unpickles as the
usual ``{"3.q": bool tensor}`` dict (:class:`PackedMasks`).
"""

from __future__ import annotations

import asyncio
import time
import warnings
from typing import Any

import numpy as np
import torch

from longact.core.adapters import QKLayout, key_str
from longact.core.masks import MaskSet, build_masks
from longact.core.stats import FIELDS, QKStats, check_fields, ema

ACTOR_PREFIX = "longact_coordinator_"
FLAT_FORMAT = "flat"


def payload_fields(score: str) -> tuple[str, ...]:
    """Statistics fields a refresh needs for ``score`` (all of them for a score this
    module does not know, e.g. one registered by a user)."""
    extra = {"mean_abs": (), "rms": ("sum_sq",), "max_abs": ("max_abs",)}
    return ("count", "sum_abs", *extra[score]) if score in extra else FIELDS


def stats_payload(stats: QKStats, fields: tuple[str, ...] = FIELDS) -> dict[str, Any]:
    """The cheap wire form of one rank's statistics for ``exchange``/``submit``:
    ``{"format": "flat", "keys": ["0.k", "0.q", ...], "fields": {"count": (K,),
    "sum_abs": (R,), ...}}``, float64 numpy vectors from ``QKStats.to_fields``
    (torch tensors are accepted too)."""
    return {
        "format": FLAT_FORMAT,
        "keys": [key_str(k) for k in stats.keys()],
        "fields": {f: v.numpy() for f, v in stats.to_fields(fields).items()},
    }


def _as_float64(x: Any) -> torch.Tensor:
    """A float64 tensor over x (no copy for float64 numpy arrays, even read-only ones
    out of Ray's object store: they are only read)."""
    if isinstance(x, np.ndarray):
        with warnings.catch_warnings():  # "not writable": we never write to it
            warnings.simplefilter("ignore", UserWarning)
            return torch.as_tensor(x, dtype=torch.float64)
    return torch.as_tensor(x, dtype=torch.float64)


def _unpack_masks(names: list[str], sizes: list[int], bits: np.ndarray) -> dict:
    flat = torch.from_numpy(np.unpackbits(bits, count=sum(sizes)).astype(bool))
    return {n: p.clone() for n, p in zip(names, torch.split(flat, sizes))}


class PackedMasks(dict):
    """``{name: 1-D bool tensor}`` that pickles as one bit-packed numpy buffer and
    unpickles as a plain dict of bool tensors (Ray would pickle each tensor separately,
    ~0.1 ms apiece, once for every rank that receives the published masks)."""

    def __init__(self, masks: dict[str, torch.Tensor]):
        super().__init__(masks)
        names = list(self)
        flat = torch.cat([self[n].reshape(-1).to(torch.bool) for n in names]) if names else None
        sizes = [int(self[n].numel()) for n in names]
        self._packed = (names, sizes, None if flat is None else np.packbits(flat.numpy()))

    def __reduce__(self):
        if self._packed[2] is None:
            return (dict, (dict(self),))
        return (_unpack_masks, self._packed)


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
        slot["stats"] = self._merge(slot["stats"], self._partial(stats_state))
        slot["ranks"].add(rank)
        if len(slot["ranks"]) < self.world_size:
            return False
        del self._pending[step]
        acc = slot["stats"]
        window = QKStats.from_fields(self._flat_layout, acc) if isinstance(acc, dict) else acc
        self._publish(step, window, slot["t0"])
        return True

    @property
    def _flat_layout(self) -> list[tuple[tuple[int, str], int]]:
        """(key, channels) in ``QKStats.to_fields`` order (sorted keys) for this layout."""
        return sorted(self.layout.row_counts().items())

    def _partial(self, stats_state: dict[str, Any]) -> dict[str, torch.Tensor] | QKStats:
        """A rank's partial as flat fields when it covers exactly the layout."""
        flat_layout = self._flat_layout
        if stats_state.get("format") == FLAT_FORMAT:
            keys = [key_str(k) for k, _ in flat_layout]
            if list(stats_state["keys"]) != keys:
                raise ValueError("flat statistics do not cover the coordinator's layout")
            got = {f: _as_float64(v) for f, v in stats_state["fields"].items()}
            check_fields(flat_layout, got)
            if "count" not in got:
                raise ValueError("flat statistics have no 'count' field")
            return got
        part = QKStats.from_state_dict(stats_state)
        return part.to_fields() if part.layout() == flat_layout else part

    def _merge(self, acc: dict | QKStats | None, part: dict | QKStats) -> dict | QKStats:
        """Exact merge; flat partials are added in place (no per-rank allocation)."""
        if acc is None:
            return {f: v.clone() for f, v in part.items()} if isinstance(part, dict) else part
        if isinstance(acc, dict) and isinstance(part, dict):
            if set(acc) != set(part):
                raise ValueError(
                    f"ranks sent different statistics fields: {sorted(acc)} vs {sorted(part)}"
                )
            for f, v in part.items():
                if f == "max_abs":
                    torch.maximum(acc[f], v, out=acc[f])
                else:
                    acc[f].add_(v)
            return acc
        flat = self._flat_layout
        a = QKStats.from_fields(flat, acc) if isinstance(acc, dict) else acc
        return a.merge(QKStats.from_fields(flat, part) if isinstance(part, dict) else part)

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
        return {"version": self.version, "masks": _packed(self.masks), "metrics": {}}

    # ---- refresh -------------------------------------------------------------------------
    def _publish(self, step: int, window: QKStats, t0: float) -> None:
        cfg = self.config
        decay = float(cfg.get("ema", 0.0))
        if self.running is None or (decay == 0.0 and self._covers(window)):
            self.running = window  # = ema(running, window, 0) up to rounding, ~15 ms less
        else:
            self.running = ema(self.running, window, decay)
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
        self._done[step] = {"version": self.version, "masks": _packed(new), "metrics": metrics}
        # keep only the latest payloads: ranks of one refresh all read before the next
        for old in sorted(self._done)[:-4]:
            self._done.pop(old, None)
            self._events.pop(old, None)

    def _covers(self, window: QKStats) -> bool:
        """Every key of the running statistics has tokens in the window (otherwise an EMA
        with decay 0 keeps the running entry of a key without tokens)."""
        assert self.running is not None
        return all(k in window and window.token_count(k) > 0 for k in self.running.keys())

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


def _packed(masks: MaskSet) -> dict[str, Any]:
    """``masks.state_dict()`` with the mask tensors in a PackedMasks (cheap to pickle)."""
    sd = masks.state_dict()
    sd["masks"] = PackedMasks(sd["masks"])
    return sd


def get_or_create(run_id: str, config: dict, layout: QKLayout, world_size: int):
    """The run's coordinator as a named Ray actor (created by the first rank to ask)."""
    import ray

    actor_cls = ray.remote(num_cpus=0, max_concurrency=1024)(SaliencyCoordinator)
    return actor_cls.options(name=ACTOR_PREFIX + run_id, get_if_exists=True).remote(
        config, layout, world_size
    )
