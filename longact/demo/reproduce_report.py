"""``docs/reproduce.md`` from whatever runs of the grid exist (plots beside it).

Reads ``docs/reproduce/runs/*.json`` of the current experiment key and writes:

- how many runs the report rests on, of how many planned, per (algorithm, arm);
- accuracy by length per arm (mean over seeds and 95% t interval), against the warm-up;
- the paired analysis: per seed, an arm's accuracy minus plain RL's on the same seed;
  the mean difference with its exact 95% t interval per length, and pooled over the
  lengths beyond the RL length (each seed's differences averaged first);
- four figures, each with one sentence: accuracy against length with interval bands, a
  forest plot of the paired differences, reward per step, and mask drift (Jaccard with
  the first mask, |x| mass kept) of the LongAct arms.

Nothing here decides what the result should be: a verdict is "better" / "worse" only
when the 95% interval of the paired difference excludes zero, "tied" otherwise, and
"n/a" with fewer than two paired seeds.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from longact.eval.stats import Interval, mean_ci, paired, pooled_paired

ALGO_NAMES = {"grpo": "GRPO", "dapo": "DAPO"}
FLOOR = 0.15  # a task whose best arm stays below this accuracy is called "near its floor"
PAPER_GAIN = 0.039  # the paper's LongAct gain on LongBench v2 (points / 100)


def _by_seed(runs: dict, algo: str, arm: str, task: str) -> dict[int, dict[int, float]]:
    """{seed: {length: accuracy}} of one (algo, arm) on ``task``."""
    out = {}
    for r in runs.values():
        if r["algo"] == algo and r["arm"] == arm and task in r["accuracy"]:
            out[int(r["seed"])] = {int(n): v for n, v in r["accuracy"][task].items()}
    return out


def _curves(runs: dict, algo: str, arm: str, field: str) -> list[dict[str, float]]:
    """The non-empty per-step ``field`` ({step: value}) of every run of (algo, arm)."""
    return [r[field] for r in runs.values() if r["algo"] == algo and r["arm"] == arm and r[field]]


def _arms(runs: dict, plan: list) -> list[tuple[str, str]]:
    """(algo, arm) pairs of the plan, in plan order."""
    seen: list[tuple[str, str]] = []
    for r in plan:
        if (r.algo, r.arm) not in seen:
            seen.append((r.algo, r.arm))
    return seen


def _fmt(iv: Interval) -> str:
    if iv.n == 0:
        return "–"
    half = "n/a" if iv.half != iv.half else f"{iv.half:.3f}"
    return f"{iv.mean:+.3f} ± {half} (n={iv.n})"


def analysis(cfg: dict, runs: dict, plan: list) -> dict:
    """Every number the report shows: {(algo, arm, task): {...}}."""
    rep = cfg["reproduce"]
    lengths, ref = rep["eval"]["lengths"], rep["reference"]
    beyond = [n for n in lengths if n > rep["rl_length"]]
    out = {}
    for algo, arm in _arms(runs, plan):
        for task in rep["eval"]["tasks"]:
            mine = _by_seed(runs, algo, arm, task)
            base = _by_seed(runs, algo, ref, task)
            entry = {"seeds": sorted(mine), "acc": {}, "diff": {}, "pooled": None}
            for n in lengths:
                vals = [mine[s][n] for s in sorted(mine) if n in mine[s]]
                entry["acc"][n] = mean_ci(vals) if vals else (float("nan"), float("nan"))
                if arm != ref:
                    entry["diff"][n] = paired(
                        {s: v[n] for s, v in mine.items() if n in v},
                        {s: v[n] for s, v in base.items() if n in v},
                    )
            if arm != ref:
                entry["pooled"] = pooled_paired(mine, base, beyond)
            out[(algo, arm, task)] = entry
    return out


def _plots(cfg: dict, runs: dict, plan: list, res: dict, warm: dict, folder: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rep = cfg["reproduce"]
    lengths, tasks = rep["eval"]["lengths"], list(rep["eval"]["tasks"])
    algos = [a for a in ALGO_NAMES if any(r.algo == a for r in plan)]
    folder.mkdir(parents=True, exist_ok=True)
    files = []

    fig, axes = plt.subplots(len(algos), len(tasks), figsize=(5 * len(tasks), 3.6 * len(algos)),
                             squeeze=False)  # fmt: skip
    for i, algo in enumerate(algos):
        for j, task in enumerate(tasks):
            ax = axes[i][j]
            for (a, arm, t), e in res.items():
                if a != algo or t != task or not e["seeds"]:
                    continue
                m = [e["acc"][n][0] for n in lengths]
                h = [0 if e["acc"][n][1] != e["acc"][n][1] else e["acc"][n][1] for n in lengths]
                ax.plot(lengths, m, marker="o", label=f"{arm} (n={len(e['seeds'])})")
                ax.fill_between(lengths, [x - y for x, y in zip(m, h)],
                                [x + y for x, y in zip(m, h)], alpha=0.15)  # fmt: skip
            if task in warm:
                ax.plot(lengths, [warm[task].get(str(n), float("nan")) for n in lengths],
                        "k--", label="warm-up")  # fmt: skip
            ax.axvline(rep["rl_length"], color="grey", lw=0.8)
            ax.set(title=f"{ALGO_NAMES[algo]}: {task}", xlabel="prompt tokens", ylabel="accuracy")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "accuracy_vs_length.png", dpi=110)
    files.append("accuracy_vs_length.png")
    plt.close(fig)

    # forest plot: a panel per task, a row per compared arm, one interval per length
    # (offset within the row) and the pooled one beyond the RL length (red)
    pairs = [(a, arm) for a, arm in _arms(runs, plan) if arm != rep["reference"]]
    marks, rl = [*lengths, "pooled"], rep["rl_length"]
    size = (5 * len(tasks), 0.9 * max(3, len(pairs)) + 1.2)
    fig, axes = plt.subplots(1, len(tasks), figsize=size, sharey=True, squeeze=False)
    for j, task in enumerate(tasks):
        ax, labelled = axes[0][j], set()
        for row, (algo, arm) in enumerate(pairs):
            e = res.get((algo, arm, task))
            for k, n in enumerate(marks):
                iv = None if e is None else (e["pooled"] if n == "pooled" else e["diff"][n])
                if iv is None or not iv.n:
                    continue
                pooled = n == "pooled"
                label = "pooled" if pooled else f"{n} tokens" + (" (RL)" if n == rl else "")
                if label in labelled:  # one legend entry per length
                    label = None
                labelled.add(label)
                ax.errorbar(iv.mean, row + 0.7 * (k / (len(marks) - 1) - 0.5),
                            xerr=0 if iv.half != iv.half else iv.half, capsize=2,
                            fmt="o" if pooled else ".", ms=6 if pooled else 4, label=label,
                            color="C3" if pooled else plt.cm.viridis(k / len(marks)))  # fmt: skip
        ax.axvline(0, color="k", lw=0.8)
        ax.set_yticks(range(len(pairs)), [f"{ALGO_NAMES[a]} {arm}" for a, arm in pairs])
        ax.set(title=task, xlabel=f"accuracy minus {rep['reference']}, same seed (95% t)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    axes[0][0].invert_yaxis()
    fig.tight_layout()
    fig.savefig(folder / "paired_differences.png", dpi=110)
    files.append("paired_differences.png")
    plt.close(fig)

    for name, field, ylabel in (
        ("reward_per_step.png", "reward", "batch reward"),
        ("mask_drift.png", "jaccard_first", "Jaccard with the first mask; |x| mass kept"),
    ):
        fig, axes = plt.subplots(1, len(algos), figsize=(5.5 * len(algos), 3.6), squeeze=False)
        for i, algo in enumerate(algos):
            ax = axes[0][i]
            for a, arm in _arms(runs, plan):
                if a != algo:
                    continue
                curves = _curves(runs, algo, arm, field)
                if not curves:
                    continue
                steps = sorted({int(s) for c in curves for s in c})
                ms, hs = [], []
                for s in steps:
                    m, h = mean_ci([c[str(s)] for c in curves if str(s) in c])
                    ms.append(m)
                    hs.append(0 if h != h else h)
                # a marker per point: a mask chosen once (topk_fixed) has a single point
                (line,) = ax.plot(steps, ms, marker="o", ms=3, label=f"{arm} (n={len(curves)})")
                ax.fill_between(steps, [m - h for m, h in zip(ms, hs)],
                                [m + h for m, h in zip(ms, hs)], alpha=0.15)  # fmt: skip
                if field == "jaccard_first":
                    mass = _curves(runs, algo, arm, "mass_kept")
                    kept = [[c[str(s)] for c in mass if str(s) in c] for s in steps]
                    kept = [statistics.fmean(v) if v else float("nan") for v in kept]
                    ax.plot(steps, kept, ls=":", marker="o", ms=3, color=line.get_color(),
                            label=f"{arm}: |x| mass kept")  # fmt: skip
            ax.set(title=ALGO_NAMES[algo], xlabel="training step", ylabel=ylabel)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(folder / name, dpi=110)
        files.append(name)
        plt.close(fig)
    return files


def write_report(cfg: dict, results: Path, report: Path, key: str, plan: list) -> Path:
    from longact.demo.reproduce import load_runs

    rep = cfg["reproduce"]
    runs, stale = load_runs(results, key)
    warm_file = results / "runs" / "warmup.json"
    warm_rec = json.loads(warm_file.read_text()) if warm_file.is_file() else {}
    warm = warm_rec.get("accuracy", {}) if warm_rec.get("key") == key else {}
    lengths = rep["eval"]["lengths"]
    res = analysis(cfg, runs, plan)
    lines = [
        "# Reproduction at tiny scale: LongAct against plain RL and ablation masks",
        "",
        f"Rebuilt {time.strftime('%Y-%m-%d')} by `make reproduce` from **{len(runs)} of "
        f"{len(plan)} planned runs** (experiment key `{key}`; per-run results in "
        f"`{results}/runs/`). Tiny Qwen3 `{cfg['model']['size']}` after a supervised warm-up "
        f"of {cfg['sft']['steps']} steps at {cfg['sft']['lengths']} tokens on "
        f"`{cfg['task']['name']}`; RL for {rep['steps']} steps at {rep['rl_length']} tokens, "
        f"same data order and budget per seed in every arm; greedy accuracy on "
        f"{rep['eval']['samples']} held-out prompts per length and task.",
        "",
    ]
    if stale:
        lines += [f"Runs of another experiment key, left out: {', '.join(stale)}.", ""]
    shas = {r.get("warmup_sha") for r in runs.values()}
    if len(shas) > 1:
        lines += [f"**The runs come from {len(shas)} different warm-up models** "
                  "(resumed on machines whose warm-up differed); pairs mix them.", ""]  # fmt: skip
    if warm:
        cells = ", ".join(f"{n}: {v:.2f}" for n, v in sorted(
            ((int(n), v) for n, v in warm[cfg["task"]["name"]].items())))  # fmt: skip
        lines += [f"Warm-up model, accuracy by length on the training task: {cells}.", ""]
    if not runs:
        lines += ["No run has finished yet: the tables and figures appear with the first.", ""]
    else:
        files = _plots(cfg, runs, plan, res, warm, results)
        lines += _verdict(cfg, res)
        lines += _tables(cfg, res, lengths)
        cap = _captions(cfg, runs, plan, res, warm)
        lines += ["## Figures", ""]
        for name, file, sentence in zip(("accuracy", "paired", "reward", "drift"), files, cap):
            lines += [f"![{name}]({results.name}/{file})", "", sentence, ""]
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text("\n".join(lines) + _paper_scale())
    return report


def _captions(cfg: dict, runs: dict, plan: list, res: dict, warm: dict) -> list[str]:
    """One sentence per figure, written from the numbers it plots."""
    rep = cfg["reproduce"]
    task, ref, top = cfg["task"]["name"], rep["reference"], max(rep["eval"]["lengths"])
    at_top = {f"{ALGO_NAMES[a]} {arm}": e["acc"][top][0] for (a, arm, t), e in res.items()
              if t == task and e["seeds"] and e["acc"][top][0] == e["acc"][top][0]}  # fmt: skip
    legend = (
        "bands are 95% t intervals over seeds, the dashed line is the warm-up model and the "
        "grey line the RL length."
    )
    if at_top:
        lo, hi = min(at_top, key=at_top.get), max(at_top, key=at_top.get)
        was = f" (warm-up: {warm[task][str(top)]:.2f})" if str(top) in warm.get(task, {}) else ""
        accuracy = (
            f"At {top} tokens on `{task}` the arms' mean accuracy runs from {at_top[lo]:.2f} "
            f"({lo}) to {at_top[hi]:.2f} ({hi}){was}; {legend}"
        )
    else:
        accuracy = f"Accuracy against prompt length per arm; {legend}"
    pooled = [
        (f"{ALGO_NAMES[a]} {arm} on `{t}`", e["pooled"])
        for (a, arm, t), e in res.items()
        if e["pooled"] is not None and e["pooled"].n >= 2 and e["pooled"].half == e["pooled"].half
    ]
    if pooled:
        wide = max(pooled, key=lambda p: p[1].half)
        zero = sum(iv.verdict() == "tied" for _, iv in pooled)
        paired = (
            f"{zero} of {len(pooled)} pooled intervals (red) include zero; the widest is "
            f"±{wide[1].half:.3f} ({wide[0]}), so smaller effects are invisible at these seeds."
        )
    else:
        paired = f"Paired differences from {ref}: no pooled interval yet (two seeds needed)."
    last = {}
    for a, arm in _arms(runs, plan):
        # steps are JSON string keys: order them as numbers, whatever order a file has
        tails = [statistics.fmean(c[s] for s in sorted(c, key=int)[-5:])
                 for c in _curves(runs, a, arm, "reward")]  # fmt: skip
        if tails:
            last[f"{ALGO_NAMES[a]} {arm}"] = statistics.fmean(tails)
    reward = "Batch reward per training step (mean over seeds, 95% band)" + (
        f"; over the last 5 steps it averages {min(last.values()):.2f} "
        f"({min(last, key=last.get)}) to {max(last.values()):.2f} ({max(last, key=last.get)})."
        if last
        else "."
    )
    drift = []
    for a, arm in _arms(runs, plan):
        jac = [j[max(j, key=int)] for j in _curves(runs, a, arm, "jaccard_first") if len(j) > 1]
        if jac:
            drift.append(f"{ALGO_NAMES[a]} {arm} {statistics.fmean(jac):.2f}")
    mask = (
        "Mask drift during RL: Jaccard overlap of each refresh's mask with the first (solid) "
        "and the share of |x| mass it keeps (dotted)"
        + (f"; at the last refresh: {', '.join(drift)}." if drift else ".")
    )
    return [accuracy, paired, reward, mask]


def _verdict(cfg: dict, res: dict) -> list[str]:
    """Plain sentences: which arm beats the reference, by how much, on what evidence."""
    rep = cfg["reproduce"]
    ref, beyond = rep["reference"], [n for n in rep["eval"]["lengths"] if n > rep["rl_length"]]
    lines = [
        "## Verdict",
        "",
        f"Pooled paired difference from `{ref}` over the lengths beyond the RL length "
        f"({', '.join(map(str, beyond))} tokens), mean ± 95% t half-width over seeds:",
        "",
    ]
    winners = []
    for (algo, arm, task), e in res.items():
        iv = e["pooled"]
        if iv is None or iv.n == 0:
            continue
        lines.append(f"- {ALGO_NAMES[algo]}, `{arm}` on `{task}`: {_fmt(iv)}: {iv.verdict()}")
        if iv.verdict() == "better":
            winners.append(f"{ALGO_NAMES[algo]} `{arm}` on `{task}` by {iv.mean:+.3f}")
    lines.append("")
    judged = [e["pooled"] for e in res.values() if e["pooled"] is not None and e["pooled"].n >= 2]
    if any(iv.verdict() == "n/a" for iv in judged):
        lines += [
            "`n/a` with two or more seeds: every seed gave the same nonzero difference "
            f"(accuracy moves in steps of 1/{rep['eval']['samples']}), so there is no spread "
            "to build an interval from; it is not counted as a win or a loss.",
            "",
        ]
    for task in rep["eval"]["tasks"]:  # a task no arm learns cannot separate the arms
        best = max((m for (_, _, t), e in res.items() if t == task and e["seeds"]
                    for m, _ in e["acc"].values() if m == m), default=None)  # fmt: skip
        if best is not None and best < FLOOR:
            lines += [f"`{task}` stays near its floor in every arm (best mean accuracy "
                      f"{best:.2f}), so its intervals say little about the arms.", ""]  # fmt: skip
    if not judged:
        lines.append("**No verdict yet**: an interval needs at least two paired seeds.")
    elif winners:
        lines.append(f"**Beats plain RL: {'; '.join(winners)}.** Everything else ties or loses.")
    else:
        lines.append(
            "**No arm beats plain RL here**: every interval that exists includes zero or lies "
            "below it. At this scale and with these seeds, a difference smaller than the "
            "half-widths above cannot be told from noise."
        )
    return [*lines, "", *_scope(cfg, res)]


def _scope(cfg: dict, res: dict) -> list[str]:
    """What the method arm's interval rules out at this scale, and what it cannot reach."""
    rep, task = cfg["reproduce"], cfg["task"]["name"]
    algo = next((a for a, arm, t in res if arm == "topk" and t == task), None)
    iv = res[(algo, "topk", task)]["pooled"] if algo else None
    if iv is None or iv.n < 2 or iv.half != iv.half:
        return []
    gain = f"the paper's +{100 * PAPER_GAIN:.1f} points on LongBench v2"
    if iv.low < PAPER_GAIN < iv.high:
        paper = f"{gain} lies inside, so an effect of that size is neither shown nor ruled out"
    elif PAPER_GAIN >= iv.high:
        paper = f"that rules out a gain the size of {gain}, at this scale"
    else:
        paper = f"the whole interval lies above {gain}"
    return [
        "### What this can and cannot say",
        "",
        f"{ALGO_NAMES[algo]} top-k minus plain on `{task}` beyond the RL length lies in "
        f"[{100 * iv.low:+.1f}, {100 * iv.high:+.1f}] points (n={iv.n}): a gain above "
        f"{100 * iv.high:+.1f} or a loss below {100 * iv.low:+.1f} points is ruled out, smaller "
        f"effects are not; {paper}. The scale is a tiny Qwen3 `{cfg['model']['size']}`, "
        f"{rep['steps']} RL steps at {rep['rl_length']} tokens, tasks "
        f"{', '.join(f'`{t}`' for t in rep['eval']['tasks'])}: nothing here speaks for 4B-8B "
        "models, 32k contexts or LongBench v2 (the last section sizes that run).",
        "",
    ]


def _tables(cfg: dict, res: dict, lengths: list[int]) -> list[str]:
    rep = cfg["reproduce"]
    lines = []
    for task in rep["eval"]["tasks"]:
        lines += [
            f"## `{task}`",
            "",
            "| algorithm | arm | seeds | "
            + " | ".join(f"{n}{' (RL)' if n == rep['rl_length'] else ''}" for n in lengths)
            + " |",
            "|---|---|---:|" + "---:|" * len(lengths),
        ]
        for (algo, arm, t), e in res.items():
            if t == task and e["seeds"]:
                cells = [f"{m:.3f} ± {h:.3f}" if h == h else f"{m:.3f}"
                         for m, h in (e["acc"][n] for n in lengths)]  # fmt: skip
                row = f"| {ALGO_NAMES[algo]} | {arm} | {len(e['seeds'])} | " + " | ".join(cells)
                lines.append(row + " |")
        lines += [
            "",
            f"Paired difference from `{rep['reference']}` (same algorithm, same seed), "
            f"mean ± 95% t half-width; pooled: lengths beyond {rep['rl_length']}:",
            "",
            "| algorithm | arm | " + " | ".join(str(n) for n in lengths) + " | pooled | verdict |",
            "|---|---|" + "---:|" * len(lengths) + "---:|---|",
        ]
        for (algo, arm, t), e in res.items():
            if t == task and e["pooled"] is not None:
                cells = [_fmt(e["diff"][n]) for n in lengths]
                lines.append(
                    f"| {ALGO_NAMES[algo]} | {arm} | " + " | ".join(cells)
                    + f" | {_fmt(e['pooled'])} | {e['pooled'].verdict()} |"
                )  # fmt: skip
        lines.append("")
    return lines


def _paper_scale() -> str:
    from importlib import resources

    return (resources.files("longact.demo") / "paper_scale.md").read_text()
