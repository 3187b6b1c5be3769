"""RULER-style needle-in-a-haystack tasks: single, multi-key, multi-value, multi-query.

A needle is ``" The special magic number for KEY is VALUE."`` hidden in filler
sentences; the queried needle sits at a depth spread evenly over the samples (0 = start
of the context, 1 = end), other needles at random depths. Prompt::

    Find the special magic numbers hidden in the text.
     <filler> The special magic number for amber is 4821. <filler>
    What is the special magic number for amber?

and the expected response is the value(s) alone, space-separated (``4821``;
multi-value: in the order they appear in the context; multi-query: in the order the
keys are asked).

Departures from RULER: keys are words and values are numbers only (RULER also offers
UUIDs), values default to 4 digits (``value_digits``; RULER uses 7) so a tiny model's
answer stays short, and the haystack is random filler sentences rather than essays or
the repeated "The grass is green" noise. ``niah_multikey`` puts its distractor needles
(other keys) in that same filler.
"""

from __future__ import annotations

import random

from longact.data import vocab
from longact.data.base import TASKS, Sample, check_opts
from longact.data.fit import Fitter, distinct_numbers, insert_at, spread

INSTRUCTION = "Find the special magic numbers hidden in the text."
NEEDLE = " The special magic number for {key} is {value}."


def _question(keys: list[str], multi_value: bool) -> str:
    if multi_value:
        return f"What are all the special magic numbers for {keys[0]}?"
    if len(keys) == 1:
        return f"What is the special magic number for {keys[0]}?"
    return f"What are the special magic numbers for {', '.join(keys[:-1])} and {keys[-1]}?"


def _niah(
    task: str,
    fitter: Fitter,
    rng: random.Random,
    length: int,
    index: int,
    n: int,
    *,
    num_keys: int,
    num_values: int,
    num_queries: int,
    value_digits: int,
) -> Sample:
    """Shared generator: ``num_keys`` keys with ``num_values`` values each; the first
    ``num_queries`` keys are asked for."""
    if not 1 <= num_queries <= num_keys <= len(vocab.KEYS):
        raise ValueError(f"task {task!r}: need 1 <= num_queries <= num_keys <= {len(vocab.KEYS)}")
    if num_values < 1:
        raise ValueError(f"task {task!r}: num_values must be at least 1")
    keys = rng.sample(vocab.KEYS, num_keys)
    values = distinct_numbers(rng, num_keys * num_values, value_digits)
    depth = spread(index, n)
    needles = []  # (depth, text, queried key or None, value)
    for k, key in enumerate(keys):
        for v in range(num_values):
            value = values[k * num_values + v]
            d = depth if (k, v) == (0, 0) else rng.random()
            needles.append((d, NEEDLE.format(key=key, value=value), k < num_queries, value))
    question = _question(keys[:num_queries], multi_value=num_values > 1)
    filler_seed = rng.getrandbits(64)

    def build(budget: int) -> str:
        haystack = fitter.filler(random.Random(filler_seed), budget)
        pieces = insert_at(haystack, [(d, text) for d, text, _, _ in needles])
        return f"{INSTRUCTION}\n{''.join(pieces)}\n{question}"

    content, num_tokens = fitter.fit(task, length, build)
    queried = [(text, value) for _, text, q, value in needles if q]
    if num_values > 1:  # multi-value: answer in the order of the context
        queried.sort(key=lambda tv: content.index(tv[0]))
    answers = [value for _, value in queried]
    return Sample(
        content=content,
        answers=answers,
        target=" ".join(answers),
        num_tokens=num_tokens,
        depth=depth,
        meta={"keys": keys[:num_queries], "num_needles": len(needles)},
    )


@TASKS.register("niah_single")
def niah_single(fitter, rng, length, index, n, **opts) -> Sample:
    """One needle; asked for its value."""
    o = check_opts("niah_single", opts)
    return _niah(
        "niah_single", fitter, rng, length, index, n, num_keys=1, num_values=1, num_queries=1, **o
    )


@TASKS.register("niah_multikey")
def niah_multikey(fitter, rng, length, index, n, **opts) -> Sample:
    """One queried needle among ``num_keys - 1`` distractor needles with other keys."""
    o = check_opts("niah_multikey", opts)
    return _niah("niah_multikey", fitter, rng, length, index, n, num_values=1, num_queries=1, **o)


@TASKS.register("niah_multivalue")
def niah_multivalue(fitter, rng, length, index, n, **opts) -> Sample:
    """One key with ``num_values`` needles; all values are asked for."""
    o = check_opts("niah_multivalue", opts)
    return _niah("niah_multivalue", fitter, rng, length, index, n, num_keys=1, num_queries=1, **o)


@TASKS.register("niah_multiquery")
def niah_multiquery(fitter, rng, length, index, n, **opts) -> Sample:
    """``num_queries`` needles with different keys; all are asked for."""
    o = check_opts("niah_multiquery", opts)
    q = o.pop("num_queries")
    return _niah(
        "niah_multiquery",
        fitter,
        rng,
        length,
        index,
        n,
        num_keys=q,
        num_values=1,
        num_queries=q,
        **o,
    )
