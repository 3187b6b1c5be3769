"""verl's own trainer (``python -m verl.trainer.main_ppo``, the v1 trainer) on the CPU.

2 GRPO steps with 2 FSDP2 ranks on gloo and the ``hf`` rollout, through LongAct's
plugin alone (loaded by verl's entry point; LongAct's training hook is off because
``longact-train`` is not the launcher). Checks: the actor's weights changed, the
rollout's log-probs match the actor's recomputed ones, and step metrics were logged.
"""

from __future__ import annotations

import sys

import pytest
import torch
from e2e_utils import REPO, base_overrides, load_weights, run, step_metrics, step_weights

pytestmark = pytest.mark.slow


def test_verl_main_ppo_grpo_two_ranks(tmp_path, tiny_dir, rl_data):
    ckpt = tmp_path / "ckpt"
    cmd = [
        sys.executable,
        "-m",
        "verl.trainer.main_ppo",
        f"--config-path={REPO / 'recipes'}",
        "--config-name=grpo_cpu",
        "hydra.searchpath=[pkg://longact.hydra_configs,pkg://verl.trainer.config]",
        *base_overrides(tiny_dir, rl_data, ckpt),
        "trainer.total_training_steps=2",
        "trainer.save_freq=2",
        "actor_rollout_ref.actor.optim.lr=1e-3",
        "actor_rollout_ref.actor.checkpoint.save_contents=[model,optimizer,extra,hf_model]",
    ]
    text = run(cmd, tmp_path / "train.log")
    metrics = step_metrics(text)
    assert sorted(metrics) == [1, 2], f"steps logged: {sorted(metrics)}"
    for step, m in metrics.items():
        for key in ("timing_s/step", "critic/score/mean", "actor/pg_loss", "actor/grad_norm"):
            assert key in m, f"step {step} lacks {key}"
        assert m["training/rollout_probs_diff_valid"] == 1.0
        # the hf rollout's log-probs equal the FSDP actor's recomputation
        assert m["training/rollout_probs_diff_mean"] < 1e-3, m["training/rollout_probs_diff_mean"]
        assert "longact/mask_version" not in m  # plain verl: LongAct's hook stays off
    before = load_weights(tiny_dir / "model.safetensors")
    after = step_weights(ckpt, 2)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) == len(before), f"unchanged: {sorted(set(before) - set(changed))}"
