"""Fixtures for end-to-end runs of verl's trainer on the CPU (tiny model, tiny data).

These tests start real verl runs (Ray, 2 FSDP2 ranks on gloo, the hf rollout); each
takes one to two minutes on 2 cores and is marked ``slow``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # e2e_utils, toy_reward


@pytest.fixture(scope="session")
def tiny_dir(tiny_xxs) -> Path:
    return tiny_xxs


@pytest.fixture(scope="session")
def rl_data(tmp_path_factory, tiny_dir) -> dict[str, Path]:
    from longact.data.tasks import make_dataset, write_parquet

    out = tmp_path_factory.mktemp("data")
    rows = make_dataset("niah_single", tiny_dir, length=96, n=48, seed=0)
    return {
        "train": write_parquet(rows[:40], out / "train.parquet"),
        "val": write_parquet(rows[40:], out / "val.parquet"),
    }
