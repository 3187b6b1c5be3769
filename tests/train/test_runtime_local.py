"""LongActRuntime with an in-process coordinator (no Ray): one rank's refresh, exact
sparse step, and the per-part timing metrics it reports."""

from __future__ import annotations

import pytest
import torch
from longact_tiny import runtime_step, tiny_model

from longact.core.arch import get_adapter
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
    t+1, except the first, which is in force at step 1 (no update without a mask);
    frozen rows stay bit-identical against the mask in force at every step, step 1
    included; a checkpoint first installs the refresh in flight."""
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
        assert frozen.any(), f"step {step}: no mask in force"
        assert torch.equal(dict(model.named_parameters())[w].detach()[frozen], before[frozen])
        # blocked on a refresh: at step 1 (the first, waited for), then installing the
        # one sent at the step before (steps 3, 4)
        assert ("longact/rank_refresh_s" in rt.pop_metrics()) == (step != 2)
    # version 1 is in force at step 1; the one from step t's statistics from step t + 1
    assert versions == [1, 1, 2, 3]
    step, _, handle = rt._inflight  # step 4's refresh is in flight, on its thread ...
    assert step == 4 and rt.version == 3
    handle.result(timeout=60)  # (let the thread finish: the coordinator publishes v4)
    assert coord.version == 4
    rt.save(str(tmp_path))  # ... and a checkpoint installs it first
    assert rt.version == 4
    state = torch.load(state_path(tmp_path, 0), weights_only=False)
    assert state["version"] == 4 and state["coordinator"]["version"] == 4


@pytest.mark.parametrize("optimizer", ["adamw", "rmsprop"])
def test_exact_path_metric_and_resume_zeroes_frozen_moments(tmp_path, optimizer):
    """AdamW takes the masked exact path (longact/exact_path_snapshot 0.0, its weight
    decay applied in the step hook), RMSprop the snapshot path (1.0). A resume into an
    optimizer whose frozen rows carry moments (a plain verl checkpoint, or one written
    by the snapshot path) zeroes them on the masked path and leaves them on the other."""

    def make(model):
        if optimizer == "adamw":
            return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        return torch.optim.RMSprop(model.parameters(), lr=1e-3, momentum=0.9)

    masked = optimizer == "adamw"
    model = tiny_model("qwen3", seed=0)
    opt = make(model)
    layout = get_adapter(model).layout(model)
    rt = LongActRuntime(model, opt, CFG, coordinator=SaliencyCoordinator(CFG, layout, 1))
    for step in range(1, 4):
        runtime_step(rt, model, opt, step)
        m = rt.pop_metrics()
        assert m["longact/exact_path_snapshot"] == (0.0 if masked else 1.0)
        assert (m["longact/decay_s"] > 0) == masked
    rt.save(str(tmp_path))
    assert torch.load(state_path(tmp_path, 0), weights_only=False)["guard"] == {"stash": {}}

    model2 = tiny_model("qwen3", seed=0)
    opt2 = make(model2)
    for step in range(2):  # plain training: moments in every row
        ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(step))
        model2(input_ids=ids, labels=ids).loss.backward()
        opt2.step()
        opt2.zero_grad()
    coord2 = SaliencyCoordinator(CFG, layout, 1)
    rt2 = LongActRuntime(model2, opt2, CFG, coordinator=coord2)
    rt2.load(str(tmp_path))
    assert rt2.version == rt.version and rt2.guard.path == rt.guard.path
    for t in rt2.guard.targets:
        frozen = ~rt2.guard.masks[t.ref.key]
        assert frozen.any()
        for k, v in opt2.state[t.param].items():
            if k != "step":
                assert (not v[frozen].any()) == masked, (t.name, k)


def test_resume_from_a_plain_checkpoint_starts_longact_fresh(tmp_path, capsys):
    """A checkpoint folder with no LongAct state (plain RL, LongAct turned on at resume):
    LongAct starts as a new run. The first masks come at the next optimizer step, the
    moments plain training left in the rows they freeze are zeroed, and those rows then
    stay bit-identical while the trainable rows move."""
    model = tiny_model("qwen3", seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(2):  # plain training: moments in every row
        ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(step))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    layout = get_adapter(model).layout(model)
    rt = LongActRuntime(model, opt, CFG, coordinator=SaliencyCoordinator(CFG, layout, 1))
    rt.load(str(tmp_path))  # verl's checkpoint folder, without longact_state_rank0.pt
    assert "no LongAct state" in capsys.readouterr().out
    assert rt.version == 0 and rt.step == 0
    for step in range(1, 4):
        before = {k: v.detach().clone() for k, v in model.named_parameters()}
        runtime_step(rt, model, opt, step)
        assert rt.version == (1 if step < 3 else 2)
        for t in rt.guard.targets:
            frozen = ~rt.guard.masks[t.ref.key]
            after = t.param.detach()
            assert torch.equal(after[frozen], before[t.name][frozen]), (step, t.name)
            assert not torch.equal(after[~frozen], before[t.name][~frozen]), (step, t.name)
            for k, v in opt.state[t.param].items():
                if k != "step":
                    assert not v[frozen].any(), (step, t.name, k)


def test_lora_runtime_freezes_lora_b_rows_and_saves_the_adapter(tmp_path):
    """A peft LoRA model through the runtime: refreshes as without LoRA, the rows of q/k
    lora_B never selected stay zero, the checkpoint holds the adapter peft loads; a
    non-zero lora_B at start is refused."""
    import json

    from peft import LoraConfig, PeftModel, get_peft_model

    from longact.core.lora import LoRAError

    lora = LoraConfig(r=4, target_modules="all-linear")
    model = get_peft_model(tiny_model("qwen3", seed=0), lora)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    layout = get_adapter(model).layout(model)
    rt = LongActRuntime(model, opt, CFG, coordinator=SaliencyCoordinator(CFG, layout, 1))
    assert rt.lora["rank"] == 4 and rt.guard.path == "masked"
    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"
    b = dict(model.named_parameters())[name]
    ever = torch.zeros(b.shape[0], dtype=torch.bool)
    for step in range(1, 4):
        runtime_step(rt, model, opt, step)
        ever |= rt.guard.masks[(0, "q")]
    assert rt.version == 2 and (~ever).any()
    assert not b[~ever].any()  # rows never selected: still exactly zero
    assert b[rt.guard.masks[(0, "q")]].ne(0).any(1).all()  # the kept rows trained
    rt.save(str(tmp_path))
    saved = json.loads((tmp_path / "lora_adapter" / "adapter_config.json").read_text())
    assert saved["r"] == 4 and state_path(tmp_path, 0).is_file()
    loaded = PeftModel.from_pretrained(tiny_model("qwen3", seed=0), tmp_path / "lora_adapter")
    ids = torch.arange(1, 9)[None]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    with pytest.raises(LoRAError, match="not zero when LongAct starts"):
        LongActRuntime(loaded, opt, CFG, coordinator=SaliencyCoordinator(CFG, layout, 1))
