"""LongAct through ``longact-train`` with the GPU recipe's actor layout, on the CPU.

The GPU recipes train with packed micro-batches (``use_remove_padding``), gradient
checkpointing, dynamic batch sizes and, at long context, Ulysses sequence parallelism,
which pads each packed micro-batch so that it splits evenly across the SP group. One
GRPO run of 3 steps with those settings (SP=2 over the 2 ranks, a refresh every step,
a checkpoint after every step, verl's fused kernels, and the first mask chosen by the
calibration pass before step 1) checks that:

- at every step, frozen W_Q / W_K rows are bit-identical, trainable rows and every other
  parameter changed;
- at every step, the statistics behind the refresh counted exactly the real tokens of
  that step's training forwards: ``actor/longact/window_tokens`` (summed over the ranks
  by the coordinator) equals verl's ``perf/total_num_tokens`` for the step (one PPO
  epoch over one mini-batch), so neither SP padding nor gradient-checkpoint replays
  nor the log-prob passes were counted;
- at every step, some training micro-batch was padded (``actor/longact/pad_tokens``,
  verl's ``pad_size`` as the engine saw it, is > 0), so the count above held with
  padding to leave out. The prompts are 95 tokens (odd) and the token budget holds one
  or two sequences per micro-batch, so a sequence of odd length (any even-length
  response: 8 tokens when no EOS comes first) makes an odd packed length, which SP=2
  pads by one token.

On the CPU, verl's Ulysses attention (a flash-attention patch) does not engage, so each
rank attends within its slice: the numbers trained are not meaningful, the plumbing is.
"""

from __future__ import annotations

import sys

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

LAYOUT = [
    "actor_rollout_ref.model.use_remove_padding=true",
    "actor_rollout_ref.model.enable_gradient_checkpointing=true",
    "actor_rollout_ref.actor.use_dynamic_bsz=true",
    "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=64",  # x SP=2: 128 per micro-batch
    "actor_rollout_ref.actor.ulysses_sequence_parallel_size=2",
    "actor_rollout_ref.actor.fsdp_config.ulysses_sequence_parallel_size=2",
    "actor_rollout_ref.ref.fsdp_config.ulysses_sequence_parallel_size=2",
    "actor_rollout_ref.ref.log_prob_use_dynamic_bsz=true",
    "actor_rollout_ref.ref.log_prob_max_token_len_per_gpu=512",
    "actor_rollout_ref.rollout.log_prob_use_dynamic_bsz=true",
    "actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu=512",
]


@pytest.fixture(scope="module")
def packed_run(tmp_path_factory, tiny_dir):
    from longact.data.tasks import make_dataset, write_parquet

    root = tmp_path_factory.mktemp("packed")
    ckpt = root / "ckpt"
    rows = make_dataset("niah_single", tiny_dir, length=95, n=24, seed=0)  # odd length
    data = {
        "train": write_parquet(rows[:20], root / "train.parquet"),
        "val": write_parquet(rows[20:], root / "val.parquet"),
    }
    cmd = [
        str(BIN / "longact-train"),
        "recipe=grpo_cpu",
        *base_overrides(tiny_dir, data, ckpt),
        *LAYOUT,
        "trainer.total_training_steps=3",
        "trainer.save_freq=1",
        "trainer.experiment_name=grpo_packed_sp2",
        "actor_rollout_ref.actor.optim.lr=1e-2",
        "actor_rollout_ref.actor.checkpoint.save_contents=[model,optimizer,extra,hf_model]",
        "longact.ratio=0.3",
        "longact.refresh_interval=1",
        # the paper recipes' fused kernels and the profile-first pass, under Ulysses SP=2
        "actor_rollout_ref.model.use_fused_kernels=true",
        "longact.calibration.enable=true",
        f"longact.calibration.data={data['val']}",
        "longact.calibration.num_samples=4",
        "longact.calibration.batch_size=2",
    ]
    text = run(cmd, root / "train.log", timeout=900)
    return {"ckpt": ckpt, "metrics": step_metrics(text), "log": text}


def test_frozen_rows_bit_identical_each_step(packed_run, tiny_dir):
    ckpt = packed_run["ckpt"]
    prev = load_weights(tiny_dir / "model.safetensors")
    for step in (1, 2, 3):
        masks, state = masks_at(ckpt, step)
        assert masks.version == step + 1  # v1 from calibration, then a refresh every step
        assert len(state["coordinator"]["history"]) == step + 1
        cur = step_weights(ckpt, step)
        check_step(prev, cur, masks)
        prev = cur


def test_statistics_count_exactly_the_real_tokens_of_each_step(packed_run):
    """Real tokens counted, the padding of padded micro-batches left out."""
    metrics = packed_run["metrics"]
    assert sorted(metrics) == [1, 2, 3]
    for step, m in metrics.items():
        assert m["actor/longact/pad_tokens"] > 0, f"step {step}: no micro-batch was padded"
        assert m["actor/longact/window_tokens"] == m["perf/total_num_tokens"], (step, m)
        assert m["actor/longact/mask_version"] == step + 1


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
