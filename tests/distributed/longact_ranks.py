"""Helpers for tests that run several ranks in one process (threads) against a coordinator."""

from __future__ import annotations

import threading
import uuid


def new_run_id() -> str:
    return uuid.uuid4().hex[:8]


def run_ranks(fn, n: int, timeout: float = 120.0, what: str = "a rank") -> list:
    """``fn(rank)`` on ``n`` threads at once (ranks that block on each other at a
    refresh); returns each rank's result or the exception it raised. A thread still
    blocked after ``timeout`` s fails the test."""
    out: list = [None] * n

    def body(r: int) -> None:
        try:
            out[r] = fn(r)
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            out[r] = e

    threads = [threading.Thread(target=body, args=(r,), daemon=True) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), f"{what} was still blocked after {timeout:g} s"
    return out


def bounded(fn, timeout: float, what: str):
    """``fn()`` under a watchdog: its result, or the exception it raised; a call still
    blocked after ``timeout`` s fails the test instead of hanging it."""
    (out,) = run_ranks(lambda _: fn(), 1, timeout, what)
    if isinstance(out, BaseException):
        raise out
    return out
