"""Run a worker script as N gloo ranks on this machine (CPU), for the FSDP2 tests.

``run_ranks(script, out)`` starts ``python SCRIPT OUT`` once per rank with RANK,
LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and a free MASTER_PORT set, on the loopback device,
one thread each, and fails with every rank's log tail when one of them does.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(script: Path, out: Path, world: int = 2, timeout: float = 180.0) -> None:
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    env["WORLD_SIZE"] = str(world)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only, whatever the hostname
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(out)],
            env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for r in range(world)
    ]
    logs = []
    for p in procs:
        try:
            log, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        logs.append(log.decode(errors="replace")[-4000:])
    assert all(p.returncode == 0 for p in procs), "\n\n".join(logs)
