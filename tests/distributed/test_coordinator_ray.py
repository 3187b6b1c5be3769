"""The coordinator as a named Ray actor (one small local cluster): ``get_or_create`` is
idempotent per run id, and concurrent ranks receive the same published version."""

from __future__ import annotations

import uuid

import pytest

from longact.core import QKLayout, QKStats

ray = pytest.importorskip("ray")

LAYOUT = QKLayout(num_layers=1, head_dim=4, num_attention_heads=2, num_key_value_heads=1)
CONFIG = {"ratio": 0.5, "policy": "topk"}


@pytest.fixture(scope="module")
def ray_cluster():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    if started:
        ray.shutdown()


def _partial(rank: int) -> dict:
    import torch

    s = QKStats.empty(LAYOUT.row_counts())
    for key, rows in LAYOUT.row_counts().items():
        s.update(key, torch.arange(rows, dtype=torch.float32).repeat(3, 1) * (rank + 1))
    return s.state_dict()


@ray.remote(num_cpus=0)
def _rank_task(run_id: str, rank: int, state: dict) -> dict:
    from longact.distributed.coordinator import get_or_create

    coord = get_or_create(run_id, CONFIG, LAYOUT, 2)
    return ray.get(coord.exchange.remote(rank, 1, state))


def test_named_actor_shared_by_concurrent_ranks(ray_cluster):
    from longact.distributed.coordinator import ACTOR_PREFIX, get_or_create

    run_id = uuid.uuid4().hex[:8]
    a = get_or_create(run_id, CONFIG, LAYOUT, 2)
    b = get_or_create(run_id, CONFIG, LAYOUT, 2)
    assert a._actor_id == b._actor_id
    assert ray.get_actor(ACTOR_PREFIX + run_id)._actor_id == a._actor_id

    refs = [_rank_task.remote(run_id, r, _partial(r)) for r in (0, 1)]
    out0, out1 = ray.get(refs, timeout=120)
    assert out0["version"] == out1["version"] == 1
    assert out0["masks"]["masks"].keys() == out1["masks"]["masks"].keys()
    for k, m in out0["masks"]["masks"].items():
        assert m.equal(out1["masks"]["masks"][k])
        assert int(m.sum()) == m.numel() // 2  # ratio 0.5
        assert bool(m[-1])  # the largest channel is kept
    assert ray.get(a.summary.remote()) == {"version": 1, "refreshes": 1}
    ray.kill(a)


@pytest.mark.parametrize("refresh_async", [False, True])
def test_runtime_refreshes_through_the_ray_actor(ray_cluster, refresh_async):
    """LongActRuntime against the named Ray actor, one rank, sync and async refreshes:
    versions as in-process, frozen rows bit-identical."""
    import torch
    from longact_tiny import tiny_model

    from longact.train.runtime import LongActRuntime

    model = tiny_model("qwen3", seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    cfg = {"ratio": 0.25, "run_id": uuid.uuid4().hex[:8], "refresh_async": refresh_async}
    rt = LongActRuntime(model, opt, cfg)
    w = dict(model.named_parameters())["model.layers.0.self_attn.q_proj.weight"]
    versions = []
    for step in range(3):
        ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(step))
        model(input_ids=ids, labels=ids).loss.backward()
        before = w.detach().clone()
        rt.before_step()
        with rt.protect():
            opt.step()
        opt.zero_grad()
        frozen = ~rt.guard.masks[(0, "q")]
        assert torch.equal(w.detach()[frozen], before[frozen])
        versions.append(rt.version)
    assert versions == ([0, 1, 2] if refresh_async else [1, 2, 3])
