"""The reproduction report's statistics, checked against hand-computed values."""

from __future__ import annotations

import math

import pytest

from longact.demo.reproduce import mean_ci, verdict, welch


def test_mean_ci_three_seeds():
    # mean 0.5, sample sd 0.1, t(2) = 4.303: half-width 4.303 * 0.1 / sqrt(3)
    m, h = mean_ci([0.4, 0.5, 0.6])
    assert m == pytest.approx(0.5)
    assert h == pytest.approx(4.303 * 0.1 / math.sqrt(3))


def test_mean_ci_single_value_has_no_interval():
    m, h = mean_ci([0.7])
    assert m == 0.7 and math.isnan(h)


def test_welch_difference_and_interval():
    a, b = [0.8, 0.9, 1.0], [0.4, 0.5, 0.6]
    d, h = welch(a, b)
    # equal variances 0.01: se = sqrt(2 * 0.01 / 3), df = 4, t(4) = 2.776
    assert d == pytest.approx(0.4)
    assert h == pytest.approx(2.776 * math.sqrt(0.02 / 3))
    assert verdict(d, h) == "LongAct won"
    assert verdict(-d, h) == "LongAct lost"
    assert verdict(0.01, h) == "tied"


def test_welch_identical_constant_arms_tie():
    d, h = welch([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
    assert d == 0 and h == 0
    assert verdict(d, h) == "tied"
