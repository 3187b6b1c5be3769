"""LongAct inside one training rank of verl's FSDP engine (plumbing).

``LongActRuntime`` is created by the engine after its module and optimizer exist. It

- keeps forward hooks on q_proj / k_proj (or q_norm / k_norm) of the training module:
  statistics come from the forwards verl already runs for the policy update (grad on,
  train mode); log-prob and reference passes (no_grad, eval) are not counted;
- before each optimizer step, every ``refresh_interval`` steps, sends this rank's
  statistics to the saliency coordinator and installs the masks it publishes (all ranks
  block on the same refresh, so they switch together);
- zeroes the frozen rows' gradients before clipping and keeps the frozen rows (and their
  optimizer state) bit-identical through ``optimizer.step()``;
- saves and restores the coordinator's state and its own step counter with verl's
  checkpoints (``longact_state.pt`` in the actor checkpoint folder);
- reports where its time goes, per optimizer step, as host wall-clock seconds
  (``longact/capture_s`` in the hooks, ``longact/mask_s`` zeroing frozen gradient rows,
  ``longact/snapshot_s`` and ``longact/restore_s`` around ``optimizer.step()``;
  ``longact/rank_refresh_s`` on refresh steps). On CUDA, kernels run asynchronously,
  so these are launch times unless something synchronizes.

The coordinator is the run's named Ray actor. A single process without Ray (a
benchmark, a notebook) passes a plain :class:`SaliencyCoordinator` for one rank as
``coordinator=`` and the same protocol runs in-process.

With ``refresh_async`` the refresh leaves the critical path: the statistics of step t
are sent at step t, the coordinator merges them and picks masks while the rank runs
step t+1's forwards and backwards, and the masks are installed at step t+1 (every rank
at the same step, as always). The masks are then one step older than in the default
mode; a checkpoint first installs the refresh in flight.

Optimizer steps are counted here, so ``refresh_interval`` is in optimizer steps (verl
runs one per PPO mini-batch). Without calibration, the first mask is chosen at optimizer
step 1 from the statistics of step 1's own forwards, before that step is applied. With
``calibration.enable`` (the paper's profile-first mode) it is chosen before step 1 from
a pass over calibration prompts, and the next refresh comes ``refresh_interval`` steps
later.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import yaml

from longact.core.adapters import get_adapter
from longact.core.capture import QKCapture
from longact.core.masks import MaskSet
from longact.core.sparse_update import RowMaskGuard
from longact.distributed.coordinator import SaliencyCoordinator, payload_fields, stats_payload

CONFIG_ENV = "LONGACT_CONFIG"
STATE_FILE = "longact_state.pt"


def config_from_env() -> dict[str, Any] | None:
    """The ``longact:`` section the launcher exported, or None when LongAct is off."""
    raw = os.environ.get(CONFIG_ENV)
    if not raw:
        return None
    cfg = yaml.safe_load(raw) or {}
    return cfg if cfg.get("enable", False) else None


class LongActRuntime:
    """Statistics, mask refreshes and exact sparse steps for one rank."""

    def __init__(
        self,
        module: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        cfg: dict,
        model_path: str | None = None,
        coordinator: SaliencyCoordinator | None = None,
    ):
        import torch.distributed as dist

        self.cfg = cfg
        self.module = module
        self.optimizer = optimizer
        self.adapter = get_adapter(module)
        self._fields = payload_fields(cfg.get("score", "mean_abs"))
        self.capture = QKCapture(
            module, self.adapter, point=cfg.get("capture_point", "proj"), fields=self._fields
        )
        self.capture.attach()
        self.layout = self.capture.layout
        self.guard = RowMaskGuard(module, MaskSet.full(self.layout), self.adapter)
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.step = 0  # optimizer steps taken
        self.last_refresh: int | None = None
        self.version = 0
        if coordinator is not None and coordinator.world_size != 1:
            raise ValueError(
                "an in-process coordinator serves exactly one rank; got one for "
                f"{coordinator.world_size} (use the Ray actor for several ranks)"
            )
        self._coordinator = coordinator
        self._pool = None  # the in-process coordinator's refresh thread
        self._inflight: Any = None  # async mode: the refresh sent at the last step
        self._refresh_host_s = 0.0
        self._pending_metrics: dict[str, float] = {}
        self.timings = {"refresh_s": 0.0, "mask_s": 0.0, "snapshot_s": 0.0, "restore_s": 0.0}
        cal = cfg.get("calibration") or {}
        if cal.get("enable"):
            self.calibrate(model_path, cal)

    # ---- calibration (profile-first mode) -------------------------------------------------
    @torch.no_grad()
    def calibrate(self, model_path: str | None, cal: dict) -> None:
        """Choose the first mask from forwards over calibration prompts, before step 1.

        Each rank runs its share of the prompts (every rank the same number of batches:
        FSDP's forward is collective); the coordinator merges them as for any refresh and
        publishes version 1, in force from optimizer step 1.
        """
        import pandas as pd
        from transformers import AutoTokenizer

        if not model_path:
            raise ValueError("calibration needs the model path to load its tokenizer")
        tok = AutoTokenizer.from_pretrained(model_path)
        prompts = list(pd.read_parquet(cal["data"])["prompt"])[: int(cal.get("num_samples", 32))]
        if not prompts:
            raise ValueError(f"calibration data {cal['data']} has no prompts")
        mine = prompts[self.rank :: self.world_size]
        bs = int(cal.get("batch_size", 4))
        n_batches = -(-len(prompts[0 :: self.world_size]) // bs)  # rank 0 has the most
        device = next(self.module.parameters()).device
        capture = QKCapture(
            self.module,
            self.adapter,
            self.capture.point,
            during_no_grad=True,
            fields=self._fields,
        )
        self.capture.detach()
        was_training = self.module.training
        self.module.eval()
        with capture:
            for b in range(n_batches):
                chunk = mine[b * bs : (b + 1) * bs]
                batch = chunk or prompts[:1]  # a rank out of prompts still runs the forward
                ids = [
                    tok.apply_chat_template(
                        [dict(m) for m in p], add_generation_prompt=True, tokenize=True
                    )
                    for p in batch
                ]
                ids = [list(x["input_ids"]) if not isinstance(x, list) else x for x in ids]
                width = max(len(x) for x in ids)
                pad = tok.pad_token_id if tok.pad_token_id is not None else 0
                input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
                mask = torch.zeros((len(ids), width), dtype=torch.long)
                for i, x in enumerate(ids):
                    input_ids[i, : len(x)] = torch.tensor(x)
                    mask[i, : len(x)] = 1
                # ... but counts nothing from such a filler batch
                capture.set_token_mask(None if chunk else torch.zeros_like(mask, dtype=torch.bool))
                self.module(input_ids=input_ids.to(device), attention_mask=mask.to(device))
        self.module.train(was_training)
        self.capture.attach()
        payload = self._exchange(0, capture.take())
        self._install(payload)
        self.last_refresh = 0
        self._pending_metrics.update(payload["metrics"])

    # ---- coordinator --------------------------------------------------------------------
    @property
    def coordinator(self):
        if self._coordinator is None:
            from longact.distributed.coordinator import get_or_create

            self._coordinator = get_or_create(
                self.cfg["run_id"], self.cfg, self.layout, self.world_size
            )
        return self._coordinator

    def _due(self, step: int) -> bool:
        if self.last_refresh is None:
            return True
        return step - self.last_refresh >= int(self.cfg.get("refresh_interval", 1))

    def _exchange(self, step: int, stats) -> dict:
        """Send this rank's statistics for the refresh at ``step``; the published masks."""
        return self._resolve(self._send(step, stats))

    def _send(self, step: int, stats) -> Any:
        """Start the refresh at ``step``: a Ray object ref, or a Future in-process."""
        payload = stats_payload(stats, self._fields)
        coord = self.coordinator
        if not isinstance(coord, SaliencyCoordinator):
            return coord.exchange.remote(self.rank, step, payload)

        def run() -> dict:  # in-process, one rank
            coord.submit(self.rank, step, payload)
            return coord.get(step)

        if not self.cfg.get("refresh_async", False):  # synchronous: no thread needed
            done: Future = Future()
            done.set_result(run())
            return done
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="longact-refresh")
        return self._pool.submit(run)

    @staticmethod
    def _resolve(handle: Any) -> dict:
        if isinstance(handle, Future):  # in-process coordinator
            return handle.result()
        import ray

        return ray.get(handle)

    def _call(self, method: str, *args):
        """A coordinator method, on the Ray actor or the in-process object."""
        coord = self.coordinator
        if isinstance(coord, SaliencyCoordinator):
            return getattr(coord, method)(*args)
        import ray

        return ray.get(getattr(coord, method).remote(*args))

    def _refresh(self, step: int) -> None:
        t0 = time.perf_counter()
        handle = self._send(step, self.capture.take())
        self.last_refresh = step
        if self.cfg.get("refresh_async", False):  # installed at the next optimizer step
            self._inflight = handle
            self._refresh_host_s = time.perf_counter() - t0
            return
        self._finish(self._resolve(handle), time.perf_counter() - t0)

    def _collect(self) -> None:
        """Install the refresh sent at the previous step (async mode), if any."""
        if self._inflight is None:
            return
        t0 = time.perf_counter()
        handle, self._inflight = self._inflight, None
        self._finish(self._resolve(handle), self._refresh_host_s + time.perf_counter() - t0)

    def _finish(self, payload: dict, host_s: float) -> None:
        t0 = time.perf_counter()
        self._install(payload)
        dt = host_s + time.perf_counter() - t0  # this rank's blocked host time
        self.timings["refresh_s"] += dt
        self._pending_metrics.update(payload["metrics"])
        self._pending_metrics["longact/rank_refresh_s"] = dt

    def _install(self, payload: dict, reset_entering: bool = True) -> None:
        masks = MaskSet.from_state_dict(payload["masks"])
        self.guard.set_masks(masks, self.optimizer if reset_entering else None)
        self.version = int(payload["version"])

    # ---- hooks called by the engine -------------------------------------------------------
    def before_step(self) -> None:
        """After backward, before clipping: refresh if due, then mask the gradients."""
        self.step += 1
        self._collect()
        if self._due(self.step):
            self._refresh(self.step)
        t0 = time.perf_counter()
        self.guard.mask_grads()
        dt = time.perf_counter() - t0
        self.timings["mask_s"] += dt
        self._pending_metrics["longact/mask_s"] = dt

    @contextmanager
    def protect(self) -> Iterator[None]:
        """Context manager around clipping + optimizer.step()."""
        t0 = time.perf_counter()
        with self.guard.protect(self.optimizer):
            t1 = time.perf_counter()
            try:
                yield
            finally:
                t2 = time.perf_counter()
        t3 = time.perf_counter()
        for name, dt in (("snapshot_s", t1 - t0), ("restore_s", t3 - t2)):
            self.timings[name] += dt
            self._pending_metrics[f"longact/{name}"] = dt

    def pop_metrics(self) -> dict[str, float]:
        out = dict(self._pending_metrics)
        out["longact/capture_s"] = self.capture.pop_record_s()
        out["longact/mask_version"] = float(self.version)
        out["longact/frozen_fraction"] = self.guard.frozen_fraction()
        self._pending_metrics.clear()
        return out

    # ---- checkpoints --------------------------------------------------------------------
    def save(self, local_path: str) -> None:
        import torch.distributed as dist

        self._collect()  # async mode: the checkpoint holds the masks in force from now
        if self.rank == 0:
            state = {
                "coordinator": self._call("state_dict"),
                "step": self.step,
                "last_refresh": self.last_refresh,
                "version": self.version,
            }
            path = Path(local_path) / STATE_FILE
            tmp = path.with_suffix(".tmp")
            torch.save(state, tmp)
            os.replace(tmp, path)  # never leave a half-written state file
        if dist.is_initialized():
            dist.barrier()

    def load(self, local_path: str) -> None:
        import torch.distributed as dist

        path = Path(local_path) / STATE_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: this checkpoint was not written with LongAct on "
                "(resume with longact.enable=false, or from a LongAct checkpoint)"
            )
        state = torch.load(path, weights_only=False)
        if self.rank == 0:
            self._call("load_state_dict", state["coordinator"])
        if dist.is_initialized():
            dist.barrier()
        current = self._call("current")
        if current is not None:
            # the optimizer state was restored with the weights: do not reset it
            self._install(current, reset_entering=False)
        self.step = int(state["step"])
        self.last_refresh = state["last_refresh"]
