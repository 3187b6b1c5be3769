"""Faults in the refresh path end in bounded time, with a clear error or the documented
recovery, never with a hang: non-finite statistics, an error inside a refresh, a rank
that never arrives, a coordinator that dies, never answers or never comes back,
node-local checkpoint folders, and a checkpoint write killed midway.

Every wait under test runs under a watchdog (``bounded``, ``run_ranks``): a hang fails
the test with a message naming the call, within a bound minutes above what the test
needs (no performance assertions)."""

from __future__ import annotations

import asyncio
import math
import subprocess
import sys
import time

import pytest
import torch
from longact_ranks import bounded, new_run_id, run_ranks
from longact_tiny import runtime_step, tiny_model

from longact.config import LongActConfig
from longact.core import QKLayout, QKStats
from longact.distributed.client import RefreshError
from longact.distributed.coordinator import SaliencyCoordinator
from longact.train.runtime import LongActRuntime, state_path

LAYOUT = QKLayout(num_layers=2, head_dim=4, num_attention_heads=4, num_key_value_heads=2)


def _partial(seed: int, poison: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    s = QKStats.empty(LAYOUT.row_counts())
    for key, rows in LAYOUT.row_counts().items():
        s.update(key, torch.randn(6, rows, generator=g) * (torch.arange(rows) + 1))
    sd = s.state_dict()
    if poison:  # one rank's forwards produced a NaN
        stats = QKStats.from_state_dict(sd)
        stats[(1, "k")].sum_abs[0] = math.nan
        sd = stats.state_dict()
    return sd


def _same_stats(a: dict, b: dict) -> bool:
    """Two ``QKStats.state_dict()``s hold the same numbers, bit for bit."""
    ea, eb = a["entries"], b["entries"]
    return ea.keys() == eb.keys() and all(
        torch.equal(ea[k][f], eb[k][f]) for k in ea for f in ea[k]
    )


def _exchange_all(coord: SaliencyCoordinator, step: int, parts: list[dict]) -> list[dict]:
    """Every rank's exchange at once (the Ray actor runs them as coroutines)."""

    async def go():
        return await asyncio.gather(*(coord.exchange(r, step, p) for r, p in enumerate(parts)))

    return asyncio.run(go())


# ---- the coordinator alone ----------------------------------------------------------


def test_nonfinite_statistics_keep_the_previous_masks_on_every_rank():
    coord = SaliencyCoordinator({"ratio": 0.25}, LAYOUT, 2)
    first = _exchange_all(coord, 1, [_partial(0), _partial(1)])
    running = coord.running.state_dict()
    out = _exchange_all(coord, 2, [_partial(2), _partial(3, poison=True)])
    assert out[0] == out[1]  # reported the same way on every rank
    assert out[0]["version"] == first[0]["version"] == 1
    for k, m in out[0]["masks"]["masks"].items():
        assert torch.equal(m, first[0]["masks"]["masks"][k])
    assert out[0]["metrics"]["longact/nonfinite_refresh"] == 1.0
    assert out[0]["metrics"]["longact/nonfinite_refreshes"] == 1.0
    # the poisoned window never reached the running statistics
    assert _same_stats(running, coord.running.state_dict())
    # the next clean refresh publishes as usual
    assert _exchange_all(coord, 3, [_partial(4), _partial(5)])[0]["version"] == 2


def test_nonfinite_statistics_at_the_first_refresh_fail_clearly_on_every_rank():
    coord = SaliencyCoordinator({"ratio": 0.25, "run_id": "r1"}, LAYOUT, 2)
    out = _exchange_all(coord, 1, [_partial(0, poison=True), _partial(1)])
    assert out[0] == out[1] and "error" in out[0]
    msg = out[0]["error"]
    assert msg.startswith("LongAct run r1, refresh at step 1:")
    assert "rank(s) [0]" in msg and "NaN or Inf" in msg and "no previous mask" in msg


def test_an_error_inside_a_refresh_reaches_every_rank(monkeypatch):
    import longact.distributed.coordinator as coordinator

    def broken(*args, **kwargs):
        raise RuntimeError("policy exploded")

    monkeypatch.setattr(coordinator, "build_masks", broken)
    coord = SaliencyCoordinator({"run_id": "r2"}, LAYOUT, 3)
    out = _exchange_all(coord, 4, [_partial(r) for r in range(3)])
    assert all(o == out[0] for o in out)
    assert out[0]["error"] == "LongAct run r2, refresh at step 4: RuntimeError: policy exploded"


def test_a_rank_that_never_arrives_fails_the_others_within_the_timeout():
    coord = SaliencyCoordinator({"run_id": "r3", "timeout_s": 0.5}, LAYOUT, 3)

    async def two_of_three():
        return await asyncio.gather(*(coord.exchange(r, 7, _partial(r)) for r in (0, 2)))

    out = bounded(lambda: asyncio.run(two_of_three()), 30, "the exchange of ranks 0 and 2")
    assert out[0] == out[1]
    assert out[0]["error"].startswith("LongAct run r3, refresh at step 7: rank(s) [1] sent no")
    assert "longact.timeout_s=0.5" in out[0]["error"]
    # the straggler, arriving late, gets the same error instead of waiting alone
    late = bounded(lambda: asyncio.run(coord.exchange(1, 7, _partial(1))), 30, "the straggler")
    assert late == out[0]


# ---- one rank in-process ------------------------------------------------------------


def _poison_next_take(rt: LongActRuntime) -> None:
    take = rt.capture.take

    def poisoned():
        stats = take()
        stats[(0, "q")].sum_abs[1] = math.inf
        rt.capture.take = take
        return stats

    rt.capture.take = poisoned


def _runtime(cfg: LongActConfig, **kw):
    model = tiny_model("qwen3", seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    coord = None if kw.get("ray") else SaliencyCoordinator(cfg, None, 1)
    return LongActRuntime(model, opt, cfg, coordinator=coord, **kw.get("rt", {})), model, opt


def test_runtime_keeps_its_masks_through_nonfinite_statistics():
    rt, model, opt = _runtime(LongActConfig(ratio=0.25))
    runtime_step(rt, model, opt, 1)
    masks = {k: rt.guard.masks[k].clone() for k in rt.guard.masks.keys()}
    _poison_next_take(rt)
    w = dict(model.named_parameters())["model.layers.0.self_attn.q_proj.weight"]
    before = w.detach().clone()
    runtime_step(rt, model, opt, 2)
    assert rt.version == 1
    assert all(torch.equal(masks[k], rt.guard.masks[k]) for k in masks)
    frozen = ~masks[(0, "q")]
    assert torch.equal(w.detach()[frozen], before[frozen])
    assert rt.pop_metrics()["longact/nonfinite_refresh"] == 1.0
    runtime_step(rt, model, opt, 3)
    assert rt.version == 2


def test_runtime_fails_clearly_on_nonfinite_statistics_at_the_first_refresh():
    rt, model, opt = _runtime(LongActConfig(ratio=0.25, run_id="solo"))
    _poison_next_take(rt)
    with pytest.raises(RefreshError, match=r"run solo, refresh at step 1: .*NaN or Inf"):
        runtime_step(rt, model, opt, 1)


# ---- several ranks and the Ray actor ------------------------------------------------


def _ray_ranks(cfg: LongActConfig, n: int = 2) -> list:
    """n (runtime, model, optimizer) ranks of one run, made concurrently (attach)."""
    return run_ranks(lambda r: _runtime(cfg, ray=True, rt={"rank": r, "world_size": n}), n)


def _steps(ranks: list, steps: range) -> list:
    def body(r: int):
        rt, model, opt = ranks[r]
        for s in steps:
            runtime_step(rt, model, opt, 100 * s + r)
        return rt.version

    return run_ranks(body, len(ranks))


def test_ray_rank_that_never_submits_fails_the_other_within_the_timeout(ray_cluster):
    from longact.distributed.client import RayClient
    from longact.distributed.coordinator import create

    cfg = LongActConfig(run_id=new_run_id(), timeout_s=2.0)
    coord = create(cfg)
    try:
        client = RayClient(cfg)
        client.call("attach", LAYOUT, 2)
        out = bounded(lambda: client.result(client.send(0, 3, _partial(0), 0)), 60, "rank 0")
        assert out["error"].startswith(f"LongAct run {cfg.run_id}, refresh at step 3: rank(s) [1]")
    finally:
        ray_cluster.kill(coord, no_restart=True)


def test_killed_coordinator_is_rebuilt_from_the_ranks_masks(ray_cluster):
    from longact.distributed.coordinator import create

    cfg = LongActConfig(ratio=0.25, run_id=new_run_id(), refresh_interval=2, timeout_s=60)
    coord = create(cfg)
    ranks = _ray_ranks(cfg)
    assert _steps(ranks, range(1, 3)) == [1, 1]
    masks = [{k: rt.guard.masks[k].clone() for k in rt.guard.masks.keys()} for rt, *_ in ranks]
    ray_cluster.kill(coord, no_restart=False)  # Ray restarts it, empty
    t0 = time.monotonic()
    assert _steps(ranks, range(3, 5)) == [2, 2]  # the refresh at step 3 went through
    assert time.monotonic() - t0 < 120
    metrics = [rt.pop_metrics() for rt, *_ in ranks]
    assert [m["longact/mask_version"] for m in metrics] == [2.0, 2.0]
    # at least the first rank to reach the restarted coordinator rebuilt it
    assert sum(m.get("longact/coordinator_recoveries", 0.0) for m in metrics) >= 1
    assert ray_cluster.get(coord.summary.remote()) == {"version": 2, "refreshes": 1}
    # both ranks switched together, from the same version-1 masks
    assert all(torch.equal(masks[0][k], masks[1][k]) for k in masks[0])
    a, b = ranks[0][0].guard.masks, ranks[1][0].guard.masks
    assert all(torch.equal(a[k], b[k]) for k in a.keys())
    ray_cluster.kill(coord, no_restart=True)


def test_killed_coordinator_without_restarts_fails_clearly(ray_cluster):
    from longact.distributed.coordinator import create

    cfg = LongActConfig(ratio=0.25, run_id=new_run_id(), coordinator_restarts=0, timeout_s=30)
    coord = create(cfg)
    ranks = _ray_ranks(cfg)
    assert _steps(ranks, range(1, 2)) == [1, 1]
    ray_cluster.kill(coord, no_restart=True)
    t0 = time.monotonic()
    out = _steps(ranks, range(2, 3))
    assert time.monotonic() - t0 < 60
    for err in out:
        assert isinstance(err, RefreshError), err
        assert str(err).startswith(f"LongAct run {cfg.run_id}, refresh at step 2: the saliency")
        assert "coordinator_restarts=0" in str(err) and "resume" in str(err)


def test_ray_coordinator_that_never_answers_fails_the_rank_within_its_bound(
    ray_cluster, monkeypatch
):
    """A coordinator that is alive but silent (it waits far longer for rank 1 than the
    rank waits for it): the rank's wait ends after timeout_s + GRACE_S with RefreshError."""
    from longact.distributed import client as client_module
    from longact.distributed.coordinator import create

    run_id = new_run_id()
    coord = create(LongActConfig(run_id=run_id, timeout_s=3600))
    # the actor's process is up before the 2 s bound starts: only the silence is timed
    assert ray_cluster.get(coord.ping.remote(), timeout=60)["world_size"] is None
    monkeypatch.setattr(client_module, "GRACE_S", 1.0)
    try:
        client = client_module.RayClient(LongActConfig(run_id=run_id, timeout_s=1.0))
        client.call("attach", LAYOUT, 2)
        with pytest.raises(RefreshError, match=rf"run {run_id}: .* did not answer within 2 s"):
            bounded(lambda: client.result(client.send(0, 3, _partial(0), 0)), 60, "rank 0")
        assert ray_cluster.get(coord.ping.remote(), timeout=30)["world_size"] == 2  # alive
    finally:
        ray_cluster.kill(coord, no_restart=True)


@pytest.mark.parametrize("how", ["hangs", "mute"])
def test_ray_coordinator_that_never_comes_back_fails_the_rank_within_the_timeout(ray_cluster, how):
    """A crashed coordinator that Ray restarts but that never comes back: its restart
    hangs (calls fail at once while Ray restarts it), or it restarts and never answers
    (calls wait). The rank's wait for it (``wait_alive``, after CoordinatorLost) ends
    after timeout_s with RefreshError."""
    from longact.distributed.client import CoordinatorLost, RayClient
    from longact.distributed.coordinator import actor_name

    class NeverBack(SaliencyCoordinator):  # defined here: Ray ships it to the worker by value
        def __init__(self, *args):
            import ray

            self.restarted = ray.get_runtime_context().was_current_actor_reconstructed
            if self.restarted and how == "hangs":
                time.sleep(3600)
            super().__init__(*args)

        async def ping(self):
            if self.restarted:  # how == "mute"
                await asyncio.Event().wait()
            return super().ping()

        def crash(self):
            import os

            os._exit(1)

    cfg = LongActConfig(run_id=new_run_id(), timeout_s=10.0)  # a restart takes seconds
    opts = {"name": actor_name(cfg.run_id), "num_cpus": 0, "max_restarts": 1}
    coord = ray_cluster.remote(NeverBack).options(**opts).remote(cfg)
    try:
        client = RayClient(cfg)
        with pytest.raises(CoordinatorLost):
            client.call("crash")
        with pytest.raises(RefreshError, match=r"^here: .* was not back within .*timeout_s=10 s"):
            bounded(lambda: client.wait_alive("here"), 60, "the wait for the restarted coordinator")
        if how == "mute":  # it did come up again, and answers anything but ping
            assert ray_cluster.get(coord.summary.remote(), timeout=30)["version"] == 0
    finally:
        ray_cluster.kill(coord, no_restart=True)


def test_each_rank_resumes_from_its_own_node_local_folder(ray_cluster, tmp_path):
    from longact.distributed.coordinator import create

    cfg = LongActConfig(ratio=0.25, run_id=new_run_id(), ema=0.5, timeout_s=60)
    coord = create(cfg)
    ranks = _ray_ranks(cfg)
    assert _steps(ranks, range(1, 4)) == [3, 3]
    disks = [tmp_path / f"node{r}" for r in range(2)]
    assert run_ranks(lambda r: ranks[r][0].save(str(disks[r])), 2) == [None, None]
    for r, disk in enumerate(disks):  # each node holds only what its rank wrote
        assert sorted(p.name for p in disk.iterdir()) == [state_path(disk, r).name]
    saved = torch.load(state_path(disks[0], 0), weights_only=False)
    ray_cluster.kill(coord, no_restart=True)

    cfg2 = LongActConfig(ratio=0.25, run_id=new_run_id(), ema=0.5, timeout_s=60)
    coord2 = create(cfg2)  # a new launch: a new run id, an empty coordinator
    resumed = _ray_ranks(cfg2)
    assert run_ranks(lambda r: resumed[r][0].load(str(disks[r])), 2) == [None, None]
    state = ray_cluster.get(coord2.state_dict.remote())
    assert state["version"] == saved["coordinator"]["version"] == 3
    assert state["history"] == saved["coordinator"]["history"]
    assert _same_stats(saved["coordinator"]["running"], state["running"])  # EMA, bit for bit
    for (rt, *_), (old, *_) in zip(resumed, ranks):
        assert (rt.version, rt.step, rt.last_refresh) == (old.version, old.step, old.last_refresh)
        assert all(
            torch.equal(rt.guard.masks[k], old.guard.masks[k]) for k in old.guard.masks.keys()
        )
    assert _steps(resumed, range(4, 5)) == [4, 4]  # training goes on, in step
    ray_cluster.kill(coord2, no_restart=True)


def test_ranks_restoring_different_checkpoints_fail_before_training():
    coord = SaliencyCoordinator({"run_id": "r4"}, LAYOUT, 2)
    sd = coord.state_dict()
    coord.restore(0, dict(sd, version=3, history=[{}] * 3))
    with pytest.raises(ValueError, match="rank 1 restored a checkpoint with .*same global_step"):
        coord.restore(1, dict(sd, version=2, history=[{}] * 2))


KILLED_WRITER = """
import os, signal, sys, torch
sys.path.insert(0, {tests!r})
from longact_tiny import runtime_step, tiny_model
from longact.config import LongActConfig
from longact.distributed.coordinator import SaliencyCoordinator
from longact.train.runtime import LongActRuntime
model = tiny_model("qwen3", seed=0)
opt = torch.optim.AdamW(model.parameters())
cfg = LongActConfig(ratio=0.25)
rt = LongActRuntime(model, opt, cfg, coordinator=SaliencyCoordinator(cfg, None, 1))
ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
for step in range(int(sys.argv[2])):
    model(input_ids=ids, labels=ids).loss.backward()
    rt.before_step()
    with rt.protect():
        opt.step()
    opt.zero_grad()
if sys.argv[3] == "kill":
    real = torch.save
    def dying(obj, f, *a, **k):  # half the bytes reach the disk, then the node dies
        real(obj, f, *a, **k)
        f.truncate(f.tell() // 2)
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    torch.save = dying
rt.save(sys.argv[1])
"""


def test_a_checkpoint_write_killed_midway_leaves_the_previous_state(tmp_path):
    from pathlib import Path

    script = tmp_path / "writer.py"
    script.write_text(KILLED_WRITER.format(tests=str(Path(__file__).parents[1] / "core")))
    folder = tmp_path / "ckpt"

    def write(steps: int, mode: str) -> int:
        cmd = [sys.executable, str(script), str(folder), str(steps), mode]
        return subprocess.run(cmd, timeout=300, capture_output=True).returncode

    assert write(1, "ok") == 0
    assert write(3, "kill") == -9  # killed inside the write
    state = torch.load(state_path(folder, 0), weights_only=False)  # still loadable ...
    assert state["step"] == 1 and state["version"] == 1  # ... and the previous one
    assert [p.suffix for p in folder.iterdir()].count(".tmp") == 1  # the half file
    cfg = LongActConfig(ratio=0.25)
    rt, *_ = _runtime(cfg)
    rt.load(str(folder))
    assert (rt.step, rt.version) == (1, 1)
