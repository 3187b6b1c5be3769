"""LongAct inside one training rank of verl's FSDP engine (plumbing).

``LongActRuntime`` is created by the engine after its module and optimizer exist. It

- keeps forward hooks on q_proj / k_proj (or q_norm / k_norm) of the training module:
  statistics come from the forwards verl already runs for the policy update (grad on,
  train mode); log-prob and reference passes (no_grad, eval) are not counted;
- before each optimizer step, every ``refresh_interval`` steps, sends this rank's
  statistics to the saliency coordinator and installs the masks it publishes (all ranks
  block on the same refresh, so they switch together);
- zeroes the frozen rows' gradients before clipping and keeps the frozen rows (and their
  optimizer state) bit-identical through ``optimizer.step()``, on the snapshot-free
  "masked" path for torch's AdamW / Adam / SGD and by snapshot and restore for any other
  optimizer (``core/sparse_update.py``); the path is logged once and reported as
  ``longact/exact_path_snapshot`` (1.0 on the snapshot path);
- with a peft LoRA adapter (``core/lora.py``), freezes the rows of q/k ``lora_B`` instead of
  W_Q/W_K (the base is frozen), refuses what would break that at start, and writes the
  adapter peft loads into each checkpoint (``lora_adapter/``);
- saves and restores the coordinator's state, its own step counter and the guard's state
  with verl's checkpoints, and has the guard clear the moments of frozen rows that a
  loaded optimizer state carries (snapshot-path or plain verl checkpoints). Every rank writes
  ``longact_state_rank{r}.pt`` beside verl's own shard of that rank, atomically, and
  restores from its own file, so resuming from node-local disks works
  (``longact_state.pt``, written by rank 0 of older versions, is read when a rank finds
  no file of its own);
- reports where its time goes, per optimizer step, as host wall-clock seconds
  (``longact/capture_s`` in the hooks, ``longact/mask_s`` zeroing frozen gradient rows,
  ``longact/snapshot_s`` and ``longact/restore_s`` around ``optimizer.step()``, about
  zero on the masked path, ``longact/decay_s`` in the masked path's step hook, which
  applies the weight decay the optimizer would otherwise apply itself;
  ``longact/rank_refresh_s`` on refresh steps). On CUDA, kernels run asynchronously,
  so these are launch times unless something synchronizes;
- reports ``longact/pad_tokens``, the padding verl appended to the packed training
  micro-batches of the step (Ulysses alignment, ``pad_to_length``; the engine adds it to
  ``pad_tokens``), which the statistics leave out.

The coordinator is the run's named Ray actor, reached through a client
(``longact.distributed.client``); a single process without Ray (a benchmark, a
notebook) passes a plain :class:`SaliencyCoordinator` for one rank as ``coordinator=``
and the same protocol runs in-process.

Faults: every wait is bounded by ``longact.timeout_s``; a failed refresh raises
:class:`RefreshError` on every rank with the coordinator's message; non-finite
statistics keep the masks in force (the coordinator decides, so all ranks agree). A
coordinator that died is rebuilt from the masks this rank holds, after Ray restarted it
(at most ``longact.coordinator_restarts`` times), and the refresh in progress is sent
again: the masks and version continue unchanged, the running statistics restart empty.

With ``refresh_async`` the refresh leaves the critical path: the statistics of step t
are sent at step t, the coordinator merges them and picks masks while the rank runs
step t+1's forwards and backwards, and the masks are installed at step t+1 (every rank
at the same step, as always). The masks are then one step older than in the default
mode; a checkpoint first installs the refresh in flight. The one exception is a run's
first refresh (no mask in force yet: a fresh run, or LongAct turned on at a resume): it
is waited for, so no update ever runs without a mask.

Optimizer steps are counted here, so ``refresh_interval`` is in optimizer steps (verl
runs one per PPO mini-batch). Without calibration, the first mask is chosen at optimizer
step 1 from the statistics of step 1's own forwards, before that step is applied. With
``calibration.enable`` (the paper's profile-first mode) it is chosen at step 1, before
that step is applied, from a pass over calibration prompts (eval mode, no KV cache, the
logits of the last position only, prompts cut to ``calibration.max_length`` tokens), and
the next refresh comes ``refresh_interval`` steps later. A resumed run restores its masks
and never calibrates again.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch

from longact.config import LongActConfig
from longact.core.arch import get_adapter
from longact.core.capture import QKCapture
from longact.core.lora import ADAPTER_DIR, check_model, save_adapter
from longact.core.masks import MaskSet
from longact.core.sparse_update import RowMaskGuard
from longact.distributed.client import CoordinatorLost, RefreshError, make_client
from longact.distributed.coordinator import SaliencyCoordinator
from longact.distributed.wire import payload_fields, stats_payload

STATE_FILE = "longact_state_rank{rank}.pt"
LEGACY_STATE_FILE = "longact_state.pt"  # rank 0 only, before per-rank files


def state_path(local_path: str | Path, rank: int) -> Path:
    """Where rank ``rank`` keeps LongAct's state in a checkpoint folder."""
    return Path(local_path) / STATE_FILE.format(rank=rank)


class LongActRuntime:
    """Statistics, mask refreshes and exact sparse steps for one rank."""

    def __init__(
        self,
        module: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        cfg: LongActConfig | dict,
        model_path: str | None = None,
        coordinator: SaliencyCoordinator | None = None,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        import torch.distributed as dist

        self.cfg = LongActConfig.coerce(cfg)
        self.module = module
        self.optimizer = optimizer
        self.model_path = model_path
        self.adapter = get_adapter(module)
        # LoRA: the guard freezes rows of q/k lora_B (refused where that cannot hold)
        self.lora = check_model(module, self.adapter)
        self._fields = payload_fields(self.cfg.score)
        self.capture = QKCapture(
            module, self.adapter, point=self.cfg.capture_point, fields=self._fields
        )
        self.capture.attach()
        self.layout = self.capture.layout
        self.guard = RowMaskGuard(
            module, MaskSet.full(self.layout), self.adapter, optimizer=optimizer
        )
        on = dist.is_initialized()
        self.rank = rank if rank is not None else (dist.get_rank() if on else 0)
        self.world_size = (
            world_size if world_size is not None else (dist.get_world_size() if on else 1)
        )
        self.step = 0  # optimizer steps taken
        self.last_refresh: int | None = None
        self.version = 0
        self.client = make_client(self.cfg, coordinator)
        self.client.call("attach", self.layout, self.world_size, self.rank)
        self._inflight: tuple[int, dict, Any] | None = None  # async: (step, payload, handle)
        self._refresh_host_s = 0.0
        self._pending_metrics: dict[str, float] = {}
        self.pad_tokens = 0  # verl's padding in this step's packed training forwards
        parts = ("refresh_s", "mask_s", "snapshot_s", "restore_s", "decay_s")
        self.timings = dict.fromkeys(parts, 0.0)
        self._calibration_due = self.cfg.calibration.enable
        # set by the engine: what calibration's forwards run inside (verl's Ulysses
        # patches off: each rank feeds its own whole prompts, see workers/fsdp_engine)
        self.calibration_context = nullcontext

    def _where(self, step: int) -> str:
        return f"LongAct run {self.cfg.run_id or '(in-process)'}, refresh at step {step}"

    # ---- calibration (profile-first mode) -------------------------------------------------
    @torch.no_grad()
    def calibrate(self) -> None:
        """Choose the first mask from forwards over calibration prompts.

        Each rank runs its share of the prompts (every rank the same number of batches:
        FSDP's forward is collective); the coordinator merges them as for any refresh and
        publishes version 1. The module runs in eval mode without a KV cache, computes
        the logits of the last position only, and each prompt keeps its last
        ``calibration.max_length`` tokens (0: no limit).
        """
        import pandas as pd
        from transformers import AutoTokenizer

        cal = self.cfg.calibration
        if not self.model_path:
            raise ValueError("calibration needs the model path to load its tokenizer")
        tok = AutoTokenizer.from_pretrained(self.model_path)
        prompts = list(pd.read_parquet(cal.data)["prompt"])[: cal.num_samples]
        if not prompts:
            raise ValueError(f"calibration data {cal.data} has no prompts")
        mine = prompts[self.rank :: self.world_size]
        bs = cal.batch_size
        n_batches = -(-len(prompts[0 :: self.world_size]) // bs)  # rank 0 has the most
        # where the forward computes: the accelerator, even while FSDP keeps parameters
        # on the CPU (offload policy); the parameters' device otherwise
        device = (
            torch.device("cuda", torch.cuda.current_device())
            if torch.cuda.is_available()
            else next(self.module.parameters()).device
        )
        capture = QKCapture(
            self.module, self.adapter, self.capture.point, during_no_grad=True, fields=self._fields
        )
        self.capture.detach()
        was_training = self.module.training
        self.module.eval()
        try:
            with capture, self.calibration_context():
                for b in range(n_batches):
                    chunk = mine[b * bs : (b + 1) * bs]
                    batch = chunk or prompts[:1]  # a rank out of prompts still runs the forward
                    input_ids, mask = _encode(tok, batch, cal.max_length)
                    # ... but counts nothing from such a filler batch
                    filler = None if chunk else torch.zeros_like(mask, dtype=torch.bool)
                    capture.set_token_mask(filler)
                    self.module(
                        input_ids=input_ids.to(device),
                        attention_mask=mask.to(device),
                        use_cache=False,
                        logits_to_keep=1,
                        return_dict=True,  # verl's fused-kernel forward refuses anything else
                    )
        finally:
            self.module.train(was_training)
            self.capture.attach()
        payload = self._exchange(0, capture.take())
        self._install(payload)
        self.last_refresh = 0
        self._pending_metrics.update(payload["metrics"])

    # ---- coordinator --------------------------------------------------------------------
    def _due(self, step: int) -> bool:
        if self.last_refresh is None:
            return True
        return step - self.last_refresh >= self.cfg.refresh_interval

    def _exchange(self, step: int, stats) -> dict:
        """Send this rank's statistics for the refresh at ``step``; the published masks."""
        payload = stats_payload(stats, self._fields)
        return self._resolve(step, payload, self._send(step, payload))

    def _send(self, step: int, payload: dict) -> Any:
        try:
            return self.client.send(self.rank, step, payload, self.version)
        except CoordinatorLost as e:
            return e  # answered in _resolve, like a call that died in flight

    def _resolve(self, step: int, payload: dict, handle: Any) -> dict:
        """The answer to the refresh at ``step``: masks, or RefreshError. A coordinator
        that died is waited for (Ray restarts it), rebuilt from this rank's masks, and
        sent this refresh again."""
        where = self._where(step)
        for _ in range(self.cfg.coordinator_restarts + 2):
            try:
                out = handle if isinstance(handle, CoordinatorLost) else self.client.result(handle)
                if isinstance(out, CoordinatorLost):
                    raise out
            except CoordinatorLost as e:
                if self.cfg.coordinator_restarts == 0:
                    raise RefreshError(
                        f"{where}: the saliency coordinator died ({e}); with "
                        "longact.coordinator_restarts=0 the run stops. Resume from the last "
                        "checkpoint (trainer.resume_mode=auto)"
                    ) from None
                self.client.wait_alive(where)
                out = {"recover": True}
            if "error" in out:
                raise RefreshError(out["error"])
            if "recover" not in out:
                return out
            self._recover()
            self._pending_metrics["longact/coordinator_recoveries"] = (
                self._pending_metrics.get("longact/coordinator_recoveries", 0.0) + 1.0
            )
            handle = self._send(step, payload)
        raise RefreshError(f"{where}: the saliency coordinator kept failing; giving up")

    def _recover(self) -> None:
        """Rebuild a restarted coordinator from what this rank holds."""
        self.client.call("attach", self.layout, self.world_size, self.rank)
        if self.version > 0:
            self.client.call("recover", self.version, self.guard.masks.state_dict())

    def _refresh(self, step: int) -> None:
        t0 = time.perf_counter()
        payload = stats_payload(self.capture.take(), self._fields)
        handle = self._send(step, payload)
        self.last_refresh = step
        # async: installed at the next optimizer step; but a fresh run has no mask in
        # force yet, and its first update must not train every row, so its first
        # refresh is waited for
        if self.cfg.refresh_async and self.version > 0:
            self._inflight = (step, payload, handle)
            self._refresh_host_s = time.perf_counter() - t0
            return
        self._finish(self._resolve(step, payload, handle), time.perf_counter() - t0)

    def _collect(self) -> None:
        """Install the refresh sent at the previous step (async mode), if any."""
        if self._inflight is None:
            return
        t0 = time.perf_counter()
        (step, payload, handle), self._inflight = self._inflight, None
        out = self._resolve(step, payload, handle)
        self._finish(out, self._refresh_host_s + time.perf_counter() - t0)

    def _finish(self, payload: dict, host_s: float) -> None:
        t0 = time.perf_counter()
        self._install(payload)
        dt = host_s + time.perf_counter() - t0  # this rank's blocked host time
        self.timings["refresh_s"] += dt
        self._pending_metrics.update(payload["metrics"])
        self._pending_metrics["longact/rank_refresh_s"] = dt

    def _install(self, payload: dict, restored: bool = False) -> None:
        if int(payload["version"]) == self.version and self.version > 0:
            return  # the masks in force (e.g. kept after non-finite statistics)
        masks = MaskSet.from_state_dict(payload["masks"])
        self.guard.set_masks(masks, restored=restored)
        self.version = int(payload["version"])

    # ---- hooks called by the engine -------------------------------------------------------
    def before_step(self) -> None:
        """After backward, before clipping: refresh if due, then mask the gradients."""
        # accelerator bytes LongAct held between the last step and this one (0 once the
        # engine offloaded the model, see ``offloaded``)
        self._pending_metrics["longact/held_device_bytes"] = float(self.guard.device_bytes())
        self.step += 1
        if self._calibration_due:  # first step of a fresh run: the profile-first mask
            self._calibration_due = False
            self.calibrate()
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
        parts = (("snapshot_s", t1 - t0), ("restore_s", t3 - t2), ("decay_s", self.guard.hook_s))
        for name, dt in parts:
            self.timings[name] += dt
            self._pending_metrics[f"longact/{name}"] = dt

    def offloaded(self) -> None:
        """The engine moved the model off the accelerator: LongAct keeps nothing there
        (row-index copies freed, statistics gathered so far moved to the CPU)."""
        self.guard.drop_device_copies()
        self.capture.to("cpu")

    def pop_metrics(self) -> dict[str, float]:
        out = dict(self._pending_metrics)
        out["longact/capture_s"] = self.capture.pop_record_s()
        out["longact/mask_version"] = float(self.version)
        out["longact/frozen_fraction"] = self.guard.frozen_fraction()
        out["longact/exact_path_snapshot"] = float(self.guard.path == "snapshot")
        out["longact/pad_tokens"] = float(self.pad_tokens)
        self._pending_metrics.clear()
        self.pad_tokens = 0
        return out

    # ---- checkpoints --------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """What this rank saves: the coordinator's state and its own counters."""
        return {
            "coordinator": self.client.call("state_dict"),
            "step": self.step,
            "last_refresh": self.last_refresh,
            "version": self.version,
            "guard": self.guard.state_dict(),
            "rank": self.rank,
            "world_size": self.world_size,
        }

    def before_save(self) -> None:
        """Before verl writes its checkpoint: install the refresh in flight (async mode),
        so the optimizer state verl saves next agrees with the masks saved after it
        (rows leaving the mask have their moments zeroed first)."""
        _settle()
        self._collect()

    def save(self, local_path: str) -> None:
        """Write this rank's state beside verl's shard of this rank (atomic: a write
        killed midway leaves at most a ``.tmp`` file, never a half state file). With
        LoRA, rank 0 also writes the adapter peft loads, ``lora_adapter/`` (gathered from
        every rank's shard)."""
        self._collect()  # async: the refresh in flight (a no-op after before_save)
        if self.lora is not None:
            out = Path(local_path) / ADAPTER_DIR
            save_adapter(self.module, out, write=self.rank == 0, base=self.model_path)
        path = state_path(local_path, self.rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            torch.save(self.state(), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def load(self, local_path: str) -> None:
        """Restore this rank's state from its own file in ``local_path``."""
        _settle()  # verl may have just offloaded the loaded optimizer state, non-blocking
        path = state_path(local_path, self.rank)
        if not path.is_file():
            legacy = Path(local_path) / LEGACY_STATE_FILE
            if not legacy.is_file():
                self._start_fresh(local_path)
                return
            path = legacy
        state = torch.load(path, weights_only=False)
        self.client.call("restore", self.rank, state["coordinator"])
        current = self.client.call("current")
        if current is not None:
            # the optimizer state was restored with the weights: do not reset it here
            self._install(current, restored=True)
        # ... but frozen rows' moments it carries are zeroed or set aside (masked path)
        self.guard.optimizer_state_loaded(state.get("guard"))
        self.step = int(state["step"])
        self.last_refresh = state["last_refresh"]
        self._calibration_due = False  # a resumed run keeps its masks

    def _start_fresh(self, local_path: str) -> None:
        """A checkpoint without LongAct's state (plain verl, LongAct turned on at resume):
        LongAct starts as in a new run, its first masks chosen at the next optimizer
        step (from calibration, if enabled); the frozen rows' moments the plain run left
        are zeroed or set aside when those masks are installed."""
        print(
            f"longact: rank {self.rank}: no LongAct state in {local_path} (a checkpoint of "
            "plain RL?): LongAct starts fresh, first masks at the next optimizer step",
            flush=True,
        )
        self.guard.optimizer_state_loaded(None)


def _settle() -> None:
    """Wait for the accelerator's queued copies. verl offloads with ``non_blocking``
    copies into pinned host memory; LongAct's host-side edits of that state (zeroing
    frozen rows' moments) must land after the copy, not be overwritten by it."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _encode(tok, prompts: list, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Chat-templated prompts as right-padded ``(B, T)`` ids and attention mask, each
    prompt cut to its last ``max_length`` tokens (0: uncut)."""
    ids = [
        tok.apply_chat_template([dict(m) for m in p], add_generation_prompt=True, tokenize=True)
        for p in prompts
    ]
    ids = [list(x["input_ids"]) if not isinstance(x, list) else x for x in ids]
    if max_length > 0:
        ids = [x[-max_length:] for x in ids]
    width = max(len(x) for x in ids)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = 1
    return input_ids, mask
