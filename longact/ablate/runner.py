"""``ablate(model_dir, tasks, lengths, n, ...)``: does a model rely on its salient Q/K channels?

1. **Calibration.** The statistics that choose the channels come from calibration
   prompts, never from the evaluated ones: ``calib_n`` prompts per task and length drawn
   with their own seed (``calib_seed``, default ``seed + 1000``), or the first
   ``calib_n`` rows of a parquet file (``calib_data``). A calibration prompt whose text
   equals an evaluation prompt's is dropped (and counted). The pass captures at the same
   point as training (``point``), real tokens only, and also records each channel's mean.
2. **Channels.** For every (layer, proj) the ratio picks channels with the same score,
   granularity and policy code that LongAct's masks use (``build_masks``): ``topk``,
   ``bottomk``, ``random`` (one arm per seed) - or ``none``, no disruption.
3. **Evaluation.** Every arm scores the same prompts (the ``longact eval`` rows, greedy
   HF decoding, the training reward) with the chosen channels overwritten at the capture
   point (``longact.ablate.disrupt``). ``none`` runs with no hook at all, so it is exactly
   ``longact eval`` of the model.

Departure from ``longact eval``: HF generation only (vLLM gives no hook into its layers).
The result is a JSON-able dict: per arm the accuracy by task and length with a 95%
Wilson interval, each prompt's score (for paired comparisons, ``longact.ablate.report``)
and the chosen channels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from longact.ablate.disrupt import MODES, CalibrationCapture, Disruption, replacement
from longact.core import GRANULARITIES, SCORES, build_masks, validate_ratio
from longact.core.arch import get_adapter, key_str
from longact.core.capture import POINTS
from longact.eval import report as eval_report
from longact.eval.stats import wilson

ARM_POLICIES = ("none", "topk", "random", "bottomk")  # "random" runs once per seed


class AblateError(ValueError):
    """Bad input to an ablation (model, data, settings)."""


@dataclass(frozen=True)
class Arm:
    policy: str  # none | topk | random | bottomk
    seed: int | None = None  # random only

    @property
    def name(self) -> str:
        return f"random:{self.seed}" if self.policy == "random" else self.policy


def plan_arms(policies: Sequence[str], seeds: Sequence[int]) -> list[Arm]:
    bad = [p for p in policies if p not in ARM_POLICIES]
    if bad or not policies:
        raise AblateError(
            f"unknown arm(s) {bad or '(none given)'}; valid: {', '.join(ARM_POLICIES)}"
        )
    if "random" in policies and not seeds:
        raise AblateError("the random arm needs at least one seed (--seeds 0,1,2)")
    arms = []
    for p in dict.fromkeys(policies):
        arms += [Arm(p, s) for s in dict.fromkeys(seeds)] if p == "random" else [Arm(p)]
    return arms


def check_settings(ratio: float, mode: str, score: str, granularity: str, point: str) -> None:
    try:
        validate_ratio(ratio)
        SCORES.get(score), GRANULARITIES.get(granularity)
    except ValueError as e:
        raise AblateError(str(e)) from None
    if mode not in MODES:
        raise AblateError(f"unknown mode {mode!r}; valid: {', '.join(MODES)}")
    if point not in POINTS:
        raise AblateError(f"unknown capture point {point!r}; valid: {', '.join(POINTS)}")


def calibration_rows(
    tok, tasks, lengths, n: int, seed: int, task_opts: dict | None, calib_data: str | None
) -> list[dict]:
    """Calibration rows: ``n`` per task and length with ``seed``, or the first ``n`` rows
    of the ``calib_data`` parquet file."""
    from longact.eval.runner import make_jobs
    from longact.inspect.analysis import InspectError, load_prompts

    if calib_data:
        try:
            return [{"prompt": p} for p in load_prompts(calib_data, n)]
        except InspectError as e:
            raise AblateError(str(e)) from None
    return [
        row for _, _, rows in make_jobs(tok, tasks, lengths, n, seed, task_opts) for row in rows
    ]


def calibrate(model, tok, texts: list[str], adapter, point: str, batch_size: int):
    """(QKStats, {key: (C,) mean}) over the real tokens of ``texts``."""
    from longact.inspect.analysis import run_prompts

    with CalibrationCapture(model, adapter, point) as cap:
        run_prompts(model, tok, texts, cap, batch_size)
        return cap.take(), cap.means()


def choose_channels(stats, layout, arm: Arm, ratio: float, score: str, granularity: str):
    """{key: (C,) bool} the channels ``arm`` disrupts: the MaskSet LongAct would train with
    (same statistics, ratio, score, granularity, policy and seed); empty for ``none``."""
    if arm.policy == "none":
        return {}
    masks = build_masks(
        stats,
        layout,
        ratio=ratio,
        policy=arm.policy,
        score=score,
        granularity=granularity,
        seed=arm.seed or 0,
    )
    return {k: masks[k] for k in layout}


def _summary(samples: list[dict]) -> list[dict]:
    out = eval_report.summarize(samples)
    for e in out:
        e["low"], e["high"] = wilson(e["accuracy"] * e["n"], e["n"])
    return out


def ablate(
    model_dir: str | Path,
    tasks: list[str],
    lengths: list[int],
    n: int,
    *,
    policies: Sequence[str] = ARM_POLICIES,
    seeds: Sequence[int] = (0, 1, 2),
    ratio: float = 0.3,
    mode: str = "mean",
    score: str = "mean_abs",
    granularity: str = "channel",
    point: str = "proj",
    calib_n: int = 16,
    calib_seed: int | None = None,
    calib_data: str | None = None,
    seed: int = 0,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    longbench: str | Path | None = None,
    task_opts: dict | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Accuracy of ``model_dir`` by task and length with each arm's channels disrupted."""
    from transformers import AutoConfig

    from longact.data import longbench as lb
    from longact.data.tasks import TASKS
    from longact.eval.runner import (
        EvalError,
        HFGenerator,
        count_batches,
        load_tokenizer,
        make_jobs,
        prompt_texts,
        resolve_model_dir,
        run_jobs,
    )

    arms = plan_arms(policies, seeds)
    check_settings(ratio, mode, score, granularity, point)
    try:
        for task in tasks:
            TASKS.get(task)
    except ValueError as e:
        raise AblateError(str(e)) from None
    if n < 1 or calib_n < 1 or batch_size < 1 or max_new_tokens < 1:
        raise AblateError("n, calib_n, batch size and max new tokens must be positive")
    if not lengths or min(lengths) < 1:
        raise AblateError(f"lengths must be positive, got {list(lengths)}")
    calib_seed = seed + 1000 if calib_seed is None else calib_seed
    if calib_seed == seed and not calib_data:
        raise AblateError(
            f"calib_seed {calib_seed} equals the evaluation seed: the "
            "calibration prompts would be the evaluated ones"
        )
    try:
        path = resolve_model_dir(model_dir)
        tok = load_tokenizer(path)
        config = AutoConfig.from_pretrained(path)
        adapter = get_adapter(config)  # unsupported model_type: lists the supported ones
    except (EvalError, ValueError, OSError) as e:
        raise AblateError(str(e)) from None

    records = lb.load(longbench)[:n] if longbench else []
    jobs = make_jobs(tok, tasks, lengths, n, seed, task_opts, records)
    eval_texts = {t for _, _, rows in jobs for t in prompt_texts(tok, rows)}
    calib = calibration_rows(tok, tasks, lengths, calib_n, calib_seed, task_opts, calib_data)
    calib_texts = prompt_texts(tok, calib)
    kept = [t for t in calib_texts if t not in eval_texts]
    if not kept:
        raise AblateError("every calibration prompt is also an evaluation prompt")

    gen = HFGenerator(path, tok, max_new_tokens)
    model = gen.model
    layout = adapter.layout(model)
    total = -(-len(kept) // batch_size) + len(arms) * count_batches(jobs, batch_size)
    bar = tqdm(total=total, desc="ablate", disable=not progress)
    bar.set_postfix_str("calibration")
    try:
        stats, means = calibrate(model.base_model, tok, kept, adapter, point, batch_size)
    except ValueError as e:  # point="norm" on a model without q/k norms
        raise AblateError(str(e)) from None
    bar.update(-(-len(kept) // batch_size))

    results = []
    for arm in arms:
        chosen = choose_channels(stats, layout, arm, ratio, score, granularity)
        values = replacement(chosen, means, mode)
        bar.set_description(f"ablate {arm.name}")
        if values:
            with Disruption(model, values, adapter, point):
                samples = run_jobs(gen, tok, jobs, batch_size, bar)
        else:
            samples = run_jobs(gen, tok, jobs, batch_size, bar)
        results.append(
            {
                **asdict(arm),
                "name": arm.name,
                "summary": _summary(samples),
                "scores": [s["score"] for s in samples],
                "responses": [s["response"] for s in samples],
                "channels": {
                    key_str(k): torch.nonzero(m).flatten().tolist() for k, m in chosen.items()
                },
            }
        )
    bar.close()
    return {
        "model": str(path),
        "model_type": config.model_type,
        "tasks": list(tasks) + ([lb.DATA_SOURCE] if records else []),
        "lengths": list(lengths),
        "n": n,
        "seed": seed,
        "prompts": [
            {"task": t, "length": ln, "index": r["extra_info"]["index"]}
            for t, ln, rows in jobs
            for r in rows
        ],
        "settings": {
            "ratio": ratio,
            "mode": mode,
            "score": score,
            "granularity": granularity,
            "point": point,
            "max_new_tokens": max_new_tokens,
            "batch_size": batch_size,
        },
        "calibration": {
            "source": calib_data or f"{', '.join(tasks)} at {list(lengths)}, seed {calib_seed}",
            "prompts": len(kept),
            "dropped_overlap": len(calib_texts) - len(kept),
            "tokens": int(stats.token_count(layout.keys()[0])),
        },
        "arms": results,
    }
