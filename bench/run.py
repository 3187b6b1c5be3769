"""Run LongAct's benchmarks and write ``results.json`` and ``README.md`` under ``--out``.

    python -m bench.run --out docs/bench            # full run (make bench), < 10 min
    python -m bench.run --out /tmp/b --quick        # tiny sizes, seconds, no Ray/verl
    python -m bench.run --out /tmp/b --only capture,memory
    python -m bench.run --device cuda --out docs/bench/gpu   # figures 1-3 on a GPU

Full runs start Ray and verl and allocate several GB: on a shared machine run them under
``flock /tmp/longact-heavy.lock``. Figures run cheapest first; the rollout figure (hf vs
vllm servers, ~75 s) comes before the step-time figure (verl training runs, ~2 min each),
which goes last and fits its number of run pairs to ``--budget-s``;
``bench/data_gen.py`` runs as an extra figure if time is left.

``--device cuda`` runs the figures that mean something on a GPU, with GPU sizes: the
actor-update step of an FSDP2 Qwen3-1.7B shape with LongAct on/off (``train_step``, the
GPU form of figure 1: verl and Ray are not needed), capture at 4k and 32k tokens in bf16,
also on 4 decoder layers of Qwen3-8B's shape (``capture_8b``), and the sparse update at
all 36 layers of Qwen3-8B's q/k.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from bench.common import figure, md_table, render
from longact.core.arch import QKLayout

FIGURES = (
    "memory", "mask_apply", "lora", "capture", "coordinator", "rollout", "step_time", "data_gen"
)  # fmt: skip
GPU_FIGURES = ("train_step", "capture", "capture_8b", "mask_apply")
GPU = {  # defaults with --device cuda
    "train_step": {},
    "capture": {"seq_lens": (4096, 32768), "reps": 10, "padding_mask": False},
    "capture_8b": {"seq_lens": (4096, 32768), "reps": 10, "padding_mask": False},
    "mask_apply": {"layers": 36, "reps": 8},
}
QUICK = {
    "mask_apply": {"layers": 1, "reps": 2, "hidden": 256, "heads": 4, "kv_heads": 2},
    "capture": {
        "seq_lens": (64,),
        "reps": 2,
        "vocab": 256,
        "shape": {
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "intermediate_size": 128,
        },
    },
    "coordinator": {
        "rank_counts": (2, 4),
        "reps": 2,
        "use_ray": False,
        "layout": QKLayout(2, 16, 4, 2),
    },
}


def data_gen_figure(n: int = 500, length: int = 4096, log=print) -> dict[str, Any]:
    """bench/data_gen.py (another benchmark of this repo) as an extra figure."""
    cmd = [sys.executable, "-m", "bench.data_gen", "--n", str(n), "--length", str(length)]
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=root).stdout
    out = out.strip()
    log("  " + out)
    m = re.search(r"in ([0-9.]+) s", out)
    seconds = float(m.group(1)) if m else float("nan")
    fig = figure(
        "data_gen",
        f"Extra: generating {n} niah_single samples of {length} tokens (bench/data_gen.py)",
        ["output", "seconds"],
    )
    fig["rows"].append([out, f"{seconds:.2f}"])
    fig["goals"].append(
        {
            "goal": f"{n} x {length}-token samples (s)",
            "value": f"{seconds:.2f}",
            "target": "< 30 (data_gen.py's own goal)",
            "met": bool(seconds < 30),
        }
    )
    fig["notes"].append("One run, not a side-by-side comparison.")
    return fig


def run_figure(name: str, args: argparse.Namespace, deadline: float, log=print) -> dict:
    kw: dict[str, Any] = dict(QUICK.get(name, {})) if args.quick else {}
    if args.device != "cpu":
        import torch

        kw.update(GPU.get(name, {}), device=args.device)
        if name.startswith("capture"):
            kw["dtype"] = torch.bfloat16
    if name == "train_step":
        from bench import train_step

        return train_step.run(log=log, **kw)
    if name == "memory":
        from bench import memory

        return memory.run(log=log)
    if name == "mask_apply":
        from bench import mask_apply

        kw.setdefault("layers", args.mask_layers)
        return mask_apply.run(log=log, **kw)
    if name == "lora":
        from bench import lora_update

        kw = dict(lora_update.QUICK) if args.quick else {}
        return lora_update.run(log=log, **kw)
    if name == "capture_8b":  # GPU only: 4 decoder layers of Qwen3-8B's shape
        from bench import capture

        return capture.run(log=log, shape=capture.SHAPE_8B, name=name, **kw)
    if name == "capture":
        from bench import capture

        kw.setdefault("seq_lens", tuple(int(x) for x in args.capture_lens.split(",")))
        kw.setdefault("reps", args.capture_reps)
        return capture.run(log=log, **kw)
    if name == "coordinator":
        from bench import coordinator

        kw.setdefault("rank_counts", tuple(int(x) for x in args.ranks.split(",")))
        kw.setdefault("reps", args.coord_reps)
        return coordinator.run(log=log, **kw)
    if name == "rollout":
        from bench import rollout

        return rollout.run(log=log)
    if name == "step_time":
        from bench import step_time

        return step_time.run(
            steps=args.steps, max_pairs=args.pairs, deadline=deadline - 15, log=log
        )
    if name == "data_gen":
        return data_gen_figure(log=log)
    raise ValueError(f"unknown figure {name!r}; valid: {', '.join(FIGURES)}")


def write(out: Path, figs: list[dict], meta: dict) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(
        json.dumps({"meta": meta, "figures": figs}, indent=1, default=str)
    )
    goals = [
        [f["name"], g["goal"], g["value"], g["target"], "yes" if g["met"] else "NO"]
        for f in figs
        for g in f.get("goals", [])
    ]
    parts = [
        "# LongAct benchmarks",
        "",
        f"`python -m bench.run {' '.join(meta['argv'])}` on {meta['host']} "
        f"({meta['cpus']} CPUs, {meta.get('device', 'cpu')}, torch {meta['torch']}), "
        f"{meta['date']}, {meta['seconds']:.0f} s in all. "
        + (
            "Regenerate: `make bench` (under `flock /tmp/longact-heavy.lock` on a shared machine)."
            if meta.get("device", "cpu") == "cpu"
            else "Regenerate on a CUDA machine with LongAct installed: "
            "`python -m bench.run --device cuda --out docs/bench/gpu`."
        )
        + " Raw numbers: `results.json`.",
        "",
        "## Goals",
        "",
        md_table(["figure", "goal", "measured", "target", "met"], goals) if goals else "none",
    ]
    for f in figs:
        parts += ["", render(f)]
        for t in f.get("extra_tables", []):
            parts += ["", f"### {t['title']}", "", md_table(t["columns"], t["rows"])]
    text = "\n".join(parts) + "\n"
    (out / "README.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="docs/bench", help="folder for results.json, README.md")
    p.add_argument("--quick", action="store_true", help="tiny sizes; skips the verl runs")
    p.add_argument("--only", default="", help=f"comma list of {', '.join(FIGURES)}")
    p.add_argument("--budget-s", type=float, default=570.0, help="whole-run time budget")
    p.add_argument("--steps", type=int, default=8, help="training steps per step-time run")
    p.add_argument("--pairs", type=int, default=2, help="most on/off run pairs (step time)")
    p.add_argument("--capture-lens", default="2048", help="sequence lengths, e.g. 2048,4096")
    p.add_argument("--capture-reps", type=int, default=7)
    p.add_argument("--mask-layers", type=int, default=12, help="layers run (scaled to 36)")
    p.add_argument("--ranks", default="2,8,32", help="simulated rank counts")
    p.add_argument("--coord-reps", type=int, default=5)
    p.add_argument("--device", default="cpu", help="cpu, or cuda[:N] for the GPU figures")
    args = p.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    valid = GPU_FIGURES if args.device != "cpu" else FIGURES
    names = [n for n in args.only.split(",") if n] or [
        n for n in valid if not (args.quick and n in ("rollout", "step_time", "data_gen"))
    ]
    for n in names:
        if n not in valid:
            p.error(f"unknown figure {n!r} on {args.device}; valid: {', '.join(valid)}")
    if args.device != "cpu":
        import torch

        if not args.device.startswith("cuda") or not torch.cuda.is_available():
            p.error(f"--device {args.device}: no CUDA device here (valid: cpu, cuda[:N])")
    t0 = time.monotonic()
    deadline = t0 + args.budget_s
    figs: list[dict] = []
    for i, name in enumerate(names):
        if name == "data_gen" and deadline - time.monotonic() < 60 and not args.only:
            print(f"[{i + 1}/{len(names)}] {name}: skipped, under 60 s of budget left")
            continue
        print(f"[{i + 1}/{len(names)}] {name} ({time.monotonic() - t0:.0f} s elapsed)", flush=True)
        t = time.monotonic()
        try:
            fig = run_figure(name, args, deadline, log=lambda s: print(s, flush=True))
        except Exception as e:  # keep the other figures
            traceback.print_exc()
            fig = figure(name, f"{name}: FAILED", ["error"], error=repr(e))
            fig["rows"].append([repr(e)[:300]])
        fig["seconds"] = time.monotonic() - t
        figs.append(fig)
    import torch

    meta = {
        "argv": argv,
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(args.device),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "host": platform.node() or "unknown",
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "seconds": time.monotonic() - t0,
        "quick": args.quick,
    }
    print(write(Path(args.out), figs, meta))
    return 1 if any("error" in f for f in figs) else 0


if __name__ == "__main__":
    sys.exit(main())
