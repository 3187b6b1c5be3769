"""Figure 4: the saliency coordinator's refresh latency and memory at 2, 8 and 32 ranks.

Every simulated rank holds Qwen3-8B-sized statistics (36 layers, q 4096 and k 1024
channels, float64, random values) and, at a refresh, does what ``LongActRuntime._refresh``
does: ``stats.state_dict()`` then ``ray.get(coordinator.exchange.remote(rank, step, sd))``.

- ``ray`` mode: a local Ray cluster; the coordinator is the real named actor from
  ``create``; ranks are threads inside ``procs`` Ray actor processes (rank r in
  process r % procs; 32 torch processes would not fit next to other jobs on this machine).
  All ranks start at the same wall-clock instant; each records the time it starts sending
  and the time its exchange returns. Latency = max(return) - min(send), median over
  ``reps`` refreshes after one warm-up refresh. The coordinator actor's RSS (psutil) is
  read before the first refresh and after the last, with its peak (VmHWM).
- ``inprocess`` mode: ``SaliencyCoordinator`` in this process, all ranks as coroutines
  (no serialization, no transport): the coordinator's own compute.

Two payloads, alternating (ABBA) on the same coordinator: ``dict`` =
``QKStats.state_dict()`` (what ``LongActRuntime`` sent before: 288 tensors at 8B, pickled
one by one), ``flat`` = ``coordinator.stats_payload(stats)`` (the same float64 numbers
as one vector per field, ``QKStats.to_fields``) and ``score`` = the flat form with only
the fields the default score needs (count and sum_abs, ``payload_fields("mean_abs")``),
which is what ``LongActRuntime`` sends now.

On 2 cores every sender, the coordinator and Ray's transport share the same CPUs: a real
cluster sends in parallel from separate hosts, so these latencies are upper bounds.
The bytes per refresh at 8B, 32B and 70B shapes are computed from shapes.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from bench.common import SHAPES, abba, figure, fmt_s, goal, human_bytes, rss_bytes, summarize
from bench.memory import stats_bytes
from longact.core.arch import QKLayout
from longact.core.masks import MaskSet
from longact.core.stats import ChannelStats, QKStats
from longact.distributed.coordinator import SaliencyCoordinator

CONFIG = {"ratio": 0.3, "policy": "topk", "score": "mean_abs", "ema": 0.0}
PAYLOADS = {
    "dict": "state_dict",
    "flat": "flat, all 4 fields",
    "score": "flat, score's fields (runtime)",
    "flat_put": "flat score's fields, put in advance",
}


def fake_stats(layout: QKLayout, rank: int, tokens: int = 32768) -> QKStats:
    """Plausible random statistics of ``tokens`` tokens for one rank."""
    g = torch.Generator().manual_seed(1000 + rank)
    entries = {}
    for key, c in layout.row_counts().items():
        mean = torch.rand(c, generator=g, dtype=torch.float64) + 0.1
        entries[key] = ChannelStats(
            torch.tensor(float(tokens), dtype=torch.float64),
            sum_abs=mean * tokens,
            sum_sq=mean.square() * 1.5 * tokens,
            max_abs=mean * 4,
        )
    return QKStats(entries)


def wire(stats: QKStats, fmt: str) -> dict[str, Any]:
    """What a rank sends: ``state_dict()`` (the old runtime) or the flat form (today's)."""
    if fmt == "dict":
        return stats.state_dict()
    from longact.distributed.coordinator import payload_fields, stats_payload

    if fmt == "score":  # what LongActRuntime sends for the default score, mean_abs
        return stats_payload(stats, payload_fields("mean_abs"))
    return stats_payload(stats)


# ---- in-process --------------------------------------------------------------------------
def inprocess_latency(layout: QKLayout, ranks: int, reps: int, fmt: str) -> dict[str, Any]:
    coord = SaliencyCoordinator(CONFIG, layout, ranks)
    stats = [fake_stats(layout, r) for r in range(ranks)]

    async def one(r: int, step: int) -> None:
        payload = await coord.exchange(r, step, wire(stats[r], fmt))
        MaskSet.from_state_dict(payload["masks"])  # the rank installs the masks

    async def refresh(step: int) -> float:
        t0 = time.perf_counter()
        await asyncio.gather(*(one(r, step) for r in range(ranks)))
        return time.perf_counter() - t0

    lat = [asyncio.run(refresh(step)) for step in range(1, reps + 2)][1:]  # drop warm-up
    return {"latency_s": lat, "summary": summarize(lat)}


# ---- Ray -----------------------------------------------------------------------------------
def _actor_pid(self) -> int:
    return os.getpid()


def proc_memory(pid: int) -> dict[str, int]:
    """RSS and peak RSS (VmHWM) of a local process, in bytes."""
    out = {"rss": rss_bytes(pid), "peak": 0}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    out["peak"] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


def _named_coordinator(run_id: str, config: dict, layout, n: int):
    """The coordinator as a training run has it: ``create`` with the run's config."""
    from longact.config import LongActConfig
    from longact.distributed.coordinator import create

    return create(LongActConfig.from_dict({**config, "run_id": run_id}), layout, n)


class RankGroup:
    """Several simulated ranks in one process (each refresh: one thread per rank)."""

    def __init__(self, layout: QKLayout):
        self.layout = layout
        self.stats: dict[int, QKStats] = {}

    def prepare(self, ranks: list[int]) -> int:
        for r in ranks:
            if r not in self.stats:
                self.stats[r] = fake_stats(self.layout, r)
        return len(self.stats)

    def refresh(self, coord, ranks: list[int], step: int, t_start: float, fmt: str) -> list[tuple]:
        import ray

        out: list[tuple] = []
        lock = threading.Lock()

        def one(r: int) -> None:
            put_s, arg = 0.0, None
            if fmt == "flat_put":  # serialize into the object store before the clock starts
                t0 = time.perf_counter()
                arg = ray.put(wire(self.stats[r], "score"))
                put_s = time.perf_counter() - t0
            time.sleep(max(0.0, t_start - time.time()))
            t_send = time.time()
            if arg is None:
                arg = wire(self.stats[r], fmt)
            payload = ray.get(coord.exchange.remote(r, step, arg))
            MaskSet.from_state_dict(payload["masks"])  # the rank installs the masks
            t_ret = time.time()
            with lock:
                out.append((r, t_send, t_ret, payload["version"], payload["metrics"], put_s))

        threads = [threading.Thread(target=one, args=(r,)) for r in ranks]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return out


def ray_latency(
    layout: QKLayout,
    rank_counts: tuple[int, ...],
    reps: int,
    procs: int,
    formats: tuple[str, ...] = ("dict", "flat"),
    factory: Any = None,
    log=print,
) -> dict[int, dict[str, Any]]:
    """{ranks: {fmt: {...latency...}, "rss_before": .., ...}}; formats alternate ABBA on
    one coordinator per rank count. ``factory(run_id, config, layout, n)`` makes the
    coordinator actor (default: the run's named actor, as ``longact-train`` makes it)."""
    import ray

    factory = factory or _named_coordinator
    started = not ray.is_initialized()
    if started:
        # the rank actors unpickle bench.coordinator.RankGroup: the repo root must be
        # importable in Ray's workers, which inherit this environment
        root = str(Path(__file__).resolve().parents[1])
        paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        os.environ["PYTHONPATH"] = os.pathsep.join([root, *paths])
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
            object_store_memory=1 << 30,
        )
    results: dict[int, dict[str, Any]] = {}
    try:
        top = max(rank_counts)
        n_groups = min(procs, top)
        group_cls = ray.remote(num_cpus=0, max_concurrency=top + 4)(RankGroup)
        groups = [group_cls.remote(layout) for _ in range(n_groups)]
        ray.get(
            [
                g.prepare.remote([r for r in range(top) if r % n_groups == i])
                for i, g in enumerate(groups)
            ]
        )
        for n in rank_counts:
            coord = factory(f"bench_{uuid.uuid4().hex[:8]}", CONFIG, layout, n)
            pid = ray.get(coord.__ray_call__.remote(_actor_pid))
            mem0 = proc_memory(pid)
            per_group = [[r for r in range(n) if r % n_groups == i] for i in range(n_groups)]
            out: dict[str, Any] = {
                f: {"latency_s": [], "internal_s": [], "put_s": []} for f in formats
            }
            order = list(formats) + abba(list(formats), reps)  # one warm-up each first
            for step, fmt in enumerate(order, start=1):
                t_start = time.time() + 0.3
                refs = [
                    g.refresh.remote(coord, ranks, step, t_start, fmt)
                    for g, ranks in zip(groups, per_group)
                    if ranks
                ]
                rows = [row for part in ray.get(refs) for row in part]
                assert len(rows) == n and len({row[3] for row in rows}) == 1
                latency = max(row[2] for row in rows) - min(row[1] for row in rows)
                warm = step <= len(formats)
                if not warm:
                    out[fmt]["latency_s"].append(latency)
                    out[fmt]["internal_s"].append(rows[0][4]["longact/refresh_s"])
                    out[fmt]["put_s"] += [row[5] for row in rows]
                log(
                    f"  ray, {n} ranks, {fmt} payload: {1000 * latency:.1f} ms"
                    + (" (warm-up)" if warm else "")
                )
            mem1 = proc_memory(pid)
            ray.kill(coord)
            for f in formats:
                out[f]["summary"] = summarize(out[f]["latency_s"])
                out[f]["internal"] = summarize(out[f]["internal_s"])
                out[f]["put"] = summarize(out[f]["put_s"])
            out.update(rss_before=mem0["rss"], rss_after=mem1["rss"], rss_peak=mem1["peak"])
            results[n] = out
        for g in groups:
            ray.kill(g)
    finally:
        if started:
            ray.shutdown()
    return results


# ---- bytes ---------------------------------------------------------------------------------
def refresh_bytes(
    layout: QKLayout, ranks: int, elem_bytes: int = 8, vectors: int = 3
) -> dict[str, int]:
    """Payload of one refresh: statistics in from every rank (per key a count and
    ``vectors`` (C,) vectors: 3 for every field, 1 for the score's fields the runtime
    sends), the bit-packed mask set out to every rank (1 bit per W_Q/W_K row); headers
    not counted."""
    per_rank = stats_bytes(layout, elem_bytes, vectors)
    mask = -(-sum(layout.row_counts().values()) // 8)
    return {
        "stats_per_rank": per_rank,
        "mask_per_rank": mask,
        "total": ranks * (per_rank + mask),
    }


def run(
    rank_counts: tuple[int, ...] = (2, 8, 32),
    reps: int = 5,
    procs: int = 8,
    layout: QKLayout | None = None,
    use_ray: bool = True,
    formats: tuple[str, ...] = ("dict", "flat", "score", "flat_put"),
    log=print,
) -> dict[str, Any]:
    layout = layout or SHAPES["8B"].layout
    fig = figure(
        "coordinator",
        f"4. Coordinator refresh at Qwen3-8B statistics ({layout.num_layers} layers, "
        f"q {layout.rows('q')} + k {layout.rows('k')} channels, float64)",
        [
            "ranks",
            "payload",
            "latency, Ray (first send -> all ranks hold mask)",
            "coordinator-internal (Ray)",
            "in-process (no transport)",
            "coordinator RSS before -> after (peak)",
        ],
    )
    inproc: dict[int, dict[str, Any]] = {}
    local = [f for f in formats if f != "flat_put"]  # in-process, put == score
    for n in rank_counts:
        inproc[n] = {f: inprocess_latency(layout, n, reps, f) for f in local}
        log(
            f"  in-process, {n} ranks: "
            + ", ".join(f"{f} {1000 * inproc[n][f]['summary']['median']:.1f} ms" for f in local)
        )
    viaray = ray_latency(layout, rank_counts, reps, procs, formats, log=log) if use_ray else {}
    for n in rank_counts:
        r = viaray.get(n)
        for f in formats:
            mem, lat = "n/a", "not run"
            if r is not None:
                mem = (
                    f"{human_bytes(r['rss_before'])} -> {human_bytes(r['rss_after'])} "
                    f"({human_bytes(r['rss_peak'])})"
                )
                lat = fmt_s(r[f]["summary"], "ms", 1000)
                if f == "flat_put":
                    lat += f"; put {1000 * r[f]['put']['median']:.1f} ms/rank"
            fig["rows"].append(
                [
                    n,
                    PAYLOADS[f],
                    lat,
                    fmt_s(r[f]["internal"], "ms", 1000) if r else "not run",
                    fmt_s(inproc[n][f]["summary"], "ms", 1000) if f in inproc[n] else "= score",
                    mem,
                ]
            )
    top = max(rank_counts)
    if top in viaray:
        for f in formats:
            r = viaray[top][f]
            ms = 1000 * r["summary"]["median"]
            label = f"refresh latency, {top} ranks, {PAYLOADS[f]} payload (ms)"
            if f == "flat_put":  # on a cluster every rank serializes at once, on its host
                ms += 1000 * viaray[min(rank_counts)][f]["put"]["median"]
                label = f"refresh latency, {top} ranks, score's fields, senders in parallel (ms)"
            fig["goals"].append(goal(label, ms, 100.0, "{:.1f}"))
    fig["raw"] = {
        "inprocess": inproc,
        "ray": viaray,
        "layout": {"keys": len(layout), "rows_q": layout.rows("q"), "rows_k": layout.rows("k")},
    }
    bytes_rows = []
    for key, shape in SHAPES.items():
        b64 = refresh_bytes(shape.layout, top)
        score = refresh_bytes(shape.layout, top, vectors=1)
        b32 = refresh_bytes(shape.layout, top, elem_bytes=4, vectors=1)
        bytes_rows.append(
            [
                shape.name,
                human_bytes(b64["stats_per_rank"]),
                human_bytes(score["stats_per_rank"]),
                human_bytes(b64["mask_per_rank"]),
                human_bytes(b64["total"]),
                human_bytes(score["total"]),
                human_bytes(b32["total"]),
            ]
        )
        fig["raw"][f"bytes_{key}"] = {"all_fields": b64, "score_fields": score, "fp32": b32}
    fig["extra_tables"] = [
        {
            "title": f"Bytes per refresh, {top} ranks (stats in from each, mask out to each)",
            "columns": [
                "model",
                "stats / rank, all fields (fp64)",
                "stats / rank, score's fields (fp64, what the runtime sends)",
                "mask / rank (bit-packed)",
                f"total, {top} ranks (all fields)",
                f"total, {top} ranks (score's fields)",
                f"total, {top} ranks (score's fields, if fp32)",
            ],
            "rows": bytes_rows,
        }
    ]
    g = min(procs, top)
    fig["notes"] += [
        f"Ray: ranks are threads in {g} actor processes (rank r in process r % {g}), on the "
        "same 2 cores as the coordinator and Ray itself; a cluster sends from separate hosts "
        "in parallel, so these are upper bounds. Latency includes each rank building its "
        "payload, serialization, the merge, mask building, the return to every rank and "
        "MaskSet.from_state_dict on it.",
        "Payloads: 'state_dict' = QKStats.state_dict() (288 tensors, still accepted); "
        "'flat, all 4 fields' = coordinator.stats_payload(stats) (one float64 numpy vector "
        "per field, same numbers; 4.22 MiB per rank at 8B); 'score's fields' = the flat form "
        "with count and sum_abs only (payload_fields('mean_abs'), 1.41 MiB per rank; what "
        "LongActRuntime sends now, the masks are the same).",
        "'put in advance': each rank serializes its payload into Ray's object store "
        "(ray.put, timed: 'put') before the clock starts and sends the reference, so the "
        f"{top} serializations do not queue on 2 cores; its goal row adds one rank's put "
        f"time measured at {min(rank_counts)} ranks (little contention): what a cluster pays, "
        "the ranks serializing in parallel on their own hosts.",
        "'coordinator-internal' is the coordinator's longact/refresh_s (first partial in -> "
        f"masks published). Median [min-max] over {reps} refreshes per payload, ABBA, after "
        "one warm-up refresh each.",
    ]
    return fig
