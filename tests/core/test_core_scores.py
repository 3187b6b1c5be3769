"""The statistics and score registries: declarations, their errors, and a statistic
declared in a test behaving like a built-in one (accumulation on both paths, exact
merges by its declared reduction, EMA rule, flat form, scoring)."""

import math

import pytest
import torch

from longact.core.scores import (
    REDUCTIONS,
    SCORES,
    STATISTICS,
    fields_for,
    register_score,
    register_statistic,
    scoped_registrations,
)
from longact.core.stats import ChannelStats, QKStats, ema

X = torch.tensor([[1.0, -2.0], [3.0, 4.0], [-5.0, 0.0]])  # 3 tokens x 2 channels
BUILT_IN = (["max_abs", "sum_abs", "sum_sq"], ["max_abs", "mean_abs", "rms"])


def _close(a, b):
    torch.testing.assert_close(
        torch.as_tensor(a, dtype=torch.float64),
        torch.as_tensor(b, dtype=torch.float64),
        rtol=1e-12,
        atol=1e-12,
    )


@pytest.fixture
def cubes():
    """Two statistics and a score over them, registered for one test only."""
    with scoped_registrations():

        @register_statistic("sum_cube", reduce="sum")  # no fused kernel: chunks everywhere
        def _sum_cube(a):
            return a.pow(3).sum(0)

        @register_statistic("max_cube", reduce="max", fused=lambda x: x.abs().amax(0).double() ** 3)
        def _max_cube(a):
            return a.pow(3).amax(0)

        @register_score("cube_ratio", needs=("max_cube", "sum_cube"))
        def _cube_ratio(s):
            return s.max_cube / s.mean("sum_cube")

        yield ("count", "max_cube", "sum_cube")
    assert (STATISTICS.names(), SCORES.names()) == BUILT_IN


def test_built_in_declarations():
    assert (STATISTICS.names(), SCORES.names()) == BUILT_IN
    assert {n: STATISTICS.get(n).reduction.name for n in STATISTICS} == {
        "max_abs": "max",
        "sum_abs": "sum",
        "sum_sq": "sum",
    }
    assert {n: SCORES.get(n).needs for n in SCORES} == {
        "max_abs": ("max_abs",),
        "mean_abs": ("sum_abs",),
        "rms": ("sum_sq",),
    }
    assert fields_for("rms") == ("count", "sum_sq")
    assert fields_for("rms", "mean_abs", "rms") == ("count", "sum_abs", "sum_sq")
    assert REDUCTIONS.get("sum").per_token_ema and not REDUCTIONS.get("max").per_token_ema
    with pytest.raises(ValueError, match="unknown score 'l2'; valid: max_abs, mean_abs, rms"):
        fields_for("l2")


def test_declaration_errors_name_the_problem():
    with scoped_registrations():
        with pytest.raises(ValueError, match="statistic 'sum_abs' is already registered"):
            register_statistic("sum_abs", reduce="sum")(lambda a: a.sum(0))
        with pytest.raises(ValueError, match="unknown reduction 'mean'; valid: max, sum"):
            register_statistic("avg_abs", reduce="mean")
        with pytest.raises(ValueError, match="'count' is the token count"):
            register_statistic("count", reduce="sum")
        for bad in ("_hidden", "has space", ""):
            with pytest.raises(ValueError, match="must be an identifier not starting with '_'"):
                register_statistic(bad, reduce="sum")
        with pytest.raises(ValueError, match="unknown statistic 'sum_p4'; valid: max_abs, sum"):
            register_score("kurtosis", needs=("sum_p4", "sum_sq"))
        with pytest.raises(ValueError, match="score 'nothing' must name the statistics"):
            register_score("nothing", needs=())
        with pytest.raises(ValueError, match="score 'rms' is already registered"):
            register_score("rms", needs=("sum_sq",))(lambda s: s.mean("sum_sq"))
        # a statistic named like a ChannelStats member could not be read as s.<name>
        register_statistic("merge", reduce="sum")(lambda a: a.sum(0))
        with pytest.raises(ValueError, match="statistic 'merge' is also a ChannelStats attr"):
            ChannelStats.zeros(2, fields=("merge",))
    assert "merge" not in STATISTICS and "kurtosis" not in SCORES


def test_a_registered_statistic_accumulates_merges_and_scores_like_a_built_in(cubes):
    s = ChannelStats.of(X, fields=cubes)
    assert list(s.values) == ["max_cube", "sum_cube"]
    _close(s.sum_cube, [1 + 27 + 125, 8 + 64 + 0])
    _close(s.max_cube, [125, 64])
    _close(s.score("cube_ratio"), [125 / (153 / 3), 64 / (72 / 3)])
    with pytest.raises(ValueError, match=r"needs statistic\(s\) \['sum_abs'\]"):
        s.score("mean_abs")

    # merging by the declared reductions equals the statistics of all tokens
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 6, generator=g) * torch.rand(6, generator=g) * 3
    whole = ChannelStats.of(x, fields=cubes)
    parts = [ChannelStats.of(x[i : i + 10], fields=cubes) for i in range(0, 50, 10)]
    merged = parts[0]
    for p in parts[1:]:
        merged = merged.merge(p)
    _close(merged.count, 50)
    _close(merged.sum_cube, whole.sum_cube)
    assert torch.equal(merged.max_cube, whole.max_cube)  # maxima merge exactly

    # the flat form carries them; from_fields restores them
    a = QKStats.empty({(0, "q"): 6, (0, "k"): 6}, fields=cubes)
    a.update((0, "q"), x)
    a.update((0, "k"), -x[:7])
    flat = a.to_fields()
    assert sorted(flat) == list(cubes)
    back = QKStats.from_fields(a.layout(), flat)
    for key in a:
        for f in cubes:
            assert torch.equal(getattr(back[key], f), getattr(a[key], f))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_registered_statistic_agrees_on_both_update_paths(cubes, dtype):
    """The accelerator path uses a statistic's fused kernel, or its chunks when it has
    none; both match the CPU path, masked NaN padding dropped."""
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(1500, 8, generator=g) * 2).to(dtype)
    keep = torch.rand(1500, generator=g) > 0.3
    x[~keep] = float("nan")
    a = ChannelStats.zeros(8, fields=cubes)
    b = ChannelStats.zeros(8, fields=cubes)
    a._update_chunked(x, keep, cubes)
    b._update_fused(x, keep, cubes)
    assert torch.equal(a.max_cube, b.max_cube)  # exact |x| maxima, cubed in float64
    torch.testing.assert_close(a.sum_cube, b.sum_cube, rtol=1e-12, atol=0)
    ref = x[keep].double().abs()
    _close(a.sum_cube, ref.pow(3).sum(0))
    _close(a.max_cube, ref.pow(3).amax(0))


def test_ema_follows_each_statistics_declared_reduction(cubes):
    """Sums blend per-token means, maxima blend values (windows of 3 and 1 tokens)."""
    prev = QKStats.empty({(0, "q"): 2}, fields=cubes)
    prev.update((0, "q"), X)  # sum_cube [153, 72] over 3 tokens, max_cube [125, 64]
    new = QKStats.empty({(0, "q"): 2}, fields=cubes)
    new.update((0, "q"), torch.tensor([[2.0, -1.0]]))  # [8, 1] over 1 token
    e = ema(prev, new, 0.75)[(0, "q")]
    _close(e.count, 0.75 * 3 + 0.25 * 1)
    _close(e.mean("sum_cube"), [0.75 * 51 + 0.25 * 8, 0.75 * 24 + 0.25 * 1])
    _close(e.max_cube, [0.75 * 125 + 0.25 * 8, 0.75 * 64 + 0.25 * 1])
    assert math.isfinite(float(e.score("cube_ratio").sum()))


def test_scoped_registrations_leave_nothing_behind():
    with scoped_registrations():
        register_statistic("tmp_max", reduce="max")(lambda a: a.amax(0))
        register_score("tmp", needs=("tmp_max",))(lambda s: s.tmp_max)
        assert fields_for("tmp", "mean_abs") == ("count", "sum_abs", "tmp_max")
        ChannelStats.zeros(2, fields=("tmp_max",))  # resolved, and cached, while registered
    assert (STATISTICS.names(), SCORES.names()) == BUILT_IN
    with pytest.raises(ValueError, match="unknown statistics field 'tmp_max'"):
        ChannelStats.zeros(2, fields=("tmp_max",))
    with pytest.raises(ValueError, match="unknown score 'tmp'"):
        fields_for("tmp")


def test_all_reduce_runs_one_collective_per_declared_reduction(monkeypatch, cubes):
    """Two ranks simulated in one process: each collective combines this rank's buffer
    with the other's by its op; the result is the exact merge of both ranks."""
    import torch.distributed as dist

    fields = (*cubes, "sum_sq")
    g = torch.Generator().manual_seed(2)
    ranks = []
    for r in range(2):
        s = QKStats.empty({(0, "q"): 4, (1, "k"): 3}, fields=fields)
        s.update((0, "q"), torch.randn(5 + r, 4, generator=g) * 3)
        if r:  # (1, "k") has tokens on rank 1 only
            s.update((1, "k"), torch.randn(4, 3, generator=g))
        ranks.append(s)
    sent = []
    monkeypatch.setattr(dist, "all_reduce", lambda buf, op, group=None: sent.append(buf.clone()))
    ranks[1].all_reduce()  # records rank 1's buffers, in collective order
    ops = []

    def combine(buf, op, group=None):
        ops.append(op)
        other = sent[len(ops) - 1]
        buf.copy_(buf + other if op == dist.ReduceOp.SUM else torch.maximum(buf, other))

    monkeypatch.setattr(dist, "all_reduce", combine)
    out = ranks[0].all_reduce()
    assert ops == [dist.ReduceOp.SUM, dist.ReduceOp.MAX]  # count, sum_cube, sum_sq | max_cube
    want = ranks[0].merge(ranks[1])
    assert out.fields() == ("count", *fields[1:])
    for key in want:
        assert torch.equal(out[key].max_cube, want[key].max_cube)
        for f in ("count", "sum_cube", "sum_sq"):
            _close(getattr(out[key], f), getattr(want[key], f))
