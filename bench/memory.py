"""Figure 5: LongAct's memory as a fraction of the model's bf16 parameter bytes (computed).

For Qwen3-8B, Qwen3-32B and a 70B Llama shape (``bench.common.SHAPES``), from shapes:

- mask set: one bool per W_Q / W_K row (``mask_memory_bytes``), on every rank and on the
  coordinator;
- statistics: one ``QKStats`` (float64 count + sum_abs, sum_sq, max_abs per channel), on
  every rank (the capture) and about three on the coordinator (running statistics, the
  partial merge of a refresh, one incoming partial);
- the memory that keeps frozen rows exact through an optimizer step: none on the masked
  path (torch's AdamW, Adam and SGD; ``longact/core/exact_update.py``), and on the
  snapshot path (any other optimizer) the copy ``RowMaskGuard.protect`` holds (fp32
  parameter + AdamW exp_avg + exp_avg_sq of the frozen 70 % of W_Q/W_K rows, unsharded;
  FSDP divides it by the number of ranks).

No measurement, so no repetitions: these are exact byte counts of the data structures.
"""

from __future__ import annotations

from typing import Any

from bench.common import SHAPES, figure, human_bytes
from longact.core.arch import QKLayout
from longact.core.masks import mask_memory_bytes

FLOAT64 = 8


def stats_bytes(layout: QKLayout, elem_bytes: int = FLOAT64, vectors: int = 3) -> int:
    """One QKStats: per key a count and ``vectors`` (C,) vectors (3: every field, the
    flat form's size; 1: the score's field, what the training runtime sends)."""
    return sum((1 + vectors * c) * elem_bytes for c in layout.row_counts().values())


def qk_params(layout: QKLayout, hidden: int) -> int:
    """Elements of all W_Q and W_K weights."""
    return sum(c * hidden for c in layout.row_counts().values())


def rows_for(shape_key: str, ratio: float = 0.3) -> dict[str, Any]:
    shape = SHAPES[shape_key]
    lay = shape.layout
    masks = mask_memory_bytes(lay)
    stats = stats_bytes(lay)
    frozen = (1.0 - ratio) * qk_params(lay, shape.hidden)
    snapshot = frozen * 3 * 4  # fp32 param + exp_avg + exp_avg_sq
    return {
        "shape": shape.name,
        "params": shape.params,
        "param_bytes_bf16": shape.param_bytes_bf16,
        "mask_bytes": masks,
        "stats_bytes": stats,
        "coordinator_bytes": 3 * stats + masks,
        "qk_params": qk_params(lay, shape.hidden),
        "snapshot_bytes": snapshot,
    }


def run(ratio: float = 0.3, log=print) -> dict[str, Any]:
    fig = figure(
        "memory",
        "5. Memory: masks and statistics vs model bytes (bf16), computed from shapes",
        [
            "model",
            "params (bf16 bytes)",
            "mask set",
            "stats / rank (fp64)",
            "coordinator (3 stats + mask)",
            "exact steps: masked path (AdamW, Adam, SGD)",
            "exact steps: snapshot path (other optimizers, unsharded)",
        ],
    )
    worst = 0.0
    for key in SHAPES:
        r = rows_for(key, ratio)
        pb = r["param_bytes_bf16"]

        def cell(n: float, pb: float = pb) -> str:
            return f"{human_bytes(n)} ({100 * n / pb:.2g} %)"

        fig["rows"].append(
            [
                f"{r['shape']} ({SHAPES[key].layout.num_layers} layers, "
                f"q {SHAPES[key].layout.rows('q')}, k {SHAPES[key].layout.rows('k')})",
                f"{r['params'] / 1e9:.1f}e9 ({human_bytes(pb)})",
                cell(r["mask_bytes"]),
                cell(r["stats_bytes"]),
                cell(r["coordinator_bytes"]),
                cell(0),
                cell(r["snapshot_bytes"]),
            ]
        )
        worst = max(worst, (r["mask_bytes"] + r["stats_bytes"]) / pb)
        fig["raw"][key] = r
        log(
            f"  {r['shape']}: masks {human_bytes(r['mask_bytes'])}, "
            f"stats {human_bytes(r['stats_bytes'])}"
        )
    fig["raw"]["worst_mask_plus_stats_fraction"] = worst
    fig["notes"] += [
        "Percentages are of the model's bf16 parameter bytes (2 x params). No goal was set; "
        f"mask + statistics per rank are at most {100 * worst:.2g} % of them.",
        "Masked path: nothing is copied; frozen rows' moments are zeroed in place "
        "(reentry='keep' sets the leaving rows' moments aside on the CPU, per refresh).",
        f"Snapshot path: frozen rows = {100 * (1 - ratio):.0f} % of W_Q/W_K (ratio {ratio}); "
        "3 fp32 copies (param, exp_avg, exp_avg_sq); per FSDP rank divide by the rank count.",
    ]
    return fig
