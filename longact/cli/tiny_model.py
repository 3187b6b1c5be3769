"""``longact tiny-model``: write a tiny Qwen3 model and its offline tokenizer."""

from __future__ import annotations

from pathlib import Path

from longact.cli.main import UsageError


def register(sub) -> None:
    from longact.models.tiny import SIZES

    p = sub.add_parser("tiny-model", help="write a tiny Qwen3 model + tokenizer (offline)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--size", default="xs", help=f"one of: {', '.join(SIZES.names())} (default xs)")
    p.add_argument("--seed", type=int, default=0, help="initialization seed (default 0)")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty directory")
    p.set_defaults(func=run)


def run(args) -> int:
    from longact.models.tiny import SIZES, write_tiny_model

    if args.size not in SIZES:
        raise UsageError(f"unknown size {args.size!r}; valid: {', '.join(SIZES.names())}")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        if (out / "longact_tiny.json").exists():
            print(f"{out} already holds a tiny model (use --force to rebuild)")
            return 0
        raise UsageError(f"{out} exists and is not empty; pass --force to overwrite")
    path = write_tiny_model(out, size=args.size, seed=args.seed)
    meta = (path / "longact_tiny.json").read_text().strip()
    print(f"wrote {path}: {meta}")
    return 0
