"""SaliencyCoordinator as a plain class: exact merges of rank partials, published masks,
versions, EMA across refreshes, metrics, checkpoint round trip and async exchange."""

from __future__ import annotations

import asyncio

import pytest
import torch

from longact.core import MaskSet, QKLayout, QKStats, build_masks, ema, merge
from longact.distributed.coordinator import SaliencyCoordinator

LAYOUT = QKLayout(num_layers=2, head_dim=4, num_attention_heads=4, num_key_value_heads=2)
CONFIG = {"ratio": 0.25, "policy": "topk", "score": "mean_abs", "granularity": "channel"}


def _activations(seed: int, tokens: int = 12) -> dict:
    """{key: (tokens, C)} activations with a channel-dependent scale (clear ranking)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, rows in LAYOUT.row_counts().items():
        scale = torch.rand(rows, generator=g) * 3 + 0.1
        out[key] = torch.randn(tokens, rows, generator=g) * scale
    return out


def _stats(acts: dict, rows: slice = slice(None)) -> QKStats:
    s = QKStats.empty(LAYOUT.row_counts())
    for key, x in acts.items():
        s.update(key, x[rows])
    return s


def _assert_stats_equal(a: QKStats, b: QKStats, exact: bool = True):
    assert a.keys() == b.keys()
    for key in a.keys():
        for f in ("count", "sum_abs", "sum_sq", "max_abs"):
            x, y = getattr(a[key], f), getattr(b[key], f)
            if exact:
                torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12, msg=f"{key} {f}")
            else:
                torch.testing.assert_close(x, y, msg=f"{key} {f}")


def _masks_equal(a: MaskSet, b: MaskSet) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a.keys())


def _refresh(coord: SaliencyCoordinator, step: int, acts: dict) -> dict:
    """Ranks 0 and 1 each send half of the tokens; returns the published payload."""
    assert coord.submit(1, step, _stats(acts, slice(6, None)).state_dict()) is False
    assert coord.get(step) is None
    assert coord.submit(0, step, _stats(acts, slice(0, 6)).state_dict()) is True
    return coord.get(step)


def test_rank_partials_merge_to_the_stats_of_all_data():
    coord = SaliencyCoordinator(dict(CONFIG), LAYOUT, world_size=2)
    acts = _activations(0)
    payload = _refresh(coord, 1, acts)
    whole = _stats(acts)
    _assert_stats_equal(coord.running, whole)
    expected = build_masks(whole, LAYOUT, ratio=0.25, policy="topk", version=1)
    published = MaskSet.from_state_dict(payload["masks"])
    assert _masks_equal(published, expected)
    assert _masks_equal(coord.masks, expected)
    assert payload["version"] == published.version == coord.version == 1
    assert published.meta["ratio"] == 0.25 and published.meta["policy"] == "topk"
    # ratio 0.25 over 16 q rows keeps 4, over 8 k rows keeps 2
    assert [int(published[(0, p)].sum()) for p in ("q", "k")] == [4, 2]


@pytest.mark.parametrize("policy", ["bottomk", "random", "full"])
def test_published_masks_follow_the_configured_policy(policy):
    config = {"ratio": 0.5, "policy": policy, "score": "rms", "granularity": "head", "seed": 3}
    coord = SaliencyCoordinator(config, LAYOUT, world_size=2)
    acts = _activations(1)
    published = MaskSet.from_state_dict(_refresh(coord, 5, acts)["masks"])
    expected = build_masks(
        _stats(acts), LAYOUT, ratio=0.5, policy=policy, score="rms", granularity="head", seed=3
    )
    assert _masks_equal(published, expected)


def test_versions_and_protocol_errors():
    coord = SaliencyCoordinator(dict(CONFIG), LAYOUT, world_size=2)
    assert coord.current() is None
    part = _stats(_activations(0), slice(0, 6)).state_dict()
    for step, version in ((1, 1), (2, 2), (4, 3)):
        _refresh(coord, step, _activations(step))
        assert coord.version == version and coord.get(step)["version"] == version
    assert [h["version"] for h in coord.history] == [1, 2, 3]
    assert [h["step"] for h in coord.history] == [1, 2, 4]

    # a protocol error is the step's published answer, for every rank of that refresh
    assert coord.submit(0, 5, part) is False
    assert coord.submit(0, 5, part) is True
    assert "rank 0 sent statistics for step 5 twice" in coord.get(5)["error"]
    assert coord.submit(1, 5, part) is True  # a late rank gets the same error
    for step, bad in ((6, 2), (7, -1)):
        assert coord.submit(bad, step, part) is True
        assert f"rank {bad} outside [0, 2)" in coord.get(step)["error"]
        assert coord.get(step)["error"].startswith(f"LongAct run (unnamed), refresh at step {step}")
    assert coord.version == 3  # no failed refresh published masks
    with pytest.raises(ValueError, match="already published"):
        coord.submit(0, 4, part)
    with pytest.raises(ValueError, match="world_size must be >= 1, got 0"):
        SaliencyCoordinator(dict(CONFIG), LAYOUT, world_size=0)


def test_ema_across_refreshes_and_metrics():
    coord = SaliencyCoordinator({**CONFIG, "ema": 0.5}, LAYOUT, world_size=2)
    windows = [_activations(10), _activations(11), _activations(12)]
    expected = None
    for step, acts in enumerate(windows, start=1):
        payload = _refresh(coord, step, acts)
        expected = ema(expected, _stats(acts), 0.5)
        _assert_stats_equal(coord.running, expected, exact=False)
        masks = build_masks(expected, LAYOUT, ratio=0.25, policy="topk")
        assert _masks_equal(MaskSet.from_state_dict(payload["masks"]), masks)

        m = payload["metrics"]
        assert m["longact/version"] == step and m["longact/step"] == step
        for proj in ("q", "k"):
            assert m[f"longact/kept_fraction_{proj}"] == pytest.approx(0.25)
            assert 0.0 <= m[f"longact/mass_kept_{proj}"] <= 1.0
            assert m[f"longact/mass_kept_{proj}"] >= 0.25  # topk keeps the heavy channels
            if step == 1:
                assert f"longact/jaccard_prev_{proj}" not in m
            else:
                assert 0.0 <= m[f"longact/jaccard_prev_{proj}"] <= 1.0
        assert m["longact/refresh_s"] >= 0.0
        assert coord.history[-1]["metrics"] == m
    # EMA differs from using only the last window
    assert not torch.allclose(
        coord.running[(0, "q")].sum_abs, _stats(windows[-1])[(0, "q")].sum_abs
    )


def test_state_dict_round_trip():
    coord = SaliencyCoordinator({**CONFIG, "ema": 0.5}, LAYOUT, world_size=2)
    for step in (1, 2):
        _refresh(coord, step, _activations(step))
    sd = coord.state_dict()
    assert sd["world_size"] == 2 and sd["config"]["ema"] == 0.5

    fresh = SaliencyCoordinator({**CONFIG, "ema": 0.5}, LAYOUT, world_size=2)
    fresh.submit(0, 9, _stats(_activations(9)).state_dict())  # pending work is dropped
    fresh.load_state_dict(sd)
    assert fresh.version == 2
    assert _masks_equal(fresh.masks, coord.masks)
    _assert_stats_equal(fresh.running, coord.running)
    assert fresh.history == coord.history
    assert fresh.summary() == {"version": 2, "refreshes": 2}
    cur = fresh.current()
    assert cur["version"] == 2
    assert _masks_equal(MaskSet.from_state_dict(cur["masks"]), coord.masks)
    assert fresh.submit(0, 9, _stats(_activations(9)).state_dict()) is False  # clean slate

    # the next refresh continues from the restored running statistics and version
    a = _refresh(coord, 3, _activations(3))
    b = _refresh(fresh, 3, _activations(3))
    assert a["version"] == b["version"] == 3
    assert _masks_equal(MaskSet.from_state_dict(a["masks"]), MaskSet.from_state_dict(b["masks"]))
    _assert_stats_equal(fresh.running, coord.running)


def test_async_exchange_returns_the_same_payload_to_every_rank():
    coord = SaliencyCoordinator(dict(CONFIG), LAYOUT, world_size=2)
    acts = _activations(4)

    async def rank(r: int, step: int, delay: float):
        await asyncio.sleep(delay)
        rows = slice(0, 6) if r == 0 else slice(6, None)
        return await coord.exchange(r, step, _stats(acts, rows).state_dict())

    async def run():
        first = await asyncio.gather(rank(0, 1, 0.0), rank(1, 1, 0.02))
        second = await asyncio.gather(rank(1, 2, 0.0), rank(0, 2, 0.01))
        return first, second

    (a, b), (c, d) = asyncio.run(run())
    assert a is b and c is d
    assert (a["version"], c["version"]) == (1, 2)
    expected = build_masks(_stats(acts), LAYOUT, ratio=0.25, policy="topk")
    assert _masks_equal(MaskSet.from_state_dict(a["masks"]), expected)


@pytest.mark.parametrize(
    "score, fields",
    [
        ("mean_abs", ("count", "sum_abs")),
        ("rms", ("count", "sum_abs", "sum_sq")),
        ("max_abs", ("count", "max_abs", "sum_abs")),
    ],
)
def test_flat_payload_carries_only_the_fields_the_score_needs(score, fields):
    from longact.distributed.coordinator import payload_fields, stats_payload

    assert payload_fields(score) == fields  # the score's statistics + sum_abs for the metrics
    acts = _activations(3)
    half = [_stats(acts, slice(0, 6)), _stats(acts, slice(6, None))]
    cfg = dict(CONFIG, score=score)
    flat, full = SaliencyCoordinator(cfg, LAYOUT, 2), SaliencyCoordinator(cfg, LAYOUT, 2)
    for r in (1, 0):
        payload = stats_payload(half[r], fields)
        assert tuple(sorted(payload["fields"])) == fields
        flat.submit(r, 1, payload)
        full.submit(r, 1, half[r].state_dict())
    # the same masks as from every field; the running statistics hold the sent fields
    # only, merged exactly
    assert _masks_equal(flat.masks, full.masks)
    assert flat.running.fields() == fields
    assert full.running.fields() == ("count", "max_abs", "sum_abs", "sum_sq")
    whole = _stats(acts)
    for key in whole.keys():
        for f in fields:
            got, want = getattr(flat.running[key], f), getattr(whole[key], f)
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=f"{key} {f}")
    assert flat.history[-1]["metrics"]["longact/mass_kept_q"] == pytest.approx(
        full.history[-1]["metrics"]["longact/mass_kept_q"], rel=1e-12
    )


@pytest.mark.parametrize("form", ["flat", "state_dict"])
def test_max_statistics_merge_exactly_across_ranks(form):
    """Three ranks, each holding the largest |x| of some channels (one rank no tokens of
    a key): the merged max_abs is bit-identical to that of all tokens, in both forms."""
    from longact.distributed.coordinator import stats_payload

    acts = _activations(5, tokens=9)
    for i, x in enumerate(acts.values()):
        x[(3 * i) % 9, i % x.shape[1]] = -50.0 - i  # a negative extreme, on varying ranks
    rows = [slice(0, 3), slice(3, 6), slice(6, 9)]
    parts = [_stats(acts, r) for r in rows]
    parts[2] = _stats({k: v for k, v in acts.items() if k != (1, "k")}, rows[2])
    coord = SaliencyCoordinator(dict(CONFIG, score="max_abs"), LAYOUT, 3)
    for r, part in enumerate(parts):
        sent = stats_payload(part, ("count", "max_abs", "sum_abs"))
        coord.submit(r, 1, sent if form == "flat" else part.state_dict())
    whole = merge(*parts)  # rank 2 sent no tokens of (1, "k")
    everything = _stats(acts)
    for key in LAYOUT:
        assert torch.equal(coord.running[key].max_abs, whole[key].max_abs), key
        assert float(coord.running[key].max_abs.max()) >= 50.0
        if key != (1, "k"):
            assert torch.equal(coord.running[key].max_abs, everything[key].max_abs), key
    assert _masks_equal(
        coord.masks, build_masks(whole, LAYOUT, ratio=0.25, score="max_abs", version=1)
    )


def test_flat_payload_errors_name_the_problem():
    from longact.distributed.coordinator import stats_payload

    acts = _activations(4)
    coord = SaliencyCoordinator(dict(CONFIG), LAYOUT, 2)
    coord.submit(0, 1, stats_payload(_stats(acts), ("count", "sum_abs")))
    coord.submit(1, 1, stats_payload(_stats(acts), ("count", "sum_abs", "sum_sq")))
    assert "cannot merge statistics fields ['count', 'sum_abs'] with" in coord.get(1)["error"]
    bad = stats_payload(_stats(acts), ("count", "sum_abs"))
    bad["fields"]["sum_abs"] = bad["fields"]["sum_abs"][:-1]
    coord.submit(1, 2, bad)
    assert "'sum_abs' of shape" in coord.get(2)["error"]
    with pytest.raises(ValueError, match="unknown statistics field 'mean'"):
        _stats(acts).to_fields(("count", "mean"))
    # a rank that sends less than the configured score needs fails the refresh at once
    rms = SaliencyCoordinator(dict(CONFIG, score="rms"), LAYOUT, 2)
    assert rms.submit(0, 1, stats_payload(_stats(acts), ("count", "sum_abs"))) is True
    err = rms.get(1)["error"]
    assert "statistics lack ['sum_sq']" in err and "'sum_abs', 'sum_sq'" in err


def test_mask_drift_from_the_first_mask():
    """``jaccard_first_*``: 1 at the first refresh, then the overlap with that first mask
    (not with the previous one); the first mask survives a checkpoint round trip."""
    coord = SaliencyCoordinator(dict(CONFIG), LAYOUT, world_size=2)
    first = _refresh(coord, 1, _activations(0))["metrics"]
    assert first["longact/jaccard_first_q"] == 1.0 and first["longact/jaccard_first_k"] == 1.0
    v1 = coord.masks
    for step, seed in ((2, 1), (3, 2)):
        m = _refresh(coord, step, _activations(seed))["metrics"]
        for proj in ("q", "k"):
            keys = [k for k in coord.masks.keys() if k[1] == proj]
            per_key = coord.masks.jaccard(v1, per_key=True)
            want = sum(per_key[k] for k in keys) / len(keys)
            assert m[f"longact/jaccard_first_{proj}"] == pytest.approx(want)
    assert m["longact/jaccard_first_q"] < 1.0  # other statistics picked other channels
    again = SaliencyCoordinator(dict(CONFIG), LAYOUT, world_size=2)
    again.load_state_dict(coord.state_dict())
    assert _masks_equal(again.first_masks, v1)
