"""Rule-based rewards for the long-context tasks, in verl's custom-reward signature.

``compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs)`` is
what verl's reward managers call (``reward.custom_reward_function.path`` pointing at this
file or ``longact/rewards/__init__.py``, ``name=compute_score``). It is synchronous:
verl's ``naive`` and ``dapo`` managers run a sync function in an executor. It returns a
dict with the same keys every time (verl stacks them per sample): ``score`` (the
reward), ``acc`` (the same number; DAPO's dynamic sampling filters on it) and ``recall``
(RULER's metric, without the guard below). The ``dapo`` manager adds its overlong
penalty on top of ``score``; nothing here depends on response length in tokens.

The scorer is picked by ``data_source`` in ``SCORERS``:

- ``all`` (RULER "string_match_all"): fraction of references found in the response;
- ``any`` (RULER "string_match_part", QA): 1 if any reference is found;
- ``mc`` (LongBench v2): the letter parsed from "The correct answer is (X)", with
  LongBench's fallback "The correct answer is X" and ours: a single "(X)" or a bare "X".

Matching is case-insensitive. Deliberate departures from RULER, both for RL:

- a reference must match a whole token: ``1234`` is not found inside ``12345`` nor
  ``red`` inside ``ordered`` (RULER's plain substring test would credit both);
- with ``strict=True`` (default) a response that lists more distinct candidate items
  (numbers when the references are numbers, otherwise words other than a few glue
  words) than there are references is scaled by ``references / items``: dumping every
  number of the context must not earn the reward. Set ``strict: false`` in
  ``reward.custom_reward_function.reward_kwargs`` for the bare RULER metric.

The chat end token (``<|im_end|>``), ``<|endoftext|>`` and a Qwen3 ``<think>...</think>``
block are removed first. Unknown data sources go to verl's ``default_compute_score``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

from longact.registry import Registry

Scorer = Callable[[str, list[str], bool], tuple[float, float]]
SCORERS: Registry[Scorer] = Registry("reward data_source")
END_TOKENS = ("<|im_end|>", "<|endoftext|>", "</s>", "<|eot_id|>")
GLUE_WORDS = {"the", "a", "an", "is", "are", "and", "answer", "of", "for", "to", "it", "they"}


def clean_response(solution_str) -> str:
    """The response text: decoded, end tokens and a thinking block removed."""
    if solution_str is None:
        return ""
    if isinstance(solution_str, bytes):
        solution_str = solution_str.decode("utf-8", errors="replace")
    text = str(solution_str)
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    for tok in END_TOKENS:  # everything after the end of the turn is padding
        text = text.split(tok, 1)[0]
    return text.strip()


def parse_references(ground_truth) -> list[str]:
    """References from a list / array / tuple, a JSON list string, or one plain string."""
    if ground_truth is None:
        return []
    if isinstance(ground_truth, str):
        s = ground_truth.strip()
        if s.startswith("["):
            try:
                loaded = json.loads(s)
            except json.JSONDecodeError:
                loaded = None
            if isinstance(loaded, list):
                return [str(x).strip() for x in loaded if str(x).strip()]
        return [s] if s else []
    if hasattr(ground_truth, "tolist"):
        ground_truth = ground_truth.tolist()
    if isinstance(ground_truth, (list, tuple)):
        return [str(x).strip() for x in ground_truth if str(x).strip()]
    return [str(ground_truth).strip()]


def found(ref: str, text: str) -> bool:
    """Case-insensitive match of ``ref`` in ``text`` as a whole token."""
    left = r"(?<![A-Za-z0-9])" if ref[:1].isalnum() else ""
    right = r"(?![A-Za-z0-9])" if ref[-1:].isalnum() else ""
    return re.search(left + re.escape(ref) + right, text, re.IGNORECASE) is not None


def candidate_items(text: str, numeric: bool) -> set[str]:
    """Distinct answer-like items of a response: numbers, or non-glue words."""
    if numeric:
        return set(re.findall(r"\d+", text))
    return {w for w in re.findall(r"[A-Za-z]+", text.lower()) if w not in GLUE_WORDS}


def _guard(text: str, refs: list[str], allowed: int) -> float:
    numeric = all(r.isdigit() for r in refs)
    items = candidate_items(text, numeric)
    return min(1.0, allowed / len(items)) if items else 1.0


@SCORERS.register("all")
def score_all(text: str, refs: list[str], strict: bool = True) -> tuple[float, float]:
    """Fraction of references found; ``(score, recall)``."""
    if not refs or not text:
        return 0.0, 0.0
    recall = sum(found(r, text) for r in refs) / len(refs)
    return (recall * _guard(text, refs, len(refs)) if strict else recall), recall


@SCORERS.register("any")
def score_any(text: str, refs: list[str], strict: bool = True) -> tuple[float, float]:
    """1 if any reference is found; ``(score, recall)``."""
    if not refs or not text:
        return 0.0, 0.0
    hit = float(any(found(r, text) for r in refs))
    allowed = max(len(r.split()) for r in refs)
    return (hit * _guard(text, refs, allowed) if strict else hit), hit


MC_PATTERNS = [r"The correct answer is \(([A-D])\)", r"The correct answer is ([A-D])\b"]


def extract_choice(text: str) -> str | None:
    """The option letter of a multiple-choice response, or None."""
    text = text.replace("*", "")
    for pattern in MC_PATTERNS:  # LongBench v2's own two patterns, in its order
        m = re.search(pattern, text)
        if m:
            return m.group(1)
    letters = set(re.findall(r"\(([A-D])\)", text))
    if len(letters) == 1:
        return letters.pop()
    m = re.fullmatch(r"\s*\(?([A-D])\)?\.?\s*", text)
    return m.group(1) if m else None


@SCORERS.register("mc")
def score_mc(text: str, refs: list[str], strict: bool = True) -> tuple[float, float]:
    """1 if the parsed letter is the reference letter; ``(score, recall)``."""
    pred = extract_choice(text)
    hit = float(pred is not None and bool(refs) and pred.upper() == refs[0].strip().upper())
    return hit, hit


DATA_SOURCES = {
    **{
        f"longact/{t}": "all"
        for t in ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery")
    },
    "longact/vt": "all",
    "longact/cwe": "all",
    "longact/fwe": "all",
    "longact/qa": "any",
    "longact/mcq": "mc",
    "longbench_v2": "mc",
}


def compute_score(
    data_source: str,
    solution_str,
    ground_truth,
    extra_info: dict | None = None,
    strict: bool = True,
    **kwargs,
) -> dict:
    """verl custom reward: ``{"score", "acc", "recall"}`` for one response."""
    if data_source not in DATA_SOURCES:
        return _fallback(data_source, solution_str, ground_truth, extra_info, **kwargs)
    scorer = SCORERS.get(DATA_SOURCES[data_source])
    score, recall = scorer(clean_response(solution_str), parse_references(ground_truth), strict)
    return {"score": float(score), "acc": float(score), "recall": float(recall)}


def _fallback(data_source, solution_str, ground_truth, extra_info, **kwargs) -> dict:
    """verl's own scorers (gsm8k, math, ...) for data sources that are not ours."""
    try:
        from verl.utils.reward_score import default_compute_score

        result = default_compute_score(data_source, solution_str, ground_truth, extra_info)
    except NotImplementedError:
        raise ValueError(
            f"unknown reward data_source {data_source!r}; valid: {', '.join(sorted(DATA_SOURCES))}"
            " (or one of verl's default_compute_score sources)"
        ) from None
    score = float(result["score"] if isinstance(result, dict) else result)
    return {"score": score, "acc": score, "recall": score}
