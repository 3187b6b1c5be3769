"""RULER-style aggregation: common-words (``cwe``) and frequent-words (``fwe``) extraction.

The context is a shuffled list of words, each with a leading space. Prompts::

    Find the most common words in the list.
     river amber lotus river ...
    What are the 5 most common words in the list?

    Find the most frequent words in the text.
     river river amber river ...
    What are the 3 most frequent words in the text?

The expected response is the words, space-separated: for ``cwe`` in the order they
first appear in the list (all have the same count), for ``fwe`` from the most frequent
down. The reward gives partial credit per word.

``cwe``: ``num_cw`` common words appear ``2u + 1`` times each and every other word at most
``u`` times, ``u`` the smallest that fills the budget. RULER uses fixed counts (30 vs 3)
with a vocabulary of thousands of words; ours has only the few hundred words the tiny
tokenizer knows, so the counts grow with the length instead, always with a clear gap.

``fwe``: word counts follow Zipf's law (``alpha`` = 2, as RULER), made strictly
decreasing over the top ``num_fw + 1`` ranks so the answer is unique. RULER draws random
letter strings as "coded words"; ours are vocabulary words.
"""

from __future__ import annotations

import random

from longact.data import vocab
from longact.data.base import TASKS, Sample, check_opts
from longact.data.fit import Fitter

WORDS = [w for w in dict.fromkeys(vocab.FILLER + vocab.KEYS + vocab.VALUES) if w.isalpha()]
CWE_INSTRUCTION = "Find the most common words in the list."
FWE_INSTRUCTION = "Find the most frequent words in the text."


def _render(instruction: str, words: list[str], question: str) -> str:
    return f"{instruction}\n{''.join(' ' + w for w in words)}\n{question}"


def _fill_tail(words: list[str], costs: dict[str, int], left: int, cap, counts) -> int:
    """Add words round-robin while ``left`` budget remains and ``cap`` allows; returns left."""
    progress = True
    while left > 0 and progress:
        progress = False
        for w in words:
            c = costs[w]
            if c <= left and counts.get(w, 0) < cap(w):
                counts[w] = counts.get(w, 0) + 1
                left -= c
                progress = True
                if left == 0:
                    break
    return left


@TASKS.register("cwe")
def cwe(fitter: Fitter, rng: random.Random, length: int, index: int, n: int, **opts) -> Sample:
    """``num_cw`` words clearly more common than all others."""
    o = check_opts("cwe", opts)
    k = o["num_cw"]
    if not 1 <= k < len(WORDS):
        raise ValueError(f"task 'cwe': num_cw must be between 1 and {len(WORDS) - 1}")
    shuffled = rng.sample(WORDS, len(WORDS))
    common, rare = shuffled[:k], shuffled[k:]
    costs = dict(zip(WORDS, fitter.costs([" " + w for w in WORDS])))
    common_cost = sum(costs[w] for w in common)
    rare_cost = sum(costs[w] for w in rare)
    order_seed = rng.getrandbits(64)
    question = f"What are the {k} most common words in the list?"

    def build(budget: int) -> str:
        total = 3 * common_cost + budget
        u = 1
        while (2 * u + 1) * common_cost + u * rare_cost < total:
            u += 1
        counts = {w: 2 * u + 1 for w in common}
        _fill_tail(rare, costs, total - (2 * u + 1) * common_cost, lambda w: u, counts)
        words = [w for w, c in counts.items() for _ in range(c)]
        random.Random(order_seed).shuffle(words)
        return _render(CWE_INSTRUCTION, words, question)

    content, num_tokens = fitter.fit("cwe", length, build)
    listed = content.split("\n")[1].split()
    answers = sorted(common, key=listed.index)
    return Sample(content, answers, " ".join(answers), num_tokens, meta={"num_cw": k})


def zipf_counts(n_words: int, ranks: int, alpha: float, top: int) -> list[int]:
    """About ``n_words`` occurrences over ``ranks`` ranks, Zipf-shaped, strictly decreasing
    over the first ``top + 1`` ranks."""
    weights = [r**-alpha for r in range(1, ranks + 1)]
    total = sum(weights)
    counts = [int(n_words * w / total) for w in weights]
    for i in range(top - 1, -1, -1):
        counts[i] = max(counts[i], counts[i + 1] + 1)
    return counts


@TASKS.register("fwe")
def fwe(fitter: Fitter, rng: random.Random, length: int, index: int, n: int, **opts) -> Sample:
    """Zipf-distributed words; the ``num_fw`` most frequent are asked for."""
    o = check_opts("fwe", opts)
    k, alpha = o["num_fw"], float(o["alpha"])
    if not 1 <= k < len(WORDS) - 1:
        raise ValueError(f"task 'fwe': num_fw must be between 1 and {len(WORDS) - 2}")
    ranked = rng.sample(WORDS, len(WORDS))
    costs = dict(zip(WORDS, fitter.costs([" " + w for w in WORDS])))
    weights = [r**-alpha for r in range(1, len(ranked) + 1)]
    avg = sum(w * costs[x] for w, x in zip(weights, ranked)) / sum(weights)  # per occurrence
    order_seed = rng.getrandbits(64)
    question = f"What are the {k} most frequent words in the text?"
    base = zipf_counts(0, len(ranked), alpha, k)
    min_cost = sum(c * costs[w] for w, c in zip(ranked, base))

    def build(budget: int) -> str:
        total = min_cost + budget
        counts = dict(zip(ranked, zipf_counts(int(total / avg), len(ranked), alpha, k)))
        left = total - sum(c * costs[w] for w, c in counts.items())
        tail = ranked[k:]
        if left > 0:  # top up the tail, keeping it below the k-th word
            _fill_tail(tail, costs, left, lambda w: counts[ranked[k - 1]] - 1, counts)
        for w in reversed(tail if left < 0 else []):  # trim the tail from the rarest up
            while left < 0 and counts[w] > 0:
                counts[w] -= 1
                left += costs[w]
        words = [w for w, c in counts.items() for _ in range(c)]
        random.Random(order_seed).shuffle(words)
        return _render(FWE_INSTRUCTION, words, question)

    content, num_tokens = fitter.fit("fwe", length, build)
    answers = ranked[:k]
    return Sample(content, answers, " ".join(answers), num_tokens, meta={"num_fw": k})
