"""verl's own trainer (``python -m verl.trainer.main_ppo``, the v1 trainer) on the CPU.

2 GRPO steps with 2 FSDP2 ranks on gloo and the ``hf`` rollout, from verl's own
``ppo_trainer`` config plus LongAct's CPU platform group, through LongAct's plugin alone
(loaded by verl's entry point; with no ``longact:`` section LongAct's hook stays off and
verl behaves as stock verl). Checks: the actor's weights changed, the rollout's
log-probs match the actor's recomputed ones, step metrics were logged, and none of them
is LongAct's. (A LongAct recipe given to verl's main_ppo is refused: see
``tests/workers/test_plugin_platform.py``.)
"""

from __future__ import annotations

import sys

import pytest
import torch
from e2e_utils import base_overrides, load_weights, run, step_metrics, step_weights

pytestmark = pytest.mark.slow


def test_verl_main_ppo_grpo_two_ranks(tmp_path, tiny_dir, rl_data):
    ckpt = tmp_path / "ckpt"
    cmd = [
        sys.executable,
        "-m",
        "verl.trainer.main_ppo",
        "--config-name=ppo_trainer",
        "hydra.searchpath=[pkg://longact.hydra_configs]",
        "+platform=cpu",
        *base_overrides(tiny_dir, rl_data, ckpt),
        "algorithm.adv_estimator=grpo",
        "data.train_batch_size=4",
        "data.max_response_length=8",
        "actor_rollout_ref.actor.ppo_mini_batch_size=4",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8",
        "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=8",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=8",
        "actor_rollout_ref.rollout.n=8",
        "trainer.logger=[console]",
        "trainer.val_before_train=false",
        "trainer.test_freq=-1",
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
        # plain verl: LongAct's hook stays off (verl logs the actor's metrics as actor/*)
        assert not [k for k in m if "longact/" in k], m
    before = load_weights(tiny_dir / "model.safetensors")
    after = step_weights(ckpt, 2)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) == len(before), f"unchanged: {sorted(set(before) - set(changed))}"
