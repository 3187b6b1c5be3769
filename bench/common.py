"""Shared pieces of the benchmarks: summaries, alternating runs, model shapes, tables.

A figure is a plain dict (JSON-ready)::

    {"name": "capture", "title": "...", "columns": [...], "rows": [[...], ...],
     "goals": [{"goal": "...", "value": 1.01, "target": "<= 1.03", "met": True}],
     "notes": ["..."], "raw": {...}, "seconds": 12.3}

``summarize`` gives median, min, max and the relative spread ``(max - min) / median``;
``abba`` orders the runs of two arms A B B A A B ... so slow drifts of the machine (other
jobs, memory pressure) hit both alike, and ``paired_ratios`` compares back-to-back runs.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from longact.core.arch import QKLayout


# ---- model shapes ----------------------------------------------------------------------
@dataclass(frozen=True)
class ModelShape:
    """Attention geometry and parameter count of a model we quote figures for."""

    name: str
    layout: QKLayout
    params: float  # total parameters
    hidden: int  # model width = columns of W_Q / W_K

    @property
    def param_bytes_bf16(self) -> float:
        return 2.0 * self.params


SHAPES = {
    "8B": ModelShape("Qwen3-8B", QKLayout(36, 128, 32, 8), 8.2e9, 4096),
    "32B": ModelShape("Qwen3-32B", QKLayout(64, 128, 64, 8), 32.8e9, 5120),
    "70B": ModelShape("Llama-70B shape", QKLayout(80, 128, 64, 8), 70.6e9, 8192),
}


# ---- numbers -----------------------------------------------------------------------------
def summarize(xs: Sequence[float]) -> dict[str, float]:
    """median, min, max, relative spread (max-min)/median and n of a sample."""
    xs = [float(x) for x in xs]
    if not xs:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    med = statistics.median(xs)
    lo, hi = min(xs), max(xs)
    spread = (hi - lo) / med if med else float("nan")
    return {"median": med, "min": lo, "max": hi, "spread": spread, "n": len(xs)}


def fmt_s(s: dict[str, float], unit: str = "s", scale: float = 1.0, digits: int = 3) -> str:
    """``median [min-max] unit (n=..)`` of a summary."""
    if not s.get("n"):
        return "n/a"
    m, lo, hi = (s[k] * scale for k in ("median", "min", "max"))
    return f"{m:.{digits}g} [{lo:.{digits}g}-{hi:.{digits}g}] {unit} (n={s['n']})"


def ratio(a: dict[str, float], b: dict[str, float]) -> float:
    """Median of A over median of B."""
    return a["median"] / b["median"] if b.get("median") else float("nan")


def paired_ratios(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """a[k] / b[k]: with ``abba`` order the k-th samples of two arms ran back to back, so
    each ratio sees the same machine state (robust to slow drifts of a shared host)."""
    return [x / y for x, y in zip(a, b) if y]


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def sync(device: str | None = None) -> None:
    """Wait for queued kernels (CUDA) so a wall-clock time covers the work; no-op on CPU."""
    import torch

    if device is not None and str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


def device_label(device: str) -> str:
    """'CPU' or the CUDA device's name, for figure titles."""
    import torch

    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return "CPU"


def rss_bytes(pid: int | None = None) -> int:
    import psutil

    return psutil.Process(pid or os.getpid()).memory_info().rss


def goal(name: str, value: float, target: float, fmt: str = "{:.3f}", le: bool = True) -> dict:
    """A goal row: met when value <= target (``le``) or >= target."""
    met = value <= target if le else value >= target
    return {
        "goal": name,
        "value": fmt.format(value),
        "target": ("<= " if le else ">= ") + fmt.format(target),
        "met": bool(met),
    }


# ---- running arms side by side -------------------------------------------------------------
def abba(arms: Sequence[str], reps: int) -> list[str]:
    """A B B A A B ... : each arm ``reps`` times, the order flipped every round."""
    order: list[str] = []
    for r in range(reps):
        order += list(arms) if r % 2 == 0 else list(reversed(arms))
    return order


def figure(name: str, title: str, columns: list[str], **extra: Any) -> dict[str, Any]:
    fig = {"name": name, "title": title, "columns": columns, "rows": [], "goals": []}
    fig.update({"notes": [], "raw": {}})
    fig.update(extra)
    return fig


# ---- markdown --------------------------------------------------------------------------------
def _cell(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x).replace("|", "\\|")


def md_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render(fig: dict[str, Any]) -> str:
    """One figure as markdown: heading, table, goals, notes."""
    parts = [f"## {fig['title']}", "", md_table(fig["columns"], fig["rows"])]
    if fig.get("goals"):
        rows = [
            [g["goal"], g["value"], g["target"], "yes" if g["met"] else "NO"] for g in fig["goals"]
        ]
        parts += ["", md_table(["goal", "measured", "target", "met"], rows)]
    if fig.get("notes"):
        parts += [""] + [f"- {n}" for n in fig["notes"]]
    if "seconds" in fig:
        parts += ["", f"_Figure time: {fig['seconds']:.0f} s._"]
    return "\n".join(parts)
