"""The reproduction report's statistics, checked against hand-computed values."""

from __future__ import annotations

import math

import pytest

from longact.eval.stats import mean_ci, verdict, welch


def test_mean_ci_three_seeds():
    # mean 0.5, sample sd 0.1, t(2) = 4.303: half-width 4.303 * 0.1 / sqrt(3)
    m, h = mean_ci([0.4, 0.5, 0.6])
    assert m == pytest.approx(0.5)
    assert h == pytest.approx(4.303 * 0.1 / math.sqrt(3), rel=1e-4)  # 3-decimal table


def test_mean_ci_single_value_has_no_interval():
    m, h = mean_ci([0.7])
    assert m == 0.7 and math.isnan(h)


def test_welch_difference_and_interval():
    a, b = [0.8, 0.9, 1.0], [0.4, 0.5, 0.6]
    d, h = welch(a, b)
    # equal variances 0.01: se = sqrt(2 * 0.01 / 3), df = 4, t(4) = 2.776
    assert d == pytest.approx(0.4)
    assert h == pytest.approx(2.776 * math.sqrt(0.02 / 3), rel=5e-4)  # 3-decimal table
    assert verdict(d, h) == "LongAct won"
    assert verdict(-d, h) == "LongAct lost"
    assert verdict(0.01, h) == "tied"


def test_welch_identical_constant_arms_tie():
    d, h = welch([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
    assert d == 0 and h == 0
    assert verdict(d, h) == "tied"


@pytest.mark.parametrize(
    ("df", "expected"),
    # two-sided 95% critical values of Student's t (printed tables, 3 decimals)
    [
        (1, 12.706),
        (2, 4.303),
        (5, 2.571),
        (9, 2.262),
        (10, 2.228),
        (15, 2.131),
        (20, 2.086),
        (29, 2.045),
        (30, 2.042),
        (60, 2.000),
        (120, 1.980),
        (1e6, 1.960),
    ],
)
def test_t_quantile_matches_the_tables(df, expected):
    from longact.eval.stats import t975

    assert t975(df) == pytest.approx(expected, abs=5e-4)


def test_t_quantile_for_welch_fractional_df_and_symmetry():
    from longact.eval.stats import t_cdf, t_quantile

    q = t_quantile(0.975, 7.5)  # between t(7) = 2.365 and t(8) = 2.306
    assert 2.306 < q < 2.365 and t_cdf(q, 7.5) == pytest.approx(0.975, abs=1e-10)
    assert t_quantile(0.025, 4) == pytest.approx(-t_quantile(0.975, 4))
    assert t_cdf(0.0, 3) == pytest.approx(0.5)


def test_no_spread_or_one_seed_gives_no_verdict():
    d, h = welch([0.6, 0.6, 0.6], [0.5, 0.5, 0.5])  # a standard error of 0 proves nothing
    assert d == pytest.approx(0.1) and math.isnan(h) and verdict(d, h) == "n/a"
    d, h = welch([0.7], [0.5, 0.6])  # one seed: no variance to estimate
    assert math.isnan(h) and verdict(d, h) == "n/a"


def test_wilson_matches_textbook_values():
    """Wilson 95% intervals: 8/10 -> (0.4902, 0.9433), 0/10 -> (0, 0.2775)
    (Newcombe 1998, Table I method 3 / Brown, Cai & DasGupta 2001)."""
    from longact.eval.stats import wilson

    assert wilson(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    low, high = wilson(0, 0)
    assert low != low and high != high  # nan: no prompts, no interval


def test_paired_without_spread_gives_no_verdict():
    """Two seeds with the same nonzero difference: a zero-width t interval would call it
    a sure loss; there is no interval instead. Identical zeros are a tie."""
    from longact.eval.stats import paired, pooled_paired

    same = paired({1: 0.5, 2: 0.25}, {1: 0.5 + 1 / 128, 2: 0.25 + 1 / 128})
    assert math.isnan(same.half) and same.verdict() == "n/a"
    assert paired({1: 0.5, 2: 0.25}, {1: 0.5, 2: 0.25}).verdict() == "tied"
    pooled = pooled_paired({1: {384: 0.5}, 2: {384: 0.4}}, {1: {384: 0.6}, 2: {384: 0.5}}, [384])
    assert math.isnan(pooled.half) and pooled.n == 2
