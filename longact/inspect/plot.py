"""Heatmaps of per-channel |Q| / |K| magnitude with the LongAct mask overlaid (PNG, Agg).

``plot_heatmaps(result, path)`` draws, for each projection (q, then k), a layers x
channels image of per-channel mean |x| divided by its layer's mean (1 = average
channel; the same colour scale for both projections), channel order within a head kept
and heads separated by white lines (dotted: the boundary between the two rotate-half
RoPE halves of a head's rotated channels). Only layers with that projection are rows
(hybrid models skip linear-attention layers; the row labels are the real layer
indices); a row narrower than the widest (a smaller head_dim or fewer heads) is padded
grey. Under each image a grey strip gives the RoPE frequency of each channel (dark = low
frequency, black = never turns), one strip row per distinct layer geometry, so frequency
bands line up with the columns above.
Kept channels (the rows the mask would leave trainable) carry a dot. On the right, bars
give each layer's share of the |x| mass in its top 30% channels (dashed: uniform).

``plot_compare(result, path)`` (after ``compare_results``) draws the second model the
same way, its dots coloured by whether the first model keeps that channel too, and a
panel of the per-layer Jaccard overlap of the two selections with the level expected
for two random selections of the same size.

Pure matplotlib ``Figure`` objects: no pyplot state, no backend switch for the caller.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from longact.core.arch import ProjGeom
from longact.inspect.analysis import layout_of

CMAP = "magma"
DPI = 110
WIDTH_IN = 13.0
SHARED, ONLY = "white", "#39d0ff"  # dot colours: kept by both / by this model only
MAX_COLS = 1100  # image columns (about the axis width in pixels); more channels are pooled
MIN_DOT_PT = 2.0  # smallest heatmap cell (points) that still gets dots
VEIL = 0.5  # opacity of the white veil over unkept channels when cells are too small for dots
TOP_IN, GAP_IN, BOTTOM_IN = 1.15, 1.0, 0.65  # figure margins and the gap between panels


def _rows(result: dict, proj: str) -> tuple[list[int], list[ProjGeom]]:
    """Layers that have ``proj`` (image rows, in order) and their geometries."""
    layout = layout_of(result)
    keys = [k for k in layout if k[1] == proj]
    return [k[0] for k in keys], [layout.geom(k) for k in keys]


def _relative(result: dict, proj: str) -> tuple[np.ndarray, np.ndarray]:
    """(N, Cmax) mean |x| / layer mean (NaN past a row's channels), (N, Cmax) bool kept;
    N = layers with ``proj``."""
    layers, _ = _rows(result, proj)
    vals, kept = [], []
    for layer in layers:
        ch = result["channels"][f"{layer}.{proj}"]
        m = np.asarray(ch["mean_abs"], dtype=np.float64)
        vals.append(m / m.mean() if m.mean() > 0 else m)
        k = np.zeros(m.size, dtype=bool)
        k[ch["kept"]] = True
        kept.append(k)
    width = max(v.size for v in vals)
    pad = [np.pad(v, (0, width - v.size), constant_values=np.nan) for v in vals]
    return np.stack(pad), np.stack([np.pad(k, (0, width - k.size)) for k in kept])


def _vmax(result: dict) -> float:
    """Colour scale top: the 99.5th percentile of the relative magnitude, at least 2."""
    allv = np.concatenate([_relative(result, p)[0].ravel() for p in ("q", "k") if _has(result, p)])
    return float(max(2.0, np.nanpercentile(allv, 99.5)))


def _has(result: dict, proj: str) -> bool:
    return bool(_rows(result, proj)[0])


def _heat_height(n_layers: int) -> float:
    return float(np.clip(0.16 * n_layers + 0.5, 1.0, 5.5))


def _cell_pt(n_ch: int, n_layers: int) -> float:
    """Smaller side of one heatmap cell in points."""
    return min(WIDTH_IN * 0.8 * 72 / n_ch, _heat_height(n_layers) * 72 / n_layers)


def _pool(x: np.ndarray, factor: int, how: str) -> np.ndarray:
    """(L, C) -> (L, C / factor): max or mean over runs of ``factor`` adjacent channels
    (NaN padding stays NaN)."""
    if factor == 1:
        return x
    y = x.reshape(x.shape[0], -1, factor)
    with np.errstate(all="ignore"):
        return y.max(-1) if how == "max" else y.mean(-1)


def _pool_factor(n_ch: int, head_dim: int) -> int:
    """Channels per image column: 1, or the smallest divisor of head_dim giving <= MAX_COLS."""
    for f in range(1, head_dim + 1):
        if head_dim % f == 0 and n_ch // f <= MAX_COLS:
            return f
    return head_dim


def _use_dots(result: dict) -> bool:
    """Dots when the cells of the widest image are big enough; else the veil (whole figure)."""
    layers, geoms = _rows(result, "q")
    return _cell_pt(max(g.rows for g in geoms), len(layers)) >= MIN_DOT_PT


def _mark_kept(
    ax: Any, kept: np.ndarray, other_kept: np.ndarray | None, dots: bool, factor: int
) -> None:
    """Dots on kept cells where cells are wide enough; else a veil over the unkept ones
    (pooled columns: veil weighted by the unkept fraction).

    With ``other_kept`` (comparison), channels kept by this model only are cyan."""
    n_layers, n_ch = kept.shape
    if dots:
        ys, xs = np.nonzero(kept)
        colors = SHARED if other_kept is None else np.where(other_kept[ys, xs], SHARED, ONLY)
        size = float(np.clip(0.75 * _cell_pt(n_ch, n_layers), 1.5, 7.0)) ** 2
        ax.scatter(xs, ys, s=size, c=colors, edgecolors="black", linewidths=0.5, zorder=3)
        return
    frac = _pool(kept.astype(np.float64), factor, "mean")  # (L, C/f) kept fraction
    veil = np.zeros((*frac.shape, 4))  # RGBA
    veil[..., :3] = 1.0
    veil[..., 3] = VEIL * (1.0 - frac)  # unkept channels washed out
    if other_kept is not None:
        only = _pool((kept & ~other_kept).astype(np.float64), factor, "mean") > 0.5
        veil[only] = (0.22, 0.82, 1.0, 0.5)  # cyan: kept by this model only
    extent = (-0.5, n_ch - 0.5, n_layers - 0.5, -0.5)
    ax.imshow(veil, aspect="auto", interpolation="nearest", extent=extent, zorder=2)


def _draw_proj(
    fig: Figure,
    spec: Any,
    result: dict,
    proj: str,
    vmax: float,
    other_kept: np.ndarray | None = None,
) -> None:
    """One projection: heatmap + RoPE strip + colourbar + top-30% bars, in ``spec``."""
    layers, geoms = _rows(result, proj)
    first = max(geoms, key=lambda g: g.rows)  # the widest row sets the axis ticks
    d, heads = first.head_dim, first.heads
    rel, kept = _relative(result, proj)
    n_layers, n_ch = rel.shape
    grid = spec.subgridspec(
        2,
        4,
        height_ratios=[_heat_height(n_layers), 0.22],
        width_ratios=[1.0, 0.012, 0.05, 0.09],
        hspace=0.06,
        wspace=0.015,
    )
    ax = fig.add_subplot(grid[0, 0])
    # large models: each column is the max of `factor` channels (a divisor of every head_dim)
    factor = _pool_factor(n_ch, int(np.gcd.reduce([g.head_dim for g in geoms])))
    extent = (-0.5, n_ch - 0.5, n_layers - 0.5, -0.5)
    shown = _pool(rel, factor, "max")
    cmap = matplotlib.colormaps[CMAP].with_extremes(bad="#bbbbbb")  # NaN: no such channel
    im = ax.imshow(
        shown, aspect="auto", cmap=cmap, vmin=0.0, vmax=vmax, interpolation="nearest", extent=extent
    )
    _head_lines(ax, geoms)
    for row in range(1, n_layers):
        ax.axhline(row - 0.5, color="black", lw=0.3, alpha=0.5)
    _mark_kept(ax, kept, other_kept, _use_dots(result), factor)
    ax.set_xlim(-0.5, n_ch - 0.5)
    ax.set_ylim(n_layers - 0.5, -0.5)
    step = max(1, int(np.ceil(n_layers / 16)))
    ax.set_yticks(range(0, n_layers, step))
    ax.set_yticklabels([str(layers[i]) for i in range(0, n_layers, step)])
    ax.set_ylabel("layer")
    ax.set_xticks([h * d + d / 2 - 0.5 for h in range(heads)])
    ax.set_xticklabels([f"head {h}" for h in range(heads)] if heads <= 16 else [])
    ax.tick_params(axis="x", length=0, labelsize=8, labeltop=True, labelbottom=False)
    where = "proj" if result["settings"]["point"] == "proj" else "norm"
    name = f"{proj.upper()} = {proj}_{where} output"
    ax.set_title(
        f"{name}: {_geometry_label(geoms)}   "
        f"mean top-30% share {result['overall'][proj]['top30_share']:.2f}, "
        f"max/mean {result['overall'][proj]['max_over_mean']:.1f}, "
        f"low-freq share of top 30% {result['overall'][proj]['low_freq_top30']:.2f}",
        fontsize=9.5,
        loc="left",
        pad=16,
    )
    # RoPE frequency strip, one row per distinct geometry; dark = low freq, black = none
    strip = fig.add_subplot(grid[1, 0])
    groups: dict[ProjGeom, list[int]] = {}
    for layer, g in zip(layers, geoms, strict=True):
        groups.setdefault(g, []).append(layer)
    freq = np.full((len(groups), n_ch), np.nan)
    for i, g in enumerate(groups):
        freq[i, : g.rows] = g.freq_index().numpy()
    strip.imshow(
        _pool(freq, factor, "mean"),
        aspect="auto",
        cmap=matplotlib.colormaps["Greys"].with_extremes(bad="#bbbbbb"),
        vmin=0.0,
        vmax=1.0,
        interpolation="nearest",
        extent=(-0.5, n_ch - 0.5, len(groups) - 0.5, -0.5),
    )
    if len(groups) == 1:
        for h in range(1, first.heads):
            strip.axvline(h * d - 0.5, color="white", lw=1.2)
    strip.set_xlim(-0.5, n_ch - 0.5)
    strip.set_yticks(range(len(groups)))
    labels = ["RoPE freq"] if len(groups) == 1 else [_layers_label(v) for v in groups.values()]
    strip.set_yticklabels(labels, fontsize=6 if len(groups) > 1 else 7)
    every = max(1, int(np.ceil(heads / 16)))
    strip.set_xticks([h * d - 0.5 for h in range(0, heads + 1, every)])
    strip.set_xticklabels([str(h * d) for h in range(0, heads + 1, every)], fontsize=7)
    pooled = f";  each column: max of {factor} channels" if factor > 1 else ""
    strip.set_xlabel(
        f"output channel  (strip: white = high, dark = low RoPE frequency{pooled})", fontsize=8
    )
    cax = fig.add_subplot(grid[0, 1])
    fig.colorbar(im, cax=cax).set_label("mean |x| / layer mean", fontsize=8)
    cax.tick_params(labelsize=7)
    # per-layer top-30% share
    bars = fig.add_subplot(grid[0, 3], sharey=ax)
    share = {r["layer"]: r["top30_share"] for r in result["keys"] if r["proj"] == proj}
    bars.barh(range(n_layers), [share[i] for i in layers], color="#555", height=0.7)
    bars.axvline(0.3, color="tab:red", ls="--", lw=0.8)
    bars.set_xlim(0, 1)
    bars.set_xticks([0, 0.3, 1])
    bars.tick_params(labelsize=7, labelleft=False)
    bars.set_title("top-30% share\n(dashed: uniform)", fontsize=7.5)


def _head_lines(ax: Any, geoms: list[ProjGeom]) -> None:
    """White lines between heads, dotted between the two rotate-half halves of a head's
    rotated channels; per row when the rows' geometries differ."""
    one = len(set(geoms)) == 1
    rows = [(0, geoms[0])] if one else list(enumerate(geoms))
    for row, g in rows:
        lo, hi = (-0.5, len(geoms) - 0.5) if one else (row - 0.5, row + 0.5)
        r = g.rope.rotated(g.head_dim)
        heads = [h * g.head_dim - 0.5 for h in range(1, g.heads)]
        halves = [h * g.head_dim + r / 2 - 0.5 for h in range(g.heads)] if r else []
        ax.vlines(heads, lo, hi, color="white", lw=1.2)
        ax.vlines(halves, lo, hi, color="white", lw=0.5, ls=(0, (2, 3)), alpha=0.7)


def _geometry_label(geoms: list[ProjGeom]) -> str:
    shapes = sorted({(g.heads, g.head_dim) for g in geoms})
    return " / ".join(f"{h} heads x {d} channels" for h, d in shapes)


def _layers_label(layers: list[int]) -> str:
    text = "L" + ",".join(map(str, layers[:4]))
    return text + ("..." if len(layers) > 4 else "")


def _suptitle(result: dict, versus: str | None = None) -> str:
    s, lo = result["settings"], result["layout"]
    where = "q_proj/k_proj output" if s["point"] == "proj" else "q_norm/k_norm output"
    mark = "dots" if _use_dots(result) else "bright cells (others washed out)"
    vs = f"  vs  {versus}" if versus else ""
    also = f"; white = kept by {versus} too, cyan = not kept by {versus}" if versus else ""
    return (
        f"{result['model_name']}{vs}  ({result['model_type']}, {lo['num_layers']} layers)  "
        f"|  per-channel mean |x| at {where}, {result['n']} prompts, {result['tokens']} tokens\n"
        f"{mark} = channels kept trainable: {s['policy']} {s['ratio']:g} by {s['score']}, "
        f"{s['granularity']} granularity{also}"
    )


def _title(fig: Figure, text: str) -> None:
    fig.suptitle(text, fontsize=10, x=0.05, y=1 - 0.12 / fig.get_figheight(), ha="left", va="top")


def _figure(result: dict, extra_in: float = 0.0) -> tuple[Figure, float]:
    """Figure sized for two projection panels (+ ``extra_in`` inches); panel height (in)."""
    panel = _heat_height(len(_rows(result, "q")[0])) + 0.75
    height = TOP_IN + 2 * panel + GAP_IN + BOTTOM_IN + extra_in
    return Figure(figsize=(WIDTH_IN, height), dpi=DPI), panel


def plot_heatmaps(result: dict, path: str | Path) -> Path:
    """Write the q and k heatmaps of one inspection result to ``path`` (PNG)."""
    fig, panel = _figure(result)
    h = fig.get_figheight()
    gs = fig.add_gridspec(
        2, 1, left=0.05, right=0.98, top=1 - TOP_IN / h, bottom=BOTTOM_IN / h, hspace=GAP_IN / panel
    )
    vmax = _vmax(result)
    for i, proj in enumerate(p for p in ("q", "k") if _has(result, p)):
        _draw_proj(fig, gs[i], result, proj, vmax)
    _title(fig, _suptitle(result))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def _chance_jaccard(p: float) -> float:
    """Expected |A & B| / |A | B| of two independent random selections of a fraction p."""
    return p * p / (2 * p - p * p) if p > 0 else 1.0


def plot_compare(result: dict, path: str | Path) -> Path:
    """Second model's heatmaps (dots coloured by agreement) + per-layer Jaccard panel."""
    cmp_ = result.get("compare")
    if not cmp_:
        raise ValueError("result has no 'compare' entry: run compare_results first")
    other = cmp_["other"]
    jac_in = 1.8
    fig, panel = _figure(other, extra_in=jac_in + GAP_IN)
    h = fig.get_figheight()
    gs = fig.add_gridspec(
        3,
        1,
        left=0.05,
        right=0.98,
        top=1 - TOP_IN / h,
        bottom=BOTTOM_IN / h,
        hspace=GAP_IN / ((2 * panel + jac_in) / 3),
        height_ratios=[panel, panel, jac_in],
    )
    vmax = _vmax(other)
    for i, proj in enumerate(p for p in ("q", "k") if _has(other, p)):
        _draw_proj(fig, gs[i], other, proj, vmax, other_kept=_relative(result, proj)[1])
    _title(fig, _suptitle(other, versus=result["model_name"]))
    ax = fig.add_subplot(gs[2].subgridspec(1, 2, width_ratios=[1.0, 0.16])[0, 0])
    n_layers = result["layout"]["num_layers"]
    for proj, color, dx in (("q", "tab:blue", -0.17), ("k", "tab:orange", 0.17)):
        jac = {r["layer"]: r["jaccard"] for r in cmp_["jaccard"] if r["proj"] == proj}
        if not jac:
            continue
        x = np.asarray(sorted(jac), dtype=np.float64) + dx  # layers with this projection
        ax.bar(
            x,
            [jac[i] for i in sorted(jac)],
            width=0.34,
            color=color,
            label=f"{proj}: mean {cmp_['jaccard_mean'][proj]:.2f}",
        )
        kept = {r["layer"]: r["kept_fraction"] for r in result["keys"] if r["proj"] == proj}
        chance = [_chance_jaccard(kept[i]) for i in sorted(jac)]
        ax.hlines(chance, x - 0.17, x + 0.17, color="black", ls="--", lw=1.0)
    ax.set_ylim(0, 1.05)
    ax.set_xlim(-0.6, n_layers - 0.4)
    ax.set_xticks(range(0, n_layers, max(1, int(np.ceil(n_layers / 24)))))
    ax.set_xlabel("layer")
    ax.set_ylabel("Jaccard")
    ax.set_title(
        f"overlap of the kept channels: {result['model_name']} vs {other['model_name']}"
        "   (dashed: expected for two random selections of the same size)",
        fontsize=9.5,
        loc="left",
    )
    handles, _ = ax.get_legend_handles_labels()
    dot = {"marker": "o", "ls": "", "markeredgecolor": "black", "markersize": 6}
    handles += [
        Line2D([], [], color="black", ls="--", lw=1.0, label="random selections"),
        Line2D([], [], markerfacecolor=SHARED, label="kept by both (white)", **dot),
        Line2D([], [], markerfacecolor=ONLY, label="kept by this model only (cyan)", **dot),
    ]
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
