"""Summaries and files of an evaluation: ``results.json``, ``results.md``, a PNG plot.

``summarize(samples)`` groups per-sample scores by (task, length): ``accuracy`` is the
mean ``score`` (the reward, 0..1), ``recall`` the mean RULER recall, ``n`` the count.
``results.md`` shows ``accuracy`` x 100 with one decimal, tasks as rows and lengths as
columns (the RULER layout), plus each task's mean over lengths.
"""

from __future__ import annotations

import json
from pathlib import Path


def summarize(samples: list[dict]) -> list[dict]:
    """One entry per (task, length), in first-seen order."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for s in samples:
        groups.setdefault((s["task"], s["length"]), []).append(s)
    return [
        {
            "task": task,
            "length": length,
            "accuracy": sum(s["score"] for s in group) / len(group),
            "recall": sum(s["recall"] for s in group) / len(group),
            "n": len(group),
        }
        for (task, length), group in groups.items()
    ]


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def markdown(results: dict) -> str:
    """The accuracy table (and LongBench v2 breakdown when present)."""
    summary = results["summary"]
    tasks = list(dict.fromkeys(e["task"] for e in summary))
    lengths = sorted({e["length"] for e in summary})
    cell = {(e["task"], e["length"]): e for e in summary}
    ns = sorted({e["n"] for e in summary})
    lines = [
        f"# Evaluation of `{results['model']}`",
        "",
        (
            f"Accuracy (%, mean reward x 100) by task and prompt length in tokens; "
            f"n = {', '.join(map(str, ns))} per cell; greedy decoding ({results['backend']}), "
            f"seed {results['seed']}."
        ),
        "",
        "| task | " + " | ".join(str(n) for n in lengths) + " | mean |",
        "|---|" + "---:|" * (len(lengths) + 1),
    ]
    for task in tasks:
        accs = [cell[(task, n)]["accuracy"] if (task, n) in cell else None for n in lengths]
        present = [a for a in accs if a is not None]
        mean = sum(present) / len(present) if present else None
        lines.append(f"| {task} | " + " | ".join(_pct(a) for a in accs) + f" | {_pct(mean)} |")
    for length, lb in sorted(results.get("longbench", {}).items(), key=lambda kv: int(kv[0])):
        parts = [f"overall {_pct(lb['accuracy'])} (n={lb['n']})"]
        for group in ("by_difficulty", "by_length"):
            for name, e in lb[group].items():
                if e["n"]:
                    parts.append(f"{name} {_pct(e['accuracy'])} (n={e['n']})")
        lines += ["", f"LongBench v2 at {length} tokens: " + ", ".join(parts)]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: str | Path) -> Path:
    """Accuracy vs length, one line per task (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    summary = results["summary"]
    for task in dict.fromkeys(e["task"] for e in summary):
        pts = sorted((e["length"], 100 * e["accuracy"]) for e in summary if e["task"] == task)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=task)
    lengths = sorted({e["length"] for e in summary})
    if len(lengths) > 1 and lengths[-1] / lengths[0] >= 4:
        ax.set_xscale("log", base=2)
    length_axes(ax, lengths, Path(str(results["model"])).name or "model")
    return save_figure(fig, path)


def length_axes(ax, lengths: list[int], title: str) -> None:
    """Accuracy (%) against prompt length: ticks at ``lengths``, 0-100 with a margin."""
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.set_ylim(-3, 103)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def save_figure(fig, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def write(results: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write results.json, results.md and accuracy_vs_length.png into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out / "results.json",
        "md": out / "results.md",
        "png": out / "accuracy_vs_length.png",
    }
    paths["json"].write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    paths["md"].write_text(markdown(results))
    plot(results, paths["png"])
    return paths
