"""longact-train's compact console (longact/train/console.py), without verl.

A child process runs ``RunConsole`` around code that prints what a verl run prints
(per-step metric dicts, worker noise, a grandchild writing straight to fd 2, LongAct's
notices); its terminal must show only the notices and one line per step, and the log
file everything.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

from longact.train.console import step_line

CHILD = textwrap.dedent(
    """
    import os, subprocess, sys
    from longact.train.console import RunConsole

    with RunConsole(sys.argv[1], total_steps=2):
        print("(TaskRunner pid=1) INFO: starting workers")
        print("longact-train: DAPO dynamic sampling: at most 4 generation rounds per step")
        for step in (1, 2):
            print(f"(TaskRunner pid=1) step:{step} - critic/score/mean:0.{step} - "
                  f"actor/longact/mask_version:{step}.0 - actor/longact/frozen_fraction:0.7 - "
                  f"actor/pg_loss:0.01 - timing_s/step:1.5")
        subprocess.run([sys.executable, "-c", "import os; os.write(2, b'worker noise\\\\n')"])
        print("W1203 some warning from a library", file=sys.stderr)
    print("after the run")
    """
)


def test_terminal_shows_a_line_per_step_and_the_log_keeps_everything(tmp_path):
    log = tmp_path / "out" / "train.log"
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(log)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout
    terminal = proc.stdout.splitlines()
    assert terminal[0] == f"longact-train: full log (verl's metrics, workers): {log}"
    assert "longact-train: DAPO dynamic sampling: at most 4 generation rounds per step" in terminal
    steps = [x for x in terminal if x.startswith("step ")]
    assert steps == [
        "step 1/2  reward 0.100  mask v1  kept 0.30  1.5s",
        "step 2/2  reward 0.200  mask v2  kept 0.30  1.5s",
    ]
    assert "after the run" in terminal  # the terminal is back after the block
    for noise in ("worker noise", "some warning", "INFO: starting", "actor/pg_loss"):
        assert not any(noise in x for x in terminal), noise
    text = log.read_text()
    for kept in ("worker noise", "some warning", "INFO: starting", "step:2 - ", "actor/pg_loss"):
        assert kept in text, kept
    assert "after the run" not in text


def test_step_line_shows_what_the_step_has():
    m = {"critic/score/mean": 0.25, "val-core/niah/acc/mean": 0.5, "timing_s/step": 2.04}
    assert step_line(7, None, m) == "step 7  reward 0.250  val acc 0.500  2.0s"
    m["training/filter_groups/filtered_share"] = 0.5
    assert "filtered 50%" in step_line(7, 9, m) and step_line(7, 9, m).startswith("step 7/9")


def test_full_console_is_a_switch(monkeypatch):
    from longact.train.console import RunConsole

    monkeypatch.setenv("LONGACT_CONSOLE", "full")
    assert not RunConsole.enabled()
    monkeypatch.setenv("LONGACT_CONSOLE", "compact")
    assert RunConsole.enabled()
