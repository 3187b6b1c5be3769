"""``scripts/gpu_check.py`` under a timeout: SIGTERM (what ``timeout`` sends) kills the
training run's process group, which it started as a session of its own, so nothing is
left holding the GPU; the JSON report is still written and says why it stopped.

A stand-in ``longact-train`` on PATH starts a child in its session and waits; the test
sends SIGTERM to gpu_check.py once that child runs, then looks for survivors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]


def _marked(marker: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if marker in " ".join(p.info["cmdline"] or []):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


@pytest.mark.timeout(240)
def test_sigterm_kills_the_training_runs_process_group(tmp_path):
    marker = f"gpu-check-child-{uuid.uuid4().hex}"
    fake = tmp_path / "bin" / "longact-train"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\nsh -c 'sleep 600; : {marker}' &\nsleep 600\n")
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "out"
    cmd = [sys.executable, "scripts/gpu_check.py", "--device", "cpu", "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not _marked(marker):  # the stand-in run and its child are up
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "the stand-in longact-train never started"
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
        time.sleep(0.5)
        left = [p.pid for p in _marked(marker)]
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in _marked(marker):  # leave nothing behind, whatever the outcome
            p.kill()
    assert proc.returncode != 0
    assert not left, f"left running after SIGTERM: {left}"
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["ok"] is False
    assert any("stopped by signal 15" in p for p in report["problems"]), report["problems"]
