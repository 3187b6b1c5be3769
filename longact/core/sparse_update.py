"""Exact sparse updates of W_Q / W_K rows through any torch optimizer (plumbing).

LongAct trains only the rows of W_Q and W_K whose output channels are in the mask
(q/k bias entries follow their rows); every other parameter trains normally. Zeroing a
gradient is not enough under AdamW: decoupled weight decay and stale momentum still move
the row. :class:`RowMaskGuard` makes a frozen row *bit-identical* through a step:

1. ``guard.mask_grads()`` zeroes the frozen rows of the W_Q/W_K (and bias) gradients.
   Call it after backward and BEFORE gradient clipping, so the clipping norm is the norm
   of the gradients that are actually applied.
2. ``guard.step(optimizer)`` (or ``with guard.protect(optimizer): optimizer.step()``)
   copies the frozen rows of each managed parameter and of its param-shaped optimizer
   state (exp_avg, exp_avg_sq, momentum_buffer, ...) before the step and writes them back
   after it. State created by this very step is zeroed on frozen rows (= its lazily
   initialised value), so a frozen row never accumulates moments.

Optimizer-state policy on a mask refresh (``set_masks(new, optimizer)``; our choice, the
paper does not say): rows that LEAVE the mask keep their parameter values and their
moments frozen as they were. Rows that ENTER the mask get their param-shaped state reset
to zero (``reentry="reset"``, default) so moments from an old training period do not
kick; ``reentry="keep"`` resumes from the frozen moments. Caveat either way: AdamW's step
counter is per tensor, so a zero-moment row starts with the bias correction of a late
step (first update about lr*(1-beta1)/sqrt(1-beta2), ~3x lr for default betas).

FSDP2: parameters, grads and optimizer state are DTensors sharded ``Shard(0)``; each rank
applies its own row slice of the mask to the local shard (see ``sharding.py``), with no
communication. Build the guard after ``fully_shard`` and outside forward/backward, so
it holds the sharded parameters. A full mask (every row trainable) touches nothing:
results are bit-identical to plain training.

Memory: ``protect`` copies the frozen local rows of each managed parameter and its
param-shaped state for the duration of the step (AdamW fp32: 3 x frozen elements x 4 B).
On the CPU (``reuse_buffers=None`` picks it there) those copies go into buffers kept
between steps: a fresh multi-GB allocation per step is returned to the OS and page-faulted
back every time, which made the snapshot cost as much as the AdamW step itself (see
docs/bench). On CUDA the caching allocator already reuses the blocks, so nothing is kept.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from longact.core.adapters import ArchAdapter, ParamRef, get_adapter
from longact.core.masks import MaskSet
from longact.core.sharding import local_row_range, local_tensor

REENTRY = ("reset", "keep")


@dataclass
class _Target:
    """One W_Q/W_K weight or q/k bias and this rank's view of its row mask."""

    name: str
    ref: ParamRef
    param: nn.Parameter
    start: int  # global rows [start, stop) held locally
    stop: int
    frozen: torch.Tensor  # (n_frozen_local,) long, local row indices, always on the CPU
    _on: dict[torch.device, torch.Tensor] = field(default_factory=dict)  # device copies

    def frozen_on(self, tensor: torch.Tensor) -> torch.Tensor:
        """``frozen`` on ``tensor``'s device (cached per device). Parameters, gradients
        and optimizer state move between devices under verl's param / optimizer offload,
        so the index follows the tensor it indexes at each use."""
        dev = tensor.device
        if dev.type == "cpu":
            return self.frozen
        idx = self._on.get(dev)
        if idx is None:
            idx = self._on[dev] = self.frozen.to(dev, non_blocking=True)
        return idx


def _state_tensors(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> dict[str, Any]:
    """Param-shaped tensors of the optimizer state of ``param`` (exp_avg, ...)."""
    state = optimizer.state.get(param) or {}
    return {
        k: v
        for k, v in state.items()
        if torch.is_tensor(v) and tuple(v.shape) == tuple(param.shape)
    }


class RowMaskGuard:
    """Keeps the rows outside a MaskSet bit-identical through optimizer steps."""

    def __init__(
        self,
        model: nn.Module,
        masks: MaskSet,
        adapter: ArchAdapter | None = None,
        reentry: str = "reset",
        reuse_buffers: bool | None = None,
    ):
        if reentry not in REENTRY:
            raise ValueError(f"unknown reentry policy {reentry!r}; valid: {', '.join(REENTRY)}")
        self.adapter = adapter or get_adapter(model)
        self.reentry = reentry
        self.targets: list[_Target] = []
        for name, ref, param in self.adapter.qk_params(model):
            start, stop = local_row_range(param)
            empty = torch.zeros(0, dtype=torch.long)
            self.targets.append(_Target(name, ref, param, start, stop, empty))
        if not self.targets:
            raise ValueError(
                f"no q/k projection parameters found in {type(model).__name__} "
                f"for adapter {self.adapter.model_type!r}"
            )
        if reuse_buffers is None:
            reuse_buffers = self.targets[0].param.device.type == "cpu"
        self.reuse_buffers = reuse_buffers
        self._buffers: dict[tuple[int, str], torch.Tensor] = {}
        self.masks: MaskSet | None = None
        self.set_masks(masks)

    # ---- masks -----------------------------------------------------------------------
    def _validate(self, masks: MaskSet) -> None:
        weight_keys = {t.ref.key for t in self.targets if t.ref.kind == "weight"}
        for t in self.targets:
            if t.ref.key not in masks:
                raise ValueError(f"mask set has no mask for {t.ref.key} ({t.name})")
            n = masks[t.ref.key].numel()
            if n != t.param.shape[0]:
                raise ValueError(
                    f"mask for {t.ref.key} has {n} rows but {t.name} has {t.param.shape[0]} "
                    f"rows (shape {tuple(t.param.shape)})"
                )
        extra = set(masks.keys()) - weight_keys
        if extra:
            raise ValueError(f"mask set has keys with no W_Q/W_K in the model: {sorted(extra)}")

    @torch.no_grad()
    def set_masks(
        self, masks: MaskSet, optimizer: torch.optim.Optimizer | None = None
    ) -> dict[str, int]:
        """Install a (refreshed) mask set; returns counts of rows entering/leaving it
        (W_Q/W_K weights, global rows). With ``reentry="reset"`` the param-shaped
        optimizer state of entering rows is zeroed: the optimizer is then required
        whenever rows enter (it may be None for the first mask)."""
        self._validate(masks)
        old, entering_total, leaving_total = self.masks, 0, 0
        for t in self.targets:
            if old is not None and torch.equal(masks[t.ref.key], old[t.ref.key]):
                continue  # same rows: nothing enters or leaves, t.frozen stays
            new_local = masks[t.ref.key][t.start : t.stop]  # (n_local,) bool, CPU
            if old is not None:
                prev = old[t.ref.key]
                if t.ref.kind == "weight":
                    entering_total += int((masks[t.ref.key] & ~prev).sum())
                    leaving_total += int((prev & ~masks[t.ref.key]).sum())
                entering = (new_local & ~prev[t.start : t.stop]).nonzero().squeeze(1)
                if self.reentry == "reset" and optimizer is None and entering.numel():
                    raise ValueError(
                        "rows enter the mask: pass the optimizer to set_masks so their "
                        "moments are reset (or use reentry='keep')"
                    )
                if self.reentry == "reset" and optimizer is not None and entering.numel():
                    for v in _state_tensors(optimizer, t.param).values():
                        local = local_tensor(v)
                        local.index_fill_(0, entering.to(local.device), 0)
            t.frozen = (~new_local).nonzero().squeeze(1)
            t._on.clear()
        self.masks = masks
        return {"rows_entering": entering_total, "rows_leaving": leaving_total}

    def drop_device_copies(self) -> None:
        """Free the accelerator copies of the frozen-row indices (the model is being
        offloaded: LongAct then holds no accelerator memory)."""
        for t in self.targets:
            t._on.clear()

    def frozen_fraction(self) -> float:
        """Share of W_Q/W_K rows (weights only, global) kept fixed."""
        assert self.masks is not None
        return 1.0 - float(self.masks.kept_fraction())

    # ---- gradients and steps ---------------------------------------------------------
    @torch.no_grad()
    def mask_grads(self) -> None:
        """Zero the frozen rows of W_Q/W_K grads (and q/k bias entries). Before clipping."""
        for t in self.targets:
            if t.frozen.numel() and t.param.grad is not None:
                grad = local_tensor(t.param.grad)
                grad.index_fill_(0, t.frozen_on(grad), 0)

    @contextmanager
    def protect(self, optimizer: torch.optim.Optimizer) -> Iterator[None]:
        """Frozen rows of params and their optimizer state come out of the block unchanged."""
        saved = []
        with torch.no_grad():
            for i, t in enumerate(self.targets):
                if not t.frozen.numel():
                    continue
                state = {}
                for k, v in _state_tensors(optimizer, t.param).items():
                    local = local_tensor(v)
                    state[k] = self._rows((i, k), local, t.frozen_on(local))
                param = local_tensor(t.param)
                saved.append((t, self._rows((i, ""), param, t.frozen_on(param)), state))
        try:
            yield
        finally:
            self._restore(optimizer, saved)

    def _rows(self, slot: tuple[int, str], src: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """``src[idx]`` (rows), into a buffer kept for ``slot`` when reusing buffers."""
        if not self.reuse_buffers:
            return src.index_select(0, idx)
        shape = (idx.numel(), *src.shape[1:])
        buf = self._buffers.get(slot)
        if buf is None or buf.shape != shape or buf.dtype != src.dtype or buf.device != src.device:
            buf = self._buffers[slot] = torch.empty(shape, dtype=src.dtype, device=src.device)
        return torch.index_select(src, 0, idx, out=buf)

    @staticmethod
    @torch.no_grad()
    def _restore(optimizer: torch.optim.Optimizer, saved: list) -> None:
        for t, rows, state in saved:
            param = local_tensor(t.param)
            param.index_copy_(0, t.frozen_on(param), rows)
            for k, v in _state_tensors(optimizer, t.param).items():
                local = local_tensor(v)
                if k in state:
                    local.index_copy_(0, t.frozen_on(local), state[k].to(local.device))
                else:  # created by this step: frozen rows keep the initial zeros
                    local.index_fill_(0, t.frozen_on(local), 0)

    def step(self, optimizer: torch.optim.Optimizer, closure: Callable | None = None) -> Any:
        """``optimizer.step()`` with the frozen rows protected."""
        with self.protect(optimizer):
            return optimizer.step() if closure is None else optimizer.step(closure)
