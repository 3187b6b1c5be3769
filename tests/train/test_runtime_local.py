"""LongActRuntime with an in-process coordinator (no Ray): one rank's refresh, exact
sparse step, and the per-part timing metrics it reports."""

from __future__ import annotations

import pytest
import torch
from longact_tiny import runtime_step, tiny_model

from longact.core.adapters import get_adapter
from longact.distributed.coordinator import SaliencyCoordinator
from longact.train.runtime import LongActRuntime, state_path

CFG = {"ratio": 0.25, "policy": "topk", "score": "mean_abs", "refresh_interval": 2}


def test_in_process_coordinator_runs_the_refresh_protocol():
    model = tiny_model("qwen3", seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    layout = get_adapter(model).layout(model)
    coord = SaliencyCoordinator(CFG, layout, world_size=1)
    rt = LongActRuntime(model, opt, CFG, coordinator=coord)
    versions = []
    for step in range(1, 5):
        before = {k: v.detach().clone() for k, v in model.named_parameters()}
        runtime_step(rt, model, opt, step)
        versions.append(rt.version)
        frozen = ~rt.guard.masks[(0, "q")]
        w = "model.layers.0.self_attn.q_proj.weight"
        after = dict(model.named_parameters())[w].detach()
        assert torch.equal(after[frozen], before[w][frozen]), f"step {step}: frozen rows moved"
        assert not torch.equal(after[~frozen], before[w][~frozen])
        m = rt.pop_metrics()
        for name in ("capture_s", "mask_s", "snapshot_s", "restore_s"):
            assert m[f"longact/{name}"] > 0, name
        assert ("longact/rank_refresh_s" in m) == (step in (1, 3))
    assert versions == [1, 1, 2, 2]  # refresh at optimizer steps 1 and 3
    assert coord.version == 2 and len(coord.history) == 2
    # the coordinator's state is what a checkpoint stores
    assert rt.client.call("state_dict")["version"] == 2


def test_in_process_coordinator_must_serve_one_rank():
    model = tiny_model("qwen3", seed=0)
    opt = torch.optim.AdamW(model.parameters())
    layout = get_adapter(model).layout(model)
    with pytest.raises(ValueError, match="exactly one rank; got one for 2"):
        LongActRuntime(model, opt, CFG, coordinator=SaliencyCoordinator(CFG, layout, 2))


def test_async_refresh_installs_masks_one_step_later(tmp_path):
    """refresh_async: the masks chosen from step t's statistics are in force from step
    t+1; frozen rows stay bit-identical; a checkpoint first installs the refresh in
    flight."""
    cfg = dict(CFG, refresh_interval=1, refresh_async=True)
    model = tiny_model("qwen3", seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    coord = SaliencyCoordinator(cfg, get_adapter(model).layout(model), world_size=1)
    rt = LongActRuntime(model, opt, cfg, coordinator=coord)
    w = "model.layers.1.self_attn.k_proj.weight"
    versions = []
    for step in range(1, 5):
        before = dict(model.named_parameters())[w].detach().clone()
        runtime_step(rt, model, opt, step)
        versions.append(rt.version)
        frozen = ~rt.guard.masks[(1, "k")]
        assert torch.equal(dict(model.named_parameters())[w].detach()[frozen], before[frozen])
        assert ("longact/rank_refresh_s" in rt.pop_metrics()) == (step > 1)
    # step 1 trains every row (version 0); version v is installed at step v + 1
    assert versions == [0, 1, 2, 3]
    step, _, handle = rt._inflight  # step 4's refresh is in flight, on its thread ...
    assert step == 4 and rt.version == 3
    handle.result(timeout=60)  # (let the thread finish: the coordinator publishes v4)
    assert coord.version == 4
    rt.save(str(tmp_path))  # ... and a checkpoint installs it first
    assert rt.version == 4
    state = torch.load(state_path(tmp_path, 0), weights_only=False)
    assert state["version"] == 4 and state["coordinator"]["version"] == 4
