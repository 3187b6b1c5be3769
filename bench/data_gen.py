"""Benchmark: time generating 500 niah_single samples of 4096 tokens with the tiny tokenizer.

    python bench/data_gen.py [--task niah_single] [--n 500] [--length 4096]

Prints the seconds spent in ``make_dataset`` (the tokenizer is built before the clock
starts) and checks every prompt's length. Goal on a 2-core CPU: under 30 s.
"""

from __future__ import annotations

import argparse
import time

from longact.data.tasks import fitter_for, make_dataset
from longact.models.tiny import build_tokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="niah_single")
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    tokenizer = build_tokenizer()
    start = time.perf_counter()
    fitter = fitter_for(tokenizer)
    rows = make_dataset(args.task, fitter, args.length, args.n, seed=args.seed)
    seconds = time.perf_counter() - start
    sizes = [r["extra_info"]["num_tokens"] for r in rows]
    off = max(abs(s - args.length) for s in sizes) / args.length
    print(
        f"{args.task}: {len(rows)} samples x {args.length} tokens in {seconds:.2f} s "
        f"({len(rows) / seconds:.0f} samples/s; max length error {100 * off:.2f}%)"
    )


if __name__ == "__main__":
    main()
