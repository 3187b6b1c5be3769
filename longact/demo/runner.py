"""Running stages of a pipeline: cached by config hash, subprocesses with live progress.

A stage is done when ``<out>/<stage>/stage.json`` exists with the hash of the config it
was run with; a rerun with the same config reuses it. A stage's outputs are written to
a temporary folder and moved into place at the end, so an interrupted run never leaves
a half-finished stage that looks done.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def config_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Stages:
    """Runs named stages in order under ``out``, skipping those already done."""

    def __init__(self, out: Path, log: Callable[[str], None] = print):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.log = log
        self.timings: dict[str, float] = {}
        self.cached: list[str] = []

    def dir(self, name: str) -> Path:
        return self.out / name

    def run(self, name: str, cfg: Any, fn: Callable[[Path], dict | None]) -> dict:
        final = self.dir(name)
        marker = final / "stage.json"
        h = config_hash(cfg)
        if marker.is_file():
            meta = json.loads(marker.read_text())
            if meta.get("hash") == h:
                self.log(f"[{name}] cached ({final})")
                self.cached.append(name)
                self.timings[name] = meta.get("seconds", 0.0)
                return meta.get("result") or {}
        tmp = final.with_name(final.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        self.log(f"[{name}] running ...")
        t0 = time.time()
        result = fn(tmp) or {}
        seconds = time.time() - t0
        (tmp / "stage.json").write_text(
            json.dumps({"hash": h, "seconds": seconds, "result": result}, indent=2, default=str)
        )
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        self.timings[name] = seconds
        self.log(f"[{name}] done in {seconds:.0f}s")
        return result


CRASH_SIGNS = re.compile(
    r"SIG(SEGV|BUS|ABRT|KILL|ILL|FPE)|Fatal Python error|Segmentation fault|core dumped"
    r"|[Oo]ut of memory|OOM|Killed|died|Check failed|terminate called",
)


def stream(
    cmd: list[str],
    log_path: Path,
    on_line: Callable[[str], None] | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> None:
    """Run ``cmd``, teeing its output to ``log_path`` and feeding lines to ``on_line``."""
    full_env = {**os.environ, **(env or {})}
    full_env.setdefault("PYTHONWARNINGS", "ignore")
    full_env.setdefault("LONGACT_CONSOLE", "full")  # on_line reads verl's own metric lines
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=cwd,
            text=True,
            errors="replace",
            bufsize=1,
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            if on_line is not None:
                on_line(line)
        code = proc.wait()
    if code != 0:
        lines = Path(log_path).read_text(errors="replace").splitlines(True)
        tail = "".join(lines[-40:])
        # a worker that died (a signal, the OOM killer) says so far above the traceback
        # its death causes in the driver: bring those lines along
        crash = [ln for ln in lines[:-40] if CRASH_SIGNS.search(ln)][-20:]
        seen = f"crash signs in the log:\n{''.join(crash)}...\n" if crash else ""
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited {code}; see {log_path}\n{seen}{tail}")


def bin_path(name: str) -> str:
    """A console script of this environment (next to the running interpreter)."""
    return str(Path(sys.executable).parent / name)
