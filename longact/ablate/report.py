"""The ablation's files: ``ablate.json``, ``ablate.md`` and ``ablate.png``.

``compare(result)`` pairs the arms on their shared prompts (every arm scores the same
ones): for each task and length, and pooled over the lengths, the mean per-prompt score
difference with a 95% t interval over prompts (``longact.eval.stats.mean_ci``):

* ``topk - none`` and ``bottomk - none``: what disrupting those channels costs;
* ``topk - random``: against the random arms' per-prompt mean over seeds - the question
  ``longact ablate`` answers: does accuracy fall more when the top-k channels go than
  when as many random ones do? Its interval is over prompts with the random draws held
  fixed; ``topk - random:<seed>`` gives each draw's own difference, so the spread between
  draws shows too (with few seeds, a draw that happens to hit the large channels costs
  as much as top-k).

The plot shows accuracy against length per arm, with 95% Wilson bands (the random arms
pooled: the per-prompt mean over seeds, with its t band).
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from longact.eval.report import length_axes, save_figure
from longact.eval.stats import mean_ci

COLORS = {"none": "#222222", "topk": "#c0392b", "bottomk": "#2471a3", "random": "#7f8c8d"}
STYLES = {"none": "o-", "topk": "s-", "bottomk": "^-", "random": "D--"}  # overlaps stay visible


def _scores(result: dict, policy: str) -> list[float] | None:
    """Per-prompt scores of an arm (random: mean over its seeds); None if not run."""
    arms = [a for a in result["arms"] if a["policy"] == policy]
    if not arms:
        return None
    return [statistics.fmean(col) for col in zip(*(a["scores"] for a in arms))]


def _interval(diffs: list[float]) -> dict[str, float]:
    m, h = mean_ci(diffs)
    return {"mean": m, "half": h, "n": len(diffs)}


PAIRS = (("topk", "none"), ("bottomk", "none"), ("topk", "random"))


def compare(result: dict) -> list[dict[str, Any]]:
    """Paired differences (see module docstring), one entry per pair, task and length
    (``length`` None: pooled over the task's lengths). ``topk - random:<seed>`` entries
    compare with each random draw alone: the prompt-level interval of ``topk - random``
    holds the draws fixed, and the spread between draws is the other half of the story."""
    prompts = result["prompts"]
    out = []
    randoms = [(f"random:{a['seed']}", a["scores"]) for a in result["arms"]
               if a["policy"] == "random"]  # fmt: skip
    pairs = [(a, b, _scores(result, a), _scores(result, b)) for a, b in PAIRS]
    if len(randoms) > 1 and _scores(result, "topk") is not None:
        pairs += [("topk", name, _scores(result, "topk"), sc) for name, sc in randoms]
    for a, b, sa, sb in pairs:
        if sa is None or sb is None:
            continue
        for task in dict.fromkeys(p["task"] for p in prompts):
            lengths = [*dict.fromkeys(p["length"] for p in prompts if p["task"] == task), None]
            for length in lengths:
                idx = [
                    i
                    for i, p in enumerate(prompts)
                    if p["task"] == task and length in (None, p["length"])
                ]
                diffs = [sa[i] - sb[i] for i in idx]
                out.append(
                    {"pair": f"{a} - {b}", "task": task, "length": length, **_interval(diffs)}
                )
    return out


def _pts(x: float) -> str:
    return "-" if math.isnan(x) else f"{100 * x:+.1f}"


def _ci(e: dict) -> str:
    if math.isnan(e["half"]):
        return _pts(e["mean"])
    lo, hi = e["mean"] - e["half"], e["mean"] + e["half"]
    return f"{_pts(e['mean'])} [{_pts(lo)}, {_pts(hi)}]"


def headline(result: dict, comparisons: list[dict]) -> str:
    """One sentence per task: top-k against random, pooled over lengths, as measured."""
    s = result["settings"]
    lines = []
    for e in comparisons:
        if e["pair"] != "topk - random" or e["length"] is not None:
            continue
        lo, hi = e["mean"] - e["half"], e["mean"] + e["half"]
        if math.isnan(e["half"]):
            word = "differs from (no interval: one prompt)"
        elif hi < 0:
            word = "costs more accuracy than"
        elif lo > 0:
            word = "costs less accuracy than"
        else:
            word = "cannot be told apart from"
        top = f"the top {100 * s['ratio']:g}% of channels"
        per_seed = [f"{_pts(r['mean'])} ({r['pair'].split(' - ')[1]})" for r in comparisons
                    if r["pair"].startswith("topk - random:") and r["task"] == e["task"]
                    and r["length"] is None]  # fmt: skip
        lines.append(
            f"{e['task']}: disrupting {top} {word} disrupting as "
            f"many random ones: {_ci(e)} points (top-k minus random, pooled over "
            f"{len(result['lengths'])} lengths, {e['n']} paired prompts, 95% t interval)."
            + (
                f" Against each random draw alone: {', '.join(per_seed)} points; the interval "
                "holds these draws fixed."
                if per_seed
                else ""
            )  # fmt: skip
        )
    return "\n".join(lines)


def markdown(result: dict, comparisons: list[dict]) -> str:
    s, cal = result["settings"], result["calibration"]
    seeds = [a["seed"] for a in result["arms"] if a["policy"] == "random"]
    lines = [
        f"# Channel ablation of `{result['model']}`",
        "",
        f"Channels chosen per (layer, projection) at ratio {s['ratio']:g} by `{s['score']}` "
        f"({s['granularity']} granularity) at the `{s['point']}` capture point, replaced by "
        f"{'their calibration mean' if s['mode'] == 'mean' else 'zero'}. Calibration: "
        f"{cal['prompts']} prompts ({cal['tokens']} tokens; {cal['source']}; "
        f"{cal['dropped_overlap']} dropped as evaluation prompts). Evaluation: "
        f"{result['n']} prompts per task and length, seed {result['seed']}, greedy."
        + (f" Random arms: seeds {', '.join(map(str, seeds))}." if seeds else ""),
        "",
        headline(result, comparisons),
        "",
        "## Accuracy (%, 95% Wilson interval)",
        "",
    ]
    lengths = result["lengths"]
    for task in result["tasks"]:
        lines += [
            f"**{task}**",
            "",
            "| arm | " + " | ".join(map(str, lengths)) + " |",
            "|---|" + "---:|" * len(lengths),
        ]
        for arm in result["arms"]:
            cells = {e["length"]: e for e in arm["summary"] if e["task"] == task}
            row = [
                f"{100 * c['accuracy']:.1f} [{100 * c['low']:.0f}, {100 * c['high']:.0f}]"
                if (c := cells.get(n))
                else "-"
                for n in lengths
            ]
            lines.append(f"| {arm['name']} | " + " | ".join(row) + " |")
        lines.append("")
    lines += [
        "## Paired differences (points, 95% t interval over prompts)",
        "",
        "| pair | task | " + " | ".join(map(str, lengths)) + " | pooled |",
        "|---|---|" + "---:|" * (len(lengths) + 1),
    ]
    for pair in dict.fromkeys(e["pair"] for e in comparisons):
        for task in result["tasks"]:
            cell = {e["length"]: e for e in comparisons if e["pair"] == pair and e["task"] == task}
            if cell:
                row = [_ci(cell[n]) if n in cell else "-" for n in [*lengths, None]]
                lines.append(f"| {pair} | {task} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str | Path) -> Path:
    """Accuracy against length per arm with 95% bands, one panel per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks, lengths = result["tasks"], result["lengths"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 3.8), dpi=110, squeeze=False)
    prompts = result["prompts"]
    for ax, task in zip(axes[0], tasks):
        for policy in dict.fromkeys(a["policy"] for a in result["arms"]):
            scores = _scores(result, policy)
            ys, lo, hi = [], [], []
            for n in lengths:
                vals = [
                    scores[i]
                    for i, p in enumerate(prompts)
                    if p["task"] == task and p["length"] == n
                ]
                m, h = mean_ci(vals)
                arm = next(a for a in result["arms"] if a["policy"] == policy)
                if policy != "random":  # a 0/1 score per prompt: Wilson
                    e = next(e for e in arm["summary"] if e["task"] == task and e["length"] == n)
                    low, high = e["low"], e["high"]
                else:
                    low, high = m - h, m + h
                ys.append(100 * m), lo.append(100 * low), hi.append(100 * high)
            k = sum(a["policy"] == "random" for a in result["arms"])
            label = f"random (mean of {k} seeds)" if policy == "random" else policy
            c = COLORS.get(policy, None)
            ax.plot(lengths, ys, STYLES.get(policy, "o-"), color=c, lw=2, label=label)
            ax.fill_between(lengths, lo, hi, color=c, alpha=0.15)
        ratio = 100 * result["settings"]["ratio"]
        length_axes(ax, lengths, f"{task}: {ratio:g}% of Q/K channels disrupted per layer")
    return save_figure(fig, path)


def write(result: dict, out_dir: str | Path) -> dict[str, str]:
    """Write ablate.json (with the comparisons), ablate.md and ablate.png."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result["comparisons"] = compare(result)
    files = {"json": out / "ablate.json", "md": out / "ablate.md", "png": out / "ablate.png"}
    files["json"].write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    files["md"].write_text(markdown(result, result["comparisons"]))
    plot(result, files["png"])
    return {k: str(v) for k, v in files.items()}
