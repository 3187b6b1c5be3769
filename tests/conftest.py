"""Session-wide fixtures shared by every test folder: tiny models are built, never
downloaded."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# tests/core/longact_tiny.py (tiny HF decoders from configs) serves every test folder
sys.path.insert(0, str(Path(__file__).parent / "core"))


@pytest.fixture(scope="session")
def tiny_xxs(tmp_path_factory) -> Path:
    """The xxs tiny Qwen3 (seed 0) with its offline tokenizer, written once per session."""
    from longact.models.tiny import write_tiny_model

    out = tmp_path_factory.getbasetemp() / "shared_tiny_xxs_seed0"
    if not (out / "longact_tiny.json").exists():
        write_tiny_model(out, size="xxs", seed=0)
    return out
