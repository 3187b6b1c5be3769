"""``longact warmup``: supervised warm-up of a model before RL (verl's SFT trainer)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from longact.cli.main import UsageError


def register(sub) -> None:
    p = sub.add_parser(
        "warmup",
        help="supervised warm-up before RL (verl's SFT trainer, FSDP2; CPU by default)",
        description="Train MODEL on chat messages (longact data make --sft) with verl's SFT "
        "trainer and write the result as a plain model folder. Extra key=value arguments "
        "are overrides of verl's SFT config (hydra_configs/sft_warmup_cpu.yaml).",
    )
    p.add_argument("--model", required=True, help="model folder (config, weights, tokenizer)")
    p.add_argument("--data", required=True, help="parquet with a `messages` column")
    p.add_argument("--out", required=True, help="folder for the warmed-up model")
    p.add_argument("--steps", type=int, default=400, help="optimizer steps (default 400)")
    p.add_argument("--ranks", type=int, default=2, help="FSDP2 processes (default 2)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="SFT config overrides")
    p.set_defaults(func=run)


def run(args) -> int:
    from longact.train.warmup import DEFAULT_OVERRIDES, export_model, warmup

    model, data, out = Path(args.model), Path(args.data), Path(args.out)
    if not (model / "config.json").is_file():
        raise UsageError(f"--model {model} has no config.json")
    if not data.is_file():
        raise UsageError(f"--data {data} is not a file (longact data make --sft writes one)")
    import pyarrow.parquet as pq

    if "messages" not in pq.read_schema(data).names:
        raise UsageError(f"--data {data} has no `messages` column: make it with --sft")
    if args.steps < 1 or args.ranks < 1:
        raise UsageError(f"--steps={args.steps} and --ranks={args.ranks} must be >= 1")
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise UsageError(f"overrides must be key=value, got {bad}")
    t0 = time.time()
    work = out.with_name(out.name + ".work")
    print(f"warm-up: {args.steps} steps on {args.ranks} ranks; verl's log: {work / 'sft.log'}")
    hf, losses = warmup(
        model.resolve(), data.resolve(), work.resolve(), args.steps, args.ranks,
        [*DEFAULT_OVERRIDES, *args.overrides],
    )  # fmt: skip
    export_model(hf, out)
    (out / "longact_warmup.json").write_text(
        json.dumps({"steps": args.steps, "loss": losses.get(args.steps), "data": str(data)})
    )
    final = losses.get(args.steps, float("nan"))
    print(f"wrote {out} ({time.time() - t0:.0f}s, final loss {final:.3f})")
    return 0
