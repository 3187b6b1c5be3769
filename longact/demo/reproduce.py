"""``make reproduce``: LongAct against plain RL and ablation masks, paired over seeds.

The grid (``reproduce:`` in ``hydra_configs/demo.yaml``), every run started from the same
warm-up model, with the same data order and budget per seed:

- ``topk``        LongAct, top-30% Q/K channels, masks refreshed during RL (the method);
- ``topk_fixed``  top-30% chosen once by a calibration pass, then fixed (profile first);
- ``plain``       plain RL, every parameter updates (the reference of the paired analysis);
- ``random``      30% of channels at random (seeded); ``bottomk``: the 30% lowest.

GRPO runs all five (6 seeds for ``topk`` and ``plain``, 3 for the others); DAPO runs
``topk`` against ``plain`` (3 seeds). RL trains at twice the warm-up's longest context;
each final model is evaluated at 1x-4x that length on the training task and on a task
it was not trained on.

Resumable across machines: each finished run leaves one small JSON (accuracy by task
and length, reward per step, mask drift; no weights) in ``docs/reproduce/runs/``, meant
to be committed as it lands. A rerun skips every run whose JSON carries the current
experiment key, so ``make reproduce`` on any machine finishes the grid; ``--max-runs``
runs a slice, and ``--shard K/N`` the K-th of N fixed parts of the plan, so N machines
split the grid without running a run twice (each makes its own warm-up; the report flags
warm-ups that came out different).
The report (``longact.demo.reproduce_report``) is rebuilt from whatever runs exist and
says how many it rests on. Weights and logs stay in ``--out``.

A run that changes nothing the results depend on (the grid's seeds and arms lists) keeps
its key; any other change of settings gives a new key, and the runs of the old key are
listed as stale, not mixed in. The warm-up model's hash is recorded in every run: runs
resumed on another machine whose warm-up came out different are flagged in the report.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from longact.demo.pipeline import _say, load_config, shared_stages, stage_rl
from longact.demo.runner import Stages, config_hash

RESULTS = Path("docs/reproduce")  # committed: runs/*.json, plots, and the report beside it


@dataclass(frozen=True)
class Run:
    algo: str  # grpo | dapo
    arm: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.algo}_{self.arm}_seed{self.seed}"


def plan(cfg: dict) -> list[Run]:
    """Every run of the grid, seed by seed, so that early results come in complete pairs."""
    rep = cfg["reproduce"]
    unknown = {a for g in rep["grid"] for a in g["arms"]} - set(rep["arms"])
    if unknown:
        raise ValueError(f"grid arms {sorted(unknown)} are not in reproduce.arms")
    seeds = sorted({s for g in rep["grid"] for s in g["seeds"]})
    return [
        Run(g["algo"], arm, seed)
        for seed in seeds
        for g in rep["grid"]
        for arm in g["arms"]
        if seed in g["seeds"]
    ]


def experiment_cfg(cfg: dict) -> dict:
    """The config of the reproduction: the demo's model and task, with the warm-up and RL
    settings of its own ``reproduce:`` section (none of the demo's ``sft`` / ``rl``)."""
    rep = cfg["reproduce"]
    out = {**cfg, "sft": dict(rep["sft"])}
    out["rl"] = {
        "recipe": None,  # per run: reproduce.recipes[algo]
        "train_length": rep["rl_length"],
        "train_samples": rep["train_samples"],
        "val_samples": 32,  # verl needs a validation file; the runs do not validate
        "steps": rep["steps"],
        "test_freq": -1,
        "overrides": list(rep["rl_overrides"]),
    }
    return out


def experiment_key(cfg: dict) -> str:
    """What every run's result depends on, beyond its own (algo, arm, seed)."""
    rep = {k: v for k, v in cfg["reproduce"].items() if k != "grid"}
    return config_hash([rep, cfg["model"], cfg["task"]])


def run_overrides(cfg: dict, run: Run, data_dir: Path) -> list[str]:
    arm = [
        o.replace("{calibration_data}", str(data_dir / "rl_train.parquet"))
        for o in cfg["reproduce"]["arms"][run.arm]
    ]
    return [
        *cfg["rl"]["overrides"],
        *arm,
        f"data.seed={run.seed}",
        f"actor_rollout_ref.rollout.seed={run.seed}",
        f"actor_rollout_ref.actor.data_loader_seed={run.seed}",
        f"longact.seed={run.seed}",
        "trainer.val_before_train=false",
    ]


def evaluate_model(cfg: dict, model: Path, out: Path, extra_lengths: tuple = ()) -> dict:
    """{task: {length: accuracy}} on every evaluation task (held-out prompts, seed 4), at
    the evaluation lengths; the training task also at ``extra_lengths``."""
    from longact.eval.runner import evaluate

    ev = cfg["reproduce"]["eval"]
    acc: dict[str, dict[int, float]] = {}
    for task, opts in ev["tasks"].items():
        lengths = list(ev["lengths"])
        if task == cfg["task"]["name"]:
            lengths = sorted({*lengths, *extra_lengths})
        res = evaluate(
            model, [task], lengths, ev["samples"], out_dir=out / task, seed=4,
            max_new_tokens=8, task_opts=opts, progress=False,
        )  # fmt: skip
        acc[task] = {int(r["length"]): float(r["accuracy"]) for r in res["summary"]}
    return acc


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _series(metrics: dict, *keys: str) -> dict[int, float]:
    """{step: mean of ``keys``} over the steps that logged all of them."""
    out = {}
    for step, m in metrics.items():
        if all(k in m for k in keys):
            out[int(step)] = sum(m[k] for k in keys) / len(keys)
    return out


def run_one(cfg: dict, run: Run, sft_model: Path, data_dir: Path, work: Path) -> dict:
    """Train and evaluate one run; the record its JSON holds."""
    rl_cfg = {**cfg["rl"], "recipe": cfg["reproduce"]["recipes"][run.algo]}
    rl_cfg["overrides"] = run_overrides(cfg, run, data_dir)
    st = Stages(work, log=_say)
    rl = st.run(run.name, [rl_cfg, config_hash(cfg["sft"])], lambda d: stage_rl(
        {**cfg, "rl": rl_cfg}, sft_model, data_dir, d))  # fmt: skip
    metrics = json.loads((st.dir(run.name) / "metrics.json").read_text())
    model = st.dir(run.name) / rl["model"]
    acc = evaluate_model(cfg, model, work / f"{run.name}_eval")
    return {
        "run": run.name, "algo": run.algo, "arm": run.arm, "seed": run.seed,
        "accuracy": acc,
        "reward": _series(metrics, "critic/score/mean"),
        "jaccard_first": _series(
            metrics, "actor/longact/jaccard_first_q", "actor/longact/jaccard_first_k"),
        "mass_kept": _series(metrics, "actor/longact/mass_kept_q", "actor/longact/mass_kept_k"),
        "rl_seconds": rl["seconds"],
    }  # fmt: skip


def load_runs(results: Path, key: str) -> tuple[dict[str, dict], list[str]]:
    """Finished runs of experiment ``key`` by name, and the names of stale ones."""
    current, stale = {}, []
    for f in sorted((results / "runs").glob("*.json")):
        if f.stem == "warmup":
            continue
        rec = json.loads(f.read_text())
        if rec.get("key") == key:
            current[f.stem] = rec
        else:
            stale.append(f.stem)
    return current, stale


def _write(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
    tmp.replace(path)


def shard(runs: list[Run], spec: str) -> list[Run]:
    """The runs of part ``K/N``: every N-th run of the plan from the K-th (1-based).

    Parts are cut from the full plan, not from what is left, so machines that start at
    different times never pick the same run."""
    k, n = parse_shard(spec)
    return runs[k - 1 :: n]


def parse_shard(spec: str) -> tuple[int, int]:
    """``"K/N"`` -> (K, N), 1 <= K <= N; a clear ValueError otherwise."""
    k, sep, n = spec.partition("/")
    if not (sep and k.isdigit() and n.isdigit() and 1 <= int(k) <= int(n)):
        raise ValueError(f"--shard {spec!r}: expected K/N with 1 <= K <= N, e.g. 1/2 or 2/2")
    return int(k), int(n)


def run_grid(cfg: dict, work: Path, results: Path, max_runs: int | None, part: str = "1/1") -> int:
    """Run what is missing of ``part`` (at most ``max_runs``); the number of runs done now."""
    key = experiment_key(cfg)
    done_runs = load_runs(results, key)[0]
    todo = [r for r in shard(plan(cfg), part) if r.name not in done_runs]
    _say(f"reproduce: {len(done_runs)} of {len(plan(cfg))} runs done (key {key}); "
         f"{len(todo)} to run in part {part}")  # fmt: skip
    if not todo:
        return 0
    _, data_dir, sft_model = shared_stages(Stages(work / "shared", log=_say), cfg)
    warm = results / "runs" / "warmup.json"
    if not warm.is_file() or json.loads(warm.read_text()).get("key") != key:
        acc = evaluate_model(cfg, sft_model, work / "warmup_eval", tuple(cfg["sft"]["lengths"]))
        record = {"key": key, "accuracy": acc, "warmup_sha": _sha(sft_model / "model.safetensors")}
        _write(warm, record)
        _say(f"warm-up accuracy: {acc}")
    sha = _sha(sft_model / "model.safetensors")
    done = 0
    for run in todo[:max_runs]:
        _say(f"== {run.name} ({done + 1} of {min(len(todo), max_runs or len(todo))}) ==")
        t0 = time.time()
        record = run_one(cfg, run, sft_model, data_dir, work)
        record.update(key=key, warmup_sha=sha, seconds=time.time() - t0,
                      date=time.strftime("%Y-%m-%d"))  # fmt: skip
        _write(results / "runs" / f"{run.name}.json", record)
        done += 1
    return done


def main(argv: list[str] | None = None) -> int:
    from longact.demo.reproduce_report import write_report

    p = argparse.ArgumentParser(
        prog="python -m longact.demo.reproduce", description=__doc__.split("\n")[0]
    )
    p.add_argument("--out", default="runs/reproduce", help="work folder: weights, logs")
    p.add_argument("--results", default=str(RESULTS), help="per-run JSON and plots (commit)")
    p.add_argument("--report", default="docs/reproduce.md", help="where the report goes")
    p.add_argument("--max-runs", type=int, default=None, help="stop after this many runs")
    p.add_argument("--report-only", action="store_true", help="rebuild the report, run nothing")
    p.add_argument("--shard", default="1/1", metavar="K/N", help="run part K of N of the grid")
    p.add_argument("overrides", nargs="*", help="demo.yaml overrides, e.g. reproduce.steps=40")
    args = p.parse_args(argv)
    if args.max_runs is not None and args.max_runs < 0:
        p.error(f"--max-runs={args.max_runs} must be >= 0")
    try:
        parse_shard(args.shard)
    except ValueError as e:
        p.error(str(e))
    cfg = experiment_cfg(load_config(args.overrides))
    results = Path(args.results)
    if not args.report_only:
        run_grid(cfg, Path(args.out).resolve(), results, args.max_runs, args.shard)
    write_report(cfg, results, Path(args.report), experiment_key(cfg), plan(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
