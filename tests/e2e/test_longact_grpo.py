"""LongAct through ``longact-train`` (GRPO, 2 FSDP2 ranks, CPU), killed and resumed, with
the GPU recipes' async refresh and optimizer offload.

One run of 5 planned steps with a checkpoint after every step and a mask refresh every
2 optimizer steps (at steps 1 and 3) is killed (SIGKILL to its whole process group) once
the step-3 checkpoint is complete; a second run resumes from it. With
``refresh_async`` the first refresh is waited for (version 1 in force at step 1) and the
one sent at step 3 is installed by the step-3 checkpoint, before verl writes its
optimizer state. The checks:

- at each step, step 1 included, every W_Q / W_K row outside the mask in force at that
  step is bit-identical before and after the step; rows inside changed; every other
  parameter changed;
- the versions in force run 1, 1, 1, 2 and the saved ones 1, 1, 2, 2;
- the resumed run continues at step 4 with the same mask version and coordinator state;
- field by field, the LongAct state saved at step 3 (EMA statistics with ``ema=0.5``, the
  refresh history, counters, on both ranks' copies) and the Adam moments of the frozen
  W_Q/W_K rows in verl's optimizer state are what step 4 continued from (zero: verl's
  AdamW takes the masked exact path, which zeroes the moments of rows leaving the mask,
  and the step-3 optimizer state was written after the new masks were installed);
- a wandb offline run directory holds the ``longact/*`` metrics.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from e2e_utils import (
    BIN,
    base_overrides,
    check_step,
    env,
    load_weights,
    masks_at,
    qk_moments,
    run,
    step_metrics,
    step_weights,
)

from longact.core.masks import MaskSet

pytestmark = pytest.mark.slow


def _cmd(tiny_dir, rl_data, ckpt, total, wandb_dir):
    return [
        str(BIN / "longact-train"),
        "recipe=grpo_cpu",
        *base_overrides(tiny_dir, rl_data, ckpt),
        f"trainer.total_training_steps={total}",
        "trainer.save_freq=1",
        "trainer.resume_mode=auto",
        "trainer.logger=[console,wandb]",
        "trainer.experiment_name=grpo_kill_resume",
        "actor_rollout_ref.actor.optim.lr=1e-2",
        "actor_rollout_ref.actor.checkpoint.save_contents=[model,optimizer,extra,hf_model]",
        "actor_rollout_ref.actor.fsdp_config.optimizer_offload=true",
        "longact.ratio=0.3",
        "longact.refresh_interval=2",
        "longact.refresh_async=true",
        "longact.ema=0.5",  # running statistics carry history: the resume must keep it
    ], {"WANDB_DIR": str(wandb_dir)}


def _latest(ckpt: Path) -> int:
    f = ckpt / "latest_checkpointed_iteration.txt"
    return int(f.read_text().strip()) if f.is_file() else 0


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory, tiny_dir, rl_data):
    """Start a 5-step run, SIGKILL it once the step-3 checkpoint is written."""
    root = tmp_path_factory.mktemp("grpo")
    ckpt, wandb_dir = root / "ckpt", root / "wandb"
    wandb_dir.mkdir()
    cmd, extra = _cmd(tiny_dir, rl_data, ckpt, 5, wandb_dir)
    log = root / "first.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(
            cmd, stdout=f, stderr=subprocess.STDOUT, env={**env(), **extra}, start_new_session=True
        )
        deadline = time.time() + 600
        try:
            # the step-3 checkpoint is complete and step 3's metrics line was printed
            while _latest(ckpt) < 3 or "step:3 - " not in log.read_text(errors="replace"):
                if proc.poll() is not None:
                    pytest.fail(f"run ended early ({proc.returncode}):\n{log.read_text()[-5000:]}")
                if time.time() > deadline:
                    pytest.fail("no step-3 checkpoint within 10 minutes")
                time.sleep(0.5)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    time.sleep(2)  # let the killed cluster's sockets close
    return {"root": root, "ckpt": ckpt, "wandb": wandb_dir, "log": log.read_text()}


def test_frozen_rows_bit_identical_each_step(killed_run, tiny_dir):
    """Against the mask in force at each step (its version is logged; its rows are in a
    checkpoint that saved that version), from step 1 on."""
    ckpt = killed_run["ckpt"]
    metrics = step_metrics(killed_run["log"])
    in_force = [int(metrics[s]["actor/longact/mask_version"]) for s in (1, 2, 3)]
    assert in_force == [1, 1, 1], in_force  # async: the step-3 refresh lands after step 3
    saved = {}
    for step in (1, 2, 3):
        masks, state = masks_at(ckpt, step)
        assert abs(masks.kept_fraction() - 0.3) < 0.05
        assert state["step"] == step  # one optimizer step per trainer step here
        saved[step] = masks
    # refreshes at steps 1 (waited for) and 3 (installed by that step's checkpoint)
    assert [saved[s].version for s in (1, 2, 3)] == [1, 1, 2]
    by_version = {m.version: m for m in saved.values()}
    prev = load_weights(tiny_dir / "model.safetensors")
    for step, version in zip((1, 2, 3), in_force):
        cur = step_weights(ckpt, step)
        check_step(prev, cur, by_version[version])
        prev = cur
    # the first refresh's numbers are on step 1's line; the step-3 refresh was installed
    # by the step-3 checkpoint, after that line (its numbers would be on step 4's line),
    # and is in the saved history
    assert 0.0 <= metrics[1]["actor/longact/mass_kept_q"] <= 1.0
    assert len(masks_at(ckpt, 3)[1]["coordinator"]["history"]) == 2
    for part in ("capture_s", "mask_s", "snapshot_s", "restore_s"):  # where LongAct's time goes
        assert metrics[3][f"actor/longact/{part}"] > 0, part
    assert metrics[3]["actor/longact/exact_path_snapshot"] == 0.0  # AdamW: the masked path
    assert metrics[3]["actor/longact/decay_s"] > 0  # its step hook applied the weight decay


@pytest.fixture(scope="module")
def resumed_run(killed_run, tiny_dir, rl_data) -> str:
    """The killed run resumed from its step-3 checkpoint, for one more step."""
    ckpt, root = killed_run["ckpt"], killed_run["root"]
    assert _latest(ckpt) == 3
    cmd, extra = _cmd(tiny_dir, rl_data, ckpt, 4, killed_run["wandb"])
    return run(cmd, root / "resume.log", extra_env=extra)


def test_resume_continues_with_same_masks(killed_run, resumed_run):
    ckpt = killed_run["ckpt"]
    metrics = step_metrics(resumed_run)
    assert sorted(metrics) == [4], f"resumed run logged steps {sorted(metrics)}"
    assert metrics[4]["actor/longact/mask_version"] == 2.0  # no new refresh at step 4
    masks3, _ = masks_at(ckpt, 3)
    masks4, state4 = masks_at(ckpt, 4)
    assert masks4.version == masks3.version == 2
    assert all(torch.equal(masks3[k], masks4[k]) for k in masks3.keys())
    coord = state4["coordinator"]
    assert coord["version"] == 2 and len(coord["history"]) == 2 and state4["step"] == 4
    check_step(step_weights(ckpt, 3), step_weights(ckpt, 4), masks4)


def test_resume_restores_the_whole_longact_state(killed_run, resumed_run, tiny_dir):
    """Field by field: the state saved at step 3 is the state the resumed run continued
    from. Step 4 has no refresh, so everything but the step counter must be unchanged at
    step 4: the EMA statistics, the refresh history, the version, on both ranks' copies;
    and in verl's optimizer state, the Adam moments of the frozen W_Q/W_K rows."""
    ckpt = killed_run["ckpt"]
    saved = [masks_at(ckpt, 3)[1]]
    saved.append(
        torch.load(ckpt / "global_step_3" / "actor" / "longact_state_rank1.pt", weights_only=False)
    )
    after = masks_at(ckpt, 4)[1]
    assert saved[0]["coordinator"]["config"]["ema"] == 0.5
    for state in saved:  # every rank wrote the same coordinator state (node-local copies)
        c0, c1 = state["coordinator"], after["coordinator"]
        assert (c0["version"], c0["history"], c0["nonfinite_refreshes"]) == (
            c1["version"],
            c1["history"],
            c1["nonfinite_refreshes"],
        )
        for key, fields in c0["running"]["entries"].items():
            for f, v in fields.items():
                assert torch.equal(v, c1["running"]["entries"][key][f]), (key, f)
        assert (state["last_refresh"], state["step"] + 1) == (after["last_refresh"], after["step"])
    masks = MaskSet.from_state_dict(after["coordinator"]["masks"])
    m3, m4 = qk_moments(ckpt, 3, tiny_dir), qk_moments(ckpt, 4, tiny_dir)
    assert m3.keys() == m4.keys() and m3
    nonzero_frozen = 0
    for (name, key), before in m3.items():
        layer = int(name.split(".layers.")[1].split(".")[0])
        keep = masks[(layer, "q" if ".q_proj." in name else "k")]
        assert torch.equal(before[~keep], m4[(name, key)][~keep]), f"{name} {key}: frozen moved"
        assert not torch.equal(before[keep], m4[(name, key)][keep]), f"{name} {key}: still"
        nonzero_frozen += int((before[~keep] != 0).any(dim=1).sum())
    # the masked exact path zeroed the moments of the rows that left the mask at step 3
    # (the snapshot path keeps them frozen, non-zero): frozen rows hold no moments
    assert nonzero_frozen == 0


def test_wandb_offline_has_longact_metrics(killed_run):
    runs = list(Path(killed_run["wandb"]).glob("wandb/offline-run-*/run-*.wandb"))
    assert runs, "no offline wandb run was written"
    assert any(b"longact/mask_version" in r.read_bytes() for r in runs)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
