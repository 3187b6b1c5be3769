"""Helpers for the end-to-end tests: run verl's trainer, parse its console metrics."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from longact.core.masks import MaskSet
from longact.train.runtime import state_path

HERE = Path(__file__).parent
REPO = HERE.parent.parent
BIN = Path(sys.executable).parent
QK_SUFFIXES = ("self_attn.q_proj.weight", "self_attn.k_proj.weight")


def base_overrides(tiny_dir: Path, rl_data: dict, ckpt: Path) -> list[str]:
    return [
        f"data.train_files={rl_data['train']}",
        f"data.val_files={rl_data['val']}",
        "data.max_prompt_length=128",
        f"actor_rollout_ref.model.path={tiny_dir}",
        f"reward.custom_reward_function.path={HERE / 'toy_reward.py'}",
        f"trainer.default_local_dir={ckpt}",
        "trainer.project_name=longact_tests",
    ]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.setdefault("PYTHONWARNINGS", "ignore")
    e["RAY_DEDUP_LOGS"] = "0"
    e["PYTHONUNBUFFERED"] = "1"  # metric lines reach the log as they are printed
    e["WANDB_MODE"] = "offline"
    e["LONGACT_CONSOLE"] = "full"  # verl's own console lines, parsed below (default: compact)
    e.pop("RAY_ADDRESS", None)  # always a fresh local cluster
    return e


def run(
    cmd: list[str],
    log: Path,
    timeout: int = 600,
    extra_env: dict | None = None,
    expect_rc: int = 0,
) -> str:
    """Run a trainer command; on an unexpected exit code show the end of its log."""
    with open(log, "w") as f:
        proc = subprocess.run(
            cmd,
            stdout=f,
            stderr=subprocess.STDOUT,
            env={**env(), **(extra_env or {})},
            timeout=timeout,
        )
    text = log.read_text(errors="replace")
    if proc.returncode != expect_rc:
        pytest.fail(f"{' '.join(cmd[:3])} exited {proc.returncode}; log tail:\n{text[-6000:]}")
    return text


def step_metrics(log_text: str) -> dict[int, dict[str, float]]:
    """verl's console logger lines ``step:N - key:value - ...`` -> {N: {key: value}}."""
    from longact.train.logs import parse_step_metrics

    return parse_step_metrics(log_text)


def load_weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def step_weights(ckpt: Path, step: int) -> dict:
    return load_weights(
        ckpt / f"global_step_{step}" / "actor" / "huggingface" / "model.safetensors"
    )


def masks_at(ckpt: Path, step: int) -> tuple[MaskSet, dict]:
    state = torch.load(state_path(ckpt / f"global_step_{step}" / "actor", 0), weights_only=False)
    return MaskSet.from_state_dict(state["coordinator"]["masks"]), state


def check_step(before: dict, after: dict, masks: MaskSet) -> None:
    """Frozen W_Q/W_K rows bit-identical, trainable rows changed, all else changed; and
    the saved W_Q/W_K names are exactly the masks' keys, one weight per (layer, q|k), so
    a renamed parameter cannot leave the frozen rows unchecked."""
    matched = []
    for name, w0 in before.items():
        w1 = after[name]
        if name.endswith(QK_SUFFIXES):
            layer = int(name.split(".layers.")[1].split(".")[0])
            proj = "q" if ".q_proj." in name else "k"
            matched.append((layer, proj))
            keep = masks[(layer, proj)]
            assert keep.shape[0] == w0.shape[0]
            assert torch.equal(w0[~keep], w1[~keep]), f"{name}: a frozen row moved"
            moved = (w0[keep] != w1[keep]).any(dim=1)
            assert bool(moved.all()), f"{name}: {int((~moved).sum())} trainable rows unchanged"
        else:
            assert not torch.equal(w0, w1), f"{name} did not change"
    found = sorted(matched)
    assert found == masks.keys(), f"W_Q/W_K weights of {found}, masks of {masks.keys()}"


def qk_moments(ckpt: Path, step: int, model_dir: Path, world: int = 2) -> dict:
    """{(param name, state key): (rows, ...) tensor} of the Adam moments of every W_Q/W_K
    weight in the step's verl optimizer checkpoint, each rank's rows put back in place."""
    from longact.train.ckpt_read import qk_optimizer_state

    state = qk_optimizer_state(ckpt, step, model_dir, world)
    return {k: v for k, v in state.items() if k[1] in ("exp_avg", "exp_avg_sq")}
