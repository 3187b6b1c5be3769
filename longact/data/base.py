"""The task registry and the record every task generator returns.

A task generator is a plain function registered under its task name::

    @TASKS.register("niah_single")
    def niah_single(fitter, rng, length, index, n, **opts) -> Sample: ...

It gets a ``Fitter`` (token counting for the target tokenizer), a ``random.Random``
seeded for this very sample, the target prompt length in tokens, the sample's index and
the number of samples (to spread needle depths), and task options. Unknown options are
an error (``check_opts``), so a typo does not silently fall back to a default.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from longact.registry import Registry


@dataclass
class Sample:
    """One generated prompt and its answer."""

    content: str
    """The user message (instruction, context, question at the end)."""
    answers: list[str]
    """Ground-truth references the reward looks for."""
    target: str
    """The ideal response, in the format the reward expects (for supervised warm-up)."""
    num_tokens: int
    """Prompt length in tokens (chat template + generation prompt)."""
    depth: float | None = None
    """Relative position of the (first queried) needle in the context, 0..1."""
    meta: dict = field(default_factory=dict)
    """Task-specific extras copied into ``extra_info``."""


TASKS: Registry = Registry("task")
ABILITY = {
    "niah_single": "retrieval",
    "niah_multikey": "retrieval",
    "niah_multivalue": "retrieval",
    "niah_multiquery": "retrieval",
    "vt": "multi_hop_tracing",
    "cwe": "aggregation",
    "fwe": "aggregation",
    "qa": "question_answering",
    "mcq": "multiple_choice",
}


# Options of each task and their defaults (``longact data list`` prints them).
OPTIONS = {
    "niah_single": {"value_digits": 4},
    "niah_multikey": {"value_digits": 4, "num_keys": 4},
    "niah_multivalue": {"value_digits": 4, "num_values": 4},
    "niah_multiquery": {"value_digits": 4, "num_queries": 4},
    "vt": {"num_chains": 1, "num_hops": 4, "value_digits": 4},
    "cwe": {"num_cw": 5},
    "fwe": {"num_fw": 3, "alpha": 2.0},
    "qa": {"value_digits": 4},
    "mcq": {"value_digits": 4},
}


def check_opts(task: str, opts: dict) -> dict:
    """Merge ``opts`` over the task's defaults in ``OPTIONS``; unknown keys raise."""
    allowed = OPTIONS.get(task, {})
    unknown = sorted(set(opts) - set(allowed))
    if unknown:
        raise ValueError(
            f"task {task!r}: unknown option(s) {', '.join(unknown)}; "
            f"valid: {', '.join(sorted(allowed)) or 'none'}"
        )
    merged = {**allowed, **opts}
    for k, v in merged.items():
        try:
            merged[k] = type(allowed[k])(v)  # "6" from the command line -> 6
        except (TypeError, ValueError):
            raise ValueError(
                f"task {task!r}: option {k}={v!r} is not a valid {type(allowed[k]).__name__}"
            ) from None
    return merged
