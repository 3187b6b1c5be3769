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


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for num in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularized incomplete beta function, for 0 <= x <= 1."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    lbeta = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    front = math.exp(lbeta + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` (> 0, not necessarily whole) degrees of freedom."""
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t (bisection on :func:`t_cdf`, to 1e-12)."""
    if not (0.0 < p < 1.0) or not df > 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
        if hi - lo < 1e-12:
            break
    return (lo + hi) / 2.0


def t975(df: float) -> float:
    """Two-sided 95% critical value of Student's t (exact, any df > 0)."""
    return t_quantile(0.975, df)


def mean_ci(xs: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% confidence interval."""
    m = statistics.fmean(xs)
    if len(xs) < 2:
        return m, float("nan")
    return m, t975(len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs))


def welch(a: list[float], b: list[float]) -> tuple[float, float]:
    """Difference of means (a - b) and the half-width of its 95% Welch interval.

    The half-width is NaN (no verdict) with fewer than 2 seeds in an arm, or when both
    arms have no spread but different means (no interval can be formed); two identical
    constant arms give 0 (a tie)."""
    diff = statistics.fmean(a) - statistics.fmean(b)
    if len(a) < 2 or len(b) < 2:
        return diff, float("nan")
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return diff, (0.0 if diff == 0 else float("nan"))
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
