"""Smoke test of the benchmark helpers at tiny sizes (seconds, no Ray, no verl).

Checks that every cheap figure runs and renders, that ``bench.run --quick`` writes
``results.json`` and ``README.md``, that the step-time figure is built correctly from
parsed trainer metrics, and that the coordinator's flat payload (the speed-up measured in
figure 4) gives the same masks as the state_dict payload. No timing assertions.
"""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from longact.core.arch import QKLayout
from longact.core.masks import MaskSet
from longact.train.logs import parse_step_metrics

SMALL = QKLayout(num_layers=2, head_dim=16, num_attention_heads=4, num_key_value_heads=2)


def test_common_helpers():
    from bench.common import abba, goal, md_table, summarize

    assert abba(["a", "b"], 3) == ["a", "b", "b", "a", "a", "b"]
    s = summarize([3.0, 1.0, 2.0])
    assert (s["median"], s["min"], s["max"], s["n"]) == (2.0, 1.0, 3.0, 3)
    assert goal("x", 1.01, 1.03)["met"] and not goal("x", 1.1, 1.03)["met"]
    assert md_table(["a", "b"], [[1, "x|y"]]).splitlines()[-1] == "| 1 | x\\|y |"


def test_memory_figure_counts_bytes():
    from bench import memory

    # 8B: 36 layers x (4096 + 1024) rows -> 1 byte each; stats (1 + 3C) float64 per key
    assert memory.rows_for("8B")["mask_bytes"] == 36 * 5120
    assert memory.stats_bytes(SMALL) == sum((1 + 3 * c) * 8 for c in (64, 32) for _ in range(2))
    fig = memory.run(log=lambda s: None)
    assert len(fig["rows"]) == 3


def test_quick_run_writes_results(tmp_path):
    from bench.run import main

    assert main(["--out", str(tmp_path), "--quick"]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    names = [f["name"] for f in res["figures"]]
    assert names == ["memory", "mask_apply", "lora", "capture", "coordinator"]
    text = (tmp_path / "README.md").read_text()
    assert "## Goals" in text and "Capture overhead" in text
    figs = {f["name"]: f for f in res["figures"]}
    assert all(t > 0 for t in figs["capture"]["raw"]["by_len"]["64"]["hook_s"])
    assert figs["mask_apply"]["raw"]["summary"]["plain_adamw"]["n"] == 2
    assert figs["coordinator"]["raw"]["ray"] == {}  # quick: in-process only
    lora = figs["lora"]["raw"]
    assert lora["kept_bytes"]["masked"] == 0 < lora["kept_bytes"]["snapshot"]
    assert lora["summary"]["plain_adamw"]["n"] == 2


def test_step_time_figure_from_metrics():
    from bench.step_time import summarize_runs

    def log(arm: str, base: float) -> str:
        lines = []
        for step in (1, 2, 3):
            extra = " - actor/longact/rank_refresh_s:0.01" if arm == "on" else ""
            lines.append(
                f"step:{step} - timing_s/step:{base + step} - "
                f"timing_s/update_actor:{base / 2}{extra}"
            )
        return "\n".join(lines)

    runs = [
        {"arm": arm, "wall_s": 60.0, "steps": parse_step_metrics(log(arm, base))}
        for arm, base in (("on", 10.5), ("off", 10.0), ("off", 10.0), ("on", 10.5))
    ]
    fig = summarize_runs(runs, steps=3)
    s = fig["raw"]["summary"]
    assert s["on"]["timing_s/step"]["n"] == 4  # steps 2 and 3 of two runs
    assert s["off"]["timing_s/step"]["median"] == pytest.approx(12.5)
    (g,) = fig["goals"]
    assert g["value"] == f"{13.0 / 12.5:.3f}" and g["met"]


def test_flat_payload_matches_state_dict_payload():
    from bench.coordinator import CONFIG, fake_stats, inprocess_latency, wire
    from longact.distributed.coordinator import SaliencyCoordinator

    stats = [fake_stats(SMALL, r, tokens=100 + r) for r in range(3)]
    published = {}
    for fmt in ("dict", "flat"):
        coord = SaliencyCoordinator(dict(CONFIG, ema=0.5), SMALL, world_size=3)
        for step in (1, 2):
            for r, s in enumerate(stats):
                coord.submit(r, step, wire(s, fmt))
        payload = pickle.loads(pickle.dumps(coord.get(2)))  # as a rank receives it
        assert type(payload["masks"]["masks"]) is dict
        published[fmt] = (MaskSet.from_state_dict(payload["masks"]), coord.running)
    (m_a, run_a), (m_b, run_b) = published["dict"], published["flat"]
    assert all(torch.equal(m_a[k], m_b[k]) for k in m_a.keys())
    for k in run_a.keys():
        for f in ("count", "sum_abs", "sum_sq", "max_abs"):
            assert torch.equal(getattr(run_a[k], f), getattr(run_b[k], f))
    assert inprocess_latency(SMALL, 2, 1, "flat")["summary"]["n"] == 1


def test_train_step_figure_runs_on_cpu(tmp_path):
    """The GPU form of figure 1 on a tiny model, FSDP2 over gloo, in a subprocess (it
    initializes a process group): every LongAct step refreshed and masked, in both
    refresh modes."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    out = tmp_path / "fig.json"
    code = (
        "import json, sys; from bench import train_step; "
        "f = train_step.run(shape='tiny', seq=32, micro=2, reps=1, device='cpu', "
        "log=lambda s: None); json.dump(f, open(sys.argv[1], 'w'), default=str)"
    )
    env = dict(os.environ, PYTHONPATH=str(repo), LONGACT_BENCH_PORT="29547")
    subprocess.run([sys.executable, "-c", code, str(out)], check=True, cwd=repo, env=env)
    fig = json.loads(out.read_text())
    summary = fig["raw"]["summary"]
    on, off = summary["on"], summary["off"]
    assert on["before_step"]["n"] == off["total"]["n"] == summary["async"]["total"]["n"] == 1
    assert on["snapshot"]["median"] > 0 and on["restore"]["median"] > 0
    # warm-up step + 1 timed step per arm, a refresh at each; async installs one step late
    assert any("Final mask versions: on 2, async 1" in n for n in fig["notes"])
    assert [g["goal"] for g in fig["goals"]] == [
        "update step time on/off (median)",
        "update step time on/off, refresh_async (median)",
    ]
