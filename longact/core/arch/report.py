"""What LongAct would do to a model, from its config alone (``longact doctor --model``).

``describe(config, ratio)`` returns a text report: the adapter, the layers LongAct
applies to (and those it skips), per layer the W_Q / W_K rows (which rows of which
parameter), how many rows the ratio keeps under the ``channel`` and ``rope_pair``
granularities, the RoPE pairing and the capture points. Consecutive layers with the same
geometry share one line. Nothing is loaded but the config.
"""

from __future__ import annotations

from typing import Any

import torch

from longact.core.arch.base import NORM_LAYOUTS, ArchAdapter, get_adapter
from longact.core.arch.layout import PROJS, ProjGeom
from longact.core.masks import n_keep, validate_ratio

NORM_SHAPES = dict(zip(NORM_LAYOUTS, ("(B, T, H, D)", "(B, H, T, D)", "(B, T, C)"), strict=True))


def rows_text(rows: torch.Tensor, geom: ProjGeom) -> str:
    """``[0, 64)`` for consecutive rows; ``h*32 + [0, 16) per head`` for head blocks."""
    a = int(rows[0])
    if torch.equal(rows, torch.arange(a, a + rows.numel())):
        return f"[{a}, {a + rows.numel()})"
    per_head = rows.reshape(geom.heads, geom.head_dim)
    stride = int(per_head[1, 0] - per_head[0, 0]) if geom.heads > 1 else 0
    return f"h*{stride} + [{a}, {a + geom.head_dim}) per head"


def _param_of(adapter: ArchAdapter, proj: str) -> str:
    return next(a for a, projs in adapter.proj_modules.items() if proj in projs)


def count_kept(ratio: float, geom: ProjGeom, kind: str) -> tuple[int, int]:
    """(units kept, at most that many rows) at ``ratio`` under granularity ``kind``."""
    sizes = torch.bincount(geom.units(kind))  # (U,) rows per unit
    k = n_keep(ratio, sizes.numel())
    return k, int(torch.sort(sizes, descending=True).values[:k].sum())


def _line(adapter: ArchAdapter, layers: list[int], geoms: dict, ratio: float) -> list[str]:
    span = _ranges(layers)
    out = []
    for proj in PROJS:
        g = geoms.get(proj)
        if g is None:
            out.append(f"  {span:>9}  {proj}  none: no W_{proj.upper()} here (shares K/V)")
            continue
        where = f"{_param_of(adapter, proj)} {rows_text(adapter.channel_rows(proj, geoms), g)}"
        ch, _ = count_kept(ratio, g, "channel")
        units, rp_rows = count_kept(ratio, g, "rope_pair")
        out.append(
            f"  {span:>9}  {proj}  {g.heads:>3} x {g.head_dim:<4} {g.rows:>6}  {where:<34} "
            f"{ch:>6}  {units:>5} units <= {rp_rows:<6} {g.rope.describe(g.head_dim)}"
        )
    return out


def describe(config: Any, ratio: float = 0.3) -> str:
    """The report for an HF config (raises ValueError for an unsupported model_type)."""
    validate_ratio(ratio)
    adapter = get_adapter(config)
    layout = adapter.layout(config)
    used = layout.layers()
    skipped = [i for i in range(layout.num_layers) if i not in used]
    lines = [
        f"model_type {config.model_type!r}: LongAct {adapter.family} adapter "
        f"(registered for {', '.join(adapter.model_types)})",
        f"applies to {len(used)} of {layout.num_layers} decoder layers"
        + (f"; skipped (no Q/K): {_ranges(skipped)}" if skipped else ""),
    ]
    if adapter.notes:
        lines.append(f"note: {adapter.notes}")
    lines += [
        f"rows kept per key at ratio {ratio:g}: granularity channel (keep), and rope_pair "
        "(pairs kept whole: units kept, at most that many rows)",
        f"  {'layers':>9}  p  heads x D     rows  {'W rows (of parameter)':<34} {'keep':>6}  "
        "rope_pair         RoPE",
    ]
    groups: list[tuple[list[int], dict]] = []
    for layer in used:
        geoms = layout.layer_geoms(layer)
        if groups and groups[-1][1] == geoms and groups[-1][0][-1] == layer - 1:
            groups[-1][0].append(layer)
        else:
            groups.append(([layer], geoms))
    for layers, geoms in groups:
        lines += _line(adapter, layers, geoms, ratio)
    total = sum(layout.row_counts().values())
    lines.append(f"W_Q/W_K rows in all: {total}; other parameters train normally")
    proj_mods = " / ".join(f"{m} output" for m in adapter.proj_modules)
    lines.append(f"capture point proj: {proj_mods} (the rows above)")
    if adapter.has_norm(config):
        norms = " / ".join(adapter.norm_modules[p] for p in PROJS)
        shape = NORM_SHAPES[adapter.norm_layout]
        lines.append(f"capture point norm: {norms} output {shape}")
    else:
        lines.append("capture point norm: not available (no q/k norm in this model)")
    return "\n".join(lines)


def _ranges(layers: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0-2,5,7-8"."""
    out, start = [], None
    for i, x in enumerate(layers):
        if start is None:
            start = x
        if i + 1 == len(layers) or layers[i + 1] != x + 1:
            out.append(str(start) if start == x else f"{start}-{x}")
            start = None
    return ",".join(out)
