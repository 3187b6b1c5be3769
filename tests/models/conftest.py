"""Fixtures for the tiny-model tests (the xxs model itself comes from tests/conftest.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_tok(tiny_xxs):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_xxs)
