"""``longact data``: generate task datasets (verl RL or SFT parquet) and LongBench v2 rows.

    longact data make --task niah_single[,vt,...] --length 1024[,2048] --n 64 \\
        --tokenizer DIR|tiny --seed 0 --out train.parquet [--sft] [--value-digits 4] \\
        [--opt KEY=VALUE ...]
    longact data list
    longact data longbench --input data.json --tokenizer DIR --length 8192 --out lb.parquet

Several tasks / lengths give ``n`` rows for each pair, in one file. ``--value-digits``
applies to the tasks that have numeric values; ``--opt`` sets any other task option.
"""

from __future__ import annotations

from longact.cli.main import UsageError


def register(sub) -> None:
    p = sub.add_parser("data", help="generate long-context task data (parquet)")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION")
    dsub.required = True

    m = dsub.add_parser("make", help="generate synthetic task rows")
    m.add_argument("--task", required=True, help="task name(s), comma-separated")
    m.add_argument("--length", required=True, help="prompt length(s) in tokens, comma-separated")
    m.add_argument("--n", type=int, required=True, help="samples per task and length")
    m.add_argument("--tokenizer", required=True, help="tokenizer/model directory, or 'tiny'")
    m.add_argument("--seed", type=int, default=0, help="generation seed (default 0)")
    m.add_argument("--out", required=True, help="output .parquet file")
    m.add_argument("--sft", action="store_true", help="write a `messages` column for SFT")
    m.add_argument("--value-digits", type=int, default=None, help="digits of numeric values")
    m.add_argument(
        "--opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="task option (repeatable), e.g. --opt num_keys=6",
    )
    m.set_defaults(func=run_make)

    ls = dsub.add_parser("list", help="list the tasks and their options")
    ls.set_defaults(func=run_list)

    b = dsub.add_parser("longbench", help="LongBench v2 file -> verl rows cut to a length")
    b.add_argument("--input", required=True, help="LongBench v2 data.json (local)")
    b.add_argument("--tokenizer", required=True, help="tokenizer/model directory, or 'tiny'")
    b.add_argument("--length", type=int, required=True, help="max prompt length in tokens")
    b.add_argument("--n", type=int, default=None, help="keep the first N records")
    b.add_argument("--out", required=True, help="output .parquet file")
    b.set_defaults(func=run_longbench)


def _ints(text: str, what: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{what} must be integers separated by commas, got {text!r}") from None
    if not values or min(values) < 1:
        raise UsageError(f"{what} must be positive, got {text!r}")
    return values


def _opts(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--opt expects KEY=VALUE, got {pair!r}")
        out[key.strip()] = value.strip()
    return out


def run_make(args) -> int:
    from longact.data.base import OPTIONS
    from longact.data.tasks import TASKS, fitter_for, make_dataset, to_sft_rows, write_parquet

    tasks = [t.strip() for t in args.task.split(",") if t.strip()]
    for t in tasks:
        if t not in TASKS:
            raise UsageError(f"unknown task {t!r}; valid: {', '.join(TASKS.names())}")
    lengths = _ints(args.length, "--length")
    if args.n < 1:
        raise UsageError(f"--n must be positive, got {args.n}")
    opts = _opts(args.opt)
    try:
        fitter = fitter_for(args.tokenizer)
        rows = []
        for t in tasks:
            task_opts = dict(opts)
            if args.value_digits is not None and "value_digits" in OPTIONS[t]:
                task_opts["value_digits"] = args.value_digits
            for length in lengths:
                rows += make_dataset(t, fitter, length, args.n, seed=args.seed, **task_opts)
    except (ValueError, OSError) as e:
        raise UsageError(str(e)) from None
    path = write_parquet(to_sft_rows(rows) if args.sft else rows, args.out)
    kind = "SFT" if args.sft else "RL"
    print(f"wrote {len(rows)} {kind} rows ({', '.join(tasks)} x {lengths}) to {path}")
    return 0


def run_list(args) -> int:
    from longact.data.base import ABILITY, OPTIONS
    from longact.data.tasks import TASKS

    for t in TASKS.names():
        opts = ", ".join(f"{k}={v}" for k, v in OPTIONS.get(t, {}).items()) or "-"
        print(f"{t:16s} data_source=longact/{t:16s} {ABILITY.get(t, ''):20s} {opts}")
    return 0


def run_longbench(args) -> int:
    from longact.data import longbench
    from longact.data.fit import load_tokenizer
    from longact.data.tasks import write_parquet

    try:
        records = longbench.load(args.input)
        if args.n is not None:
            records = records[: args.n]
        rows = longbench.make_rows(records, load_tokenizer(args.tokenizer), args.length)
    except (ValueError, OSError) as e:
        raise UsageError(str(e)) from None
    path = write_parquet(rows, args.out)
    cut = sum(r["extra_info"]["truncated"] for r in rows)
    print(f"wrote {len(rows)} LongBench v2 rows ({cut} contexts cut) to {path}")
    return 0
