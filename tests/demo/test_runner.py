"""``longact.demo.runner.stream``: a failed stage's error carries the log's tail and, from
above it, the lines that say a process crashed."""

from __future__ import annotations

import sys

import pytest

from longact.demo.runner import stream


def test_failed_command_names_a_crash_far_above_the_tail(tmp_path):
    script = (
        "print('(raylet) worker 2329 *** SIGSEGV received at time=1 on cpu 0 ***')\n"
        "for i in range(60): print(f'traceback line {i}')\n"
        "raise SystemExit(3)\n"
    )
    seen = []
    with pytest.raises(RuntimeError) as err:
        stream([sys.executable, "-c", script], tmp_path / "x.log", seen.append)
    msg = str(err.value)
    assert "exited 3" in msg and "traceback line 59" in msg
    assert "crash signs in the log:\n(raylet) worker 2329 *** SIGSEGV" in msg
    assert "traceback line 5\n" not in msg  # neither the middle of the log
    assert len(seen) == 61 and (tmp_path / "x.log").read_text().count("\n") == 61


def test_failed_command_without_crash_signs_gives_the_tail_alone(tmp_path):
    with pytest.raises(RuntimeError) as err:
        stream([sys.executable, "-c", "print('bad config'); raise SystemExit(1)"],
               tmp_path / "x.log")  # fmt: skip
    assert "crash signs" not in str(err.value) and "bad config" in str(err.value)
