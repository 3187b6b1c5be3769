"""Figure 3: cost of exact sparse updates at Qwen3-8B q/k sizes, old path vs new (CPU, or CUDA).

A module with ``layers`` decoder layers holding only W_Q (4096 x 4096) and W_K
(1024 x 4096), fp32, with gradients and a warmed-up ``torch.optim.AdamW`` (foreach,
weight decay 0.01), and a random 30 % row mask. Three arms on the same model and
optimizer, alternating (ABBA):

- ``snapshot`` (the old path, now the fallback for other optimizers):
  ``guard.mask_grads()`` then ``with guard.protect(): opt.step()`` with
  ``RowMaskGuard(exact_path="snapshot")``; parts timed: mask_grads, snapshot (entering
  ``protect``), the step, restore (leaving it);
- ``masked`` (the new path, chosen automatically for AdamW): the same calls; the step
  includes the pre-step hook that applies the weight decay to trainable rows only (it
  replaces the decay AdamW would apply itself), timed on its own as ``hook``;
- ``plain``: ``opt.step()`` alone.

Reported: median times, LongAct's optimizer-side share of the AdamW step (snapshot:
mask + snapshot + restore; masked: mask + enter + exit + hook minus the decay AdamW skips
because the hook applies it, ``torch._foreach_mul_`` over the same params timed in the
plain arm; and, end to end, the guarded step over the plain step, median of back-to-back
pairs, which is noisier: it is the difference of two ~1 s numbers), the bytes each path
keeps between steps, and per-step times scaled linearly to Qwen3-8B's
36 layers (every op is per-parameter elementwise or row-indexed). The full 36 layers would
need ~12 GB for params, grads and AdamW states plus ~7 GB of snapshot, so 12 layers are
run on the CPU; on a GPU (``device="cuda"``) all 36 fit, and every part is timed between
device synchronizes.

Standalone: ``python -m bench.mask_apply --quick`` (2 layers at full width, a few
seconds) or ``python -m bench.mask_apply`` (12 layers, as ``make bench``).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from torch import nn

from bench.common import (
    abba,
    device_label,
    figure,
    fmt_s,
    goal,
    human_bytes,
    paired_ratios,
    render,
    rss_bytes,
    summarize,
    sync,
)
from longact.core.arch import QKLayout, get_adapter
from longact.core.masks import build_masks
from longact.core.sparse_update import RowMaskGuard

TARGET_LAYERS = 36  # Qwen3-8B
ARMS = ("snapshot", "masked", "plain")


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
    ad = get_adapter("qwen3")
    guards = {
        "snapshot": RowMaskGuard(model, masks, ad, optimizer=opt, exact_path="snapshot"),
        "masked": RowMaskGuard(model, masks, ad, optimizer=opt),  # auto: AdamW qualifies
    }
    assert guards["masked"].path == "masked", guards["masked"].path_reason
    guards["masked"].mask_grads()  # every arm steps the same (masked) gradients
    return model, opt, guards


def guarded_step(
    opt: torch.optim.Optimizer, guard: RowMaskGuard, device: str = "cpu", prefix: str = ""
) -> dict[str, float]:
    sync(device)
    t0 = time.perf_counter()
    guard.mask_grads()
    sync(device)
    t1 = time.perf_counter()
    ctx = guard.protect()
    ctx.__enter__()  # snapshot path: copy the frozen rows (params + AdamW state)
    sync(device)
    t2 = time.perf_counter()
    try:
        opt.step()  # masked path: the pre-step hook applies the weight decay
        sync(device)
        t3 = time.perf_counter()
    finally:
        ctx.__exit__(None, None, None)  # snapshot path: restore
    sync(device)
    t4 = time.perf_counter()
    parts = {
        "mask_grads": t1 - t0,
        "enter": t2 - t1,
        "step": t3 - t2,
        "hook": guard.hook_s,
        "exit": t4 - t3,
        "total": t4 - t0,
    }
    return {f"{prefix}_{k}": v for k, v in parts.items()}


def plain_step(opt: torch.optim.Optimizer, device: str = "cpu") -> dict[str, float]:
    """The plain step, then (timed apart) the decay AdamW applies inside it, the op the
    masked path's hook takes over: ``torch._foreach_mul_(params, 1 - lr * wd)``."""
    sync(device)
    t0 = time.perf_counter()
    opt.step()
    sync(device)
    t1 = time.perf_counter()
    group = opt.param_groups[0]
    params = [p for p in group["params"] if p.grad is not None]
    with torch.no_grad():
        torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
    sync(device)
    return {"plain_adamw": t1 - t0, "plain_decay": time.perf_counter() - t1}


def time_arms(
    opt: torch.optim.Optimizer, guards: dict, reps: int, device: str = "cpu", log=print
) -> dict[str, list[float]]:
    """Every arm once to warm up, then ``reps`` steps each in ABBA order; the parts of each
    step, plus each path's LongAct total: snapshot = mask + snapshot + restore; masked =
    mask + enter + exit + hook - the decay AdamW skips because the hook applies it."""

    def one(arm: str) -> dict[str, float]:
        if arm == "plain":
            return plain_step(opt, device)
        return guarded_step(opt, guards[arm], device, arm)

    for arm in ARMS:  # warm-up of every arm
        one(arm)
    samples: dict[str, list[float]] = {}
    for i, arm in enumerate(abba(ARMS, reps)):
        got = one(arm)
        for k, v in got.items():
            samples.setdefault(k, []).append(v)
        log(f"  [{i + 1}/{len(ARMS) * reps}] {arm}: {next(reversed(got.values())):.3f} s")
    samples["snapshot_longact"] = [
        sum(x) for x in zip(*(samples[f"snapshot_{n}"] for n in ("mask_grads", "enter", "exit")))
    ]
    parts = (samples[f"masked_{n}"] for n in ("mask_grads", "enter", "exit", "hook"))
    samples["masked_longact"] = [
        sum(x) - d for x, d in zip(zip(*parts), samples["plain_decay"], strict=True)
    ]
    return samples


ROWS = [  # (key, label)
    ("snapshot_mask_grads", "old (snapshot): mask_grads (zero frozen grad rows)"),
    ("snapshot_enter", "old: protect enter = snapshot frozen rows"),
    ("snapshot_exit", "old: protect exit = restore frozen rows"),
    ("snapshot_longact", "old: LongAct total (mask + snapshot + restore)"),
    ("snapshot_step", "old: AdamW step inside protect"),
    ("snapshot_total", "old: guarded step total"),
    ("masked_mask_grads", "new (masked): mask_grads"),
    ("masked_enter", "new: protect enter"),
    ("masked_hook", "new: step hook (weight decay on trainable rows, inside the step)"),
    ("masked_exit", "new: protect exit"),
    ("masked_step", "new: AdamW step inside protect (hook included)"),
    ("masked_total", "new: guarded step total"),
    ("masked_longact", "new: LongAct total (mask + enter + exit + hook - AdamW's own decay)"),
    ("plain_adamw", "AdamW step alone (plain arm)"),
    ("plain_decay", "AdamW's own weight decay (its foreach multiply, timed apart)"),
]


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
    n_params = sum(p.numel() for p in model.parameters())
    log(
        f"  {layers} layers, {n_params / 1e6:.0f}M q/k params on {device}, setup "
        f"{time.perf_counter() - t_setup:.1f} s, RSS +{human_bytes(rss_bytes() - rss0)}"
    )

    if not cpu:
        torch.cuda.reset_peak_memory_stats(device)
    samples = time_arms(opt, guards, reps, device, log)
    s = {k: summarize(v) for k, v in samples.items()}
    adam = s["plain_adamw"]["median"]
    paired = {a: paired_ratios(samples[f"{a}_total"], samples["plain_adamw"]) for a in ARMS[:2]}
    for a in ARMS[:2]:
        s[f"{a}_paired"] = summarize(paired[a])
    share_old = s["snapshot_longact"]["median"] / adam
    share_new = s["masked_longact"]["median"] / adam
    share_e2e = s["masked_paired"]["median"] - 1.0  # (guarded - plain) / plain, paired
    kept = {a: guards[a].extra_bytes() for a in ARMS[:2]}
    # the hook's per-row decay columns (CUDA; fp32 on the CPU uses index_reduce_: none)
    col_bytes = 0 if cpu else sum(t.param.shape[0] * 4 for t in guards["masked"].targets)
    scale = target_layers / layers
    where = "CPU, fp32" if cpu else f"{device_label(device)}, fp32"
    fig = figure(
        "mask_apply",
        f"3. Exact sparse update at Qwen3-8B q/k sizes, snapshot path vs masked path ({where}, "
        f"{layers} layers run"
        + (f", scaled x{scale:g} to {target_layers})" if scale != 1 else ")"),
        ["part", f"measured, {layers} layers", f"scaled to {target_layers} layers", "vs AdamW"],
    )
    for key, label in ROWS:
        med = s[key]["median"]
        fig["rows"].append(
            [label, fmt_s(s[key]), f"{med * scale:.3f} s", f"{100 * med / adam:.1f} %"]
        )
    fig["rows"] += [
        ["old: LongAct's share of the AdamW step", f"{100 * share_old:.1f} %", "", ""],
        ["new: LongAct's share (mask + enter + exit + hook - AdamW's own decay)",
         f"{100 * share_new:.1f} %", "", ""],
        ["new: guarded step / plain step - 1 (median of back-to-back pairs)",
         f"{100 * share_e2e:.1f} %", "", ""],
        ["old: bytes kept between steps (snapshot buffers)", human_bytes(kept["snapshot"]),
         human_bytes(kept["snapshot"] * scale), f"{100 * kept['snapshot'] / (4 * n_params):.0f} "
         "% of the fp32 q/k params"],
        ["new: bytes kept between steps", human_bytes(kept["masked"]),
         human_bytes(kept["masked"] * scale), "0 % (reentry='reset')"],
        ["new: transient, during the step hook (decay columns)", human_bytes(col_bytes),
         human_bytes(col_bytes * scale), ""],
    ]  # fmt: skip
    fig["goals"] = [
        goal("masked path: LongAct's share of the AdamW step", share_new, 0.05, "{:.3f}")
        if cpu
        else goal("masked path: LongAct's share of the AdamW step (GPU)", share_new, 0.05),
        goal("masked path: snapshot bytes kept", float(kept["masked"]), 0.0, "{:.0f}"),
    ]
    fig["notes"] += [
        f"Ratio {ratio}: {100 * (1 - ratio):.0f} % of rows frozen (random mask); AdamW "
        "(foreach, weight_decay 0.01) with its state created before timing; arms in "
        f"alternating order ({', '.join(ARMS)}), {reps} steps each after a warm-up.",
        f"Old path (snapshot): mask + snapshot + restore take {100 * share_old:.0f} % of the "
        f"AdamW step; guarded/plain paired ratios {s['snapshot_paired']['median']:.2f} "
        f"[{s['snapshot_paired']['min']:.2f}-{s['snapshot_paired']['max']:.2f}].",
        f"New path (masked): mask + enter + exit + hook - AdamW's own decay take "
        f"{100 * share_new:.1f} % of the AdamW step (the hook's decay replaces AdamW's: "
        "AdamW runs with weight_decay 0 in that step); guarded/plain paired ratios "
        f"{s['masked_paired']['median']:.3f} [{s['masked_paired']['min']:.3f}-"
        f"{s['masked_paired']['max']:.3f}].",
        "Under FSDP each rank does this on its 1/N row shard, so per-rank time and bytes "
        "divide by N.",
    ]
    if cpu:
        fig["notes"].append(f"RSS {human_bytes(rss_bytes())} at the end of the figure.")
    else:
        fig["notes"].append(
            f"GPU memory peak {human_bytes(torch.cuda.max_memory_allocated(device))} "
            f"(params+grads+AdamW {human_bytes(n_params * 16)})."
        )
    fig["raw"] = {
        "device": device_label(device),
        "layers": layers,
        "target_layers": target_layers,
        "n_params": n_params,
        "samples": samples,
        "summary": s,
        "share_of_adamw": {"snapshot": share_old, "masked": share_new, "masked_e2e": share_e2e},
        "kept_bytes": kept,
        "decay_column_bytes": col_bytes,
    }
    return fig


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2 layers at full width (seconds)")
    p.add_argument("--layers", type=int, default=None, help="layers run (default 12)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    layers = args.layers or (2 if args.quick else 12)
    print(render(run(layers=layers, reps=args.reps, device=args.device)))


if __name__ == "__main__":
    main()
