"""Figure 1: verl's GRPO training step on the CPU, LongAct on vs off.

``longact-train recipe=grpo_cpu`` (2 FSDP2 ranks on gloo, the hf rollout, n=8) on the
``xs`` tiny model (``write_tiny_model(dir, "xs")``) with niah_single prompts of 256
tokens (2-digit values), the reward from the recipe (``pkg://longact.rewards``). Arms:

- ``on``:  ``longact.enable=true longact.ratio=0.3 longact.refresh_interval=1`` (a mask
  refresh through the saliency coordinator at every optimizer step);
- ``off``: ``longact.enable=false`` (verl's plain RL through the same engine class).

Same seed, data and config otherwise. Runs alternate on, off, off, on, ... (each run is a
fresh Ray cluster); step 1 of each run is dropped as warm-up. Per-step times are verl's
``timing_s/step`` and ``timing_s/update_actor``; LongAct's own per-step costs come from its
metrics: ``actor/longact/rank_refresh_s`` (a rank's coordinator round trip),
``actor/longact/refresh_s`` (the coordinator's merge + mask build) and the per-step host
times of capture, mask_grads and the protect snapshot / restore.

Each run pays ~60-80 s of start-up (Ray, workers, model load) on 2 cores, so the number of
run pairs adapts to a deadline (at least one pair).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import figure, fmt_s, goal, paired_ratios, ratio, summarize

ARMS = {
    "on": ["longact.enable=true", "longact.ratio=0.3", "longact.refresh_interval=1"],
    "off": ["longact.enable=false"],
}
METRICS = {
    "timing_s/step": "verl step (timing_s/step)",
    "timing_s/update_actor": "actor update (timing_s/update_actor)",
    "timing_s/gen": "rollout (timing_s/gen)",
    "actor/longact/rank_refresh_s": "LongAct refresh round trip, per rank",
    "actor/longact/refresh_s": "coordinator merge + masks (refresh_s)",
    # host seconds LongActRuntime reports per optimizer step (rows without data are skipped)
    "actor/longact/capture_s": "LongAct capture hooks, per step",
    "actor/longact/mask_s": "LongAct mask_grads, per step",
    "actor/longact/snapshot_s": "LongAct protect: snapshot frozen rows, per step",
    "actor/longact/restore_s": "LongAct protect: restore frozen rows, per step",
}


def prepare(root: Path, steps: int, length: int = 256, batch: int = 4, size: str = "xs") -> dict:
    """The tiny model and parquet files shared by every run."""
    from longact.data.tasks import make_dataset, write_parquet
    from longact.models.tiny import write_tiny_model

    model = write_tiny_model(root / f"tiny_{size}", size=size, seed=0)
    rows = make_dataset("niah_single", model, length=length, n=batch * steps + 4, seed=0,
                        value_digits=2)  # fmt: skip
    return {
        "model": model,
        "train": write_parquet(rows[: batch * steps], root / "train.parquet"),
        "val": write_parquet(rows[batch * steps :], root / "val.parquet"),
    }


def command(data: dict, run_dir: Path, arm: str, steps: int, extra: list[str]) -> list[str]:
    from longact.demo.runner import bin_path

    return [
        bin_path("longact-train"),
        "recipe=grpo_cpu",
        f"data.train_files={data['train']}",
        f"data.val_files={data['val']}",
        f"actor_rollout_ref.model.path={data['model']}",
        f"trainer.total_training_steps={steps}",
        f"trainer.default_local_dir={run_dir / 'ckpt'}",
        "trainer.project_name=longact_bench",
        f"trainer.experiment_name=bench_step_{arm}",
        "trainer.logger=[console]",
        f"hydra.run.dir={run_dir / 'hydra'}",
        *ARMS[arm],
        *extra,
    ]


def run_env() -> dict[str, str]:
    e = {"PYTHONWARNINGS": "ignore", "RAY_DEDUP_LOGS": "0", "WANDB_MODE": "offline"}
    e["LONGACT_CONSOLE"] = "full"  # the metrics are read from verl's console lines
    os.environ.pop("RAY_ADDRESS", None)  # always a fresh local cluster
    return e


def one_run(data: dict, run_dir: Path, arm: str, steps: int, extra: list[str], log=print) -> dict:
    """Run the trainer once; {step: {metric: value}} plus wall time."""
    from longact.demo.runner import stream
    from longact.train.logs import parse_step_metrics

    run_dir.mkdir(parents=True, exist_ok=True)
    metrics: dict[int, dict[str, float]] = {}

    def on_line(line: str) -> None:
        for step, got in parse_step_metrics(line).items():  # a later line wins, as in the log
            metrics.setdefault(step, {}).update(got)
            log(f"    {arm}: step {step}/{steps}, step {got.get('timing_s/step', 0):.2f} s")

    t0 = time.perf_counter()
    stream(command(data, run_dir, arm, steps, extra), run_dir / "train.log", on_line, run_env())
    wall = time.perf_counter() - t0
    if sorted(metrics) != list(range(1, steps + 1)):
        raise RuntimeError(f"{arm} run logged steps {sorted(metrics)}; see {run_dir}/train.log")
    return {"wall_s": wall, "steps": metrics}


def run(
    steps: int = 8,
    max_pairs: int = 2,
    deadline: float | None = None,
    workdir: Path | None = None,
    extra: list[str] | None = None,
    log=print,
) -> dict[str, Any]:
    """Alternate on/off runs (pairs in ABBA order) while another pair fits the deadline
    (``time.monotonic()`` value; None: run ``max_pairs``)."""
    root = Path(workdir or tempfile.mkdtemp(prefix="longact_bench_step_"))
    data = prepare(root, steps)
    runs: list[dict] = []
    order = ["on", "off"]
    t_start = time.monotonic()
    for pair in range(max_pairs):
        if pair and deadline is not None:
            per_pair = (time.monotonic() - t_start) / pair
            if time.monotonic() + per_pair > deadline:
                log(f"  stopping after {pair} pair(s): another (~{per_pair:.0f} s) would "
                    "pass the deadline")  # fmt: skip
                break
        for arm in order if pair % 2 == 0 else order[::-1]:
            i = len(runs)
            log(f"  run {i + 1}: LongAct {arm}")
            r = one_run(data, root / f"run{i}_{arm}", arm, steps, extra or [], log)
            r["arm"] = arm
            runs.append(r)
            log(f"  run {i + 1} ({arm}) done in {r['wall_s']:.0f} s")
    return summarize_runs(runs, steps, root)


def summarize_runs(runs: list[dict], steps: int, root: Path | None = None) -> dict[str, Any]:
    """The figure from parsed runs (step 1 of each run dropped)."""
    per_arm: dict[str, dict[str, list[float]]] = {"on": {}, "off": {}}
    for r in runs:
        for step, m in r["steps"].items():
            if step == 1:
                continue
            for key in METRICS:
                if key in m:
                    per_arm[r["arm"]].setdefault(key, []).append(m[key])
    s = {arm: {k: summarize(v) for k, v in d.items()} for arm, d in per_arm.items()}
    n_pairs = sum(r["arm"] == "on" for r in runs)
    fig = figure(
        "step_time",
        f"1. verl GRPO step on the CPU (tiny xs model, 2 ranks), LongAct on vs off "
        f"({n_pairs} run(s) per arm x {steps - 1} timed steps)",
        ["measure", "LongAct off", "LongAct on (ratio 0.3, refresh every step)", "on / off"],
    )
    for key, label in METRICS.items():
        on, off = s["on"].get(key), s["off"].get(key)
        if not on and not off:
            continue
        both = on and off and on.get("n") and off.get("n")
        fig["rows"].append(
            [
                label,
                fmt_s(off) if off else "-",
                fmt_s(on) if on else "-",
                f"{ratio(on, off):.3f}" if both else "-",
            ]
        )
    first = {
        arm: summarize([r["steps"][1]["timing_s/step"] for r in runs if r["arm"] == arm])
        for arm in ("on", "off")
    }
    if first["on"]["n"] and first["off"]["n"]:
        fig["rows"].append(
            [
                "step 1 (dropped warm-up; LongAct starts its coordinator actor here)",
                fmt_s(first["off"]),
                fmt_s(first["on"]),
                f"{ratio(first['on'], first['off']):.3f}",
            ]
        )
    if s["on"].get("timing_s/step") and s["off"].get("timing_s/step"):
        r_step = ratio(s["on"]["timing_s/step"], s["off"]["timing_s/step"])
        fig["goals"].append(goal("step time on/off (median)", r_step, 1.05))
    run_med = {
        arm: [
            statistics.median(m["timing_s/step"] for k, m in r["steps"].items() if k != 1)
            for r in runs
            if r["arm"] == arm
        ]
        for arm in ("on", "off")
    }
    pairs = paired_ratios(run_med["on"], run_med["off"])
    if pairs:
        fig["notes"].append(
            "Per run pair (on run k vs off run k, back to back), ratio of median step times: "
            + ", ".join(f"{x:.3f}" for x in pairs)
            + ". The spread between pairs is the machine's run-to-run noise."
        )
    step_on = s["on"].get("timing_s/step")
    if step_on and s["on"].get("actor/longact/rank_refresh_s"):
        direct = s["on"]["actor/longact/rank_refresh_s"]["median"] / step_on["median"]
        fig["notes"].append(
            f"LongAct's refresh round trip is {100 * direct:.2f} % of a step (direct cost)."
        )
    upd_on = s["on"].get("timing_s/update_actor")
    if upd_on and s["on"].get("actor/longact/rank_refresh_s"):
        share = s["on"]["actor/longact/rank_refresh_s"]["median"] / upd_on["median"]
        fig["notes"].append(
            f"The refresh round trip is {100 * share:.1f} % of the LongAct-on actor update."
        )
    walls = {arm: [round(r["wall_s"]) for r in runs if r["arm"] == arm] for arm in ("on", "off")}
    fig["notes"] += [
        f"Run order: {', '.join(r['arm'] for r in runs)}; wall time per run (s): "
        f"on {walls['on']}, off {walls['off']} (start-up included).",
        "Medians [min-max] over all timed steps of all runs of an arm; step 1 dropped.",
        "Capture (hooks), mask_grads and protect (snapshot + restore) are inside "
        "timing_s/update_actor; their rows are LongActRuntime's own per-step host times "
        "(longact/capture_s, mask_s, snapshot_s, restore_s).",
    ]
    fig["raw"] = {
        "runs": [{"arm": r["arm"], "wall_s": r["wall_s"], "steps": r["steps"]} for r in runs],
        "summary": s,
        "step1": first,
        "paired_run_ratios": pairs,
        "workdir": str(root) if root else None,
    }
    return fig
