"""RULER-style variable tracking (``vt``): follow chains of assignments hidden in filler.

Each chain starts with ``" VAR AXQ = 4821."`` and continues with ``num_hops``
statements ``" VAR BRT = VAR AXQ."``; the statements of a chain keep their order and sit
at random depths of the filler. With ``num_chains > 1`` the other chains (other values)
are distractors. Prompt::

    Remember the variables assigned in the text.
     <filler> VAR AXQ = 4821. <filler> VAR BRT = VAR AXQ. <filler>
    Which variables are assigned the value 4821?

The expected response is every variable of the queried chain, in chain order,
space-separated (``AXQ BRT CDM DLP EKN``); the reward gives partial credit per variable.
``depth`` in ``extra_info`` is the position of the chain's first statement.

Departures from RULER: three-letter upper-case names from ``vocab.VARIABLES`` (one token
each in the tiny tokenizer) instead of five random letters, and values of
``value_digits`` digits (default 4; RULER uses 5).
"""

from __future__ import annotations

import random

from longact.data import vocab
from longact.data.base import TASKS, Sample, check_opts
from longact.data.fit import Fitter, distinct_numbers, insert_at

INSTRUCTION = "Remember the variables assigned in the text."


@TASKS.register("vt")
def vt(fitter: Fitter, rng: random.Random, length: int, index: int, n: int, **opts) -> Sample:
    """Chains of ``num_hops + 1`` variables; the first chain's value is asked for."""
    o = check_opts("vt", opts)
    chains_n, hops = o["num_chains"], o["num_hops"]
    if chains_n < 1 or hops < 0 or chains_n * (hops + 1) > len(vocab.VARIABLES):
        raise ValueError(
            f"task 'vt': num_chains * (num_hops + 1) must be between 1 and "
            f"{len(vocab.VARIABLES)}, got {chains_n} * ({hops} + 1)"
        )
    names = rng.sample(vocab.VARIABLES, chains_n * (hops + 1))
    values = distinct_numbers(rng, chains_n, o["value_digits"])
    chains = [names[c * (hops + 1) : (c + 1) * (hops + 1)] for c in range(chains_n)]
    statements = []  # (depth, text)
    first_depth = 0.0
    for c, chain in enumerate(chains):
        depths = sorted(rng.random() for _ in chain)
        if c == 0:
            first_depth = depths[0]
        statements.append((depths[0], f" VAR {chain[0]} = {values[c]}."))
        for d, prev, var in zip(depths[1:], chain, chain[1:]):
            statements.append((d, f" VAR {var} = VAR {prev}."))
    question = f"Which variables are assigned the value {values[0]}?"
    filler_seed = rng.getrandbits(64)

    def build(budget: int) -> str:
        haystack = fitter.filler(random.Random(filler_seed), budget)
        return f"{INSTRUCTION}\n{''.join(insert_at(haystack, statements))}\n{question}"

    content, num_tokens = fitter.fit("vt", length, build)
    return Sample(
        content=content,
        answers=list(chains[0]),
        target=" ".join(chains[0]),
        num_tokens=num_tokens,
        depth=first_depth,
        meta={"value": values[0], "num_chains": chains_n, "num_hops": hops},
    )
