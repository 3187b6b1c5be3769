"""Statistics of the reproduction report: exact Student t intervals, unpaired and paired.

Pure Python (no numpy, no scipy). ``t_quantile`` inverts the Student t CDF, computed from
the regularized incomplete beta function, to 1e-12: any ``df > 0``, fractional included
(Welch). The paired analysis is the one the grid is built for: every arm runs the same
seeds on the same data order, so per-seed differences from the reference arm (plain RL)
remove the seed-to-seed spread the arms share.

- :func:`paired`: mean of per-seed differences and its 95% t interval (df = n - 1);
- :func:`pooled_paired`: each seed's difference averaged over several lengths first,
  then the same interval over seeds (lengths of one seed are not independent, so they
  are not counted as extra samples).

For accuracies on n prompts (``longact ablate``, the demo): :func:`wilson`, the 95% Wilson
score interval of a proportion; the paired difference of two models or two arms on the
same prompts is :func:`mean_ci` over the per-prompt score differences.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for num in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularized incomplete beta function, for 0 <= x <= 1."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    lbeta = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    front = math.exp(lbeta + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` (> 0, not necessarily whole) degrees of freedom."""
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t (bisection on :func:`t_cdf`, to 1e-12)."""
    if not (0.0 < p < 1.0) or not df > 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
        if hi - lo < 1e-12:
            break
    return (lo + hi) / 2.0


def t975(df: float) -> float:
    """Two-sided 95% critical value of Student's t (exact, any df > 0)."""
    return t_quantile(0.975, df)


def mean_ci(xs: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% confidence interval."""
    m = statistics.fmean(xs)
    if len(xs) < 2:
        return m, float("nan")
    return m, t975(len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs))


Z975 = 1.959963984540054  # two-sided 95% normal quantile


def wilson(successes: float, n: int) -> tuple[float, float]:
    """95% Wilson score interval (low, high) of a proportion ``successes / n``; scores in
    [0, 1] that are not 0/1 enter through their sum. n = 0 gives (nan, nan)."""
    if n <= 0:
        return float("nan"), float("nan")
    p, z2 = successes / n, Z975**2
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z975 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))


def welch(a: list[float], b: list[float]) -> tuple[float, float]:
    """Difference of means (a - b) and the half-width of its 95% Welch interval.

    The half-width is NaN (no verdict) with fewer than 2 seeds in an arm, or when both
    arms have no spread but different means (no interval can be formed); two identical
    constant arms give 0 (a tie)."""
    diff = statistics.fmean(a) - statistics.fmean(b)
    if len(a) < 2 or len(b) < 2:
        return diff, float("nan")
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return diff, (0.0 if diff == 0 else float("nan"))
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return diff, t975(df) * se


def verdict(diff: float, half: float) -> str:
    if math.isnan(half):
        return "n/a"
    if diff - half > 0:
        return "LongAct won"
    if diff + half < 0:
        return "LongAct lost"
    return "tied"


@dataclass(frozen=True)
class Interval:
    """A mean with the half-width of its 95% interval over ``n`` paired seeds."""

    mean: float
    half: float  # NaN: no interval (fewer than 2 seeds)
    n: int

    @property
    def low(self) -> float:
        return self.mean - self.half

    @property
    def high(self) -> float:
        return self.mean + self.half

    def verdict(self) -> str:
        """ "better" / "worse" when the interval excludes 0, "tied" otherwise."""
        if math.isnan(self.half):
            return "n/a"
        if self.low > 0:
            return "better"
        if self.high < 0:
            return "worse"
        return "tied"


def _seed_interval(diffs: list[float]) -> Interval:
    """The t interval of per-seed differences. Identical nonzero differences (no spread,
    common with 2 seeds and accuracies on a 1/n grid) give no interval rather than a
    zero-width one, as in :func:`welch`; identical zeros are a tie."""
    m, h = mean_ci(diffs)
    if h == 0 and m != 0:
        h = float("nan")
    return Interval(m, h, len(diffs))


def paired(arm: Mapping[int, float], reference: Mapping[int, float]) -> Interval:
    """Per-seed differences ``arm[s] - reference[s]`` over the seeds both have."""
    seeds = sorted(set(arm) & set(reference))
    if not seeds:
        return Interval(float("nan"), float("nan"), 0)
    diffs = [arm[s] - reference[s] for s in seeds]
    return _seed_interval(diffs)


def pooled_paired(
    arm: Mapping[int, Mapping[int, float]],
    reference: Mapping[int, Mapping[int, float]],
    lengths: Sequence[int],
) -> Interval:
    """{seed: {length: accuracy}} of two arms -> the paired interval of the per-seed
    difference averaged over ``lengths`` (seeds missing a length are left out)."""
    seeds = [
        s
        for s in sorted(set(arm) & set(reference))
        if all(n in arm[s] and n in reference[s] for n in lengths)
    ]
    if not seeds or not lengths:
        return Interval(float("nan"), float("nan"), 0)
    diffs = [statistics.fmean(arm[s][n] - reference[s][n] for n in lengths) for s in seeds]
    return _seed_interval(diffs)
