"""The coordinator as a named Ray actor (one small local cluster): ``create`` is
idempotent per run id, ranks find it by name, and concurrent ranks receive the same
published version."""

from __future__ import annotations

import pytest
import torch
from longact_ranks import new_run_id, run_ranks
from longact_tiny import tiny_model

from longact.config import LongActConfig
from longact.core import QKLayout, QKStats

LAYOUT = QKLayout(num_layers=1, head_dim=4, num_attention_heads=2, num_key_value_heads=1)


def _partial(rank: int) -> dict:
    s = QKStats.empty(LAYOUT.row_counts())
    for key, rows in LAYOUT.row_counts().items():
        s.update(key, torch.arange(rows, dtype=torch.float32).repeat(3, 1) * (rank + 1))
    return s.state_dict()


def test_named_actor_shared_by_concurrent_ranks(ray_cluster):
    ray = ray_cluster
    from longact.distributed.client import RayClient
    from longact.distributed.coordinator import actor_name, create

    cfg = LongActConfig(ratio=0.5, run_id=new_run_id())
    a, b = create(cfg), create(cfg)
    assert a._actor_id == b._actor_id
    assert ray.get_actor(actor_name(cfg.run_id))._actor_id == a._actor_id

    def rank(r: int) -> dict:
        client = RayClient(cfg)
        client.call("attach", LAYOUT, 2)
        return client.result(client.send(r, 1, _partial(r), 0))

    out0, out1 = run_ranks(rank, 2)
    assert out0["version"] == out1["version"] == 1
    assert out0["masks"]["masks"].keys() == out1["masks"]["masks"].keys()
    for k, m in out0["masks"]["masks"].items():
        assert m.equal(out1["masks"]["masks"][k])
        assert int(m.sum()) == m.numel() // 2  # ratio 0.5
        assert bool(m[-1])  # the largest channel is kept
    assert ray.get(a.summary.remote()) == {"version": 1, "refreshes": 1}
    ray.kill(a, no_restart=True)


def test_a_rank_without_a_coordinator_fails_clearly(ray_cluster):
    from longact.distributed.client import RayClient, RefreshError

    cfg = LongActConfig(run_id=new_run_id(), timeout_s=1.0)
    with pytest.raises(RefreshError, match=f"run {cfg.run_id}: no saliency coordinator named"):
        RayClient(cfg)


@pytest.mark.parametrize("refresh_async", [False, True])
def test_runtime_refreshes_through_the_ray_actor(ray_cluster, refresh_async):
    """LongActRuntime against the named Ray actor, one rank, sync and async refreshes:
    versions as in-process, frozen rows bit-identical."""
    from longact.distributed.coordinator import create
    from longact.train.runtime import LongActRuntime

    model = tiny_model("qwen3", seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    cfg = LongActConfig(ratio=0.25, run_id=new_run_id(), refresh_async=refresh_async)
    coord = create(cfg)  # the caller owns it: it lives while this handle does
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
        assert frozen.any(), f"step {step}: no mask in force"
        assert torch.equal(w.detach()[frozen], before[frozen])
        versions.append(rt.version)
    # async: the first refresh is waited for (no update without a mask), later ones lag
    assert versions == ([1, 1, 2] if refresh_async else [1, 2, 3])
    ray_cluster.kill(coord, no_restart=True)
