"""What a mask score needs, declared in one place: statistics and the scores over them.

A *statistic* is one float64 value per channel of a projection, gathered from the
magnitudes |x| of its activations. Its declaration is all the rest of LongAct reads:

* how it accumulates: ``chunk`` maps the float64 |x| of n tokens (n, C) to a (C,)
  partial; the optional ``fused`` maps the activation in its own dtype (N, C) to the same
  (C,) float64 partial in fewer kernels, and is used on accelerators (without it, the
  float64 chunks run there too; see ``ChannelStats.update_``);
* its reduction (``REDUCTIONS``), which combines partials everywhere - within a capture,
  across micro-batches, across ranks at the coordinator, in ``QKStats.all_reduce``
  (``dist_op``) - and decides the EMA across refreshes: a ``sum`` statistic is a total
  over tokens, so the EMA blends its per-token mean (total / count); a ``max`` statistic
  is already per token, the EMA blends the value itself.

Every statistic starts at 0, and a masked-out token reaches ``chunk`` / ``fused`` as a
row of zeros (the hot path never gathers), so a statistic must be one a zero row leaves
unchanged: sums of |x|^p (p > 0), maxima of |x|. Then merging equals accumulating the
concatenated tokens (up to float64 addition order for sums; exactly for maxima).

A *score* ranks the channels of one (layer, proj): it names the statistics it needs and
maps a ChannelStats holding them to (C,) float64. :func:`fields_for` turns score names
into the fields to accumulate and send (``count`` plus the union of their statistics);
the wire payload and the coordinator's merge follow from it. Adding a score, here or in
user code imported before the run starts (on every rank and in the coordinator's process:
registrations are per process), takes one ``register_statistic`` per new statistic and one
``register_score``::

    @register_statistic("sum_p4", reduce="sum")
    def _sum_p4(a):  # a: float64 |x| (n, C)
        return a.pow(4).sum(0)

    @register_score("kurtosis", needs=("sum_p4", "sum_sq"))
    def score_kurtosis(s):  # s: ChannelStats
        return s.mean("sum_p4") / s.mean("sum_sq").square()

Built in: statistics ``sum_abs`` (sum of |x|), ``sum_sq`` (sum of x^2), ``max_abs`` (max
of |x|); scores ``mean_abs = sum_abs / count`` (the paper's magnitude, AWQ's choice, the
default), ``rms = sqrt(sum_sq / count)`` and ``max_abs``. A key with no tokens scores 0
on the mean-based scores. ``count`` (tokens seen, one per key, summed) is not a statistic:
every ChannelStats has it.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from longact.registry import Registry

if TYPE_CHECKING:
    from longact.core.stats import ChannelStats

COUNT = "count"  # tokens seen per key: in every ChannelStats, reduced by sum


@dataclass(frozen=True)
class Reduction:
    """How partials of a statistic combine, across ranks too, and how its EMA blends."""

    name: str
    combine_: Callable[[torch.Tensor, torch.Tensor], Any]  # in place: acc <- acc (op) part
    dist_op: str  # the torch.distributed.ReduceOp member doing the same across ranks
    per_token_ema: bool  # True: EMA on total / count (a total over tokens); False: on values


REDUCTIONS: Registry[Reduction] = Registry("reduction")
REDUCTIONS.add("sum", Reduction("sum", torch.Tensor.add_, "SUM", per_token_ema=True))
REDUCTIONS.add(
    "max",
    Reduction("max", lambda acc, v: torch.maximum(acc, v, out=acc), "MAX", per_token_ema=False),
)


@dataclass(frozen=True)
class Statistic:
    """A per-channel statistic of |x| (see module docstring)."""

    name: str
    reduction: Reduction
    chunk: Callable[[torch.Tensor], torch.Tensor]  # float64 |x| (n, C) -> (C,)
    fused: Callable[[torch.Tensor], torch.Tensor] | None = None  # x (N, C) -> (C,) float64


@dataclass(frozen=True)
class Score:
    """Channel scores (C,) from a ChannelStats holding the statistics in ``needs``."""

    name: str
    needs: tuple[str, ...]
    fn: Callable[[ChannelStats], torch.Tensor]

    def __call__(self, stats: ChannelStats) -> torch.Tensor:
        missing = [n for n in self.needs if n not in stats.values]
        if missing:
            raise ValueError(
                f"score {self.name!r} needs statistic(s) {missing}, but these statistics "
                f"hold only {list(stats.values)}; accumulate and send "
                f"fields_for({self.name!r}) = {list(fields_for(self.name))}"
            )
        return self.fn(stats)


STATISTICS: Registry[Statistic] = Registry("statistic")
SCORES: Registry[Score] = Registry("score")


def register_statistic(
    name: str, reduce: str, fused: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> Callable[[Callable], Callable]:
    """Decorator: register the decorated ``chunk`` function as statistic ``name``
    reduced by ``reduce`` (a name in ``REDUCTIONS``), with an optional ``fused`` kernel."""
    if not isinstance(name, str) or not name.isidentifier() or name.startswith("_"):
        raise ValueError(f"statistic name {name!r} must be an identifier not starting with '_'")
    if name == COUNT:
        raise ValueError(f"{COUNT!r} is the token count every ChannelStats has, not a statistic")
    reduction = REDUCTIONS.get(reduce)

    def deco(chunk: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
        STATISTICS.add(name, Statistic(name, reduction, chunk, fused))
        return chunk

    return deco


def register_score(name: str, needs: Iterable[str]) -> Callable[[Callable], Callable]:
    """Decorator: register the decorated ``fn(stats) -> (C,)`` as score ``name``, reading
    the registered statistics ``needs``."""
    needs = tuple(needs)
    if not needs:
        raise ValueError(f"score {name!r} must name the statistics it needs")
    for n in needs:
        STATISTICS.get(n)  # an unknown name raises, listing the registered statistics

    def deco(fn: Callable[[ChannelStats], torch.Tensor]) -> Callable:
        SCORES.add(name, Score(name, needs, fn))
        return fn

    return deco


def statistics_for(fields: Iterable[str]) -> tuple[Statistic, ...]:
    """The registered statistics named in ``fields`` (``count`` skipped), sorted by name;
    an unknown name raises, listing the valid fields."""
    return _statistics_for(tuple(fields))


@functools.cache  # registrations are never removed: a name that resolved stays valid
def _statistics_for(fields: tuple[str, ...]) -> tuple[Statistic, ...]:
    from longact.core.stats import ChannelStats  # (stats imports this module)

    out = {}
    for n in fields:
        if n == COUNT:
            continue
        if n not in STATISTICS:
            valid = ", ".join((COUNT, *STATISTICS.names()))
            raise ValueError(f"unknown statistics field {n!r}; valid: {valid}")
        if hasattr(ChannelStats, n):  # s.<name> would not read the statistic
            raise ValueError(f"statistic {n!r} is also a ChannelStats attribute; rename it")
        out[n] = STATISTICS.get(n)
    return tuple(out[n] for n in sorted(out))


def statistic_names(fields: Iterable[str] | None) -> list[str]:
    """The statistic names in ``fields``, sorted (None: every registered statistic)."""
    return STATISTICS.names() if fields is None else [s.name for s in statistics_for(fields)]


def reduction_of(field: str) -> Reduction:
    """How ``field`` (``count`` or a statistic) reduces."""
    return REDUCTIONS.get("sum") if field == COUNT else statistics_for((field,))[0].reduction


@contextlib.contextmanager
def scoped_registrations() -> Iterator[None]:
    """Statistics and scores registered inside the ``with`` block are removed on exit
    (tests: a registration otherwise lasts as long as the process)."""
    before = {reg: set(reg.names()) for reg in (SCORES, STATISTICS)}
    try:
        yield
    finally:
        for reg, names in before.items():
            for name in set(reg.names()) - names:
                reg.remove(name)
        _statistics_for.cache_clear()


def fields_for(*scores: str) -> tuple[str, ...]:
    """``count`` and every statistic the named scores need, sorted: what to accumulate
    and send so that those scores can be computed."""
    return (COUNT, *sorted({n for s in scores for n in SCORES.get(s).needs}))


# ---- built-in statistics ---------------------------------------------------------------
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


@register_statistic("sum_abs", reduce="sum", fused=lambda x: _blocked_sum(x, 1))
def _sum_abs(a: torch.Tensor) -> torch.Tensor:
    return a.sum(0)


@register_statistic("sum_sq", reduce="sum", fused=lambda x: _blocked_sum(x, 2))
def _sum_sq(a: torch.Tensor) -> torch.Tensor:
    return a.square().sum(0)


def _amax_fused(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x, math.inf, dim=0).double()  # exact in any dtype


@register_statistic("max_abs", reduce="max", fused=_amax_fused)
def _max_abs(a: torch.Tensor) -> torch.Tensor:
    return a.amax(0)


# ---- built-in scores -------------------------------------------------------------------
@register_score("mean_abs", needs=("sum_abs",))
def score_mean_abs(s: ChannelStats) -> torch.Tensor:
    return s.mean("sum_abs")


@register_score("rms", needs=("sum_sq",))
def score_rms(s: ChannelStats) -> torch.Tensor:
    return s.mean("sum_sq").sqrt()


@register_score("max_abs", needs=("max_abs",))
def score_max_abs(s: ChannelStats) -> torch.Tensor:
    return s.values["max_abs"]
