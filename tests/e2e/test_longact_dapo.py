"""LongAct through ``longact-train`` with the DAPO recipe on the CPU (v1 trainer).

3 steps, 2 FSDP2 ranks, dynamic sampling on, the profile-first calibration pass (the first
mask, version 1, comes from calibration prompts before step 1) and a refresh every 2
optimizer steps (step 2). Each step's frozen W_Q / W_K rows are bit-identical across that
step, trainable rows and every other parameter changed, and the mask version in force
was 1, 2, 2.
"""

from __future__ import annotations

import pytest
from e2e_utils import (
    BIN,
    base_overrides,
    check_step,
    load_weights,
    masks_at,
    run,
    step_metrics,
    step_weights,
)

pytestmark = pytest.mark.slow


def test_dapo_dynamic_sampling_exact_masks(tmp_path, tiny_dir, rl_data):
    ckpt = tmp_path / "ckpt"
    cmd = [
        str(BIN / "longact-train"),
        "recipe=dapo_cpu",
        *base_overrides(tiny_dir, rl_data, ckpt),
        "trainer.total_training_steps=3",
        "trainer.save_freq=1",
        "actor_rollout_ref.actor.optim.lr=1e-2",
        "actor_rollout_ref.actor.checkpoint.save_contents=[model,optimizer,extra,hf_model]",
        "longact.refresh_interval=2",
        "longact.granularity=rope_pair",
        "longact.calibration.enable=true",
        f"longact.calibration.data={rl_data['val']}",
        "longact.calibration.num_samples=6",
        "longact.calibration.batch_size=2",
    ]
    text = run(cmd, tmp_path / "dapo.log")
    metrics = step_metrics(text)
    assert sorted(metrics) == [1, 2, 3]
    # DAPO's dynamic sampling ran (the v1 trainer's group filter reports what it evicted)
    # (toy_reward gives even-indexed prompts no signal, so some groups are always dropped)
    evicted = [metrics[s].get("training/filter_groups/evicted_samples", 0) for s in metrics]
    assert sum(evicted) > 0, evicted
    assert [metrics[s]["actor/longact/mask_version"] for s in (1, 2, 3)] == [1.0, 2.0, 2.0]
    prev = load_weights(tiny_dir / "model.safetensors")
    for step in (1, 2, 3):
        masks, _ = masks_at(ckpt, step)
        assert masks.meta["granularity"] == "rope_pair"
        cur = step_weights(ckpt, step)
        check_step(prev, cur, masks)
        prev = cur
