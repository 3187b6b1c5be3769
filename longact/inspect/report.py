"""Text summary and output files of an inspection: ``inspect.json`` and the PNG heatmaps.

``summary_table(result)`` is the printed table: one row per (layer, projection) with the
top-10% / top-30% share of mean |x| mass, max/mean, the mass on the mask's kept channels,
the low-frequency fraction of the top-30% channels (and, after ``compare_results``, the
Jaccard overlap with the second model), then means per projection, then
``summary_line``: the mask's share of |x| mass and where its channels sit in RoPE.
``write_outputs(result, out_dir)`` writes ``inspect.json`` (everything, including the
per-channel values the plots are drawn from), ``heatmaps.png`` and, with a comparison,
``compare.png``; it returns ``{"json": ..., "heatmaps": ..., "compare": ...}`` paths.
"""

from __future__ import annotations

import json
from pathlib import Path

from longact.inspect.plot import plot_compare, plot_heatmaps


def _layers(result: dict) -> str:
    """``"28"``, or ``"8 of 32"`` when LongAct applies to some layers only (hybrids)."""
    lo = result["layout"]
    used = len({r["layer"] for r in result["keys"]})
    return str(lo["num_layers"]) if used == lo["num_layers"] else f"{used} of {lo['num_layers']}"


def _uniform(lo: dict) -> bool:
    """One head_dim and rotary width across keys (old results: always)."""
    geoms = {(v["head_dim"], v["rope"]["rotary_dim"]) for v in lo.get("keys", {}).values()}
    return len(geoms) <= 1


def summary_table(result: dict) -> str:
    s, lo = result["settings"], result["layout"]
    cmp_ = result.get("compare")
    jac = {(r["layer"], r["proj"]): r["jaccard"] for r in cmp_["jaccard"]} if cmp_ else {}
    hd_note = "" if _uniform(lo) else " in the first layer, varies by layer"
    lines = [
        f"model {result['model_name']} ({result['model_type']}, {_layers(result)} layers, "
        f"{lo['num_attention_heads']} q / {lo['num_key_value_heads']} kv heads, "
        f"head_dim {lo['head_dim']}{hd_note}): {result['n']} prompts, {result['tokens']} tokens, "
        f"point {s['point']}",
        f"mask: {s['policy']} ratio {s['ratio']:g} by {s['score']}, {s['granularity']}"
        + (f"; compared with {cmp_['model_name']}" if cmp_ else ""),
        "",
        "layer proj  top10%  top30%  max/mean  kept-mass  lowfreq(top30)"
        + ("  jaccard" if cmp_ else ""),
    ]

    def row(label: str, proj: str, r: dict, j: float | None) -> str:
        text = (
            f"{label:>5} {proj:>4}  {r['top10_share']:6.3f}  {r['top30_share']:6.3f}  "
            f"{r['max_over_mean']:8.2f}  {r['kept_mass']:9.3f}  {r['low_freq_top30']:14.3f}"
        )
        return text + (f"  {j:7.3f}" if j is not None else "")

    for r in result["keys"]:
        lines.append(row(str(r["layer"]), r["proj"], r, jac.get((r["layer"], r["proj"]))))
    for proj in ("q", "k", "all"):
        j = cmp_["jaccard_mean"][proj] if cmp_ else None
        lines.append(row("mean", proj, result["overall"][proj], j))
    return "\n".join([*lines, "", summary_line(result)])


def summary_line(result: dict) -> str:
    """The one sentence to take away: the mass the mask's channels hold, and where they
    sit in the RoPE spectrum, on the measured prompts."""
    s, ov = result["settings"], result["overall"]
    cal = result.get("calibration", {"source": "the evaluation prompts (in-sample)"})
    chosen = (
        f"chosen on {cal['n']} calibration prompts ({cal['source']})" if "n" in cal
        else "chosen on the same prompts (in-sample; --calib-n N for a held-out split)"
    )  # fmt: skip
    uniform = sum(r["kept_fraction"] for r in result["keys"]) / len(result["keys"])
    return (
        f"summary: the {s['policy']} {100 * s['ratio']:g}% channels, {chosen}, hold "
        f"{100 * ov['q']['kept_mass']:.0f}% of |q| and {100 * ov['k']['kept_mass']:.0f}% of "
        f"|k| mass on the {result['n']} measured prompts (uniform: ~{100 * uniform:.0f}%); "
        f"{100 * ov['all']['kept_low_freq']:.0f}% of them sit in the low-frequency half of "
        "RoPE (uniform: ~50%)."
    )


def write_outputs(result: dict, out_dir: str | Path) -> dict[str, str]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": str(out / "inspect.json")}
    Path(files["json"]).write_text(json.dumps(result, indent=1) + "\n")
    files["heatmaps"] = str(plot_heatmaps(result, out / "heatmaps.png"))
    if result.get("compare"):
        files["compare"] = str(plot_compare(result, out / "compare.png"))
    return files
