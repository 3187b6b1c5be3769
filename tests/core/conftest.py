"""Fixtures for the longact.core tests: tiny models built from configs, CPU only."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # for longact_tiny (any import mode)

from longact_tiny import tiny_model


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def qwen3():
    return tiny_model("qwen3")
