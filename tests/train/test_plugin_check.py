"""``plugin_problem``: a missing or broken LongAct plugin is named, never silent.

verl swallows a plugin's import error (debug log), so without this check a run would get
verl's stock engine and train plain RL. Each way it can go wrong gets its own line.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from longact.train import plugin_check
from longact.train.plugin_check import plugin_problem


def test_loaded_plugin_is_no_problem():
    assert plugin_problem("cpu") is None
    assert plugin_problem("cuda") is None


@pytest.fixture
def stock_registry(monkeypatch):
    """verl's engine registry as it is when LongAct's plugin did not load."""
    from verl.workers.engine.base import EngineRegistry

    engines = {k: dict(v) for k, v in EngineRegistry._engines["language_model"].items()}
    for backend in engines.values():
        for key in ("cpu", ("cuda", "nvidia")):
            backend.pop(key, None)
    monkeypatch.setitem(EngineRegistry._engines, "language_model", engines)
    monkeypatch.delenv("VERL_USE_EXTERNAL_PLUGINS", raising=False)


class _BrokenEntryPoint:
    name, value = "longact", "longact.workers.plugin"

    def load(self):
        raise ModuleNotFoundError("No module named 'longact.workers'")


def test_import_error_is_named(stock_registry, monkeypatch):
    monkeypatch.setattr("importlib.metadata.entry_points", lambda group: [_BrokenEntryPoint()])
    msg = plugin_problem("cuda")
    assert "engine for ('cuda', 'nvidia') is FSDPEngineWithLMHead, not LongAct's" in msg
    assert "fails to import: ModuleNotFoundError: No module named 'longact.workers'" in msg


def test_missing_entry_point_is_named(stock_registry, monkeypatch):
    monkeypatch.setattr("importlib.metadata.entry_points", lambda group: [])
    msg = plugin_problem("cpu")
    assert "no 'longact' entry point in group 'verl.plugins'" in msg
    assert "pip install -e ." in msg


def test_policy_that_excludes_longact_is_named(stock_registry, monkeypatch):
    monkeypatch.setenv("VERL_USE_EXTERNAL_PLUGINS", "someone_else")
    assert "VERL_USE_EXTERNAL_PLUGINS='someone_else'" in plugin_problem("cpu")
    assert plugin_check.engine_key("cuda") == ("cuda", "nvidia")


def test_longact_train_stops_without_its_plugin(tmp_path):
    """A run whose processes would not load the plugin stops before anything starts."""
    script = Path(sys.executable).parent / "longact-train"
    env = dict(os.environ, VERL_USE_EXTERNAL_PLUGINS="none", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [str(script), "recipe=grpo_cpu", f"actor_rollout_ref.model.path={tmp_path}"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=240,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "LongAct's verl plugin is not loaded" in proc.stderr, proc.stderr[-2000:]
    assert "VERL_USE_EXTERNAL_PLUGINS='none'" in proc.stderr
