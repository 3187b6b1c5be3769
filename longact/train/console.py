"""A readable console for ``longact-train``: one line per step, the rest to a log file.

verl's trainer, its Ray workers and their libraries print a great deal: a dict of a
hundred metrics per step, per-worker start-up logs, warnings. ``RunConsole`` routes the
process's standard output and error (file descriptors 1 and 2, so Ray's forwarded
worker output and C-level prints are included) into ``train.log`` and shows on the
terminal:

- ``longact-train:`` notices and errors (a run that crashes prints its traceback after
  the routing ends, as Hydra reports it);
- one line per training step, read from verl's console logger (``step:N - key:value``):
  step, reward, validation accuracy (at validation steps: verl logs no training
  accuracy), the DAPO filtered share, LongAct's mask version and kept fraction of
  W_Q/W_K rows, the step time;
- a progress bar over the steps when the terminal is a TTY.

verl's full metrics still reach every logger in ``trainer.logger`` (its ``console``
logger writes them to the log file), and the first line says where the log is.
``LONGACT_CONSOLE=full`` turns the routing off (everything on the terminal, as verl
prints it); tools that parse verl's output themselves set it.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from typing import IO

from longact.train.logs import parse_step_metrics

ENV = "LONGACT_CONSOLE"
# verl's import-time notices about optional engines this install does not use. Filtered
# in LongAct's entry points (``longact``, ``longact-train``) and, through the run's
# runtime_env, in the processes of a longact-train run; never globally.
QUIET_WARNINGS = [
    f"ignore:{name} engine is not available"
    for name in ("torchtitan", "veomni", "automodel", "mindspeed", "megatron")
]
# lines shown on the terminal as they are, besides the step lines (prefix match)
PASS_THROUGH = ("longact-train:",)


def _first(*keys: str):
    return lambda m: next((m[k] for k in keys if k in m), None)


def _val_acc(m: dict[str, float]) -> float | None:
    """Validation accuracy (verl logs a training accuracy for no reward manager)."""
    for k in sorted(m):
        if k.startswith("val-core/") and k.endswith("/acc/mean"):
            return m[k]
    return None


def _kept(m: dict[str, float]) -> float | None:
    frozen = m.get("actor/longact/frozen_fraction")
    return None if frozen is None else 1.0 - frozen


# (label, value from the step's metrics, format); a column shows when its value exists
COLUMNS = [
    ("reward ", _first("critic/score/mean", "critic/rewards/mean"), "{:.3f}"),
    ("val acc ", _val_acc, "{:.3f}"),
    ("filtered ", _first("training/filter_groups/filtered_share"), "{:.0%}"),
    ("mask v", _first("actor/longact/mask_version"), "{:.0f}"),
    ("kept ", _kept, "{:.2f}"),  # share of W_Q/W_K rows trainable
]


def quiet_known_noise() -> None:
    """Filter :data:`QUIET_WARNINGS` in this process (an entry point calls it)."""
    import warnings

    for q in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=q.split(":", 1)[1])


def step_line(step: int, total: int | None, m: dict[str, float]) -> str:
    """The one line shown for a step's metrics ``m`` (verl's metric names)."""
    parts = [f"step {step}/{total}" if total else f"step {step}"]
    for label, value_of, fmt in COLUMNS:
        value = value_of(m)
        if value is not None:
            parts.append(label + fmt.format(value))
    if "timing_s/step" in m:
        parts.append(f"{m['timing_s/step']:.1f}s")
    return "  ".join(parts)


class RunConsole:
    """Context manager: routes fds 1 and 2 to ``log_path``, shows step lines on the terminal."""

    def __init__(self, log_path: str | Path, total_steps: int | None = None):
        self.log_path = Path(log_path)
        self.total = total_steps if total_steps and total_steps > 0 else None
        self.steps_seen: set[int] = set()
        self._thread: threading.Thread | None = None

    @staticmethod
    def enabled() -> bool:
        return os.environ.get(ENV, "compact") != "full"

    def __enter__(self) -> RunConsole:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        sys.stdout.flush()
        sys.stderr.flush()
        self._saved = (os.dup(1), os.dup(2))
        self.term: IO[str] = os.fdopen(os.dup(self._saved[1]), "w", buffering=1)
        self.term.write(f"longact-train: full log (verl's metrics, workers): {self.log_path}\n")
        self._bar = self._make_bar()
        read, write = os.pipe()
        os.dup2(write, 1)
        os.dup2(write, 2)
        os.close(write)
        self._log = open(self.log_path, "a", buffering=1, errors="replace")
        self._thread = threading.Thread(target=self._pump, args=(read,), daemon=True)
        self._thread.start()
        return self

    def _make_bar(self):
        if not self.term.isatty():
            return None
        import shutil

        from tqdm import tqdm

        width = shutil.get_terminal_size((100, 20)).columns  # a terminal reporting 0: 100
        return tqdm(total=self.total, file=self.term, unit="step", ncols=width, leave=True)

    def _show(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=self.term)
        else:
            self.term.write(text + "\n")

    def _pump(self, fd: int) -> None:
        with os.fdopen(fd, "r", errors="replace") as pipe:
            for line in pipe:
                self._log.write(line)
                self._route(line.rstrip("\n"))

    def _route(self, line: str) -> None:
        for step, metrics in parse_step_metrics(line).items():
            if step in self.steps_seen or not metrics:
                continue
            self.steps_seen.add(step)
            self._show(step_line(step, self.total, metrics))
            if self._bar is not None:
                self._bar.update(1)
            return
        body = line.split(") ", 1)[1] if line.startswith("(") and ") " in line else line
        if body.startswith(PASS_THROUGH):
            self._show(body)

    def __exit__(self, *exc) -> None:
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():
            ray.shutdown()  # the run is over: its workers' last output goes to the log too
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(self._saved[0], 1)  # closes the pipe's last write ends
        os.dup2(self._saved[1], 2)
        if self._thread is not None:
            self._thread.join(timeout=3)  # Ray's children may hold the pipe
        if self._bar is not None:
            self._bar.close()
        self._log.close()
        for fd in self._saved:
            os.close(fd)
        self.term.close()
