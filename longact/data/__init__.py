"""LongAct data: synthetic long-context tasks (RULER-style) and a LongBench v2 reader.

``make_dataset``, ``write_parquet``, ``read_parquet``, ``to_sft_rows`` and ``TASKS`` are
loaded lazily from ``longact.data.tasks`` so that ``from longact.data import vocab``
stays cheap.
"""

_LAZY = ("TASKS", "make_dataset", "write_parquet", "read_parquet", "to_sft_rows")


def __getattr__(name):
    if name in _LAZY:
        from longact.data import tasks

        return getattr(tasks, name)
    raise AttributeError(f"module 'longact.data' has no attribute {name!r}")
