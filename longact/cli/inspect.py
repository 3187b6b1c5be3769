"""``longact inspect``: how concentrated |Q| / |K| is per channel, and what a mask keeps.

    longact inspect --model DIR --data FILE.parquet [--compare DIR2] [--n 16] \\
        [--ratio 0.3] [--policy topk] [--score mean_abs] [--granularity channel] \\
        [--point proj|norm] [--out DIR] [--batch-size 4] [--seed 0] \\
        [--calib-n 0] [--calib-data FILE] [--base DIR]

Runs the model (HF dir or verl checkpoint: ``global_step_N``, ``.../actor`` or its
``huggingface/``; or a LoRA adapter, loaded unmerged onto ``--base``, by default the base
path it records) over the first ``n`` prompts, prints the concentration table and writes
``inspect.json``, ``heatmaps.png`` and, with ``--compare``, ``compare.png`` to ``--out``
(default ``outputs/inspect/<model name>``). With ``--calib-n N`` the mask is chosen on N
calibration prompts (``--calib-data``, or the rows after the first ``n``) and measured on
the ``n`` others; the last printed line sums it up. See ``longact.inspect``.
"""

from __future__ import annotations

import re
from pathlib import Path

from longact.cli.main import UsageError


def register(sub) -> None:
    p = sub.add_parser("inspect", help="per-channel |Q|/|K| magnitude heatmaps and mask overlap")
    p.add_argument("--model", required=True, help="HF model dir or verl checkpoint folder")
    p.add_argument("--data", required=True, help="parquet file with a chat 'prompt' column")
    p.add_argument("--compare", default=None, help="second model: heatmaps + Jaccard overlap")
    p.add_argument("--n", type=int, default=16, help="first n prompts (default 16)")
    p.add_argument("--ratio", type=float, default=0.3, help="mask ratio (default 0.3)")
    p.add_argument("--policy", default="topk", help="mask policy (default topk)")
    p.add_argument("--score", default="mean_abs", help="channel score (default mean_abs)")
    p.add_argument("--granularity", default="channel", help="channel|rope_pair|head")
    p.add_argument(
        "--point",
        default="proj",
        choices=["proj", "norm"],
        help="capture at q_proj/k_proj output (proj) or after q_norm/k_norm",
    )
    p.add_argument("--out", default=None, help="output dir (default outputs/inspect/<model>)")
    p.add_argument("--batch-size", type=int, default=4, help="prompts per forward (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random policy (default 0)")
    p.add_argument("--calib-n", type=int, default=0,
                   help="choose the mask on N calibration prompts, measure on the --n ones "
                   "(default 0: the same prompts)")  # fmt: skip
    p.add_argument("--calib-data", default=None,
                   help="calibration parquet (default: the rows after the first --n)")  # fmt: skip
    p.add_argument("--base", default=None,
                   help="base model of a LoRA adapter given as --model/--compare "
                   "(default: the path the adapter records)")  # fmt: skip
    p.set_defaults(func=run)


def run(args) -> int:
    from transformers.utils import logging as hf_logging

    from longact.inspect import (
        compare_results,
        inspect_model,
        model_name,
        summary_table,
        write_outputs,
    )

    hf_logging.disable_progress_bar()  # no "Loading weights" bars between the tables
    opts = {
        "n": args.n,
        "ratio": args.ratio,
        "policy": args.policy,
        "score": args.score,
        "granularity": args.granularity,
        "point": args.point,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "calib_n": args.calib_n,
        "calib_data": args.calib_data,
        "base": args.base,
    }
    try:
        result = inspect_model(args.model, args.data, **opts)
        if args.compare:
            compare_results(result, inspect_model(args.compare, args.data, **opts))
        out = args.out
        if out is None:
            out = Path("outputs/inspect") / re.sub(r"[^\w.-]+", "_", model_name(result["model"]))
        files = write_outputs(result, out)
    except (ValueError, OSError) as e:
        raise UsageError(str(e)) from None
    print(summary_table(result))
    print(f"wrote {', '.join(files.values())}")
    return 0
