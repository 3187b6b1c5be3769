"""``longact eval``: accuracy of a model on the tasks across prompt lengths.

    longact eval --model DIR --tasks niah_single,vt,qa --lengths 256,512,1024 --n 16 \\
        --out DIR [--seed 0] [--batch-size 8] [--max-new-tokens 32] [--backend auto] \\
        [--longbench data.json] [--base DIR]

``--model`` may be a LoRA adapter (a LoRA run's ``global_step_N/actor``): it is merged
into its base model (``--base``, default: the path the adapter records) for the run.

Writes ``results.json`` (per-sample scores; per task x length accuracy and n),
``results.md`` (table) and ``accuracy_vs_length.png`` into ``--out``.
"""

from __future__ import annotations

from pathlib import Path

from longact.cli.main import UsageError


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a model on the long-context tasks")
    p.add_argument(
        "--model",
        required=True,
        help="HF model dir, verl checkpoint (huggingface/) or LoRA adapter (lora_adapter/)",
    )
    p.add_argument(
        "--base", default=None, help="base model of a LoRA adapter (default: the adapter's)"
    )
    p.add_argument("--tasks", required=True, help="task names, comma-separated")
    p.add_argument("--lengths", required=True, help="prompt lengths in tokens, comma-separated")
    p.add_argument("--n", type=int, default=16, help="samples per task and length (default 16)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0, help="data seed (default 0)")
    p.add_argument("--batch-size", type=int, default=8, help="generation batch (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="default 32")
    p.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "hf", "vllm"],
        help="auto: vLLM when it imports and CUDA is present, else HF",
    )
    p.add_argument("--longbench", default=None, help="also evaluate this LongBench v2 file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="task option for every task that has it (repeatable), e.g. --opt value_digits=2",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    from longact.cli.data import _ints, _opts
    from longact.eval.runner import evaluate

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise UsageError("--tasks is empty")
    lengths = _ints(args.lengths, "--lengths")
    try:
        results = evaluate(
            args.model,
            tasks,
            lengths,
            args.n,
            out_dir=args.out,
            seed=args.seed,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            backend=args.backend,
            longbench=args.longbench,
            progress=not args.quiet,
            task_opts=_opts(args.opt),
            base=args.base,
        )
    except (ValueError, OSError) as e:
        raise UsageError(str(e)) from None
    print(Path(results["files"]["md"]).read_text(), end="")
    print(f"wrote {', '.join(results['files'].values())}")
    return 0
