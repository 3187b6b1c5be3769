"""Per-channel magnitude statistics of query/key activations (pure math, no hooks).

For every (layer, projection) key, :class:`ChannelStats` keeps, per output channel ``c`` of
q_proj / k_proj (the last dim of an activation of shape (..., C)):

* ``count``   - number of tokens seen (float64 scalar; "effective" count after an EMA),
* ``sum_abs`` - sum over tokens of ``|x[t, c]|``       (C,) float64,
* ``sum_sq``  - sum over tokens of ``x[t, c] ** 2``     (C,) float64,
* ``max_abs`` - max over tokens of ``|x[t, c]|``        (C,) float64.

Sums are token-weighted, so merging micro-batches, data-parallel ranks (including
sequence-parallel shards of one sequence) or steps is an exact addition (max for
``max_abs``): the merge of two statistics equals the statistics of the concatenated tokens.

Scores: ``mean_abs = sum_abs / count`` (the paper's magnitude, AWQ's choice),
``rms = sqrt(sum_sq / count)``, ``max_abs``. A key with ``count == 0`` scores 0.

EMA across mask refreshes (:func:`ema`): the paper gives no formula, this is ours. With
``decay`` in [0, 1), per key and channel, on per-channel *means*::

    mean_abs = decay * prev.mean_abs + (1 - decay) * new.mean_abs
    mean_sq  = decay * prev.mean_sq  + (1 - decay) * new.mean_sq
    max_abs  = decay * prev.max_abs  + (1 - decay) * new.max_abs
    count    = decay * prev.count    + (1 - decay) * new.count   (effective tokens)

i.e. each refresh window weighs the same whatever its token count; sums are stored as
``mean * count`` so the result is again a ChannelStats. A side with no tokens (missing key
or count 0) contributes nothing: the other side is returned unchanged.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Iterator, Mapping, Set
from dataclasses import dataclass
from typing import Any

import torch

from longact.core.adapters import Key, key_str, parse_key

FIELDS = ("count", "sum_abs", "sum_sq", "max_abs")
_CHUNK_ELEMS = 1 << 22  # float64 working set per chunk: 32 MiB


def check_fields(layout: Iterable[tuple[Key, int]], flat: Mapping[str, Any]) -> None:
    """Raise unless every entry of ``flat`` is a known field of the shape
    ``QKStats.to_fields`` gives over ``layout``: count (K,), the others (R,)."""
    layout = list(layout)
    rows = sum(c for _, c in layout)
    for f, v in flat.items():
        want = len(layout) if f == "count" else rows
        if f not in FIELDS or tuple(v.shape) != (want,):
            raise ValueError(
                f"statistics field {f!r} of shape {tuple(v.shape)} does not fit the layout "
                f"({len(layout)} keys, {rows} channels; valid fields: {', '.join(FIELDS)})"
            )


@functools.cache
def _accumulated(fields: tuple[str, ...]) -> frozenset[str]:
    """The per-channel fields to accumulate (checked once per distinct tuple)."""
    bad = sorted(set(fields) - set(FIELDS))
    if bad:
        raise ValueError(f"unknown statistics fields {bad}")
    return frozenset(fields) - {"count"}


_BLOCK = 1024  # tokens per float32 partial sum on accelerators


def _blocked_sum(x: torch.Tensor, p: int) -> torch.Tensor:
    """Per-channel sum of |x|^p (p = 1 or 2) of x (N, C) as float64 (C,): float32 norms
    over blocks of ``_BLOCK`` tokens (one kernel, x read once), float64 across blocks.
    On an H100, 8x faster than a float64 reduction at 32k tokens x 4096 channels."""
    n, c = x.shape
    full = n - n % _BLOCK
    parts = []
    if full:  # (full/B, B, C) -> (full/B, C)
        parts.append(torch.linalg.vector_norm(x[:full].reshape(-1, _BLOCK, c), p, dim=1,
                                              dtype=torch.float32))  # fmt: skip
    if full < n:  # the remainder: (1, C)
        parts.append(torch.linalg.vector_norm(x[full:], p, dim=0, dtype=torch.float32)[None])
    blocks = parts[0] if len(parts) == 1 else torch.cat(parts)  # (n_blocks, C) float32
    if p == 2:
        blocks = blocks.double().square()
    return blocks.sum(0, dtype=torch.float64)


@dataclass
class ChannelStats:
    """Statistics of one (layer, proj): count () and sum_abs/sum_sq/max_abs (C,), float64."""

    count: torch.Tensor
    sum_abs: torch.Tensor
    sum_sq: torch.Tensor
    max_abs: torch.Tensor

    @classmethod
    def zeros(cls, n_channels: int, device: torch.device | str | None = None) -> ChannelStats:
        z = torch.zeros(n_channels, dtype=torch.float64, device=device)
        return cls(torch.zeros((), dtype=torch.float64, device=device), z, z.clone(), z.clone())

    @classmethod
    def of(cls, x: torch.Tensor) -> ChannelStats:
        """Statistics of the tokens of x (..., C)."""
        out = cls.zeros(x.shape[-1], x.device)
        out.update_(x)
        return out

    @property
    def n_channels(self) -> int:
        return self.sum_abs.shape[0]

    @torch.no_grad()
    def update_(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        fields: Iterable[str] = FIELDS,
    ) -> ChannelStats:
        """Add the tokens of x (..., C) in place, only those where ``mask`` (...) is True.

        ``fields``: which of sum_abs / sum_sq / max_abs to accumulate (``count`` always
        is); the others stay as they are, e.g. zeros when only the score's field is
        needed. Masked-out tokens are replaced by zeros (``torch.where``, so even NaN/inf
        padding is dropped) rather than gathered: no device sync, and as all terms are
        >= 0 the zeros change no sum and no max. Sums are taken in float64.

        Two implementations, chosen by device, each the faster one there (docs/bench):
        on the CPU, chunks of tokens cast to float64 (``_update_chunked``, exact sums of
        the float64 values); on accelerators, blocked reductions that read x once in its
        own dtype (``_update_fused``): float32 sums within blocks of ``_BLOCK`` tokens,
        float64 across blocks and calls, never a float64 copy of the activations. They
        agree to ~1e-7 relative (float32 rounding within a block), far below any
        difference that could reorder channels meaningfully."""
        x = x.detach().reshape(-1, x.shape[-1])  # (N, C)
        if x.shape[1] != self.n_channels:
            raise ValueError(f"activation has {x.shape[1]} channels, stats {self.n_channels}")
        keep = None
        if mask is not None:
            keep = mask.detach().reshape(-1).to(device=x.device, dtype=torch.bool)  # (N,)
            if keep.shape[0] != x.shape[0]:
                raise ValueError(f"mask has {keep.shape[0]} tokens, activation {x.shape[0]}")
        fields = _accumulated(tuple(fields))
        if x.device.type == "cpu":
            self._update_chunked(x, keep, fields)
        else:
            self._update_fused(x, keep, fields)
        self.count += x.shape[0] if keep is None else keep.sum()
        return self

    def _update_chunked(self, x: torch.Tensor, keep: torch.Tensor | None, fields: Set[str]) -> None:
        step = max(1, _CHUNK_ELEMS // max(1, x.shape[1]))
        for start in range(0, x.shape[0], step):
            a = x[start : start + step].to(torch.float64).abs_()  # (n, C)
            if keep is not None:
                a = torch.where(keep[start : start + step, None], a, 0.0)  # NaN-safe
            if "sum_abs" in fields:
                self.sum_abs += a.sum(0)
            if "sum_sq" in fields:
                self.sum_sq += a.square().sum(0)
            if "max_abs" in fields:
                torch.maximum(self.max_abs, a.amax(0), out=self.max_abs)

    def _update_fused(self, x: torch.Tensor, keep: torch.Tensor | None, fields: Set[str]) -> None:
        if keep is not None:
            x = torch.where(keep[:, None], x, 0)  # (N, C), x's dtype; NaN-safe
        if "sum_abs" in fields:
            self.sum_abs += _blocked_sum(x, 1)
        if "sum_sq" in fields:
            self.sum_sq += _blocked_sum(x, 2)
        if "max_abs" in fields:
            amax = torch.linalg.vector_norm(x, math.inf, dim=0)  # exact in any dtype
            torch.maximum(self.max_abs, amax.double(), out=self.max_abs)

    def merge(self, other: ChannelStats) -> ChannelStats:
        """Exact statistics of the union of both token sets."""
        if other.n_channels != self.n_channels:
            raise ValueError(f"cannot merge {self.n_channels} with {other.n_channels} channels")
        o = other.to(self.sum_abs.device)
        return ChannelStats(
            self.count + o.count,
            self.sum_abs + o.sum_abs,
            self.sum_sq + o.sum_sq,
            torch.maximum(self.max_abs, o.max_abs),
        )

    def to(self, device: torch.device | str) -> ChannelStats:
        return ChannelStats(*(getattr(self, f).to(device) for f in FIELDS))

    def clone(self) -> ChannelStats:
        return ChannelStats(*(getattr(self, f).clone() for f in FIELDS))

    # ---- scores (C,) float64 -------------------------------------------------------
    def _per_token(self, total: torch.Tensor) -> torch.Tensor:
        return total / self.count if float(self.count) > 0 else torch.zeros_like(total)

    def mean_abs(self) -> torch.Tensor:
        return self._per_token(self.sum_abs)

    def mean_sq(self) -> torch.Tensor:
        return self._per_token(self.sum_sq)

    def rms(self) -> torch.Tensor:
        return self.mean_sq().sqrt()


class QKStats:
    """ChannelStats for every (layer, "q"|"k") key. Immutable merges; in-place updates."""

    def __init__(self, entries: Mapping[Key, ChannelStats] | None = None):
        self.entries: dict[Key, ChannelStats] = dict(entries or {})

    @classmethod
    def empty(cls, row_counts: Mapping[Key, int], device: Any = None) -> QKStats:
        """Zero statistics for every key, e.g. ``QKStats.empty(layout.row_counts())``.

        All fields are views into one zeroed buffer: one allocation and one fill instead
        of four per key (on a GPU, 224 tiny kernels fewer per refresh at 28 layers)."""
        total = sum(1 + 3 * n for n in row_counts.values())
        buf = torch.zeros(total, dtype=torch.float64, device=device)
        entries, i = {}, 0
        for k, n in row_counts.items():
            count, rest = buf[i], buf[i + 1 : i + 1 + 3 * n].view(3, n)
            entries[k] = ChannelStats(count, rest[0], rest[1], rest[2])
            i += 1 + 3 * n
        return cls(entries)

    def keys(self) -> list[Key]:
        return sorted(self.entries)

    def __getitem__(self, key: Key) -> ChannelStats:
        return self.entries[key]

    def __iter__(self) -> Iterator[Key]:
        return iter(self.keys())

    def __contains__(self, key: object) -> bool:
        return key in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def update(
        self,
        key: Key,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        fields: Iterable[str] = FIELDS,
    ) -> None:
        """Add the tokens of x (..., C) [where mask (...) is True] to ``key``
        (created on x's device if new); ``fields`` as in ``ChannelStats.update_``."""
        if key not in self.entries:
            self.entries[key] = ChannelStats.zeros(x.shape[-1], x.device)
        elif self.entries[key].sum_abs.device != x.device:  # e.g. CPU-offloaded params
            self.entries[key] = self.entries[key].to(x.device)
        self.entries[key].update_(x, mask, fields)

    def token_count(self, key: Key) -> float:
        return float(self.entries[key].count) if key in self.entries else 0.0

    # ---- scores ----------------------------------------------------------------------
    def mean_abs(self, key: Key) -> torch.Tensor:
        return self.entries[key].mean_abs()

    def rms(self, key: Key) -> torch.Tensor:
        return self.entries[key].rms()

    def max_abs(self, key: Key) -> torch.Tensor:
        return self.entries[key].max_abs

    # ---- merging ---------------------------------------------------------------------
    def merge(self, other: QKStats) -> QKStats:
        """Exact token-weighted merge; keys present on one side only are copied."""
        out = {k: v.clone() for k, v in self.entries.items()}
        for k, v in other.entries.items():
            out[k] = out[k].merge(v) if k in out else v.clone()
        return QKStats(out)

    __add__ = merge

    def to(self, device: Any) -> QKStats:
        return QKStats({k: v.to(device) for k, v in self.entries.items()})

    # ---- serialization -----------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain CPU tensors: {"format": 1, "entries": {"3.q": {"count": ..., ...}}}."""
        return {
            "format": 1,
            "entries": {
                key_str(k): {f: getattr(v, f).detach().cpu().clone() for f in FIELDS}
                for k, v in sorted(self.entries.items())
            },
        }

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, Any]) -> QKStats:
        if sd.get("format") != 1:
            raise ValueError(f"unknown QKStats format {sd.get('format')!r}")
        entries = {}
        for k, v in sd["entries"].items():
            fields = [torch.as_tensor(v[f], dtype=torch.float64) for f in FIELDS]
            entries[parse_key(k)] = ChannelStats(*fields)
        return cls(entries)

    def layout(self) -> list[tuple[Key, int]]:
        """(key, n_channels) in the fixed order used by the flat form."""
        return [(k, self.entries[k].n_channels) for k in self.keys()]

    def to_flat(self, device: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(sums, maxes): sums = [count, sum_abs, sum_sq] per key, to all-reduce with SUM;
        maxes = max_abs per key, to all-reduce with MAX. Both float64 1-D, on ``device``
        (default: that of the first key)."""
        keys = self.keys()
        if device is not None or len({self.entries[k].sum_abs.device for k in keys}) > 1:
            device = device or self.entries[keys[0]].sum_abs.device
            return self.to(device).to_flat()
        sums = [
            t
            for k in keys
            for t in (
                self.entries[k].count.reshape(1),
                self.entries[k].sum_abs,
                self.entries[k].sum_sq,
            )
        ]
        maxes = [self.entries[k].max_abs for k in keys]
        return torch.cat(sums), torch.cat(maxes)

    @classmethod
    def from_flat(
        cls, layout: Iterable[tuple[Key, int]], sums: torch.Tensor, maxes: torch.Tensor
    ) -> QKStats:
        entries, i, j = {}, 0, 0
        for key, c in layout:
            count = sums[i].clone()
            sum_abs = sums[i + 1 : i + 1 + c].clone()
            sum_sq = sums[i + 1 + c : i + 1 + 2 * c].clone()
            entries[key] = ChannelStats(count, sum_abs, sum_sq, maxes[j : j + c].clone())
            i, j = i + 1 + 2 * c, j + c
        if i != sums.numel() or j != maxes.numel():
            raise ValueError("flat statistics do not match the layout")
        return cls(entries)

    def to_fields(self, fields: Iterable[str] = FIELDS) -> dict[str, torch.Tensor]:
        """Per-field flat float64 CPU vectors in sorted key order: ``count`` (K,) with
        one entry per key, the others (R,) with every key's channels end to end."""
        keys, out = self.keys(), {}
        for f in fields:
            if f not in FIELDS:
                raise ValueError(f"unknown statistics field {f!r}; valid: {', '.join(FIELDS)}")
            parts = [getattr(self.entries[k], f).reshape(-1) for k in keys]
            out[f] = torch.cat(parts).to("cpu", torch.float64) if parts else torch.zeros(0)
        return out

    @classmethod
    def from_fields(
        cls, layout: Iterable[tuple[Key, int]], flat: Mapping[str, torch.Tensor]
    ) -> QKStats:
        """Inverse of :meth:`to_fields` over ``layout`` ((key, channels), sorted keys);
        fields absent from ``flat`` are zeros."""
        layout = list(layout)
        check_fields(layout, flat)
        entries, i = {}, 0
        for j, (key, c) in enumerate(layout):
            z = ChannelStats.zeros(c)
            count = flat["count"][j].clone() if "count" in flat else z.count
            rest = [flat[f][i : i + c].clone() if f in flat else getattr(z, f) for f in FIELDS[1:]]
            entries[key] = ChannelStats(count, *rest)
            i += c
        return cls(entries)

    def all_reduce(self, group: Any = None, device: Any = None) -> QKStats:
        """Exact merge over a process group (two collectives). Every rank must hold the
        same keys and channel counts (create them with :meth:`empty`). ``device``: where
        the collectives run (a CUDA device for NCCL)."""
        import torch.distributed as dist

        sums, maxes = self.to_flat(device)
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
        dist.all_reduce(maxes, op=dist.ReduceOp.MAX, group=group)
        return QKStats.from_flat(self.layout(), sums, maxes)


def merge(*stats: QKStats) -> QKStats:
    """Exact merge of any number of statistics."""
    out = QKStats()
    for s in stats:
        out = out.merge(s)
    return out


@torch.no_grad()
def ema_channel(prev: ChannelStats, new: ChannelStats, decay: float) -> ChannelStats:
    """EMA on per-channel means (see module docstring)."""
    if float(prev.count) <= 0:
        return new.clone()
    if float(new.count) <= 0:
        return prev.clone()
    new = new.to(prev.sum_abs.device)
    a, b = decay, 1.0 - decay
    count = a * prev.count + b * new.count
    mean_abs = a * prev.mean_abs() + b * new.mean_abs()
    mean_sq = a * prev.mean_sq() + b * new.mean_sq()
    max_abs = a * prev.max_abs + b * new.max_abs
    return ChannelStats(count, mean_abs * count, mean_sq * count, max_abs)


def ema(prev: QKStats | None, new: QKStats, decay: float) -> QKStats:
    """Blend statistics of a new refresh window into the running ones.

    ``decay`` is the weight of the past, in [0, 1): 0 keeps only ``new``.
    """
    if not (0.0 <= decay < 1.0) or math.isnan(decay):
        raise ValueError(f"ema decay must be in [0, 1), got {decay!r}")
    if prev is None:
        return QKStats({k: v.clone() for k, v in new.entries.items()})
    out = {k: v.clone() for k, v in prev.entries.items()}
    for k, v in new.entries.items():
        out[k] = ema_channel(out[k], v, decay) if k in out else v.clone()
    return QKStats(out)
