"""``make reproduce``: LongAct against plain DAPO and two ablation masks, with seeds.

From the demo's warm-up model (stages shared with ``make demo`` under ``--shared``),
every arm gets the same RL budget, data and seeds:

- ``longact_topk``  LongAct: top-30% Q/K channels trainable (the method);
- ``full``          plain DAPO (LongAct off: every parameter updates);
- ``random``        30% of channels chosen at random (seeded);
- ``bottomk``       the 30% lowest-magnitude channels.

Each (arm, seed) run is a cached stage: an interrupted experiment resumes where it
stopped and keeps finished runs. Every final model is evaluated at the training length
and at held-out longer lengths. The report gives mean and a 95% confidence interval
(t distribution over seeds) per arm and length, and a verdict per length from Welch's
t-test of LongAct against plain DAPO: won / lost when the 95% interval of the difference
excludes zero, tied otherwise. Whatever the result, it is reported as measured.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

from longact.demo.pipeline import (
    _say,
    load_config,
    sft_key,
    shared_stages,
    stage_eval,
    stage_rl,
)
from longact.demo.runner import Stages

# two-sided 97.5% quantiles of Student's t for small degrees of freedom
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306}


def t975(df: float) -> float:
    if df >= 30:
        return 1.96
    lo = max(1, math.floor(df))
    return _T975.get(lo, 2.2)


def mean_ci(xs: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% confidence interval."""
    m = statistics.fmean(xs)
    if len(xs) < 2:
        return m, float("nan")
    return m, t975(len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs))


def welch(a: list[float], b: list[float]) -> tuple[float, float]:
    """Difference of means (a - b) and the half-width of its 95% Welch interval."""
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    diff = statistics.fmean(a) - statistics.fmean(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return diff, 0.0
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return diff, t975(df) * se


def verdict(diff: float, half: float) -> str:
    if math.isnan(half):
        return "n/a"
    if diff - half > 0:
        return "LongAct won"
    if diff + half < 0:
        return "LongAct lost"
    return "tied"


def run(shared: Path, out: Path, cfg: dict) -> dict:
    rep = cfg["reproduce"]
    _, data_dir, sft_model = shared_stages(Stages(shared, log=_say), cfg)

    st = Stages(out, log=_say)
    ev_cfg = {**cfg, "eval": {"lengths": rep["eval_lengths"], "samples": rep["eval_samples"]}}
    st.run("eval_sft", [ev_cfg["eval"], sft_key(cfg)], lambda d: stage_eval(ev_cfg, sft_model, d))
    results: dict[str, dict[int, dict[int, float]]] = {}
    for arm, arm_overrides in rep["arms"].items():
        for seed in rep["seeds"]:
            name = f"{arm}_seed{seed}"
            rl_cfg = dict(cfg["rl"])
            rl_cfg.update(steps=rep["steps"], test_freq=-1)
            rl_cfg["overrides"] = [
                *cfg["rl"]["overrides"],
                *arm_overrides,
                f"data.seed={seed}",
                f"actor_rollout_ref.rollout.seed={seed}",
                f"actor_rollout_ref.actor.data_loader_seed={seed}",
                f"longact.seed={seed}",
                "trainer.val_before_train=false",
            ]
            run_cfg = {**cfg, "rl": rl_cfg}
            _say(f"== {name} ==")
            rl = st.run(
                f"rl_{name}",
                [rl_cfg, sft_key(cfg)],
                lambda d, c=run_cfg: stage_rl(c, sft_model, data_dir, d),
            )
            model = st.dir(f"rl_{name}") / rl["model"]
            ev = st.run(
                f"eval_{name}",
                [ev_cfg["eval"], rl_cfg],
                lambda d, m=model: stage_eval(ev_cfg, m, d),
            )
            results.setdefault(arm, {})[seed] = {int(k): v for k, v in ev["accuracy"].items()}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return results


def write_report(
    results: dict, cfg: dict, out: Path, report: Path, seconds: float, baseline: dict | None = None
) -> None:
    rep = cfg["reproduce"]
    lengths = rep["eval_lengths"]
    train_len = cfg["rl"]["train_length"]
    lines = [
        "# Reproduction at tiny scale: LongAct vs plain DAPO and ablation masks",
        "",
        f"Run on {time.strftime('%Y-%m-%d')} with `make reproduce` "
        f"({seconds / 60:.0f} min on a 2-core CPU). Model: tiny Qwen3 `{cfg['model']['size']}` "
        f"after the demo's supervised warm-up (contexts {cfg['sft']['lengths']}); task "
        f"`{cfg['task']['name']}` {cfg['task']['options']}; DAPO for {rep['steps']} steps at "
        f"{train_len} tokens, identical data, budget and seeds {rep['seeds']} for every arm; "
        f"greedy accuracy on {rep['eval_samples']} held-out prompts per length.",
        "",
        "Accuracy, mean over seeds ± 95% confidence interval (t distribution):",
        "",
        "| arm | "
        + " | ".join(f"{n}{' (train)' if n == train_len else ''}" for n in lengths)
        + " |",
        "|---|" + "---:|" * len(lengths),
    ]
    if baseline:
        lines.append(
            "| warm-up only (before RL) | "
            + " | ".join(f"{baseline.get(n, float('nan')):.3f}" for n in lengths)
            + " |"
        )
    for arm, by_seed in results.items():
        cells = []
        for n in lengths:
            m, h = mean_ci([by_seed[s][n] for s in sorted(by_seed)])
            cells.append(f"{m:.3f} ± {h:.3f}")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += ["", "LongAct (top-k 0.3) minus plain DAPO (full), Welch 95% interval:", ""]
    lines += ["| length | difference | verdict |", "|---:|---:|---|"]
    verdicts = []
    if "longact_topk" in results and "full" in results:
        for n in lengths:
            a = [results["longact_topk"][s][n] for s in results["longact_topk"]]
            b = [results["full"][s][n] for s in results["full"]]
            d, h = welch(a, b)
            v = verdict(d, h)
            verdicts.append(v)
            lines.append(f"| {n} | {d:+.3f} ± {h:.3f} | {v} |")
    wins, losses = verdicts.count("LongAct won"), verdicts.count("LongAct lost")
    summary = (
        f"LongAct won at {wins}, lost at {losses} and tied at "
        f"{len(verdicts) - wins - losses} of {len(verdicts)} lengths against plain DAPO."
    )
    lines += [
        "",
        f"**{summary}**",
        "",
        "Per-seed accuracies: `results.json` in the run folder.",
        "",
    ]
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text("\n".join(lines))
    _say(summary)


def baseline(out: Path) -> dict[int, float]:
    """Accuracy of the warm-up model by length (the eval_sft stage of the run folder)."""
    meta = json.loads((Path(out) / "eval_sft" / "stage.json").read_text())
    return {int(k): v for k, v in meta["result"]["accuracy"].items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m longact.demo.reproduce", description=__doc__.split("\n")[0]
    )
    p.add_argument("--out", default="runs/reproduce", help="run folder (resumable)")
    p.add_argument("--shared", default="runs/demo", help="folder of the demo's shared stages")
    p.add_argument("--report", default="docs/reproduce.md", help="where the report goes")
    p.add_argument("overrides", nargs="*", help="demo.yaml overrides, e.g. reproduce.steps=40")
    args = p.parse_args(argv)
    cfg = load_config(args.overrides)
    t0 = time.time()
    results = run(Path(args.shared).resolve(), Path(args.out).resolve(), cfg)
    write_report(
        results, cfg, Path(args.out), Path(args.report), time.time() - t0, baseline(Path(args.out))
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
