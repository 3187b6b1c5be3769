"""The demo's report: one page, four figures, each with one sentence of what it shows.

1. the ablation of the warm-up model (``ablate/ablate.png``, written by the ablate stage);
2. accuracy by context length before and after RL, 95% Wilson bands, and the gain at the
   RL length with a paired interval over the same held-out prompts;
3. reward per RL step;
4. the Q/K channel heatmaps of the warm-up model with its mask, and the mask overlap of
   the warm-up and RL models.

The sentences are written from the numbers of the run, whatever they say.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from longact.eval.stats import mean_ci, wilson  # noqa: E402


def paired_gain(cfg: dict, before: list[float], after: list[float]) -> dict[int, dict]:
    """{length: before, after (with Wilson intervals) and the paired gain after - before
    with its 95% t interval over prompts}; the scores are in evaluation order (one task,
    ``eval.lengths`` in turn, ``eval.samples`` each)."""
    n, out = cfg["eval"]["samples"], {}
    for i, length in enumerate(cfg["eval"]["lengths"]):
        b, a = before[i * n : (i + 1) * n], after[i * n : (i + 1) * n]
        m, h = mean_ci([y - x for x, y in zip(b, a)])
        out[length] = {
            "before": statistics.fmean(b),
            "before_ci": wilson(sum(b), len(b)),
            "after": statistics.fmean(a),
            "after_ci": wilson(sum(a), len(a)),
            "gain": m,
            "gain_half": h,
            "n": len(b),
        }
    return out


def _plot_accuracy(gain: dict[int, dict], cfg: dict, out: Path) -> None:
    xs = sorted(gain)
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=120)
    for key, label, style, color in (
        ("before", "after warm-up (before RL)", "s--", "#7f8c8d"),
        ("after", "after RL", "o-", "#c0392b"),
    ):
        ys = [100 * gain[x][key] for x in xs]
        ax.plot(xs, ys, style, color=color, lw=2, label=label)
        ax.fill_between(
            xs,
            [100 * gain[x][key + "_ci"][0] for x in xs],
            [100 * gain[x][key + "_ci"][1] for x in xs],
            color=color,
            alpha=0.15,
        )
    ax.axvline(cfg["rl"]["train_length"], color="#c0392b", ls=":", label="RL length")
    ax.axvspan(
        min(cfg["sft"]["lengths"]),
        max(cfg["sft"]["lengths"]),
        color="#3498db",
        alpha=0.12,
        label="warm-up lengths",
    )
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("accuracy (%), 95% band")
    ax.set_ylim(-3, 103)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{cfg['task']['name']}: accuracy by context length")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def _plot_rewards(metrics: dict, algo: str, out: Path) -> list[tuple[int, float]]:
    steps = sorted(int(s) for s in metrics)
    batch = [
        (s, metrics[str(s)]["critic/score/mean"])
        for s in steps
        if "critic/score/mean" in metrics[str(s)]
    ]
    fig, ax = plt.subplots(figsize=(7, 3.2), dpi=120)
    if batch:
        ax.plot(
            *zip(*batch),
            "o-",
            color="#c0392b",
            lw=1.5,
            ms=3,
            label="mean reward of the step's rollouts",
        )
    ax.set_xlabel("RL step")
    ax.set_ylabel("reward")
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(f"{algo} + LongAct: reward per step")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return batch


def _pts(x: float) -> str:
    return f"{100 * x:+.1f}"


def _reward_sentence(batch: list[tuple[int, float]]) -> str:
    if len(batch) < 2:
        return "Too few steps logged a reward to draw a curve."
    k = max(1, len(batch) // 4)
    first = statistics.fmean(r for _, r in batch[:k])
    last = statistics.fmean(r for _, r in batch[-k:])
    return (
        f"The mean reward of the rollouts went from {first:.2f} (first {k} steps) to "
        f"{last:.2f} (last {k}) over {len(batch)} steps; a point is one step's "
        "rollouts, so single steps are noisy."
    )


def _gain_sentence(cfg: dict, gain: dict[int, dict], steps: int, algo: str) -> str:
    length = cfg["rl"]["train_length"]
    g = gain.get(length)
    if g is None:
        return f"The RL length ({length}) is not among the evaluated lengths."
    lo, hi = g["gain"] - g["gain_half"], g["gain"] + g["gain_half"]
    if math.isnan(g["gain_half"]):
        word = "changed"
    elif lo > 0:
        word = "rose"
    elif hi < 0:
        word = "fell"
    else:
        word = "moved within noise"
    return (
        f"At the RL length ({length} tokens) accuracy {word}: {100 * g['before']:.1f}% -> "
        f"{100 * g['after']:.1f}% after {steps} {algo} steps with LongAct, a gain of "
        f"{_pts(g['gain'])} points (95% paired t interval [{_pts(lo)}, {_pts(hi)}], "
        f"{g['n']} held-out prompts)."
    )


def write_report(
    out: Path, cfg: dict, stages, ev_sft: dict, ev_rl: dict, rl: dict, insp: dict, total_s: float
) -> Path:
    from longact.ablate.report import headline

    metrics = json.loads((out / "rl" / "metrics.json").read_text())
    ablation = json.loads((out / "ablate" / "ablate.json").read_text())
    algo = "DAPO" if "dapo" in cfg["rl"]["recipe"] else "GRPO"
    batch = _plot_rewards(metrics, algo, out / "reward_per_step.png")
    gain = paired_gain(cfg, ev_sft["scores"], ev_rl["scores"])
    _plot_accuracy(gain, cfg, out / "accuracy_vs_length.png")
    last = metrics[str(max(int(s) for s in metrics))] if metrics else {}
    jac = insp.get("jaccard_sft_rl", {})
    steps = cfg["rl"]["steps"]
    lines = [
        "# LongAct demo report",
        "",
        f"`make demo`, {time.strftime('%Y-%m-%d %H:%M')}: {total_s:.0f} s of stages on "
        f"{os.cpu_count()} CPU cores (install excluded). A tiny Qwen3 (`{cfg['model']['size']}`) "
        f"is warmed up on `{cfg['task']['name']}` at {min(cfg['sft']['lengths'])}-"
        f"{max(cfg['sft']['lengths'])} tokens, then trained with {algo} + LongAct (top "
        f"{100 * _ratio(cfg):g}% Q/K rows) at {cfg['rl']['train_length']} tokens.",
        "",
        "## 1. Does the warm-up model rely on its top-k Q/K channels?",
        "",
        "![ablation](ablate/ablate.png)",
        "",
        headline(ablation, ablation["comparisons"]) + " Details: [ablate.md](ablate/ablate.md).",
        "",
        "## 2. Accuracy by context length, before and after RL",
        "",
        "![accuracy vs length](accuracy_vs_length.png)",
        "",
        _gain_sentence(cfg, gain, steps, algo),
        "",
        "| length | before RL | after RL | gain (points, 95% paired interval) |",
        "|---:|---:|---:|---:|",
        *[
            f"| {n} | {100 * g['before']:.1f} | {100 * g['after']:.1f} | {_pts(g['gain'])} "
            f"[{_pts(g['gain'] - g['gain_half'])}, {_pts(g['gain'] + g['gain_half'])}] |"
            for n, g in sorted(gain.items())
        ],
        "",
        "## 3. Reward per RL step",
        "",
        "![reward per step](reward_per_step.png)",
        "",
        _reward_sentence(batch),
        "",
        "## 4. Where the salient channels are",
        "",
        "![heatmaps](inspect/heatmaps_sft.png)",
        "",
        insp.get("summary_sft", "").replace("summary: the", "Warm-up model: the"),
        "",
        "![compare](inspect/compare_sft_rl.png)",
        "",
        f"The masks of the warm-up and RL models overlap with Jaccard "
        f"{jac.get('q', float('nan')):.2f} (q) and {jac.get('k', float('nan')):.2f} (k); LongAct "
        f"refreshed its mask during RL up to version "
        f"{last.get('actor/longact/mask_version', float('nan')):.0f}.",
        "",
        "## Stages",
        "",
        "| stage | seconds | cached |",
        "|---|---:|---|",
        *[
            f"| {k} | {v:.0f} | {'yes' if k in stages.cached else ''} |"
            for k, v in stages.timings.items()
        ],
        "",
        "Logs: `sft/sft.log`, `rl/rl.log`; metrics: `rl/metrics.json`, `ablate/ablate.json`, "
        "`eval_rl/results.json`.",
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    (out / "summary.json").write_text(
        json.dumps(
            {
                "gain": {str(k): v for k, v in gain.items()},
                "ablation": ablation["comparisons"],
                "timings": stages.timings,
                "total_s": total_s,
            },
            indent=1,
        )
    )
    missing = missing_figures(path)
    if missing:  # the page is written (look at it), but the demo did not succeed
        raise RuntimeError(
            f"{path} links figures no stage wrote: {', '.join(missing)}; see that stage's "
            f"log, then rerun after deleting its folder under {out}"
        )
    return path


def missing_figures(page: Path) -> list[str]:
    """The images a markdown page links that do not exist beside it."""
    links = re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", page.read_text())
    return [link for link in links if not (page.parent / link).is_file()]


def _ratio(cfg: dict) -> float:
    for item in cfg["rl"]["overrides"]:
        k, _, v = item.partition("=")
        if k.lstrip("+") == "longact.ratio":
            return float(v)
    return 0.3
