"""Synthetic long-context datasets in verl's RL parquet format (and an SFT variant).

``make_dataset(task, tokenizer, length, n, seed, **opts)`` generates ``n`` rows of one
task whose prompts are ``length`` tokens of ``tokenizer`` (chat template with the
generation prompt included; exact, and within 2% for any tokenizer). Generation is
deterministic: sample ``i`` depends only on (task, seed, length, i, opts).

A row::

    data_source   "longact/<task>"
    prompt        [{"role": "user", "content": ...}]
    ability       "retrieval" | "multi_hop_tracing" | "aggregation" | ...
    reward_model  {"style": "rule", "ground_truth": [reference, ...]}   (list of strings)
    extra_info    {"task", "length", "num_tokens", "depth", "index", "seed",
                   "answer" (the ideal response), task-specific extras}

``to_sft_rows`` turns rows into a ``messages`` column (user prompt + assistant answer in
exactly the format the reward expects) for a supervised warm-up with verl's
``MultiTurnSFTDataset``. Tasks live in ``niah``, ``vt``, ``aggregation`` and ``qa``.
"""

from __future__ import annotations

import random
from pathlib import Path

from longact.data import aggregation, niah, qa, vt  # noqa: F401  (register the tasks)
from longact.data.base import ABILITY, TASKS
from longact.data.fit import Fitter, TaskLengthError, load_tokenizer

_FITTERS: dict[int, tuple[object, Fitter]] = {}


def fitter_for(tokenizer) -> Fitter:
    """A ``Fitter`` for a tokenizer object, directory or ``"tiny"`` (cached per object)."""
    if isinstance(tokenizer, Fitter):
        return tokenizer
    key = tokenizer if isinstance(tokenizer, (str, Path)) else None
    if key is not None:
        key = str(Path(tokenizer).resolve()) if str(tokenizer) != "tiny" else "tiny"
        for obj, fitter in _FITTERS.values():
            if obj == key:
                return fitter
        fitter = Fitter(load_tokenizer(tokenizer))
        _FITTERS[id(fitter)] = (key, fitter)
        return fitter
    if id(tokenizer) not in _FITTERS:
        _FITTERS[id(tokenizer)] = (tokenizer, Fitter(tokenizer))
    return _FITTERS[id(tokenizer)][1]


def make_dataset(task: str, tokenizer, length: int, n: int, seed: int = 0, **opts) -> list[dict]:
    """``n`` rows of ``task`` with ``length``-token prompts (see the module docstring)."""
    fn = TASKS.get(task)
    if int(length) < 1 or int(n) < 1:
        raise ValueError(f"length and n must be positive, got length={length}, n={n}")
    fitter = fitter_for(tokenizer)
    rows = []
    for i in range(n):
        try:
            s = fn(fitter, _rng(task, seed, length, i), int(length), i, int(n), **opts)
        except TaskLengthError:
            raise TaskLengthError(
                task, int(length), _minimum(fn, fitter, task, length, n, seed, opts)
            ) from None
        extra = {
            "task": task,
            "length": int(length),
            "num_tokens": s.num_tokens,
            "depth": s.depth,
            "index": i,
            "seed": seed,
            "answer": s.target,
            **s.meta,
        }
        rows.append(
            {
                "data_source": f"longact/{task}",
                "prompt": [{"role": "user", "content": s.content}],
                "ability": ABILITY.get(task, "long_context"),
                "reward_model": {"style": "rule", "ground_truth": list(s.answers)},
                "extra_info": extra,
            }
        )
    return rows


def _rng(task: str, seed: int, length: int, index: int) -> random.Random:
    return random.Random(f"longact:{task}:{seed}:{length}:{index}")


def _minimum(fn, fitter: Fitter, task: str, length: int, n: int, seed: int, opts: dict) -> int:
    """The smallest length at which all ``n`` samples fit. Samples depend on the length
    (it seeds them), so search upward from the largest minimum at ``length``."""
    fitter.probe = True
    try:
        for _ in range(20):
            worst = 0
            for i in range(n):
                try:
                    fn(fitter, _rng(task, seed, length, i), int(length), i, int(n), **opts)
                except TaskLengthError as e:
                    worst = max(worst, e.minimum)
            if worst <= length:
                return length
            length = worst
    finally:
        fitter.probe = False
    return length


def to_sft_rows(rows: list[dict]) -> list[dict]:
    """``messages`` rows: the prompt plus the ideal assistant answer."""
    return [
        {
            "messages": [
                *row["prompt"],
                {"role": "assistant", "content": row["extra_info"]["answer"]},
            ],
            "data_source": row["data_source"],
            "extra_info": row["extra_info"],
        }
        for row in rows
    ]


def write_parquet(rows: list[dict], path: str | Path) -> Path:
    """Write rows (RL or SFT) to a parquet file; returns the path."""
    import pandas as pd

    if not rows:
        raise ValueError("no rows to write")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(path, index=False)
    return path


def _plain(x):
    """numpy arrays / scalars from a parquet round trip back to lists and Python values."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if hasattr(x, "tolist") and not isinstance(x, (str, bytes)):
        x = x.tolist()
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def read_parquet(path: str | Path) -> list[dict]:
    """Rows of a parquet file written by ``write_parquet``, as plain Python objects."""
    import pandas as pd

    return [_plain(r) for r in pd.read_parquet(path).to_dict(orient="records")]
