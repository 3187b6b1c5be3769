"""``longact tiny-model``: write a seeded tiny model of one family and its offline tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

from longact.cli.main import UsageError


def register(sub) -> None:
    from longact.models.tiny import SIZES
    from longact.models.tiny_arch import ARCHS

    p = sub.add_parser("tiny-model", help="write a tiny model + tokenizer (offline)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--size", default="xs", help=f"one of: {', '.join(SIZES.names())} (default xs)")
    p.add_argument(
        "--arch",
        default="qwen3",
        help=f"model family, one of: {', '.join(ARCHS.names())} (default qwen3)",
    )
    p.add_argument("--seed", type=int, default=0, help="initialization seed (default 0)")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty directory")
    p.set_defaults(func=run)


def run(args) -> int:
    from longact.models.tiny import SIZES, write_tiny_model
    from longact.models.tiny_arch import ARCHS

    if args.size not in SIZES:
        raise UsageError(f"unknown size {args.size!r}; valid: {', '.join(SIZES.names())}")
    if args.arch not in ARCHS:
        raise UsageError(f"unknown arch {args.arch!r}; valid: {', '.join(ARCHS.names())}")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        meta_file = out / "longact_tiny.json"
        if meta_file.exists():
            meta = json.loads(meta_file.read_text())
            have = (meta.get("arch", "qwen3"), meta.get("size"), meta.get("seed"))
            if have != (args.arch, args.size, args.seed):
                raise UsageError(
                    f"{out} holds a tiny {have[0]} model (size {have[1]}, seed {have[2]}), not "
                    f"{args.arch} (size {args.size}, seed {args.seed}); pass --force to rebuild"
                )
            print(f"{out} already holds a tiny model (use --force to rebuild)")
            return 0
        raise UsageError(f"{out} exists and is not empty; pass --force to overwrite")
    path = write_tiny_model(out, size=args.size, seed=args.seed, arch=args.arch)
    meta = (path / "longact_tiny.json").read_text().strip()
    print(f"wrote {path}: {meta}")
    return 0
