"""Fit a synthetic prompt to an exact token budget, fast.

The target length of a sample is the length in tokens of its whole prompt as the model
sees it: the chat template applied to ``[{"role": "user", "content": ...}]`` with the
generation prompt. ``Fitter`` does the bookkeeping:

- filler sentences (lower-case words from ``longact.data.vocab``, with no digits and no
  word a task uses as a key, value or attribute) are generated once and tokenized once
  in a batch; a haystack is built by adding their token costs, then topped up with single
  words, so it is exact for tokenizers whose pre-tokenizer splits at spaces (the tiny
  tokenizer, GPT-2/Qwen-style byte-level BPE);
- ``fit`` measures the real prompt once and, when the additive estimate was off (other
  tokenizers, text joins that merge), corrects the budget and rebuilds, at most a few
  times. The result is within ``TOLERANCE`` (2%) of the target, and exact in practice.

Every text piece starts with a space (``" the old river."``) so pieces join without
merging tokens across the seam.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

from longact.data import vocab

TOLERANCE = 0.02
# Words kept out of the filler: they carry meaning in some task's question or answer.
RESERVED = set(vocab.KEYS + vocab.VALUES + vocab.VARIABLES) | {
    "number", "numbers", "answer", "question", "word", "words", "its", "color", "code",
    "music", "place", "season", "picture", "spring", "summer", "autumn", "winter",
}  # fmt: skip
FILLER_WORDS = [w for w in dict.fromkeys(vocab.FILLER) if w not in RESERVED]
POOL_SIZE = 2048


class TaskLengthError(ValueError):
    """The requested length is below what the task needs."""

    def __init__(self, task: str, length: int, minimum: int):
        self.task, self.length, self.minimum = task, length, minimum
        super().__init__(
            f"task {task!r} cannot fit in {length} tokens: it needs at least {minimum} "
            f"tokens with this tokenizer (ask for --length {minimum} or more)"
        )


def load_tokenizer(tokenizer):
    """A tokenizer object, a model/tokenizer directory, or ``"tiny"`` (the offline one)."""
    if not isinstance(tokenizer, (str, Path)):
        return tokenizer
    if str(tokenizer) == "tiny":
        from longact.models.tiny import build_tokenizer

        return build_tokenizer()
    path = Path(tokenizer)
    if not path.is_dir():
        raise ValueError(f"tokenizer directory {path} does not exist")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def filler_sentence(rng: random.Random) -> str:
    """One lower-case filler sentence with a leading space, e.g. ``" the old river."``."""
    return " " + " ".join(rng.choice(FILLER_WORDS) for _ in range(rng.randint(5, 12))) + "."


class Fitter:
    """Token counting and haystack filling for one tokenizer."""

    def __init__(self, tokenizer):
        self.tokenizer = load_tokenizer(tokenizer)
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template; prompts need one")
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:
            self._encode_batch = lambda texts: [
                e.ids for e in backend.encode_batch(texts, add_special_tokens=False)
            ]
        else:  # slow tokenizers
            self._encode_batch = lambda texts: self.tokenizer(texts, add_special_tokens=False)[
                "input_ids"
            ]
        self._costs: dict[str, int] = {}
        self.probe = False  # when set, ``fit`` raises TaskLengthError with the minimum
        rng = random.Random(0)
        self.pool = [filler_sentence(rng) for _ in range(POOL_SIZE)]
        self.pool_costs = self.costs(self.pool)
        words = [" " + w for w in FILLER_WORDS]
        word_costs = self.costs(words)
        self.unit_words = [w for w, c in zip(words, word_costs) if c == 1] or words[:1]

    # -- counting ---------------------------------------------------------------------
    def render(self, content: str) -> str:
        """The prompt text: chat template with the generation prompt."""
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )

    def count(self, content: str) -> int:
        """Prompt length in tokens of a user message ``content``."""
        return len(self._encode_batch([self.render(content)])[0])

    def costs(self, pieces: list[str]) -> list[int]:
        """Token cost of each text piece on its own (cached)."""
        todo = [p for p in dict.fromkeys(pieces) if p not in self._costs]
        if todo:
            for p, ids in zip(todo, self._encode_batch(todo)):
                self._costs[p] = len(ids)
        return [self._costs[p] for p in pieces]

    # -- filling ----------------------------------------------------------------------
    def filler(self, rng: random.Random, budget: int) -> list[str]:
        """Filler pieces whose summed cost is ``budget`` (whole sentences, then words)."""
        out: list[str] = []
        left = budget
        pool, costs = self.pool, self.pool_costs
        while left > 0:
            i = rng.randrange(len(pool))
            if costs[i] > left:
                break
            out.append(pool[i])
            left -= costs[i]
        if left > 0:
            out.append("".join(rng.choice(self.unit_words) for _ in range(left)))
        return out

    def fit(self, task: str, length: int, build: Callable[[int], str]) -> tuple[str, int]:
        """Find ``content = build(budget)`` whose prompt is ``length`` tokens (within 2%).

        ``build(0)`` must give the smallest prompt the task allows; a larger budget asks
        for about that many more tokens. Returns ``(content, prompt_tokens)``.
        """
        content = build(0)
        minimum = self.count(content)
        if minimum > length or self.probe:
            raise TaskLengthError(task, length, minimum)
        if minimum == length:
            return content, minimum
        budget = length - minimum
        best: tuple[int, str, int] | None = None
        for _ in range(6):
            content = build(budget)
            n = self.count(content)
            if n == length:
                return content, n
            if best is None or abs(n - length) < best[0]:
                best = (abs(n - length), content, n)
            budget = max(0, budget + length - n)
        if best is not None and best[0] <= TOLERANCE * length:
            return best[1], best[2]
        raise ValueError(f"task {task!r}: could not fit {length} tokens (closest: {best[2]})")


def insert_at(pieces: list[str], inserts: list[tuple[float, str]]) -> list[str]:
    """Insert texts between pieces at relative depths in [0, 1] (stable for ties)."""
    out = list(pieces)
    positions = [(round(d * len(pieces)), k, text) for k, (d, text) in enumerate(inserts)]
    for pos, _, text in sorted(positions, reverse=True):
        out.insert(pos, text)
    return out


def spread(index: int, n: int) -> float:
    """Depth of sample ``index`` of ``n``: evenly from 0 (start) to 1 (end)."""
    return 0.5 if n <= 1 else index / (n - 1)


def random_number(rng: random.Random, digits: int) -> str:
    """A ``digits``-long number with no leading zero."""
    if digits < 1:
        raise ValueError(f"value_digits must be at least 1, got {digits}")
    return str(rng.randint(10 ** (digits - 1) if digits > 1 else 0, 10**digits - 1))


def distinct_numbers(rng: random.Random, count: int, digits: int) -> list[str]:
    """``count`` different numbers of ``digits`` digits."""
    space = 10**digits - (10 ** (digits - 1) if digits > 1 else 0)
    if count > space:
        raise ValueError(f"cannot draw {count} distinct {digits}-digit values")
    seen: dict[str, None] = {}
    while len(seen) < count:
        seen.setdefault(random_number(rng, digits), None)
    return list(seen)
