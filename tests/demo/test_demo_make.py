"""The README's quick start, ``make demo`` and ``make test``, as the Makefile runs them.

``make demo`` runs for real, in a scratch folder that holds the Makefile, links to the
files its ``setup`` target depends on and ``.venv``, a link to this test's virtualenv:
``setup`` must find that virtualenv up to date (no reinstall; the README's "a second
run reuses it"), and the demo's stages all run (nothing cached) and leave the report
with its numbers and figures under ``runs/demo``. ``make test`` is what CI runs
(``.ci/run``); here only its recipe is checked, with ``make -n``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STAGES = ["model", "data", "sft", "ablate", "rl", "eval_rl", "inspect"]
STEPS = 25  # hydra_configs/demo.yaml rl.steps


def _make_env() -> dict[str, str]:
    """The environment without anything an outer ``make`` or shell would pass down."""
    drop = ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "VENV", "RAY_ADDRESS", "LONGACT_CONSOLE")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _scratch_checkout(root: Path) -> Path:
    """``root`` with the Makefile, its install stamp's prerequisites (linked) and
    ``.venv`` (a link to this test's virtualenv)."""
    makefile = (REPO / "Makefile").read_text()
    rule = re.search(r"^\$\(VENV\)/\.longact-install-cpu:(.*)$", makefile, flags=re.M)
    assert rule, "the Makefile's setup stamp rule moved: update this test"
    tops = {"Makefile"} | {p.split("/")[0] for p in rule.group(1).split()}
    for top in sorted(tops):
        (root / top).symlink_to(REPO / top)
    (root / ".venv").symlink_to(Path(sys.prefix))
    return root


def _make(args: list[str], cwd: Path, timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["make", *args], cwd=cwd, env=_make_env(), capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(900)  # measured 200-220 s on 2 cores
def test_make_demo(tmp_path):
    """``make demo`` with an existing virtualenv: no reinstall, and ``runs/demo`` as
    ``check_demo`` says."""
    root = _scratch_checkout(tmp_path)
    stale = _make(["-q", "setup"], root)
    assert stale.returncode == 0, (
        f"{sys.prefix}/.longact-install-cpu is older than what `make setup` installs from, "
        "so `make demo` would reinstall: run `make setup` first"
    )
    start = time.monotonic()
    proc = _make(["demo"], root, timeout=800)
    took = time.monotonic() - start
    out = proc.stdout + proc.stderr
    # progress bars aside, so that a failed stage's crash signs and tail fit the message
    text = "\n".join(ln for ln in out.splitlines() if not re.search(r"\d+it/s|s/it]", ln))
    assert proc.returncode == 0, text[-8000:]
    assert "install.sh" not in out, out[-3000:]
    print(f"make demo: {took:.0f}s\n{out[-3000:]}")

    check_demo(root / "runs" / "demo")


def check_demo(demo: Path) -> None:
    """What ``make demo`` leaves in ``runs/demo``: every stage run now (none cached) with
    its seconds in the report, accuracy before and after RL at each evaluated length,
    the summary, every figure the report shows, and the RL model."""
    report = (demo / "report.md").read_text()
    stages = re.findall(r"^\| (\w+) \| (\d+) \| *(\S*) *\|$", report, flags=re.M)
    assert [name for name, _, _ in stages] == STAGES, report[-1500:]
    assert not any(cached for _, _, cached in stages), report[-1500:]
    for stage in STAGES:
        assert json.loads((demo / stage / "stage.json").read_text())["hash"]
    table = re.findall(r"^\| (\d+) \| ([\d.]+) \| ([\d.]+) \| [-+\d.]+ \[", report, flags=re.M)
    assert [int(n) for n, _, _ in table] == [64, 128, 192], report
    assert all(0 <= float(v) <= 100 for _, *acc in table for v in acc)
    assert f"after {STEPS} GRPO steps" in report
    summary = json.loads((demo / "summary.json").read_text())
    assert sorted(summary["gain"], key=int) == ["64", "128", "192"]
    assert list(summary["timings"]) == STAGES and summary["ablation"]
    figures = re.findall(r"!\[[^]]*\]\(([^)]+)\)", report)
    assert len(figures) == 5, figures
    for fig in figures:
        assert (demo / fig).is_file(), f"report.md shows {fig}, which the demo did not draw"
        assert (demo / fig).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", fig
    hf = demo / "rl" / "ckpt" / f"global_step_{STEPS}" / "actor" / "huggingface"
    assert (hf / "model.safetensors").is_file()


def test_make_test_is_what_ci_runs(tmp_path):
    """``.ci/run`` runs ``make test``, whose recipe is the lint and the whole suite, and
    with an up-to-date virtualenv ``make test`` installs nothing first."""
    ci = [ln for ln in (REPO / ".ci" / "run").read_text().splitlines() if ln.strip()]
    assert ci[-1] == "make test"
    root = _scratch_checkout(tmp_path)
    proc = _make(["-n", "test"], root)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        ".venv/bin/ruff check .",
        ".venv/bin/ruff format --check .",
        ".venv/bin/python -m pytest tests -q --durations=20",
    ]
