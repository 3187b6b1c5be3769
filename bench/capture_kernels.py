"""Micro-benchmark: the two ways ``ChannelStats.update_`` reduces one activation.

    python -m bench.capture_kernels            # on CUDA if present, else the CPU

Times ``_update_chunked`` (float64 copies of token chunks; the CPU path, and what every
device used before) against ``_update_fused`` (float32 block norms read straight from
bf16 activations, float64 across blocks; the accelerator path) at q/k activation shapes,
with and without a token mask, for all three fields and for ``sum_abs`` alone (what the
training runtime accumulates for the default ``mean_abs`` score). Prints one line per
case with both times and their largest relative difference. Results of a run on an H100
are in docs/bench/gpu/NOTES.md.
"""

from __future__ import annotations

import time

import torch

from bench.common import sync
from longact.core.stats import FIELDS, ChannelStats

CASES = ((4096, 1024), (32768, 1024), (32768, 4096))  # (tokens, channels)


def _time(update, x, keep, fields, reps: int, device: str) -> tuple[float, ChannelStats]:
    """Seconds per ``update(stats, x, keep, fields)`` call (after 3 warm-up calls) and the
    statistics the timed calls accumulated."""
    for _ in range(3):
        update(ChannelStats.zeros(x.shape[1], device), x, keep, fields)
    out = ChannelStats.zeros(x.shape[1], device)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        update(out, x, keep, fields)
    sync(device)
    return (time.perf_counter() - t0) / reps, out


def main(reps: int = 50) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16
    every = frozenset(FIELDS) - {"count"}
    print(f"device {device}, activations {dtype}, {reps} calls per case")
    for tokens, channels in CASES:
        x = torch.randn(tokens, channels, device=device, dtype=dtype) * 3  # (T, C)
        for keep in (None, torch.ones(tokens, dtype=torch.bool, device=device)):
            for fields in (every, frozenset({"sum_abs"})):
                t_c, a = _time(ChannelStats._update_chunked, x, keep, fields, reps, device)
                t_f, b = _time(ChannelStats._update_fused, x, keep, fields, reps, device)
                diff = max(
                    float(((getattr(a, f) - getattr(b, f)).abs() / getattr(a, f).abs()).max())
                    for f in fields
                )
                print(
                    f"T={tokens} C={channels} mask={keep is not None} fields={sorted(fields)}: "
                    f"chunked {1e3 * t_c:.3f} ms, fused {1e3 * t_f:.3f} ms "
                    f"({t_c / t_f:.1f}x), max rel diff {diff:.1e}"
                )


if __name__ == "__main__":
    main()
