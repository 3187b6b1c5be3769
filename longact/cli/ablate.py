"""``longact ablate``: does this model rely on its salient Q/K channels?

    longact ablate --model DIR --tasks niah_single --lengths 128,256,384,512 --n 128 \\
        --out DIR [--ratio 0.3] [--arms none,topk,random,bottomk] [--seeds 0,1,2] \\
        [--mode mean|zero] [--calib-n 16] [--calib-data FILE] [--point proj|norm] \\
        [--score mean_abs] [--granularity channel] [--longbench FILE] [--opt KEY=VALUE]

Chooses, per layer and projection, the channels a LongAct mask would (``topk``), as many
at random (one arm per seed) or the lowest (``bottomk``), from calibration prompts kept
apart from the evaluated ones; overwrites them at the capture point during generation;
and scores every arm on the same prompts. Writes ``ablate.json``, ``ablate.md`` and
``ablate.png`` to ``--out``. See ``longact.ablate``.
"""

from __future__ import annotations

from pathlib import Path

from longact.cli.main import UsageError


def register(sub) -> None:
    p = sub.add_parser("ablate", help="disrupt the top-k Q/K channels; accuracy by length per arm")
    p.add_argument("--model", required=True, help="HF model dir or verl checkpoint folder")
    p.add_argument("--tasks", required=True, help="task names, comma-separated")
    p.add_argument("--lengths", required=True, help="prompt lengths in tokens, comma-separated")
    p.add_argument(
        "--n", type=int, default=64, help="evaluation prompts per task and length (default 64)"
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--ratio", type=float, default=0.3, help="share of channels disrupted (0.3)")
    p.add_argument(
        "--arms",
        default="none,topk,random,bottomk",
        help="arms, comma-separated: none, topk, random, bottomk",
    )
    p.add_argument("--seeds", default="0,1,2", help="seeds of the random arm (default 0,1,2)")
    p.add_argument(
        "--mode",
        default="mean",
        choices=["mean", "zero"],
        help="replace a channel by its calibration mean (default) or by 0",
    )
    p.add_argument(
        "--calib-n",
        type=int,
        default=16,
        help="calibration prompts per task and length (default 16)",
    )
    p.add_argument(
        "--calib-seed",
        type=int,
        default=None,
        help="seed of the calibration prompts (default: --seed + 1000)",
    )
    p.add_argument(
        "--calib-data",
        default=None,
        help="parquet file whose first --calib-n rows calibrate instead",
    )
    p.add_argument(
        "--point",
        default="proj",
        choices=["proj", "norm"],
        help="disrupt at the q/k projection output (proj) or after q/k norm",
    )
    p.add_argument("--score", default="mean_abs", help="channel score (default mean_abs)")
    p.add_argument("--granularity", default="channel", help="channel|rope_pair|head")
    p.add_argument("--seed", type=int, default=0, help="evaluation data seed (default 0)")
    p.add_argument("--batch-size", type=int, default=8, help="generation batch (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="default 32")
    p.add_argument("--longbench", default=None, help="also evaluate this LongBench v2 file")
    p.add_argument(
        "--opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="task option for every task that has it, e.g. --opt value_digits=2",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _seeds(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--seeds must be integers separated by commas, got {text!r}") from None


def run(args) -> int:
    from transformers.utils import logging as hf_logging

    from longact.ablate import ablate, write
    from longact.cli.data import _ints, _opts

    hf_logging.disable_progress_bar()
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise UsageError("--tasks is empty")
    try:
        result = ablate(
            args.model,
            tasks,
            _ints(args.lengths, "--lengths"),
            args.n,
            policies=[a.strip() for a in args.arms.split(",") if a.strip()],
            seeds=_seeds(args.seeds),
            ratio=args.ratio,
            mode=args.mode,
            score=args.score,
            granularity=args.granularity,
            point=args.point,
            calib_n=args.calib_n,
            calib_seed=args.calib_seed,
            calib_data=args.calib_data,
            seed=args.seed,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            longbench=args.longbench,
            task_opts=_opts(args.opt),
            progress=not args.quiet,
        )
        files = write(result, Path(args.out))
    except (ValueError, OSError) as e:
        raise UsageError(str(e)) from None
    print(Path(files["md"]).read_text(), end="")
    print(f"wrote {', '.join(files.values())}")
    return 0
