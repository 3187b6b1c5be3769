"""Fixtures for ``longact submit`` tests: a private Ray cluster on loopback.

The cluster is started with the project venv's ``ray`` (so longact is importable on it),
bound to 127.0.0.1 with free ports and its own temp dir. Like a managed cluster, its head
declares no GPU, and a second node declares 2 logical GPUs (the CPU recipes ask for 2
ranks). It is always torn down: the blocking ``ray start`` processes are terminated,
then every process whose command line names this cluster's
temp dir is killed by pid. (``ray stop --force`` is not used: it kills every Ray
process of the user on the machine, including clusters other test runs started.)
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
_TOKEN = secrets.token_hex(32)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cluster_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # longact-train for the job
    env.pop("RAY_ADDRESS", None)
    env.setdefault("PYTHONWARNINGS", "ignore")
    env["RAY_DEDUP_LOGS"] = "0"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["WANDB_MODE"] = "offline"
    # Ray resolves 127.0.0.1 to the host's network address unless told this is a
    # single-machine cluster: keep every Ray process on loopback.
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    # token authentication (Ray's default) with this session's own token
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN"] = _TOKEN
    return env


def _cluster_pids(temp_dir: str) -> list[int]:
    import psutil

    pids = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(temp_dir in part for part in proc.info["cmdline"] or []):
                pids.append(proc.info["pid"])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return [p for p in pids if p != os.getpid()]


def _stop(head: subprocess.Popen, temp_dir: str) -> None:
    import psutil

    if head.poll() is None:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait(timeout=10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _cluster_pids(temp_dir):
        time.sleep(0.5)
    for pid in _cluster_pids(temp_dir):
        try:
            psutil.Process(pid).kill()
        except psutil.NoSuchProcess:
            pass


@pytest.fixture
def submit_env() -> dict[str, str]:
    """Environment for ``longact submit`` subprocesses."""
    return cluster_env()


def _node_ports() -> dict[str, int]:
    """Ports every node of a loopback cluster needs for itself."""
    return {
        "--dashboard-agent-listen-port": free_port(),
        "--dashboard-agent-grpc-port": free_port(),
        "--runtime-env-agent-port": free_port(),
        "--metrics-export-port": free_port(),
        "--node-manager-port": free_port(),
        "--object-manager-port": free_port(),
    }


class Cluster(str):
    """The dashboard address (http://127.0.0.1:PORT), with ``gcs`` (HOST:PORT, where nodes
    and drivers join) and ``temp_dir`` (where ``ray start`` left ``ray_current_cluster``)."""

    gcs: str
    temp_dir: str


@pytest.fixture
def ray_cluster():
    """Yields the dashboard address (a ``Cluster``) of a fresh local cluster.

    Two nodes, as on a managed cluster: a head that declares no GPU (where job
    entrypoints run) and a worker node that declares 2 logical GPUs."""
    # short: Ray's unix socket paths live under it and must stay below ~107 chars
    temp_dir = tempfile.mkdtemp(prefix="lar", dir="/tmp")
    dash = free_port()
    gcs = free_port()
    ports = {
        "--port": gcs,
        "--dashboard-port": dash,
        "--ray-client-server-port": free_port(),
        **_node_ports(),
    }
    cmd = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1",
        "--include-dashboard=true",
        "--num-cpus=4",
        "--num-gpus=0",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
        *(f"{k}={v}" for k, v in ports.items()),
    ]
    log = open(Path(temp_dir) / "ray-start.log", "w")  # noqa: SIM115 (closed below)
    head = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env=cluster_env(), start_new_session=True
    )
    address = Cluster(f"http://127.0.0.1:{dash}")
    address.gcs, address.temp_dir = f"127.0.0.1:{gcs}", temp_dir
    worker = None
    try:
        deadline = time.monotonic() + 120
        while True:
            if head.poll() is not None:
                pytest.fail(f"ray start exited {head.returncode}:\n{_tail(temp_dir)}")
            try:
                req = urllib.request.Request(
                    f"{address}/api/version", headers={"Authorization": f"Bearer {_TOKEN}"}
                )
                with urllib.request.urlopen(req, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"Ray dashboard never came up at {address}:\n{_tail(temp_dir)}")
            time.sleep(1)
        worker = _start_worker_node(f"127.0.0.1:{gcs}", temp_dir, log)
        yield address
    finally:
        if worker is not None:
            _stop(worker, temp_dir)
        _stop(head, temp_dir)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


# `ray start` of a second node on this machine, on loopback. Ray's CLI refuses a second
# node unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1, and that setting also rewrites the
# 127.0.0.1 of `--address` into the host's network address, where this cluster's GCS does
# not listen. So the variable stays 0 (every process Ray starts keeps to loopback), and
# only this CLI process lets the second node through and leaves 127.0.0.1 as it is.
WORKER_NODE_START = """
import sys
import ray._private.ray_constants as constants
import ray._private.services as services
from ray.scripts.scripts import main
constants.ENABLE_RAY_CLUSTER = True
services.node_ip_address_from_perspective = lambda address=None: "127.0.0.1"
sys.argv = ["ray", *sys.argv[1:]]
main()
"""


def _start_worker_node(gcs: str, temp_dir: str, log) -> subprocess.Popen:
    """A second node on this machine: 16 CPUs and 2 logical GPUs (the training ranks)."""
    cmd = [
        sys.executable,
        "-c",
        WORKER_NODE_START,
        "start",
        f"--address={gcs}",
        "--block",
        "--node-ip-address=127.0.0.1",
        "--num-cpus=16",
        "--num-gpus=2",
        *(f"{k}={v}" for k, v in _node_ports().items()),
    ]
    worker = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env=cluster_env(), start_new_session=True
    )
    deadline = time.monotonic() + 120
    status = [str(BIN / "ray"), "status", f"--address={gcs}"]
    while True:
        if worker.poll() is not None:
            pytest.fail(f"worker node's ray start exited {worker.returncode}:\n{_tail(temp_dir)}")
        out = subprocess.run(status, capture_output=True, text=True, env=cluster_env()).stdout
        if "0.0/2.0 GPU" in out:
            return worker
        if time.monotonic() > deadline:
            pytest.fail(f"the worker node never joined:\n{out}\n{_tail(temp_dir)}")
        time.sleep(1)


def _tail(temp_dir: str) -> str:
    return (Path(temp_dir) / "ray-start.log").read_text(errors="replace")[-4000:]


TINY_REWARD = '''"""Reward with variance for an untrained model: pays for an even-length answer."""


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs):
    return 1.0 if len(solution_str) % 2 == 0 else 0.0
'''


@pytest.fixture
def tiny_run(tmp_path) -> dict[str, Path]:
    """A tiny model, a tiny data set in verl's RL format and a reward file."""
    import pandas as pd

    from longact.models.tiny import write_tiny_model

    rows = []
    for i in range(16):
        a, b = i % 7, (3 * i) % 5
        rows.append(
            {
                "data_source": "longact_submit_test",
                "prompt": [{"role": "user", "content": f"What is {a} plus {b}? Answer:"}],
                "ability": "math",
                "reward_model": {"style": "rule", "ground_truth": str(a + b)},
                "extra_info": {"index": i},
            }
        )
    data = tmp_path / "train.parquet"
    pd.DataFrame(rows).to_parquet(data)
    reward = tmp_path / "tiny_reward.py"
    reward.write_text(TINY_REWARD)
    return {
        "model": write_tiny_model(tmp_path / "model", size="xxs", seed=0),
        "data": data,
        "reward": reward,
        "ckpt": tmp_path / "ckpt",
    }
