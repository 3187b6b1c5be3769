"""Reading verl's console logger: ``step:N - key:value - key:value ...`` lines (its
format in the pinned verl; the demo, the benchmarks and longact-train's console read it)."""

from __future__ import annotations

import re
from pathlib import Path

STEP_RE = re.compile(r"step:(\d+) - (.*)")
_NUM_RE = re.compile(r"^(?:np\.\w+\()?(-?[0-9.]+(?:e[-+]?\d+)?|nan|inf)\)?$")


def parse_step_metrics(text: str) -> dict[int, dict[str, float]]:
    """{step: {metric: value}} from a trainer's console output (later lines win)."""
    out: dict[int, dict[str, float]] = {}
    for m in STEP_RE.finditer(text):
        metrics = {}
        for part in m.group(2).split(" - "):
            key, _, val = part.rpartition(":")
            num = _NUM_RE.match(val.strip())
            if key and num:
                metrics[key.strip()] = float(num.group(1))
        out.setdefault(int(m.group(1)), {}).update(metrics)
    return out


def read_step_metrics(path: str | Path) -> dict[int, dict[str, float]]:
    return parse_step_metrics(Path(path).read_text(errors="replace"))
