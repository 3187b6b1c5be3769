"""Per-channel magnitude statistics of query/key activations (pure math, no hooks).

For every (layer, projection) key, :class:`ChannelStats` keeps ``count`` - the tokens seen,
a float64 scalar ("effective" count after an EMA) - and one float64 (C,) tensor per
*statistic* it holds, C = the output channels of q_proj / k_proj (the last dim of an
activation (..., C)). What each statistic is, how it accumulates from |x|, reduces (sum
or max) and blends in an EMA is declared in ``longact.core.scores``; this module applies
those declarations and names no statistic. A ChannelStats holds the statistics it was
created with: every registered one by default, only what the score needs in training
(``scores.fields_for``). Merging micro-batches, data-parallel ranks (including
sequence-parallel shards of one sequence) or steps combines each statistic by its
reduction, so a merge equals the statistics of the concatenated tokens; both sides must
hold the same statistics.

EMA across mask refreshes (:func:`ema`): the paper gives no formula, this is ours. With
``decay`` in [0, 1), per key and channel, ``mean = total / count``::

    count = decay * prev.count + (1 - decay) * new.count         (effective tokens)
    sum:    mean  = decay * prev.mean  + (1 - decay) * new.mean   (stored as mean * count)
    max:    value = decay * prev.value + (1 - decay) * new.value

so each refresh window weighs the same whatever its token count. A side with no tokens
(missing key or count 0) contributes nothing: the other is returned unchanged. The result
holds ``new``'s statistics; one ``prev`` lacks (score changed on resume) starts from ``new``.

Flat form (:meth:`QKStats.to_fields`): one float64 vector per field, keys sorted,
``count`` (K,) and each statistic (R,) = every key's channels end to end: the wire
payload, and, grouped by reduction, what :meth:`QKStats.all_reduce` sends.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from longact.core.arch import Key, key_str, parse_key
from longact.core.scores import (
    COUNT,
    REDUCTIONS,
    SCORES,
    STATISTICS,
    Statistic,
    reduction_of,
    statistic_names,
    statistics_for,
)

FIELDS = (COUNT, *STATISTICS.names())  # count + built-in statistics (live list: STATISTICS)
_CHUNK_ELEMS = 1 << 22  # float64 working set per chunk: 32 MiB
Fields = Iterable[str] | None  # field names to hold / accumulate; None: all


def _zeroed(row_counts: Mapping[Key, int], names: list[str], device: Any) -> dict:
    """{key: zero ChannelStats holding ``names``}, every tensor a view into one buffer:
    one allocation and one fill (on a GPU, hundreds of tiny kernels fewer per refresh)."""
    s = len(names)
    buf = torch.zeros(sum(1 + s * n for n in row_counts.values()), dtype=torch.float64,
                      device=device)  # fmt: skip
    entries, i = {}, 0
    for key, n in row_counts.items():
        rest = buf[i + 1 : i + 1 + s * n].view(s, n)
        entries[key] = ChannelStats(buf[i], **{name: rest[j] for j, name in enumerate(names)})
        i += 1 + s * n
    return entries


class ChannelStats:
    """Statistics of one (layer, proj): ``count`` () and ``values`` {statistic: (C,)},
    float64, sorted by name. A statistic also reads as an attribute (``s.sum_abs``)."""

    def __init__(self, count: torch.Tensor, **values: torch.Tensor):
        stats = statistics_for(tuple(values))
        if not stats:
            raise ValueError(f"ChannelStats needs a statistic; valid: {STATISTICS.names()}")
        shapes = {n: tuple(v.shape) for n, v in values.items()}
        if len(set(shapes.values())) != 1 or len(next(iter(shapes.values()))) != 1:
            raise ValueError(f"statistics of one key must be (C,) of one length, got {shapes}")
        self.count = count
        self.values = {s.name: values[s.name] for s in stats}

    @classmethod
    def zeros(cls, n_channels: int, device: Any = None, fields: Fields = None) -> ChannelStats:
        """Zero statistics holding ``fields`` (default: every registered statistic)."""
        return _zeroed({0: n_channels}, statistic_names(fields), device)[0]

    @classmethod
    def of(cls, x: torch.Tensor, fields: Fields = None) -> ChannelStats:
        """Statistics of the tokens of x (..., C)."""
        return cls.zeros(x.shape[-1], x.device, fields).update_(x)

    def __getattr__(self, name: str) -> torch.Tensor:
        values = self.__dict__.get("values")  # absent while unpickling
        if values is not None and name in values:
            return values[name]
        raise AttributeError(f"ChannelStats has no attribute or statistic {name!r}")

    @property
    def n_channels(self) -> int:
        return next(iter(self.values.values())).shape[0]

    @torch.no_grad()
    def update_(
        self, x: torch.Tensor, mask: Tensor | None = None, fields: Fields = None
    ) -> ChannelStats:
        """Add the tokens of x (..., C) in place, only those where ``mask`` (...) is True.

        ``fields``: which held statistics to accumulate (default: all; ``count`` always
        is). Masked-out tokens become zero rows (``torch.where``: even NaN/inf padding is
        dropped) rather than being gathered: no device sync, and no statistic changes.

        Two paths, each the faster one on its device (docs/bench): on the CPU, chunks of
        tokens cast to float64 (each statistic's ``chunk``); on accelerators, each
        statistic's ``fused`` kernel reading x once in its own dtype (built-in sums:
        float32 within blocks of 1024 tokens, float64 across them, no float64 copy of the
        activations). They agree to ~1e-7 relative, far below what could reorder
        channels meaningfully."""
        x = x.detach().reshape(-1, x.shape[-1])  # (N, C)
        if x.shape[1] != self.n_channels:
            raise ValueError(f"activation has {x.shape[1]} channels, stats {self.n_channels}")
        keep = None
        if mask is not None:
            keep = mask.detach().reshape(-1).to(device=x.device, dtype=torch.bool)  # (N,)
            if keep.shape[0] != x.shape[0]:
                raise ValueError(f"mask has {keep.shape[0]} tokens, activation {x.shape[0]}")
        fields = tuple(self.values) if fields is None else tuple(fields)
        if x.shape[0]:
            update = self._update_chunked if x.device.type == "cpu" else self._update_fused
            update(x, keep, fields)
        self.count += x.shape[0] if keep is None else keep.sum()
        return self

    def _held(self, fields: Iterable[str]) -> tuple[Statistic, ...]:
        stats = statistics_for(tuple(fields))
        missing = [s.name for s in stats if s.name not in self.values]
        if missing:
            raise ValueError(
                f"cannot accumulate {missing}: these statistics hold {list(self.values)}"
            )
        return stats

    def _update_chunked(
        self, x: torch.Tensor, keep: torch.Tensor | None, fields: Iterable[str]
    ) -> None:
        stats = self._held(fields)
        step = max(1, _CHUNK_ELEMS // max(1, x.shape[1]))
        for start in range(0, x.shape[0], step):
            a = x[start : start + step].to(torch.float64).abs_()  # (n, C)
            if keep is not None:
                a = torch.where(keep[start : start + step, None], a, 0.0)  # NaN-safe
            for s in stats:
                s.reduction.combine_(self.values[s.name], s.chunk(a))

    def _update_fused(
        self, x: torch.Tensor, keep: torch.Tensor | None, fields: Iterable[str]
    ) -> None:
        stats = self._held(fields)
        slow = [s.name for s in stats if s.fused is None]
        if slow:
            self._update_chunked(x, keep, slow)
        if len(slow) == len(stats):
            return
        if keep is not None:
            x = torch.where(keep[:, None], x, 0)  # (N, C), x's dtype; NaN-safe
        for s in stats:
            if s.fused is not None:
                s.reduction.combine_(self.values[s.name], s.fused(x))

    def merge(self, other: ChannelStats) -> ChannelStats:
        """Exact statistics of the union of both token sets."""
        if other.n_channels != self.n_channels:
            raise ValueError(f"cannot merge {self.n_channels} with {other.n_channels} channels")
        if set(other.values) != set(self.values):
            raise ValueError(
                f"cannot merge statistics {list(self.values)} with {list(other.values)}"
            )
        o = other.to(self.count.device)
        out = self.clone()
        out.count += o.count
        for name, v in out.values.items():
            reduction_of(name).combine_(v, o.values[name])
        return out

    def to(self, device: Any) -> ChannelStats:
        return ChannelStats(
            self.count.to(device), **{n: v.to(device) for n, v in self.values.items()}
        )

    def clone(self) -> ChannelStats:
        return ChannelStats(self.count.clone(), **{n: v.clone() for n, v in self.values.items()})

    def mean(self, name: str) -> torch.Tensor:
        """Per-token mean (C,) of a sum statistic: total / count; zeros without tokens."""
        total = self.values[name]
        return total / self.count if float(self.count) > 0 else torch.zeros_like(total)

    def score(self, name: str) -> torch.Tensor:
        """The registered score ``name`` (C,) of these statistics."""
        return SCORES.get(name)(self)


class QKStats:
    """ChannelStats for every (layer, "q"|"k") key. Immutable merges; in-place updates."""

    def __init__(self, entries: Mapping[Key, ChannelStats] | None = None):
        self.entries: dict[Key, ChannelStats] = dict(entries or {})

    @classmethod
    def empty(
        cls, row_counts: Mapping[Key, int], device: Any = None, fields: Fields = None
    ) -> QKStats:
        """Zero statistics for every key holding ``fields`` (default: every registered
        statistic), e.g. ``QKStats.empty(layout.row_counts())``; views of one buffer."""
        return cls(_zeroed(row_counts, statistic_names(fields), device))

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

    def fields(self) -> tuple[str, ...]:
        """``count`` and the statistics every key holds, sorted."""
        held = [set(v.values) for v in self.entries.values()]
        return (COUNT, *sorted(set.intersection(*held) if held else ()))

    def update(self, key: Key, x: torch.Tensor, mask: Tensor | None = None, fields: Fields = None):
        """Add the tokens of x (..., C) [where mask (...) is True] to ``key`` (created on
        x's device holding ``fields`` if new); ``fields`` as in ``ChannelStats.update_``."""
        if key not in self.entries:
            self.entries[key] = ChannelStats.zeros(x.shape[-1], x.device, fields)
        elif self.entries[key].count.device != x.device:  # e.g. CPU-offloaded params
            self.entries[key] = self.entries[key].to(x.device)
        self.entries[key].update_(x, mask, fields)

    def token_count(self, key: Key) -> float:
        return float(self.entries[key].count) if key in self.entries else 0.0

    def score(self, key: Key, name: str) -> torch.Tensor:
        """The registered score ``name`` (C,) of ``key``."""
        return self.entries[key].score(name)

    # ---- merging ---------------------------------------------------------------------
    def merge(self, other: QKStats) -> QKStats:
        """Exact merge; keys present on one side only are copied."""
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
                key_str(k): {
                    f: t.detach().cpu().clone() for f, t in [(COUNT, v.count), *v.values.items()]
                }
                for k, v in sorted(self.entries.items())
            },
        }

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, Any]) -> QKStats:
        if sd.get("format") != 1:
            raise ValueError(f"unknown QKStats format {sd.get('format')!r}")
        entries = {}
        for k, v in sd["entries"].items():
            t = {f: torch.as_tensor(x, dtype=torch.float64) for f, x in v.items()}
            if COUNT not in t:
                raise ValueError(f"statistics of {k} have no {COUNT!r}")
            entries[parse_key(k)] = ChannelStats(t.pop(COUNT), **t)
        return cls(entries)

    def layout(self) -> list[tuple[Key, int]]:
        """(key, n_channels) in the fixed order used by the flat form."""
        return [(k, self.entries[k].n_channels) for k in self.keys()]

    def to_fields(self, fields: Fields = None, device: Any = "cpu") -> dict[str, torch.Tensor]:
        """Per-field flat float64 vectors on ``device`` in sorted key order: ``count`` (K,)
        with one entry per key, each statistic (R,) with every key's channels end to end.
        ``fields`` default: :meth:`fields`."""
        entries = [self.entries[k] for k in self.keys()]
        fields = self.fields() if fields is None else tuple(fields)
        statistics_for(fields)  # unknown names raise
        out = {}
        for f in fields:
            parts = [e.count.reshape(1) if f == COUNT else e.values.get(f) for e in entries]
            if any(p is None for p in parts):
                raise ValueError(f"not every key holds {f!r}; all hold {self.fields()}")
            flat = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)
            out[f] = flat.to(device, torch.float64)
        return out

    @classmethod
    def from_fields(
        cls, layout: Iterable[tuple[Key, int]], flat: Mapping[str, torch.Tensor]
    ) -> QKStats:
        """Inverse of :meth:`to_fields` over ``layout`` ((key, channels), sorted keys):
        every key holds the statistics in ``flat`` (views of one copy of each vector)."""
        layout = list(layout)
        check_fields(layout, flat)
        sizes = [c for _, c in layout]
        count = flat[COUNT].clone()
        split = {f: torch.split(v.clone(), sizes) for f, v in flat.items() if f != COUNT}
        return cls({
            key: ChannelStats(count[j], **{f: parts[j] for f, parts in split.items()})
            for j, (key, _) in enumerate(layout)
        })  # fmt: skip

    def all_reduce(self, group: Any = None, device: Any = None) -> QKStats:
        """Exact merge over a process group: one collective per reduction (sum, max).
        Every rank must hold the same keys, channel counts and statistics (create them
        with :meth:`empty`). ``device``: where the collectives run (CUDA for NCCL)."""
        import torch.distributed as dist

        if not self.entries:
            return QKStats()
        flat = self.to_fields(device=device or self.entries[self.keys()[0]].count.device)
        groups: dict[str, list[str]] = {}
        for f in flat:  # sorted fields: the same collectives in the same order everywhere
            groups.setdefault(reduction_of(f).name, []).append(f)
        for red, names in groups.items():
            buf = torch.cat([flat[f] for f in names])
            op = getattr(dist.ReduceOp, REDUCTIONS.get(red).dist_op)
            dist.all_reduce(buf, op=op, group=group)
            flat.update(zip(names, torch.split(buf, [flat[f].numel() for f in names])))
        return QKStats.from_fields(self.layout(), flat)


def check_fields(layout: Iterable[tuple[Key, int]], flat: Mapping[str, Any]) -> None:
    """Raise unless ``flat`` has the form ``QKStats.to_fields`` gives over ``layout``:
    ``count`` (K,) and at least one registered statistic (R,)."""
    layout = list(layout)
    rows = sum(c for _, c in layout)
    statistics_for(tuple(flat))
    if COUNT not in flat or len(flat) < 2:
        raise ValueError(
            f"statistics fields {sorted(flat)} need {COUNT!r} and at least one statistic "
            f"({', '.join(STATISTICS.names())})"
        )
    for f, v in flat.items():
        want = len(layout) if f == COUNT else rows
        if tuple(v.shape) != (want,):
            raise ValueError(
                f"statistics field {f!r} of shape {tuple(v.shape)} does not fit the layout "
                f"({len(layout)} keys, {rows} channels)"
            )


def merge(*stats: QKStats) -> QKStats:
    """Exact merge of any number of statistics."""
    out = QKStats()
    for s in stats:
        out = out.merge(s)
    return out


@torch.no_grad()
def _ema_channel(prev: ChannelStats, new: ChannelStats, decay: float) -> ChannelStats:
    """EMA of one key (see module docstring)."""
    if float(prev.count) <= 0:
        return new.clone()
    if float(new.count) <= 0:
        return prev.clone()
    new = new.to(prev.count.device)
    a, b = decay, 1.0 - decay
    count = a * prev.count + b * new.count
    values = {}
    for name, v in new.values.items():
        known = name in prev.values
        if reduction_of(name).per_token_ema:
            mean = a * prev.mean(name) + b * new.mean(name) if known else new.mean(name)
            values[name] = mean * count
        else:
            values[name] = a * prev.values[name] + b * v if known else v.clone()
    return ChannelStats(count, **values)


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
        out[k] = _ema_channel(out[k], v, decay) if k in out else v.clone()
    return QKStats(out)
