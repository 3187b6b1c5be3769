"""Which torch the CPU tier installs (scripts/torch_source.py), decided without a network:
a machine's own CPU build first, PyTorch's CPU index only when it answers, and never
PyPI's CUDA build on Linux without a warning."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "torch_source.py"
spec = importlib.util.spec_from_file_location("torch_source", SCRIPT)
ts = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ts)

CPU_INDEX = ["--index-url", ts.CPU_INDEX, "torch==2.13.0+cpu"]


def never(reason: str):
    def probe() -> bool:
        raise AssertionError(f"the network was probed although {reason}")

    return probe


@pytest.fixture
def wheel_dir(tmp_path) -> Path:
    (tmp_path / "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl").write_bytes(b"")
    return tmp_path


def test_an_installed_cpu_build_is_kept():
    args, why = ts.choose(("2.13.0+cpu", None), {}, "", "linux", never("torch is installed"))
    assert args is None and "already installed" in why
    # a CUDA build, or another version, is not kept
    args, _ = ts.choose(("2.13.0", "12.8"), {}, "", "linux", lambda: True)
    assert args == CPU_INDEX
    args, _ = ts.choose(("2.12.0+cpu", None), {}, "", "linux", lambda: True)
    assert args == CPU_INDEX


def test_a_configured_local_wheel_is_used_without_the_network(wheel_dir):
    env = {"PIP_FIND_LINKS": str(wheel_dir)}
    args, why = ts.choose(None, env, "", "linux", never("a local wheel exists"))
    assert args == ["torch==2.13.0+cpu"] and str(wheel_dir) in why
    cfg = f"global.find-links='{wheel_dir}'\n:env:.default-timeout='180'"
    args, _ = ts.choose(None, {}, cfg, "linux", never("pip config names the folder"))
    assert args == ["torch==2.13.0+cpu"]
    args, _ = ts.choose(None, {"PIP_FIND_LINKS": f"file://{wheel_dir}"}, "", "linux", never(""))
    assert args == ["torch==2.13.0+cpu"]


def test_an_explicit_mirror_then_non_linux_then_the_probe(tmp_path):
    mirror = {"LONGACT_TORCH_INDEX": "https://mirror.example/whl/cpu"}
    args, _ = ts.choose(None, mirror, "", "linux", never("a mirror is named"))
    assert args == ["--index-url", "https://mirror.example/whl/cpu", "torch==2.13.0+cpu"]
    args, why = ts.choose(None, {}, "", "darwin", never("PyPI's wheel is the CPU build"))
    assert args == ["torch==2.13.0"] and "darwin" in why
    empty = {"PIP_FIND_LINKS": str(tmp_path)}  # a folder without the wheel
    assert ts.choose(None, empty, "", "linux", lambda: True)[0] == CPU_INDEX


def test_no_source_of_the_cpu_build_warns_about_the_cuda_one():
    args, why = ts.choose(None, {}, "", "linux", lambda: False)
    assert args == ["torch==2.13.0"]
    assert why.startswith("WARNING") and "CUDA build" in why and "LONGACT_TORCH_INDEX" in why
