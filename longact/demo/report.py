"""The demo's report: ``report.md`` with plots of reward per step, accuracy by context
length before and after RL, the warm-up loss, and the Q/K heatmaps with the mask."""

from __future__ import annotations

import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _plot_rewards(metrics: dict, out: Path) -> dict:
    steps = sorted(int(s) for s in metrics)
    batch = [
        (s, metrics[str(s)]["critic/score/mean"])
        for s in steps
        if "critic/score/mean" in metrics[str(s)]
    ]
    val = []
    for s in steps:
        m = metrics[str(s)]
        keys = [k for k in m if k.startswith("val-core/") and "/acc/mean" in k]
        if keys:
            val.append((s, m[keys[0]]))
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=120)
    if batch:
        ax.plot(
            *zip(*batch), color="#999", lw=1, label="training batch (after DAPO's group filter)"
        )
    if val:
        ax.plot(
            *zip(*val), "o-", color="#c0392b", lw=2, label="validation (greedy, held-out prompts)"
        )
    ax.set_xlabel("RL step")
    ax.set_ylabel("reward")
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("DAPO + LongAct (ratio 0.3): reward per step")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return {"val": val, "batch": batch}


def _plot_accuracy(before: dict, after: dict, cfg: dict, out: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=120)
    for acc, label, style in ((before, "after warm-up (SFT)", "s--"), (after, "after RL", "o-")):
        xs = sorted(int(k) for k in acc)
        ax.plot(xs, [acc[str(x)] for x in xs], style, lw=2, label=label)
    lo, hi = min(cfg["sft"]["lengths"]), max(cfg["sft"]["lengths"])
    ax.axvspan(lo, hi, color="#3498db", alpha=0.12, label="warm-up lengths")
    ax.axvline(cfg["rl"]["train_length"], color="#c0392b", ls=":", label="RL length")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{cfg['task']['name']}: accuracy by context length")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def _plot_loss(losses: dict, out: Path) -> None:
    steps = sorted(int(s) for s in losses)
    fig, ax = plt.subplots(figsize=(7, 3), dpi=120)
    ax.plot(steps, [losses[str(s)] for s in steps], lw=1)
    ax.set_xlabel("warm-up step")
    ax.set_ylabel("loss (answer tokens)")
    ax.grid(alpha=0.3)
    ax.set_title("Supervised warm-up (verl SFT trainer)")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def _override(cfg: dict, key: str, default: str) -> str:
    for item in cfg["rl"]["overrides"]:
        k, _, v = item.partition("=")
        if k.lstrip("+") == key:
            return v
    return default


def _acc(stage_result: dict) -> dict:
    return {str(k): v for k, v in stage_result["accuracy"].items()}


def write_report(out: Path, cfg: dict, stages, ev_sft: dict, ev_rl: dict, rl: dict) -> Path:
    metrics = json.loads((out / "rl" / "metrics.json").read_text())
    losses = json.loads((out / "sft" / "loss.json").read_text())
    rewards = _plot_rewards(metrics, out / "reward_per_step.png")
    before, after = _acc(ev_sft), _acc(ev_rl)
    _plot_accuracy(before, after, cfg, out / "accuracy_vs_length.png")
    _plot_loss(losses, out / "sft_loss.png")
    val = rewards["val"]
    start, end = (val[0][1], val[-1][1]) if val else (float("nan"), float("nan"))
    last = metrics[str(max(int(s) for s in metrics))]
    nan = float("nan")
    lines = [
        "# LongAct demo report",
        "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M')} by `make demo` "
        f"(tiny Qwen3 `{cfg['model']['size']}`, CPU, task `{cfg['task']['name']}` "
        f"with options {cfg['task']['options']}).",
        "",
        "## Result",
        "",
        f"- Validation reward at the RL length ({cfg['rl']['train_length']} tokens): "
        f"**{start:.3f} before RL -> {end:.3f} after {cfg['rl']['steps']} DAPO steps** "
        f"with LongAct (ratio {cfg['inspect']['ratio']}).",
        "- Accuracy by context length (greedy, held-out samples, n = "
        f"{cfg['eval']['samples']} per length):",
        "",
        "| length | after warm-up | after RL |",
        "|---:|---:|---:|",
        *[
            f"| {k} | {before[k]:.2f} | {after.get(k, float('nan')):.2f} |"
            for k in sorted(before, key=int)
        ],
        "",
        "![reward per step](reward_per_step.png)",
        "",
        "![accuracy vs length](accuracy_vs_length.png)",
        "",
        "## LongAct during RL",
        "",
        f"- masks refreshed every {_override(cfg, 'longact.refresh_interval', '1')} optimizer "
        f"steps; last mask version {last.get('actor/longact/mask_version', nan):.0f}, "
        f"frozen share of W_Q/W_K rows {last.get('actor/longact/frozen_fraction', nan):.2f}.",
        "- Q/K channel magnitudes of the warm-up model, with the top-30% mask (dots):",
        "",
        "![heatmaps](inspect/heatmaps_sft.png)",
        "",
        "- Warm-up model vs RL model (mask overlap per layer):",
        "",
        "![compare](inspect/compare_sft_rl.png)",
        "",
        "## Warm-up",
        "",
        "![sft loss](sft_loss.png)",
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
        "Logs: `sft/sft.log`, `rl/rl.log`; metrics: `rl/metrics.json`, `eval_*/results.json`.",
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    (out / "summary.json").write_text(
        json.dumps({"val_reward_start": start, "val_reward_end": end, "accuracy_before": before,
                    "accuracy_after": after, "timings": stages.timings}, indent=1)
    )  # fmt: skip
    return path
