"""LongAct through ``longact-train`` with the DAPO recipe on the CPU (v1 trainer).

3 steps, 2 FSDP2 ranks, dynamic sampling on, the profile-first calibration pass (the first
mask, version 1, comes from calibration prompts before step 1) and a refresh every 2
optimizer steps (step 2). Each step's frozen W_Q / W_K rows are bit-identical across that
step, trainable rows and every other parameter changed, and the mask version in force
was 1, 2, 2. The run uses longact-train's compact console: one line per step on the
terminal, verl's full metrics in the log file the first line names.

A second run, an untrained model on the task's own reward (every group scores 0, so
every group is filtered), ends with the bounded-sampling error within the configured
number of generation rounds.
"""

from __future__ import annotations

import re
import time

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
    hydra_dir = tmp_path / "hydra"
    cmd.append(f"hydra.run.dir={hydra_dir}")
    console = run(cmd, tmp_path / "dapo.log", extra_env={"LONGACT_CONSOLE": "compact"})
    log = hydra_dir / "train.log"
    assert f"full log (verl's metrics, workers): {log}" in console
    # the terminal shows one line per step, in order, with LongAct's mask version
    lines = re.findall(r"^step (\d)/3 .*$", console, flags=re.M)
    assert lines == ["1", "2", "3"], console
    step1 = next(x for x in console.splitlines() if x.startswith("step 1/3"))
    for part in ("reward ", "filtered ", "mask v1", "kept 0.31"):
        assert part in step1, step1
    assert "actor/pg_loss" not in console and len(console.splitlines()) < 20, console
    metrics = step_metrics(log.read_text())  # verl's full metrics are in the log
    assert sorted(metrics) == [1, 2, 3]
    assert "actor/pg_loss" in metrics[1]
    # the bounded sampler's metrics: a share of groups filtered, within the rounds allowed
    shares = [metrics[s]["training/filter_groups/filtered_share"] for s in (1, 2, 3)]
    assert all(0.0 <= x < 1.0 for x in shares) and max(shares) > 0, shares
    assert all(1 <= metrics[s]["training/filter_groups/gen_rounds"] <= 16 for s in (1, 2, 3))
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


def test_dapo_without_signal_stops_with_a_clear_error(tmp_path, tiny_dir, rl_data):
    """Untrained model + the needle task's own reward: every group is filtered."""
    ckpt = tmp_path / "ckpt"
    overrides = [o for o in base_overrides(tiny_dir, rl_data, ckpt) if "reward_function" not in o]
    cmd = [
        str(BIN / "longact-train"),
        "recipe=dapo_cpu",
        *overrides,
        "trainer.total_training_steps=3",
        "algorithm.filter_groups.max_num_gen_batches=2",
        f"hydra.run.dir={tmp_path / 'hydra'}",
    ]
    t0 = time.time()
    console = run(
        cmd, tmp_path / "dapo_nosignal.log", extra_env={"LONGACT_CONSOLE": "compact"}, expect_rc=1
    )
    elapsed = time.time() - t0
    error = [x for x in console.splitlines() if x.startswith("longact-train: error:")]
    assert len(error) == 1, console
    msg = error[0]
    assert "DAPO dynamic sampling at step 1: after 2 generation rounds (8 prompts" in msg
    assert "8 of 8 finished groups (100%) were filtered" in msg and "'acc'" in msg
    assert "algorithm.filter_groups.enable=false" in msg
    assert "Traceback" not in console and len(console.splitlines()) < 10, console
    assert elapsed < 400, f"took {elapsed:.0f} s"  # start-up + 2 rounds, never unbounded
    log = (tmp_path / "hydra" / "train.log").read_text()
    assert "DynamicSamplingExhausted" in log  # the full traceback stays in the log
