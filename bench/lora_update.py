"""Figure 7: LongAct with LoRA against LoRA alone, optimizer side, at Qwen3-8B sizes.

The trainable part of a LoRA run on Qwen3-8B (36 layers, hidden 4096, q 4096 rows, k and v
1024, MLP 12288), rank ``rank`` on every linear layer (verl's ``all-linear``): for each of
q, k, v, o, gate, up, down a ``lora_A`` (r x in) and a ``lora_B`` (out x r), fp32, with
random values and gradients (a trained adapter, not lora_B = 0), and a warmed-up
``torch.optim.AdamW`` (foreach, weight decay 0.01). The frozen base weights take no
optimizer work, so they are left out. Arms, alternating (ABBA), on one model and
optimizer:

- ``plain``: LoRA alone, ``opt.step()``;
- ``masked``: LongAct's default path for AdamW (``RowMaskGuard``: ``mask_grads`` zeroes
  the frozen rows of q/k ``lora_B``, the step hook applies weight decay to trainable rows);
- ``snapshot``: the fallback for other optimizers (copy and restore the frozen rows).

A random 30 % of q/k channels is kept. Reported: the parts' median times, LongAct's share
of LoRA's AdamW step (as in figure 3), the bytes each path keeps between steps, and the
memory LongAct adds per rank (mask set and statistics, ``bench.memory``) next to LoRA's own
trainable state (params, grads, AdamW moments). Every layer is run: nothing is scaled.

Standalone: ``python -m bench.lora_update [--quick]``.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from torch import nn

from bench.common import figure, fmt_s, goal, human_bytes, paired_ratios, render, summarize
from bench.mask_apply import ARMS, time_arms
from bench.memory import stats_bytes
from longact.core.arch import QKLayout, get_adapter
from longact.core.masks import build_masks, mask_memory_bytes
from longact.core.sparse_update import RowMaskGuard

QWEN3_8B = {"layers": 36, "hidden": 4096, "heads": 32, "kv_heads": 8, "head_dim": 128,
            "mlp": 12288}  # fmt: skip


class _LoRA(nn.Module):
    """What peft's LoRA layer trains: ``lora_A.default`` (r x in), ``lora_B.default``."""

    def __init__(self, d_in: int, d_out: int, rank: int):
        super().__init__()
        self.lora_A = nn.ModuleDict({"default": nn.Linear(d_in, rank, bias=False, device="meta")})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(rank, d_out, bias=False, device="meta")})
        for lin in (self.lora_A["default"], self.lora_B["default"]):
            lin.weight = nn.Parameter(torch.randn(lin.weight.shape) * 0.02)
            lin.weight.grad = torch.randn(lin.weight.shape) * 1e-3


class _Layer(nn.Module):
    def __init__(self, s: dict, rank: int):
        super().__init__()
        h, m = s["hidden"], s["mlp"]
        q, kv = s["heads"] * s["head_dim"], s["kv_heads"] * s["head_dim"]
        self.self_attn = nn.Module()
        for name, (d_in, d_out) in {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv),
                                    "o_proj": (q, h)}.items():  # fmt: skip
            setattr(self.self_attn, name, _LoRA(d_in, d_out, rank))
        self.mlp = nn.Module()
        for name, (d_in, d_out) in {"gate_proj": (h, m), "up_proj": (h, m),
                                    "down_proj": (m, h)}.items():  # fmt: skip
            setattr(self.mlp, name, _LoRA(d_in, d_out, rank))


class LoRAOnly(nn.Module):
    """``layers.<i>.{self_attn,mlp}.<proj>.lora_{A,B}.default``: LoRA's trainable part."""

    def __init__(self, shape: dict, rank: int):
        super().__init__()
        self.layers = nn.ModuleList(_Layer(shape, rank) for _ in range(shape["layers"]))


def run(rank: int = 64, reps: int = 5, ratio: float = 0.3, shape: dict | None = None,
        log=print) -> dict[str, Any]:  # fmt: skip
    s = dict(QWEN3_8B, **(shape or {}))
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = LoRAOnly(s, rank)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    opt.step()  # AdamW state exists: steady-state steps from here on
    layout = QKLayout(s["layers"], s["head_dim"], s["heads"], s["kv_heads"])
    masks = build_masks(None, layout, ratio=ratio, policy="random", seed=0)
    ad = get_adapter("qwen3")
    guards = {
        "snapshot": RowMaskGuard(model, masks, ad, optimizer=opt, exact_path="snapshot"),
        "masked": RowMaskGuard(model, masks, ad, optimizer=opt),
    }
    assert guards["masked"].path == "masked", guards["masked"].path_reason
    assert all(t.ref.kind == "lora_B" for t in guards["masked"].targets)
    guards["masked"].mask_grads()  # every arm steps the same (masked) gradients
    n_params = sum(p.numel() for p in model.parameters())
    log(f"  LoRA r={rank}, {s['layers']} layers: {n_params / 1e6:.1f}M trainable params, "
        f"setup {time.perf_counter() - t0:.1f} s")  # fmt: skip

    samples = time_arms(opt, guards, reps, "cpu", log)
    st = {k: summarize(v) for k, v in samples.items()}
    adam = st["plain_adamw"]["median"]
    share = {a: st[f"{a}_longact"]["median"] / adam for a in ARMS[:2]}
    paired = summarize(paired_ratios(samples["masked_total"], samples["plain_adamw"]))
    kept = {a: guards[a].extra_bytes() for a in ARMS[:2]}
    lora_state = n_params * 4 * 4  # fp32 params, grads, exp_avg, exp_avg_sq
    longact_mem = mask_memory_bytes(layout) + stats_bytes(layout)
    fig = figure(
        "lora",
        f"7. LongAct with LoRA (r={rank}, all linear layers) vs LoRA alone, optimizer side, "
        + ("Qwen3-8B sizes" if s == QWEN3_8B else "a small shape")
        + f" ({s['layers']} layers, CPU, fp32)",
        ["part", "median [min-max]", "vs LoRA's AdamW step"],
    )
    rows = [
        ("plain_adamw", "LoRA alone: AdamW step"),
        ("masked_mask_grads", "LongAct masked path: mask_grads (frozen q/k lora_B grad rows)"),
        ("masked_hook", "masked: step hook (weight decay on trainable rows)"),
        ("masked_total", "masked: guarded step total"),
        ("masked_longact", "masked: LongAct's part (mask + enter + exit + hook - AdamW's decay)"),
        ("snapshot_longact", "snapshot path: LongAct's part (mask + snapshot + restore)"),
        ("snapshot_total", "snapshot: guarded step total"),
    ]
    for key, label in rows:
        fig["rows"].append([label, fmt_s(st[key]), f"{100 * st[key]['median'] / adam:.1f} %"])
    fig["rows"] += [
        ["masked: guarded step / LoRA step - 1 (back-to-back pairs)",
         f"{100 * (paired['median'] - 1):.1f} %", ""],
        ["bytes kept between steps: masked / snapshot",
         f"{human_bytes(kept['masked'])} / {human_bytes(kept['snapshot'])}", ""],
        ["LongAct's memory per rank (masks + statistics)", human_bytes(longact_mem),
         f"{100 * longact_mem / lora_state:.2f} % of LoRA's trainable state "
         f"({human_bytes(lora_state)})"],
    ]  # fmt: skip
    fig["goals"] = [
        goal("LoRA: LongAct's share of the AdamW step (masked path)", share["masked"], 0.05,
             "{:.3f}"),
        goal("LoRA: snapshot bytes kept (masked path)", float(kept["masked"]), 0.0, "{:.0f}"),
    ]  # fmt: skip
    fig["notes"] += [
        f"{n_params / 1e6:.1f}M trainable LoRA params; {100 * (1 - ratio):.0f} % of the q/k "
        f"lora_B rows frozen (random mask); arms alternate ({', '.join(ARMS)}), {reps} steps "
        "each after a warm-up. The q/k lora_B matrices whose rows LongAct masks are "
        f"{100 * rank * (layout.rows('q') + layout.rows('k')) * s['layers'] / n_params:.1f} % "
        "of LoRA's parameters; the step hook also takes over AdamW's weight decay of all the "
        "others (AdamW then runs without it), which is why it is subtracted.",
        "Under FSDP each rank does this on its 1/N row shard.",
    ]
    fig["raw"] = {"rank": rank, "shape": s, "n_params": n_params, "samples": samples,
                  "summary": st, "share_of_adamw": share, "kept_bytes": kept,
                  "longact_bytes": longact_mem, "lora_state_bytes": lora_state}  # fmt: skip
    return fig


QUICK = {"rank": 4, "reps": 2,
         "shape": {"layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "head_dim": 16,
                   "mlp": 128}}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a tiny shape (seconds)")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args(argv)
    kw = dict(QUICK) if args.quick else {"rank": args.rank, "reps": args.reps}
    print(render(run(**kw)))


if __name__ == "__main__":
    main()
