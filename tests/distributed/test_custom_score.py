"""A score declared only in this test, over two statistics of its own (one summed, one
maxed), flows end to end: forward hooks capture it on a tiny model, the flat payload
carries exactly what it needs, the coordinator merges two ranks by each statistic's
declared reduction, blends refreshes by the declared EMA rule and publishes the masks
the score picks; the training runtime runs with it unchanged. No LongAct module names it.
"""

from __future__ import annotations

import pytest
import torch
from longact_tiny import runtime_step, tiny_model, token_batch

from longact.config import LongActConfig
from longact.core import MaskSet, QKCapture, build_masks, select_rows
from longact.core.scores import (
    SCORES,
    STATISTICS,
    register_score,
    register_statistic,
    scoped_registrations,
)
from longact.distributed.coordinator import SaliencyCoordinator
from longact.distributed.wire import payload_fields, stats_payload
from longact.train.runtime import LongActRuntime

FIELDS = ("count", "peak_sq", "sum_abs", "sum_p4")  # the score's two + sum_abs (metrics)
# real tokens per refresh differ (18, then 14), so the two EMA rules give different values
ATTN = {
    1: torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]),
    2: torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 0, 0]]),
}


@pytest.fixture(scope="module")
def peakiness():
    with scoped_registrations():

        @register_statistic("sum_p4", reduce="sum")  # no fused kernel: chunks everywhere
        def _sum_p4(a):
            return a.square().square().sum(0)

        @register_statistic("peak_sq", reduce="max", fused=lambda x: x.abs().amax(0).double() ** 2)
        def _peak_sq(a):
            return a.square().amax(0)

        @register_score("peakiness", needs=("peak_sq", "sum_p4"))
        def _peakiness(s):  # peak power over the root of the mean fourth power
            return s.peak_sq / s.mean("sum_p4").sqrt()

        yield "peakiness"
    assert "peakiness" not in SCORES and "peak_sq" not in STATISTICS


def _capture(model, step: int, rank: int | None):
    """The statistics rank ``rank`` of two gathers from one forward over both ranks'
    rows (rank None: every row), so every capture sees the same activations."""
    ids = token_batch(step, 4, 6)
    real = torch.cat([ATTN[step], ATTN[step]]).bool()
    mask = real.clone()
    if rank is not None:
        mask[[r for r in range(4) if r // 2 != rank]] = False
    cap = QKCapture(model, fields=FIELDS, token_mask=mask)
    with cap:
        model(input_ids=ids, attention_mask=real.long()).logits.sum().backward()
    return cap.take()


def test_a_score_declared_in_a_test_flows_end_to_end(peakiness):
    assert payload_fields(peakiness) == FIELDS
    model = tiny_model("qwen3", seed=0)
    layout = QKCapture(model).layout
    coord = SaliencyCoordinator({"ratio": 0.25, "score": peakiness, "ema": 0.5}, layout, 2)
    windows = []
    for step in (1, 2):
        for r in (1, 0):
            part = _capture(model, step, r)
            assert part.fields() == FIELDS  # only what the score and metrics need
            payload = stats_payload(part)
            assert tuple(sorted(payload["fields"])) == FIELDS
            coord.submit(r, step, payload)
        assert "error" not in coord.get(step), coord.get(step)
        windows.append(_capture(model, step, None))
        if step == 1:  # the merge of both ranks is the statistics of all their tokens
            for key in layout:
                got, want = coord.running[key], windows[0][key]
                assert float(got.count) == float(want.count) == 18.0
                assert torch.equal(got.peak_sq, want.peak_sq), key  # max: exact
                torch.testing.assert_close(got.sum_p4, want.sum_p4, rtol=1e-12, atol=0)

    # refresh 2 blends per-token means of the summed statistic, values of the maxed one
    (w1, w2), running = windows, coord.running
    for key in layout:
        a, b, got = w1[key], w2[key], running[key]
        assert float(got.count) == pytest.approx(0.5 * 18 + 0.5 * 14)
        mean = 0.5 * a.mean("sum_p4") + 0.5 * b.mean("sum_p4")
        torch.testing.assert_close(got.mean("sum_p4"), mean, rtol=1e-12, atol=0)
        assert torch.equal(got.peak_sq, 0.5 * a.peak_sq + 0.5 * b.peak_sq)

    # the published masks are the top 25% of channels by the score, computed by hand
    published = MaskSet.from_state_dict(coord.get(2)["masks"])
    for key in layout:
        s = running[key]
        score = s.peak_sq / (s.sum_p4 / s.count).sqrt()
        want = select_rows(score, layout.rows(key[1]), layout.head_dim, ratio=0.25, key=key)
        assert torch.equal(published[key], want), key
    by_name = build_masks(running, layout, ratio=0.25, score=peakiness, version=2)
    assert all(torch.equal(published[k], by_name[k]) for k in layout)
    by_mean = build_masks(running, layout, ratio=0.25, score="mean_abs")
    assert any(not torch.equal(published[k], by_mean[k]) for k in layout)  # it matters
    assert 0.0 < coord.history[-1]["metrics"]["longact/mass_kept_q"] <= 1.0


def test_the_training_runtime_runs_a_declared_score_unchanged(peakiness):
    cfg = LongActConfig(ratio=0.25, score=peakiness)
    model = tiny_model("qwen3", seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    coord = SaliencyCoordinator(cfg, None, 1)
    rt = LongActRuntime(model, opt, cfg, coordinator=coord)
    assert rt.capture.stats.fields() == FIELDS
    runtime_step(rt, model, opt, 1)
    assert rt.version == 1 and coord.running.fields() == FIELDS
    assert rt.guard.masks.kept_fraction() == pytest.approx(0.25)
