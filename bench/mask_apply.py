"""Figure 3: cost of exact sparse updates at Qwen3-8B q/k sizes (CPU, or CUDA).

A module with ``layers`` decoder layers holding only W_Q (4096 x 4096) and W_K
(1024 x 4096), fp32, with gradients and a warmed-up ``torch.optim.AdamW`` (foreach), and a
``RowMaskGuard`` with a random 30 % row mask. Two arms, alternating (ABBA):

- ``guarded``: ``guard.mask_grads()`` then ``with guard.protect(opt): opt.step()``, with the
  three parts timed separately (mask_grads; snapshot = entering ``protect``; restore =
  leaving it) and the step inside;
- ``plain``: ``opt.step()`` alone.

Reported: median times, LongAct's share (mask + snapshot + restore) over the AdamW step,
and per-step times scaled linearly to Qwen3-8B's 36 layers (every op is per-parameter
elementwise or row-indexed, so time is linear in layers). The full 36 layers would need
~12 GB for params, grads and AdamW states plus ~7 GB of snapshot, so 12 layers are run
on the CPU; on a GPU (``device="cuda"``) all 36 fit, and every part is timed between
device synchronizes.

Before/after of one speed choice: the ``guarded_fresh`` arm (CPU only) is the same step
with ``RowMaskGuard(reuse_buffers=False)``, i.e. a fresh snapshot allocation per step,
as LongAct did before it kept the snapshot buffers between steps on the CPU.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from bench.common import (
    abba,
    device_label,
    figure,
    fmt_s,
    human_bytes,
    paired_ratios,
    rss_bytes,
    summarize,
    sync,
)
from longact.core.adapters import QKLayout, get_adapter
from longact.core.masks import build_masks
from longact.core.sparse_update import RowMaskGuard

TARGET_LAYERS = 36  # Qwen3-8B


class _Attn(nn.Module):
    def __init__(self, hidden: int, q_rows: int, k_rows: int, device: str):
        super().__init__()
        self.q_proj = nn.Linear(hidden, q_rows, bias=False, device="meta")
        self.k_proj = nn.Linear(hidden, k_rows, bias=False, device="meta")
        for lin in (self.q_proj, self.k_proj):  # materialize without kaiming init
            shape = lin.weight.shape
            lin.weight = nn.Parameter(torch.randn(shape, device=device) * 0.02)
            lin.weight.grad = torch.randn(shape, device=device) * 1e-3


class _Layer(nn.Module):
    def __init__(self, hidden: int, q_rows: int, k_rows: int, device: str):
        super().__init__()
        self.self_attn = _Attn(hidden, q_rows, k_rows, device)


class QKOnly(nn.Module):
    """``model.layers.<i>.self_attn.{q_proj,k_proj}``: just the parameters LongAct masks."""

    def __init__(self, layout: QKLayout, hidden: int, device: str = "cpu"):
        super().__init__()
        self.layers = nn.ModuleList(
            _Layer(hidden, layout.rows("q"), layout.rows("k"), device)
            for _ in range(layout.num_layers)
        )


def setup(
    layers: int,
    hidden: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    ratio: float,
    device: str = "cpu",
):
    torch.manual_seed(0)
    layout = QKLayout(layers, head_dim, heads, kv_heads)
    model = QKOnly(layout, hidden, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    opt.step()  # create the AdamW state: steady-state steps from here on
    masks = build_masks(None, layout, ratio=ratio, policy="random", seed=0)
    guards = {
        "guarded": RowMaskGuard(model, masks, get_adapter("qwen3")),
        "guarded_fresh": RowMaskGuard(model, masks, get_adapter("qwen3"), reuse_buffers=False),
    }
    return model, opt, guards


def guarded_step(
    opt: torch.optim.Optimizer, guard: RowMaskGuard, device: str = "cpu", prefix: str = ""
) -> dict[str, float]:
    sync(device)
    t0 = time.perf_counter()
    guard.mask_grads()
    sync(device)
    t1 = time.perf_counter()
    ctx = guard.protect(opt)
    ctx.__enter__()  # snapshot of frozen rows (params + AdamW state)
    sync(device)
    t2 = time.perf_counter()
    try:
        opt.step()
        sync(device)
        t3 = time.perf_counter()
    finally:
        ctx.__exit__(None, None, None)  # restore
    sync(device)
    t4 = time.perf_counter()
    parts = {
        "mask_grads": t1 - t0,
        "snapshot": t2 - t1,
        "adamw_in_guard": t3 - t2,
        "restore": t4 - t3,
        "guarded_total": t4 - t0,
    }
    return {prefix + k: v for k, v in parts.items()}


def plain_step(opt: torch.optim.Optimizer, device: str = "cpu") -> dict[str, float]:
    sync(device)
    t0 = time.perf_counter()
    opt.step()
    sync(device)
    return {"plain_adamw": time.perf_counter() - t0}


def run(
    layers: int = 12,
    reps: int = 5,
    hidden: int = 4096,
    heads: int = 32,
    kv_heads: int = 8,
    head_dim: int = 128,
    ratio: float = 0.3,
    target_layers: int = TARGET_LAYERS,
    device: str = "cpu",
    log=print,
) -> dict[str, Any]:
    rss0 = rss_bytes()
    t_setup = time.perf_counter()
    model, opt, guards = setup(layers, hidden, heads, kv_heads, head_dim, ratio, device)
    cpu = not str(device).startswith("cuda")
    arms = ["guarded", "guarded_fresh", "plain"] if cpu else ["guarded", "plain"]
    n_params = sum(p.numel() for p in model.parameters())
    log(
        f"  {layers} layers, {n_params / 1e6:.0f}M q/k params on {device}, setup "
        f"{time.perf_counter() - t_setup:.1f} s, RSS +{human_bytes(rss_bytes() - rss0)}"
    )

    def one(arm: str) -> dict[str, float]:
        if arm == "plain":
            return plain_step(opt, device)
        return guarded_step(opt, guards[arm], device, "" if arm == "guarded" else "fresh_")

    for arm in arms:  # warm-up of every arm
        one(arm)
    if not cpu:
        torch.cuda.reset_peak_memory_stats(device)
    samples: dict[str, list[float]] = {}
    peak = rss_bytes()
    for i, arm in enumerate(abba(arms, reps)):
        got = one(arm)
        for k, v in got.items():
            samples.setdefault(k, []).append(v)
        peak = max(peak, rss_bytes())
        log(
            f"  [{i + 1}/{len(arms) * reps}] {arm}: "
            + ", ".join(f"{k} {v:.3f}s" for k, v in got.items())
        )
    s = {k: summarize(v) for k, v in samples.items()}

    def overhead(prefix: str) -> list[float]:
        parts = (samples[prefix + n] for n in ("mask_grads", "snapshot", "restore"))
        return [sum(x) for x in zip(*parts)]

    s["longact"] = summarize(overhead(""))
    s["paired"] = summarize(paired_ratios(samples["guarded_total"], samples["plain_adamw"]))
    if cpu:
        s["fresh_longact"] = summarize(overhead("fresh_"))
    scale = target_layers / layers
    adam = s["plain_adamw"]["median"]
    share = s["longact"]["median"] / adam
    where = "CPU, fp32" if cpu else f"{device_label(device)}, fp32"
    fig = figure(
        "mask_apply",
        f"3. Exact sparse update at Qwen3-8B q/k sizes ({where}, {layers} layers run"
        + (f", scaled x{scale:g} to {target_layers})" if scale != 1 else ")"),
        ["part", f"measured, {layers} layers", f"scaled to {target_layers} layers", "vs AdamW"],
    )
    rows = [
        ("mask_grads", "mask_grads (zero frozen grad rows)"),
        ("snapshot", "protect: snapshot frozen rows"),
        ("restore", "protect: restore frozen rows"),
        ("longact", "LongAct total (mask + snapshot + restore)"),
        ("plain_adamw", "AdamW step alone (plain arm)"),
        ("adamw_in_guard", "AdamW step inside protect (guarded arm)"),
        ("guarded_total", "guarded arm total"),
    ]
    if cpu:
        rows += [
            ("fresh_snapshot", "before: snapshot into fresh memory (reuse_buffers=False)"),
            ("fresh_restore", "before: restore (reuse_buffers=False)"),
            ("fresh_longact", "before: LongAct total (reuse_buffers=False)"),
            ("fresh_adamw_in_guard", "before: AdamW step inside protect"),
        ]
    for key, label in rows:
        med = s[key]["median"]
        fig["rows"].append(
            [label, fmt_s(s[key]), f"{med * scale:.3f} s", f"{100 * med / adam:.1f} %"]
        )
    fig["goals"] = []  # no target was set for this figure
    fig["notes"] += [
        f"Ratio {ratio}: {100 * (1 - ratio):.0f} % of rows frozen (random mask); AdamW "
        "(foreach, weight_decay 0.01) with its state created before timing; arms in "
        f"alternating order ({', '.join(arms)}), {reps} steps each after a warm-up.",
        f"LongAct's own parts (mask + snapshot + restore) take {100 * share:.0f} % of the "
        f"AdamW step time; whole guarded step / plain step: ratio of medians "
        f"{s['guarded_total']['median'] / adam:.2f}, median of paired (back-to-back) ratios "
        f"{s['paired']['median']:.2f} [{s['paired']['min']:.2f}-{s['paired']['max']:.2f}].",
        "Under FSDP each rank does this on its 1/N row shard, so per-rank time divides by N.",
    ]
    if cpu:
        before = s["fresh_longact"]["median"]
        fig["notes"] += [
            f"Speed choice, before -> after: keeping the snapshot buffers between steps "
            f"(RowMaskGuard's CPU default) took LongAct's parts from {before:.3f} s "
            f"({100 * before / adam:.0f} % of AdamW) to {s['longact']['median']:.3f} s "
            f"({100 * share:.0f} %), same run, same steps. A fresh multi-GB allocation per "
            "step is page-fault bound on this VM.",
            f"RSS peak {human_bytes(peak)} for {layers} layers (params+grads+AdamW "
            f"{human_bytes(n_params * 16)}, kept snapshot "
            f"{human_bytes(n_params * 12 * (1 - ratio))}).",
        ]
    else:
        peak_gpu = torch.cuda.max_memory_allocated(device)
        fig["notes"].append(
            f"GPU memory peak {human_bytes(peak_gpu)} (params+grads+AdamW "
            f"{human_bytes(n_params * 16)}, snapshot {human_bytes(n_params * 12 * (1 - ratio))})."
        )
    fig["raw"] = {
        "device": device_label(device),
        "layers": layers,
        "target_layers": target_layers,
        "n_params": n_params,
        "samples": samples,
        "summary": s,
        "share_of_adamw": share,
        "rss_peak": peak,
    }
    return fig
