"""Fixtures for the inspect tests: two tiny (untrained) models and a small parquet."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """(seed-0 model dir, seed-1 model dir), size xxs."""
    from longact.models.tiny import write_tiny_model

    root = tmp_path_factory.mktemp("tiny_inspect")
    return write_tiny_model(root / "m0", "xxs", 0), write_tiny_model(root / "m1", "xxs", 1)


@pytest.fixture(scope="session")
def niah_parquet(tiny_models, tmp_path_factory):
    """4 niah_single prompts: two of 128 tokens and two of 160 (a padded batch)."""
    from longact.data.tasks import make_dataset, write_parquet

    tok = str(tiny_models[0])
    rows = make_dataset("niah_single", tok, length=128, n=2)
    rows += make_dataset("niah_single", tok, length=160, n=2)
    return write_parquet(rows, tmp_path_factory.mktemp("inspect_data") / "niah.parquet")
