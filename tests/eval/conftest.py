"""Fixtures for the eval tests: a tiny (untrained) model directory, written once."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from longact.models.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny_eval") / "model", size="xxs", seed=0)
