"""Choosing which rows of W_Q / W_K stay trainable: scores, policies, granularity, MaskSet.

A mask is one bool per output row (= output channel) of q_proj / k_proj per layer,
True = trainable. It is chosen per layer and per projection; K's mask is chosen over K's
own channels (GQA: n_kv_heads*head_dim rows), never derived from Q's.

Pipeline for one (layer, proj): channel scores (C,) from statistics (``SCORES``, declared
with the statistics they need in ``longact.core.scores``: mean_abs [default], rms,
max_abs) -> pooled to units by the granularity (``GRANULARITIES``) -> a policy picks
``n_keep`` units (``POLICIES``) -> expanded back to a (C,) row mask.

* Granularity ``channel``: one unit per row. ``rope_pair``: the two channels RoPE turns
  together form one unit, score = mean of the two: under rotate-half ``h*D + j`` and
  ``h*D + j + R/2`` (R = the key's rotated channels, D = head_dim); a channel RoPE does
  not turn (partial rotary, a layer without RoPE) is a unit of its own
  (``ProjGeom.units``, from the adapter's ``Rope``). ``head``: the D rows of a head form
  one unit, score = mean over the head.
* Rounding (our choice, the paper only gives "30%"): ``n_keep = clamp(floor(ratio *
  n_units + 0.5), 1, n_units)`` - round half up, at least one unit. E.g. ratio 0.3 over
  16 K channels keeps 5 (4.8), over 5 units keeps 2 (1.5), over 4 heads keeps 1 (1.2).
* Ties: ``topk`` / ``bottomk`` prefer the lower unit index (stable sort).
* ``random`` is seeded per (seed, layer, proj): the same on every rank and every run.
  ``full`` keeps every row (ratio ignored) and equals plain training.
* ``ratio`` must be in (0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from longact.core.arch.layout import ROTATE_HALF, Key, ProjGeom, QKLayout, Rope, key_str, parse_key
from longact.core.scores import SCORES
from longact.core.stats import QKStats
from longact.registry import Registry

PolicyFn = Callable[[torch.Tensor | None, int, int, torch.Generator], torch.Tensor]

POLICIES: Registry[PolicyFn] = Registry("mask policy")


# ---- granularity ---------------------------------------------------------------------
@dataclass(frozen=True)
class Granularity:
    """A grouping of a key's C channels into U units that are kept or frozen together.
    A unit's score is the mean of its channels' scores."""

    name: str

    def units(self, geom: ProjGeom) -> torch.Tensor:
        """(C,) long: unit id 0..U-1 of each channel (numbered by first channel)."""
        rope = geom.rope
        if self.name == "rope_pair" and rope.style != "none" and geom.head_dim % 2:
            raise ValueError(f"rope_pair granularity needs an even head_dim, got {geom.head_dim}")
        return geom.units(self.name)

    @staticmethod
    def pool(scores: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
        """(..., C) channel scores -> (..., U) unit scores (mean over each unit)."""
        n = int(units.max()) + 1
        size = torch.zeros(n, dtype=scores.dtype).index_add_(
            0, units, torch.ones_like(units, dtype=scores.dtype)
        )
        total = torch.zeros(*scores.shape[:-1], n, dtype=scores.dtype).index_add_(-1, units, scores)
        return total / size

    @staticmethod
    def expand(unit_mask: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
        """(..., U) unit mask -> (..., C) row mask."""
        return unit_mask[..., units]


GRANULARITIES: Registry[Granularity] = Registry("granularity")
for _name in ("channel", "rope_pair", "head"):
    GRANULARITIES.add(_name, Granularity(_name))


def _geom(n_channels: int, head_dim: int, rope: Rope | None) -> ProjGeom:
    if head_dim <= 0 or n_channels % head_dim:
        raise ValueError(f"{n_channels} channels do not split into heads of {head_dim}")
    return ProjGeom(n_channels // head_dim, head_dim, rope or ROTATE_HALF)


# ---- policies: (scores (U,) or None, n_units, n_keep, generator) -> (U,) bool -------------
def _need_scores(scores: torch.Tensor | None, name: str) -> torch.Tensor:
    if scores is None:
        raise ValueError(f"mask policy {name!r} needs activation statistics with tokens")
    if not torch.isfinite(scores).all():
        raise ValueError(f"mask policy {name!r} got non-finite channel scores")
    return scores


def _first(order: torch.Tensor, n_keep: int, n_units: int) -> torch.Tensor:
    """(..., U) bool: True at the first ``n_keep`` indices of each row of ``order``."""
    mask = torch.zeros(order.shape, dtype=torch.bool)
    mask.scatter_(-1, order[..., :n_keep].cpu(), True)
    return mask


def _batched(fn: PolicyFn) -> PolicyFn:
    """Marks a policy that also takes (L, U) scores (one row per layer) and decides each
    row on its own, so ``build_masks`` may call it once for all layers of a projection."""
    fn.batched = True  # type: ignore[attr-defined]
    return fn


@POLICIES.register("topk")
@_batched
def policy_topk(scores: torch.Tensor | None, n_units: int, k: int, gen: torch.Generator):
    s = _need_scores(scores, "topk")  # stable sort: ties go to the lower index
    return _first(torch.sort(s, dim=-1, descending=True, stable=True).indices, k, n_units)


@POLICIES.register("bottomk")
@_batched
def policy_bottomk(scores: torch.Tensor | None, n_units: int, k: int, gen: torch.Generator):
    s = _need_scores(scores, "bottomk")
    return _first(torch.sort(s, dim=-1, descending=False, stable=True).indices, k, n_units)


@POLICIES.register("random")
def policy_random(scores: torch.Tensor | None, n_units: int, k: int, gen: torch.Generator):
    return _first(torch.randperm(n_units, generator=gen), k, n_units)


@POLICIES.register("full")
def policy_full(scores: torch.Tensor | None, n_units: int, k: int, gen: torch.Generator):
    return torch.ones(n_units, dtype=torch.bool)


# ---- building ------------------------------------------------------------------------
def validate_ratio(ratio: float) -> float:
    r = float(ratio)
    if not (0.0 < r <= 1.0) or math.isnan(r):
        raise ValueError(f"mask ratio must be in (0, 1], got {ratio!r}")
    return r


def n_keep(ratio: float, n_units: int) -> int:
    """Units kept: clamp(floor(ratio * n_units + 0.5), 1, n_units) (round half up)."""
    r = validate_ratio(ratio)
    return min(n_units, max(1, math.floor(r * n_units + 0.5 + 1e-9)))


def _generator(seed: int, key: Key) -> torch.Generator:
    """CPU generator seeded from (seed, layer, proj)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + key[0] * 2 + int(key[1] == "k"))


def select_rows(
    scores: torch.Tensor | None,
    n_channels: int,
    head_dim: int,
    *,
    ratio: float,
    policy: str = "topk",
    granularity: str = "channel",
    seed: int = 0,
    key: Key = (0, "q"),
    rope: Rope | None = None,
) -> torch.Tensor:
    """Row mask (C,) bool for one (layer, proj) from channel scores (C,) or None.
    ``rope``: the key's RoPE pairing (default: rotate-half over the whole head)."""
    pol, gran = POLICIES.get(policy), GRANULARITIES.get(granularity)
    units = gran.units(_geom(n_channels, head_dim, rope))  # (C,)
    n_units = int(units.max()) + 1
    unit_scores = None
    if scores is not None:
        if scores.numel() != n_channels:
            raise ValueError(f"{scores.numel()} scores for {n_channels} channels of {key}")
        unit_scores = gran.pool(scores.detach().double().cpu(), units)  # (U,)
    unit_mask = pol(unit_scores, n_units, n_keep(ratio, n_units), _generator(seed, key))
    return gran.expand(unit_mask, units).clone()  # (C,)


@torch.no_grad()
def build_masks(
    stats: QKStats | None,
    layout: QKLayout,
    *,
    ratio: float = 0.3,
    policy: str = "topk",
    score: str = "mean_abs",
    granularity: str = "channel",
    seed: int = 0,
    version: int = 0,
) -> MaskSet:
    """A MaskSet for every (layer, proj) of ``layout``. Keys without tokens get no scores
    (score-based policies then raise)."""
    validate_ratio(ratio)
    score_fn, _ = SCORES.get(score), POLICIES.get(policy)
    GRANULARITIES.get(granularity)
    masks = {}
    if getattr(POLICIES.get(policy), "batched", False) and stats is not None:
        groups: dict[tuple[str, ProjGeom], list[Key]] = {}
        for k in layout:  # one policy call per projection and geometry, not per layer
            groups.setdefault((k[1], layout.geom(k)), []).append(k)
        for (_, geom), keys in groups.items():
            if all(k in stats and stats.token_count(k) > 0 for k in keys):
                masks.update(_masks_at_once(stats, geom, keys, ratio, policy, granularity, score))
    for key in layout:
        if key in masks:
            continue
        scores = None
        if stats is not None and key in stats and stats.token_count(key) > 0:
            scores = score_fn(stats[key])
        g = layout.geom(key)
        masks[key] = select_rows(
            scores,
            g.rows,
            g.head_dim,
            ratio=ratio,
            policy=policy,
            granularity=granularity,
            seed=seed,
            key=key,
            rope=g.rope,
        )
    meta = {"ratio": ratio, "policy": policy, "score": score, "granularity": granularity}
    meta["seed"] = seed
    return MaskSet(masks, version=version, meta=meta)


def _masks_at_once(
    stats: QKStats,
    geom: ProjGeom,
    keys: list[Key],
    ratio: float,
    policy: str,
    granularity: str,
    score: str,
) -> dict[Key, torch.Tensor]:
    """A batched policy over the (L, U) unit scores of all layers of one projection that
    share ``geom``: the same masks as ``select_rows`` key by key, in one call (one sort
    for topk)."""
    gran = GRANULARITIES.get(granularity)
    units = gran.units(geom)  # (C,)
    n_units = int(units.max()) + 1
    score_fn = SCORES.get(score)
    chan = torch.stack([score_fn(stats[k]).detach().double().cpu() for k in keys])  # (L, C)
    keep = POLICIES.get(policy)(gran.pool(chan, units), n_units, n_keep(ratio, n_units), None)
    return {k: gran.expand(keep[i], units).clone() for i, k in enumerate(keys)}  # (C,) each


# ---- the mask set --------------------------------------------------------------------
class MaskSet:
    """One bool (C,) CPU row mask per (layer, proj); True = trainable. Versioned."""

    def __init__(
        self, masks: Mapping[Key, torch.Tensor], version: int = 0, meta: dict | None = None
    ):
        self.masks = {k: torch.as_tensor(v, dtype=torch.bool).cpu() for k, v in masks.items()}
        for k, v in self.masks.items():
            if v.dim() != 1:
                raise ValueError(f"mask for {k} must be 1-D (one bool per row), got {v.shape}")
        self.version = int(version)
        self.meta = dict(meta or {})

    @classmethod
    def full(cls, layout: QKLayout, version: int = 0) -> MaskSet:
        masks = {k: torch.ones(n, dtype=torch.bool) for k, n in layout.row_counts().items()}
        return cls(masks, version, {"policy": "full", "ratio": 1.0})

    def keys(self) -> list[Key]:
        return sorted(self.masks)

    def __getitem__(self, key: Key) -> torch.Tensor:
        return self.masks[key]

    def __iter__(self) -> Iterator[Key]:
        return iter(self.keys())

    def __contains__(self, key: object) -> bool:
        return key in self.masks

    def kept_fraction(self, per_key: bool = False) -> float | dict[Key, float]:
        if per_key:
            return {k: float(v.float().mean()) for k, v in sorted(self.masks.items())}
        kept = sum(int(v.sum()) for v in self.masks.values())
        return kept / max(1, sum(v.numel() for v in self.masks.values()))

    def jaccard(self, other: MaskSet, per_key: bool = False) -> float | dict[Key, float]:
        """|A & B| / |A | B| over kept rows (1.0 when both keep nothing)."""
        if set(self.masks) != set(other.masks):
            raise ValueError("mask sets cover different (layer, proj) keys")
        inter = {k: int((v & other[k]).sum()) for k, v in self.masks.items()}
        union = {k: int((v | other[k]).sum()) for k, v in self.masks.items()}
        if per_key:
            return {k: inter[k] / union[k] if union[k] else 1.0 for k in self.keys()}
        total = sum(union.values())
        return sum(inter.values()) / total if total else 1.0

    def mass_kept(
        self, stats: QKStats, score: str = "mean_abs", per_key: bool = False
    ) -> float | dict[Key, float]:
        """Share of the score mass (default per-channel mean |x|) on kept rows."""
        fn = SCORES.get(score)
        kept, total = {}, {}
        for k, m in self.masks.items():
            s = fn(stats[k]).double().cpu()
            kept[k], total[k] = float(s[m].sum()), float(s.sum())
        if per_key:
            return {k: kept[k] / total[k] if total[k] else 0.0 for k in self.keys()}
        t = sum(total.values())
        return sum(kept.values()) / t if t else 0.0

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": 1,
            "version": self.version,
            "meta": dict(self.meta),
            "masks": {key_str(k): v.clone() for k, v in sorted(self.masks.items())},
        }

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, Any]) -> MaskSet:
        if sd.get("format") != 1:
            raise ValueError(f"unknown MaskSet format {sd.get('format')!r}")
        masks = {parse_key(k): v for k, v in sd["masks"].items()}
        return cls(masks, sd["version"], sd.get("meta"))

    def memory_bytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.masks.values())


def mask_memory_bytes(shapes: QKLayout | Mapping[Any, int] | Iterable[int]) -> int:
    """Bytes of a MaskSet (1 byte per row) for a layout, {key: rows} or row counts."""
    if isinstance(shapes, QKLayout):
        shapes = shapes.row_counts()
    if isinstance(shapes, Mapping):
        shapes = shapes.values()
    return sum(int(n) for n in shapes)
