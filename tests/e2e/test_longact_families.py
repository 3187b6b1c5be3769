"""LongAct through ``longact-train`` on two families besides Qwen3 (CPU, verl's v1 trainer).

- ``phi3``: one fused ``qkv_proj`` per layer, sharded by FSDP2 along rows that mix q, k
  and v (2 ranks);
- ``qwen3_5`` (its ``qwen3_5_text`` model): a hybrid of linear-attention layers (skipped)
  and full-attention layers whose ``q_proj`` interleaves query and gate rows.

3 GRPO steps, masks refreshed every 2 optimizer steps (versions 1, 1, 2). At every step
the frozen W_Q/W_K rows (located through the family's adapter) are bit-identical, the
trainable q/k rows, the v and gate rows, and the other parameters move.
"""

from __future__ import annotations

import pytest
import torch
from e2e_utils import BIN, base_overrides, load_weights, masks_at, run, step_metrics, step_weights

from longact.core.arch import get_adapter
from longact.core.arch.base import param_mask

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=["phi3", "qwen3_5"])
def family(request, tmp_path_factory):
    from longact.data.tasks import make_dataset, write_parquet
    from longact.models.tiny import write_tiny_model

    out = tmp_path_factory.mktemp(request.param)
    model = write_tiny_model(out / "model", size="xxs", seed=0, arch=request.param)
    rows = make_dataset("niah_single", model, length=96, n=24, seed=0)
    data = {
        "train": write_parquet(rows[:20], out / "train.parquet"),
        "val": write_parquet(rows[20:], out / "val.parquet"),
    }
    return request.param, model, data


def _check_step(adapter, config, before: dict, after: dict, masks) -> None:
    layout = adapter.layout(config)
    qk = {}
    for name in before:
        ref = adapter.match_param(name)
        if ref is not None and ref.kind == "weight" and any(k in layout for k in ref.keys):
            rows = adapter.param_rows(ref, layout, before[name].shape[0])
            qk[name] = (param_mask(rows, masks, before[name].shape[0]), rows)
    # every (layer, q|k) the masks hold is found in some saved parameter, so a renamed
    # parameter cannot leave its frozen rows unchecked
    covered = sorted({key for _, rows in qk.values() for key, _ in rows})
    assert covered == masks.keys(), f"W_Q/W_K rows of {covered}, masks of {masks.keys()}"
    for name, w0 in before.items():
        w1 = after[name]
        if name not in qk:
            assert not torch.equal(w0, w1), f"{name} did not change"
            continue
        trainable, rows = qk[name]
        frozen = ~trainable
        assert frozen.any(), f"{name}: nothing frozen"
        assert torch.equal(w0[frozen], w1[frozen]), f"{name}: a frozen row moved"
        moved = (w0 != w1).any(dim=1)
        qk_rows = torch.zeros_like(trainable)
        for _, r in rows:
            qk_rows[r] = True
        assert bool(moved[trainable & qk_rows].all()), f"{name}: trainable q/k rows unchanged"
        other = ~qk_rows  # v rows (phi3), gate rows (qwen3.5): never masked
        if other.any():
            assert bool(moved[other].all()), f"{name}: v/gate rows unchanged"


def test_longact_train_on_family(family, tmp_path):
    arch, model, data = family
    ckpt = tmp_path / "ckpt"
    cmd = [
        str(BIN / "longact-train"),
        "recipe=grpo_cpu",
        *base_overrides(model, data, ckpt),
        "trainer.total_training_steps=3",
        "trainer.save_freq=1",
        "actor_rollout_ref.actor.optim.lr=1e-2",
        "actor_rollout_ref.actor.checkpoint.save_contents=[model,optimizer,extra,hf_model]",
        "longact.refresh_interval=2",
    ]
    metrics = step_metrics(run(cmd, tmp_path / f"{arch}.log"))
    assert sorted(metrics) == [1, 2, 3]
    assert [metrics[s]["actor/longact/mask_version"] for s in (1, 2, 3)] == [1.0, 1.0, 2.0]
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model)
    adapter = get_adapter(config)
    prev = load_weights(model / "model.safetensors")
    for step in (1, 2, 3):
        masks, _ = masks_at(ckpt, step)
        cur = step_weights(ckpt, step)
        _check_step(adapter, config, prev, cur, masks)
        prev = cur
