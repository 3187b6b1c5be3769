"""QKStats: hand-computed statistics, exact merges, serialization, EMA, held fields."""

import math

import pytest
import torch

import longact.core.stats as stats_mod
from longact.core.scores import STATISTICS
from longact.core.stats import ChannelStats, QKStats, ema, merge

X = torch.tensor([[1.0, -2.0], [3.0, 4.0], [-5.0, 0.0]])  # 3 tokens x 2 channels


def _close(a, b):
    torch.testing.assert_close(
        torch.as_tensor(a, dtype=torch.float64),
        torch.as_tensor(b, dtype=torch.float64),
        rtol=1e-12,
        atol=1e-12,
    )


def test_channel_stats_by_hand():
    s = ChannelStats.of(X)
    _close(s.count, 3)
    _close(s.sum_abs, [9, 6])
    _close(s.sum_sq, [35, 20])
    _close(s.max_abs, [5, 4])
    _close(s.score("mean_abs"), [3, 2])
    _close(s.score("rms"), [math.sqrt(35 / 3), math.sqrt(20 / 3)])
    _close(s.score("max_abs"), [5, 4])
    assert s.sum_abs.dtype == torch.float64
    assert list(s.values) == ["max_abs", "sum_abs", "sum_sq"]  # every registered, sorted
    empty = ChannelStats.zeros(2)
    _close(empty.score("mean_abs"), [0, 0])
    _close(empty.score("rms"), [0, 0])


def test_update_accepts_leading_dims_and_chunks(monkeypatch):
    x = torch.randn(2, 37, 5)
    ref = ChannelStats.of(x.reshape(-1, 5).double())
    monkeypatch.setattr(stats_mod, "_CHUNK_ELEMS", 7)  # force many chunks
    s = ChannelStats.of(x)
    for f in ("count", "sum_abs", "sum_sq", "max_abs"):
        _close(getattr(s, f), getattr(ref, f))
    with pytest.raises(ValueError, match="channels"):
        s.update_(torch.zeros(3, 4))


def test_token_mask_drops_rows_even_nan():
    x = torch.cat([X, torch.tensor([[float("nan"), float("inf")]])])  # (4, 2), last is padding
    s = ChannelStats.zeros(2)
    s.update_(x.reshape(2, 2, 2), mask=torch.tensor([[True, True], [True, False]]))
    ref = ChannelStats.of(X)
    for f in ("count", "sum_abs", "sum_sq", "max_abs"):
        _close(getattr(s, f), getattr(ref, f))
    with pytest.raises(ValueError, match="mask has 2 tokens, activation 3"):
        s.update_(X, mask=torch.ones(2, dtype=torch.bool))


def test_merge_is_exact_and_keys_union():
    a = QKStats()
    a.update((0, "q"), X[:2])
    b = QKStats()
    b.update((0, "q"), X[2:])
    b.update((1, "k"), X)
    m = a + b
    assert m.keys() == [(0, "q"), (1, "k")]
    full = ChannelStats.of(X)
    for key in m:
        for f in ("count", "sum_abs", "sum_sq", "max_abs"):
            _close(getattr(m[key], f), getattr(full, f))
    m3 = merge(a, b, b)
    _close(m3[(0, "q")].count, 2 + 1 + 1)
    _close(m3[(1, "k")].sum_abs, [18, 12])
    _close(a[(0, "q")].count, 2)  # merge does not mutate
    _close(m.score((0, "q"), "mean_abs"), [3, 2])
    _close(m.score((1, "k"), "max_abs"), [5, 4])
    assert m.token_count((0, "q")) == 3.0 and m.token_count((5, "q")) == 0.0


def test_state_dict_and_flat_roundtrip():
    s = QKStats.empty({(0, "q"): 2, (0, "k"): 3})
    s.update((0, "q"), X)
    s.update((0, "k"), torch.arange(6.0).reshape(2, 3))
    sd = s.state_dict()
    assert set(sd["entries"]) == {"0.q", "0.k"}
    assert all(isinstance(v, torch.Tensor) for e in sd["entries"].values() for v in e.values())
    back = QKStats.from_state_dict(sd)
    flat = s.to_fields()
    assert {f: v.numel() for f, v in flat.items()} == {  # keys sorted: 0.k (3), 0.q (2)
        "count": 2, "max_abs": 5, "sum_abs": 5, "sum_sq": 5
    }  # fmt: skip
    torch.testing.assert_close(
        flat["max_abs"], torch.tensor([3, 4, 5, 5, 4.0], dtype=torch.float64)
    )
    for other in (back, QKStats.from_fields(s.layout(), flat)):
        for key in s:
            for f in ("count", "sum_abs", "sum_sq", "max_abs"):
                assert torch.equal(getattr(other[key], f), getattr(s[key], f))
    part = QKStats.from_fields(s.layout(), {f: flat[f] for f in ("count", "sum_sq")})
    assert part.fields() == ("count", "sum_sq") and list(part[(0, "q")].values) == ["sum_sq"]
    with pytest.raises(ValueError, match=r"'sum_abs' of shape \(4,\) does not fit the layout"):
        QKStats.from_fields(s.layout(), dict(flat, sum_abs=flat["sum_abs"][:-1]))
    with pytest.raises(ValueError, match="need 'count' and at least one statistic"):
        QKStats.from_fields(s.layout(), {"sum_abs": flat["sum_abs"]})
    with pytest.raises(ValueError, match="format"):
        QKStats.from_state_dict({"format": 9})


def test_statistics_hold_only_what_was_asked():
    """A QKStats created for some fields holds, accumulates, sends and scores only those;
    asking for more, or merging with statistics of other fields, raises clearly."""
    s = QKStats.empty({(0, "q"): 2, (1, "k"): 2}, fields=("count", "max_abs"))
    s.update((0, "q"), X)
    assert s.fields() == ("count", "max_abs") and list(s[(0, "q")].values) == ["max_abs"]
    _close(s.score((0, "q"), "max_abs"), [5, 4])
    with pytest.raises(ValueError, match=r"score 'mean_abs' needs statistic\(s\) \['sum_abs'\]"):
        s.score((0, "q"), "mean_abs")
    with pytest.raises(ValueError, match=r"cannot accumulate \['sum_sq'\]"):
        s.update((0, "q"), X, fields=("sum_sq",))
    with pytest.raises(ValueError, match=r"not every key holds 'sum_abs'"):
        s.to_fields(("count", "sum_abs"))
    with pytest.raises(ValueError, match="cannot merge statistics"):
        s.merge(QKStats.empty({(0, "q"): 2}))
    with pytest.raises(ValueError, match="needs a statistic"):
        ChannelStats.zeros(2, fields=("count",))
    with pytest.raises(ValueError, match="unknown statistics field 'l2'"):
        QKStats.empty({(0, "q"): 2}, fields=("l2",))
    s.update((0, "q"), torch.zeros(0, 2))  # no tokens: nothing changes
    assert s.token_count((0, "q")) == 3.0
    # a new key takes the fields asked for
    s.update((2, "q"), X, fields=("count", "sum_sq"))
    assert list(s[(2, "q")].values) == ["sum_sq"] and s.fields() == ("count",)


def test_ema_takes_the_statistics_of_the_new_window():
    """After a score change (e.g. on resume) the running statistics follow the window:
    a statistic the past lacks starts from the window's, one the window lacks is gone."""
    prev = QKStats.empty({(0, "q"): 2}, fields=("count", "sum_abs", "max_abs"))
    prev.update((0, "q"), X)
    new = QKStats.empty({(0, "q"): 2}, fields=("count", "sum_abs", "sum_sq"))
    new.update((0, "q"), torch.tensor([[2.0, -2.0]]))
    e = ema(prev, new, 0.5)[(0, "q")]
    assert list(e.values) == ["sum_abs", "sum_sq"]
    _close(e.count, 2)
    _close(e.mean("sum_abs"), [2.5, 2])
    _close(e.mean("sum_sq"), [4, 4])  # the window's mean, at the blended count


def test_ema_on_means_by_hand():
    prev = QKStats()
    prev.update((0, "q"), X)  # mean_abs [3, 2], mean_sq [35/3, 20/3], max [5, 4], n=3
    new = QKStats()
    new.update((0, "q"), torch.tensor([[2.0, -2.0]]))  # mean_abs [2, 2], mean_sq [4, 4], n=1
    new.update((1, "k"), X)
    out = ema(prev, new, decay=0.75)
    e = out[(0, "q")]
    _close(e.count, 0.75 * 3 + 0.25 * 1)
    _close(e.mean("sum_abs"), [0.75 * 3 + 0.25 * 2, 0.75 * 2 + 0.25 * 2])
    _close(e.mean("sum_sq"), [0.75 * 35 / 3 + 0.25 * 4, 0.75 * 20 / 3 + 0.25 * 4])
    _close(e.max_abs, [0.75 * 5 + 0.25 * 2, 0.75 * 4 + 0.25 * 2])
    _close(out[(1, "k")].sum_abs, [9, 6])  # only in new: copied
    # decay 0 keeps only the new window; no previous -> new; empty new window -> prev.
    _close(ema(prev, new, 0.0)[(0, "q")].mean("sum_abs"), [2, 2])
    _close(ema(None, new, 0.5)[(0, "q")].mean("sum_abs"), [2, 2])
    empty = QKStats.empty({(0, "q"): 2})
    _close(ema(prev, empty, 0.5)[(0, "q")].mean("sum_abs"), [3, 2])
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            ema(prev, new, bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_and_chunked_updates_agree(dtype):
    """The accelerator path (float32 blocks, float64 across) and the CPU path (float64
    chunks) agree to float32 rounding, masked NaN padding included; the token count
    spans whole blocks and a remainder."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 1000, 24, generator=g) * 4).to(dtype)  # 3000 = 2 blocks + 952
    mask = torch.rand(3, 1000, generator=g) > 0.3
    x[~mask] = float("nan")
    keep = mask.reshape(-1)
    flat = x.reshape(-1, 24)
    a, b = ChannelStats.zeros(24), ChannelStats.zeros(24)
    a._update_chunked(flat, keep, set(STATISTICS.names()))
    b._update_fused(flat, keep, set(STATISTICS.names()))
    for f in ("sum_abs", "sum_sq", "max_abs"):
        torch.testing.assert_close(getattr(a, f), getattr(b, f), rtol=1e-5, atol=0, msg=f)
    assert torch.isfinite(b.sum_abs).all()


def test_update_only_the_requested_fields():
    x = torch.randn(40, 8)
    s = ChannelStats.zeros(8)
    s.update_(x, fields=("count", "sum_abs"))
    torch.testing.assert_close(s.sum_abs, x.double().abs().sum(0))
    assert float(s.count) == 40 and not s.sum_sq.any() and not s.max_abs.any()
    with pytest.raises(ValueError, match="unknown statistics field 'mean'; valid: count, max_abs"):
        s.update_(x, fields=("mean",))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_capture_takes_the_fused_path_and_matches_the_cpu():
    """On CUDA, update_ uses the blocked float32 reductions; the statistics match the
    CPU's float64 path on the same bf16 activations to float32 rounding."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 3000, 64, generator=g) * 3).to(torch.bfloat16)
    mask = torch.rand(2, 3000, generator=g) > 0.2
    cpu = ChannelStats.zeros(64).update_(x, mask)
    gpu = ChannelStats.zeros(64, "cuda").update_(x.cuda(), mask.cuda())
    for f in ("count", *STATISTICS.names()):
        torch.testing.assert_close(getattr(gpu, f).cpu(), getattr(cpu, f), rtol=1e-5, atol=0)
