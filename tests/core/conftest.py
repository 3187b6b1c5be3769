"""Fixtures for the longact.core tests: tiny models built from configs, CPU only."""

import pytest
import torch
from longact_tiny import tiny_model  # on sys.path through tests/conftest.py


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def qwen3():
    return tiny_model("qwen3")
