"""Session-wide fixtures shared by every test folder (tiny models are built, never
downloaded), and the suite's bounds on time: every test has a timeout (pyproject.toml),
``slow`` tests a longer default, and a hang the timeout cannot break ends the session."""

from __future__ import annotations

import faulthandler
import os
import sys
from pathlib import Path

import pytest

# tests/core/longact_tiny.py (tiny HF decoders from configs) serves every test folder
sys.path.insert(0, str(Path(__file__).parent / "core"))

SLOW_TIMEOUT_S = 1200
"""Default bound of a ``slow`` test without its own timeout mark: one or two verl runs
(80-130 s each on 2 cores), above the 600-900 s their subprocesses are bounded by."""

BACKSTOP_S = 120
"""Seconds past a test's timeout before the backstop dumps every thread and exits: the
timeout's SIGALRM cannot interrupt a hang inside C code that holds the main thread."""

_stderr = -1  # the terminal's stderr, duplicated before output capture starts


def pytest_configure(config):
    global _stderr
    if not config.pluginmanager.hasplugin("timeout"):
        raise pytest.UsageError("the suite bounds every test with pytest-timeout: install it")
    _stderr = os.dup(2)


def pytest_collection_modifyitems(config, items):
    """``slow`` tests without a timeout mark of their own get SLOW_TIMEOUT_S."""
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT_S))


def _timeout(item) -> float:
    """The test's pytest-timeout bound in seconds (0: none): its mark, else the option."""
    mark = item.get_closest_marker("timeout")
    if mark is not None and (mark.args or "timeout" in mark.kwargs):
        value = mark.args[0] if mark.args else mark.kwargs["timeout"]
    else:
        value = item.config.getvalue("timeout") or item.config.getini("timeout")
    return float(value or 0)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """The backstop: a test still running BACKSTOP_S after its timeout ends the session
    (faulthandler's C watchdog thread dumps the stacks and exits with status 1)."""
    limit = _timeout(item)
    armed = limit > 0 and _stderr >= 0 and not item.config.getvalue("usepdb")
    if armed:
        faulthandler.dump_traceback_later(limit + BACKSTOP_S, exit=True, file=_stderr)
    try:
        return (yield)
    finally:
        if armed:
            faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="session")
def tiny_xxs(tmp_path_factory) -> Path:
    """The xxs tiny Qwen3 (seed 0) with its offline tokenizer, written once per session."""
    from longact.models.tiny import write_tiny_model

    out = tmp_path_factory.getbasetemp() / "shared_tiny_xxs_seed0"
    if not (out / "longact_tiny.json").exists():
        write_tiny_model(out, size="xxs", seed=0)
    return out
