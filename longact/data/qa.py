"""Document QA over synthetic fact documents: ``qa`` (short answer) and ``mcq`` (4 options).

Each document is about one key and states three facts about it, mixed with filler::

    Document about amber. <filler> its color is red. <filler> its code is 4821. ...

The gold document sits at a depth spread evenly over the samples among distractor
documents about other keys (which state the same kinds of facts with other values), so
the question can only be answered by finding the right document. ``qa`` prompt::

    Answer the question based on the documents.
    Document about amber. ... Document about cedar. ...
    What is the color of amber?

and the expected response is the value alone (``red``); scored "any" (RULER's QA
metric). ``mcq`` builds a record in LongBench v2's schema (``_id, domain, sub_domain,
difficulty, length, question, choice_A..D, answer, context``) and LongBench v2's prompt
(``longact.data.longbench.build_prompt``); the expected response is
``The correct answer is (B)``. ``hard`` records (odd indices) put the three wrong choices
in distractor documents as values of the same attribute; ``easy`` ones never mention them.

Departures: RULER's QA uses SQuAD / HotpotQA paragraphs; ours are generated so every
word is in the tiny tokenizer and the answer is checkable. The documents of an ``mcq``
record are ours, not LongBench's; the ``length`` class uses LongBench's word thresholds.
"""

from __future__ import annotations

import hashlib
import random

from longact.data import longbench, vocab
from longact.data.base import TASKS, Sample, check_opts
from longact.data.fit import Fitter, distinct_numbers, insert_at, spread

INSTRUCTION = "Answer the question based on the documents."


def _words(text: str) -> list[str]:
    return text.split()


ATTRIBUTES = {
    "color": _words("red orange yellow green blue purple pink brown black white gray gold"),
    "picture": _words("circle square triangle diamond heart spade club crown sword shield ring"),
    "music": _words("bell drum flute harp piano violin guitar"),
    "place": _words("north south east west"),
    "season": _words("spring summer autumn winter"),
    "code": [],  # numbers of value_digits digits
}
MCQ_ATTRIBUTES = ["color", "picture", "music", "code"]  # enough values for 4 choices
FACTS_PER_DOC = 3


def _value(rng: random.Random, attr: str, digits: int, exclude=()) -> str:
    if attr == "code":
        while True:
            (v,) = distinct_numbers(rng, 1, digits)
            if v not in exclude:
                return v
    return rng.choice([v for v in ATTRIBUTES[attr] if v not in exclude])


def _documents(rng, gold_attr, digits, exclude=()):
    """One (key, {attr: value}) per key, in random order; the first is the gold one."""
    keys = rng.sample(vocab.KEYS, len(vocab.KEYS))
    docs = []
    for i, key in enumerate(keys):
        others = [a for a in ATTRIBUTES if a != gold_attr]
        attrs = rng.sample(others, FACTS_PER_DOC - 1) + [gold_attr]
        if i > 0 and rng.random() < 0.5:  # half the distractors skip the asked attribute
            attrs[-1] = rng.choice([a for a in others if a not in attrs])
        rng.shuffle(attrs)
        facts = {a: _value(rng, a, digits, exclude if a == gold_attr else ()) for a in attrs}
        docs.append((key, facts))
    return docs


def _doc_builder(fitter: Fitter, rng: random.Random, docs, gold_depth: float):
    """``build(budget)`` -> the documents' text: more documents and filler as budget grows."""
    pieces = [
        (f"\nDocument about {key}.", [f" its {a} is {v}." for a, v in facts.items()])
        for key, facts in docs
    ]
    costs = [sum(fitter.costs([h, *fs])) for h, fs in pieces]
    fact_depths = [[rng.random() for _ in fs] for _, fs in pieces]
    filler_seed = rng.getrandbits(64)

    def build(budget: int) -> str:
        frng = random.Random(filler_seed)
        m, used = 2, 0
        while m < len(pieces) and used + costs[m] <= budget // 2:  # about half in documents
            used += costs[m]
            m += 1
        order = list(range(1, m))
        order.insert(round(gold_depth * (m - 1)), 0)
        filler = fitter.filler(frng, budget - used)
        chunk = -(-len(filler) // m) if filler else 0
        text = []
        for slot, d in enumerate(order):
            header, facts = pieces[d]
            part = filler[slot * chunk : (slot + 1) * chunk]
            text.append(header + "".join(insert_at(part, list(zip(fact_depths[d], facts)))))
        return "".join(text)

    return build


@TASKS.register("qa")
def qa(fitter: Fitter, rng: random.Random, length: int, index: int, n: int, **opts) -> Sample:
    """Short-answer question about one fact of the gold document."""
    o = check_opts("qa", opts)
    attr = rng.choice(list(ATTRIBUTES))
    docs = _documents(rng, attr, o["value_digits"])
    key, answer = docs[0][0], docs[0][1][attr]
    depth = spread(index, n)
    build_docs = _doc_builder(fitter, rng, docs, depth)
    question = f"What is the {attr} of {key}?"
    content, num_tokens = fitter.fit(
        "qa", length, lambda b: f"{INSTRUCTION}{build_docs(b)}\n{question}"
    )
    return Sample(content, [answer], answer, num_tokens, depth, {"key": key, "attribute": attr})


@TASKS.register("mcq")
def mcq(fitter: Fitter, rng: random.Random, length: int, index: int, n: int, **opts) -> Sample:
    """Four-option question in LongBench v2's schema and prompt."""
    o = check_opts("mcq", opts)
    attr = rng.choice(MCQ_ATTRIBUTES)
    hard = index % 2 == 1
    gold = _value(rng, attr, o["value_digits"])
    wrong: list[str] = []
    while len(wrong) < 3:
        v = _value(rng, attr, o["value_digits"], exclude=[gold, *wrong])
        wrong.append(v)
    docs = _documents(rng, attr, o["value_digits"], exclude=[] if hard else [gold, *wrong])
    docs[0][1][attr] = gold
    if hard:  # the wrong choices are facts of the nearest distractor documents
        for (_, facts), v in zip(docs[1:4], wrong):
            facts[attr] = v
    key = docs[0][0]
    choices = wrong[:]
    letter = "ABCD"[rng.randrange(4)]
    choices.insert("ABCD".index(letter), gold)
    depth = spread(index, n)
    build_docs = _doc_builder(fitter, rng, docs, depth)
    _id = hashlib.sha1(f"{key}:{attr}:{gold}:{rng.random()}".encode()).hexdigest()[:24]
    record = {
        "_id": _id,
        "domain": "Multi-Document QA",
        "sub_domain": "Synthetic facts",
        "difficulty": "hard" if hard else "easy",
        "length": "short",
        "question": f"What is the {attr} of {key}?",
        **{f"choice_{c}": v for c, v in zip("ABCD", choices)},
        "answer": letter,
        "context": "",
    }
    content, num_tokens = fitter.fit(
        "mcq", length, lambda b: longbench.build_prompt(record, build_docs(b))
    )
    context = longbench.context_of(content)
    record["length"] = longbench.length_class(len(context.split()))
    meta = {k: v for k, v in record.items() if k != "context"}
    target = f"The correct answer is ({letter})"
    return Sample(content, [letter], target, num_tokens, depth, {"longbench": meta})
