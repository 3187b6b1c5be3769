"""LongAct eval: accuracy vs context length on the synthetic tasks and LongBench v2.

``evaluate`` is loaded lazily from ``longact.eval.runner``.
"""


def __getattr__(name):
    if name in ("evaluate", "EvalError"):
        from longact.eval import runner as module

        return getattr(module, name)
    raise AttributeError(f"module 'longact.eval' has no attribute {name!r}")
