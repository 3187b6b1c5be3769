"""Exact sparse updates of W_Q / W_K rows through any torch optimizer (plumbing).

LongAct trains only the rows of W_Q and W_K whose output channels are in the mask
(q/k bias entries follow their rows); every other parameter trains normally. Which rows
of which parameter are W_Q/W_K rows comes from the adapter (``param_rows``): a plain
q_proj/k_proj, the query rows of a gated q_proj, the q and k rows of a fused qkv_proj.
Other rows of such a parameter (gate, v) are never frozen. Zeroing a
gradient is not enough under AdamW: decoupled weight decay and stale momentum still move
the row. :class:`RowMaskGuard` makes a frozen row *bit-identical* through a step:

1. ``guard.mask_grads()`` zeroes the frozen rows of the W_Q/W_K (and bias) gradients.
   Call it after backward and BEFORE gradient clipping, so the clipping norm is the norm
   of the gradients that are actually applied.
2. ``guard.step(optimizer)`` (or ``with guard.protect(optimizer): optimizer.step()``, the
   block may hold the clipping and may skip the step) keeps the frozen rows of each managed
   parameter and of its optimizer state exact, in one of two ways, chosen once when the
   guard first meets its optimizer (``optimizer=`` at construction, ``set_masks`` or
   ``protect``), logged once and readable as ``guard.path`` / ``guard.path_reason``:

   - ``"masked"`` (no copies; ``exact_update.py``): for exactly ``torch.optim.AdamW``,
     ``Adam`` and ``SGD`` with the settings listed in ``exact_update.exact_path_for``, a
     row whose gradient and optimizer state are zero is updated by exactly zero. Frozen
     rows' state is kept at zero and weight decay is applied by a step hook to trainable
     rows only, with the lr of that step.
   - ``"snapshot"`` (any other optimizer, or ``exact_path="snapshot"``): the frozen rows
     of each parameter and of its param-shaped state (exp_avg, exp_avg_sq,
     momentum_buffer, ...) are copied before the step and written back after it. State
     created by this very step is zeroed on frozen rows (= its lazily initialised value).

Optimizer-state policy on a mask refresh (``set_masks(new, optimizer)``; our choice, the
paper does not say): rows that ENTER the mask get their param-shaped state reset to zero
(``reentry="reset"``, default) so moments from an old training period do not kick;
``reentry="keep"`` resumes from the moments the rows had when they left. Rows that LEAVE
keep their parameter values; their moments stay frozen in the optimizer state (snapshot)
or are set aside on the CPU, and zeroed in the optimizer state (masked, ``keep``; under
``reset`` they are just zeroed). Both paths give the same parameters. Caveat either way:
AdamW's step counter is per tensor, so a zero-moment row starts with the bias correction
of a late step (first update about lr*(1-beta1)/sqrt(1-beta2), ~3x lr for default betas).
After an optimizer state is loaded from a checkpoint, call
``guard.optimizer_state_loaded(saved)`` (``saved`` = ``guard.state_dict()`` of that
checkpoint, or None): on the masked path frozen rows' moments (snapshot-path and plain
checkpoints carry some) are zeroed or set aside.

FSDP2: parameters, grads and optimizer state are DTensors sharded ``Shard(0)``; each rank
applies its own row slice of the mask to the local shard (see ``sharding.py``), with no
communication. Build the guard after ``fully_shard`` and outside forward/backward, so
it holds the sharded parameters. A full mask (every row trainable) touches nothing:
results are bit-identical to plain training.

Memory: the masked path keeps nothing per step (a per-row decay column of rows x 4 B per
W_Q/W_K parameter lives during the step hook). ``protect`` on the snapshot path copies
the frozen local rows of each managed parameter and its param-shaped state for the
duration of the step (AdamW fp32: 3 x frozen elements x 4 B). On the CPU
(``reuse_buffers=None`` picks it there, tensor by tensor) those copies go into buffers
kept between steps: a fresh multi-GB allocation per step is returned to the OS and
page-faulted back every time, which made the snapshot cost as much as the AdamW step
itself (see docs/bench). On CUDA the caching allocator already reuses the blocks, so
nothing is kept, even where the guard was built while FSDP had the parameters offloaded
to the CPU; and ``drop_device_copies`` (the engine offloads) frees whatever accelerator
memory the guard still holds.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from longact.core.arch import ArchAdapter, get_adapter, param_mask
from longact.core.exact_update import MaskedUpdate, _Target, exact_path_for, param_state
from longact.core.masks import MaskSet
from longact.core.sharding import local_row_range, local_tensor

REENTRY = ("reset", "keep")
EXACT_PATHS = ("auto", "masked", "snapshot")
log = logging.getLogger(__name__)


class RowMaskGuard:
    """Keeps the rows outside a MaskSet bit-identical through optimizer steps."""

    def __init__(
        self,
        model: nn.Module,
        masks: MaskSet,
        adapter: ArchAdapter | None = None,
        reentry: str = "reset",
        reuse_buffers: bool | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        exact_path: str = "auto",
    ):
        if reentry not in REENTRY:
            raise ValueError(f"unknown reentry policy {reentry!r}; valid: {', '.join(REENTRY)}")
        if exact_path not in EXACT_PATHS:
            raise ValueError(f"unknown exact_path {exact_path!r}; valid: {', '.join(EXACT_PATHS)}")
        self.adapter = adapter or get_adapter(model)
        self.reentry = reentry
        self.exact_path = exact_path
        self.targets: list[_Target] = []
        layout = self.adapter.layout(model) if hasattr(model, "config") else None
        for name, ref, param in self.adapter.qk_params(model):
            start, stop = local_row_range(param)
            empty = torch.zeros(0, dtype=torch.long)
            sources = self.adapter.param_rows(ref, layout, param.shape[0])
            self.targets.append(
                _Target(name, ref, param, start, stop, sources, frozen=empty, kept=empty)
            )
        if not self.targets:
            raise ValueError(
                f"no q/k projection parameters found in {type(model).__name__} "
                f"for the {self.adapter.family!r} adapter"
            )
        self.reuse_buffers = reuse_buffers  # None: for CPU tensors only
        self._buffers: dict[tuple[int, str], torch.Tensor] = {}
        self.optimizer: torch.optim.Optimizer | None = None
        self.path: str | None = None  # "masked" | "snapshot" once an optimizer is met
        self.path_reason = ""
        self._masked: MaskedUpdate | None = None
        self._grads_masked = False
        self.masks: MaskSet | None = None
        self.set_masks(masks)
        if optimizer is not None:
            self.bind(optimizer)

    # ---- the optimizer and the path -------------------------------------------------------
    def bind(self, optimizer: torch.optim.Optimizer) -> str:
        """Meet the optimizer (once) and choose the exact path for it; returns the path.
        On the masked path the frozen rows' optimizer state is zeroed (or stashed)."""
        if optimizer is self.optimizer:
            return self.path
        if self.optimizer is not None:
            raise ValueError(
                f"this RowMaskGuard already serves a {type(self.optimizer).__name__}; it "
                f"cannot switch to another optimizer ({type(optimizer).__name__}): build a "
                "guard per optimizer"
            )
        path, reason = exact_path_for(optimizer, [t.param for t in self.targets])
        if self.exact_path == "snapshot":
            path, reason = "snapshot", f"exact_path='snapshot' was asked for ({reason})"
        elif self.exact_path == "masked" and path != "masked":
            raise ValueError(f"exact_path='masked' is not possible: {reason}")
        self.optimizer, self.path, self.path_reason = optimizer, path, reason
        log.log(
            logging.INFO if path == "masked" else logging.WARNING,
            "LongAct keeps frozen W_Q/W_K rows exact with the %s path: %s",
            path,
            reason,
        )
        if path == "masked":
            self._masked = MaskedUpdate(optimizer, self.targets, self.reentry, self.mask_grads)
            self._masked.adopt()
        return path

    def _optimizer(self, optimizer: torch.optim.Optimizer | None) -> torch.optim.Optimizer | None:
        if optimizer is not None:
            self.bind(optimizer)
        return self.optimizer

    # ---- masks -----------------------------------------------------------------------
    def _validate(self, masks: MaskSet) -> None:
        weight_keys = {k for t in self.targets if t.ref.row_matrix for k, _ in t.sources}
        for t in self.targets:
            for key, rows in t.sources:
                if key not in masks:
                    raise ValueError(f"mask set has no mask for {key} ({t.name})")
                n = masks[key].numel()
                if n != rows.numel():
                    raise ValueError(
                        f"mask for {key} has {n} rows but {t.name} has {rows.numel()} "
                        f"W_{key[1].upper()} rows (shape {tuple(t.param.shape)})"
                    )
        extra = set(masks.keys()) - weight_keys
        if extra:
            raise ValueError(f"mask set has keys with no W_Q/W_K in the model: {sorted(extra)}")

    @staticmethod
    def _param_mask(t: _Target, masks: MaskSet) -> torch.Tensor:
        """(rows of t.param,) bool, global: True = trainable."""
        return param_mask(t.sources, masks, t.param.shape[0])

    @torch.no_grad()
    def set_masks(
        self,
        masks: MaskSet,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        restored: bool = False,
    ) -> dict[str, int]:
        """Install a (refreshed) mask set; returns counts of rows entering/leaving it
        (W_Q/W_K weights, global rows). Entering rows get their state reset or put back
        (``reentry``), leaving rows' state is zeroed or stashed on the masked path. The
        optimizer (bound if given) is required on the snapshot path when rows enter
        under ``reentry="reset"``. ``restored``: the optimizer state was just loaded with
        these masks in force, so no row's state is touched here (follow with
        :meth:`optimizer_state_loaded`)."""
        self._validate(masks)
        opt = self._optimizer(optimizer)
        old, entering_total, leaving_total = self.masks, 0, 0
        for t in self.targets:
            new = self._param_mask(t, masks)  # (R,) bool, CPU, global rows
            prev = self._param_mask(t, old) if old is not None else None
            if prev is not None and torch.equal(new, prev):
                continue  # same rows: nothing enters or leaves, t.frozen stays
            new_local = new[t.start : t.stop]  # (n_local,) bool
            if prev is not None:
                if t.ref.row_matrix:  # rows outside every source are True in both
                    entering_total += int((new & ~prev).sum())
                    leaving_total += int((prev & ~new).sum())
                if not restored:
                    self._move_state(t, opt, new_local, prev[t.start : t.stop])
            t.frozen = (~new_local).nonzero().squeeze(1)
            t.kept = new_local.nonzero().squeeze(1)
            t._on.clear()
        self.masks = masks
        return {"rows_entering": entering_total, "rows_leaving": leaving_total}

    def _move_state(self, t: _Target, opt, new_local: torch.Tensor, prev_local: torch.Tensor):
        entering = (new_local & ~prev_local).nonzero().squeeze(1)
        if self._masked is not None:
            leaving = (prev_local & ~new_local).nonzero().squeeze(1)
            if leaving.numel():
                self._masked.freeze(t, leaving)
            if entering.numel():
                self._masked.thaw(t, entering)
            return
        if self.reentry != "reset" or not entering.numel():
            return
        if opt is None:
            raise ValueError(
                "rows enter the mask: pass the optimizer to set_masks so their "
                "moments are reset (or use reentry='keep')"
            )
        for v in param_state(opt, t.param).values():
            local = local_tensor(v)
            local.index_fill_(0, entering.to(local.device), 0)

    def drop_device_copies(self) -> None:
        """Free the accelerator copies of the frozen-row indices (the model is being
        offloaded: LongAct then holds no accelerator memory), and any snapshot buffers
        kept there."""
        for t in self.targets:
            t._on.clear()
        self._buffers = {k: b for k, b in self._buffers.items() if b.device.type == "cpu"}

    def device_bytes(self) -> int:
        """Accelerator bytes the guard holds between steps: row-index copies and kept
        snapshot buffers (0 on a CPU host, and after ``drop_device_copies``)."""
        held = list(self._buffers.values())
        held += [i for t in self.targets for i in t._on.values()]
        return sum(x.numel() * x.element_size() for x in held if x.device.type != "cpu")

    def frozen_fraction(self) -> float:
        """Share of W_Q/W_K rows (weights only, global) kept fixed."""
        assert self.masks is not None
        return 1.0 - float(self.masks.kept_fraction())

    # ---- checkpoints ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What LongAct must save beside the optimizer's own state: the moments set aside
        for frozen rows (masked path, ``reentry="keep"``), by global row, on the CPU."""
        stash: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
        if self._masked is not None:
            for (i, key), (rows, values) in self._masked.stash.items():
                t = self.targets[i]
                stash.setdefault(t.name, {})[key] = {"rows": rows + t.start, "values": values}
        return {"stash": stash}

    @torch.no_grad()
    def optimizer_state_loaded(self, saved: dict[str, Any] | None = None) -> None:
        """The optimizer's state was just loaded from a checkpoint (after masks were set
        with ``restored=True``). Masked path: frozen rows' moments, which snapshot-path
        and plain checkpoints carry, are zeroed (``reset``) or set aside (``keep``).
        Then the moments of ``saved`` (this guard's ``state_dict()`` from the same
        checkpoint) for rows frozen here return to the stash (masked path) or to the
        optimizer state (snapshot path)."""
        if self._masked is not None:
            self._masked.adopt()
        if self.reentry != "keep":
            return  # under "reset" set-aside moments are never used
        for t in self.targets:
            by_key = ((saved or {}).get("stash") or {}).get(t.name, {})
            frozen = torch.zeros(t.stop - t.start, dtype=torch.bool)
            frozen[t.frozen] = True
            for key, entry in by_key.items():
                rows, values = entry["rows"] - t.start, entry["values"]
                mine = (rows >= 0) & (rows < t.stop - t.start)  # rows of this rank's shard
                rows, values = rows[mine], values[mine]
                still = frozen[rows]  # rows trainable under these masks keep the live state
                rows, values = rows[still], values[still]
                if not rows.numel():
                    continue
                if self._masked is not None:
                    self._masked._put(t, key, rows, values)
                    continue
                state = param_state(self.optimizer, t.param) if self.optimizer else {}
                if key in state:
                    local = local_tensor(state[key])
                    local.index_copy_(0, rows.to(local.device), values.to(local.device))

    # ---- gradients and steps ---------------------------------------------------------
    @torch.no_grad()
    def mask_grads(self) -> None:
        """Zero the frozen rows of W_Q/W_K grads (and q/k bias entries). Before clipping."""
        for t in self.targets:
            if t.frozen.numel() and t.param.grad is not None:
                grad = local_tensor(t.param.grad)
                grad.index_fill_(0, t.frozen_on(grad), 0)
        self._grads_masked = True

    @property
    def hook_s(self) -> float:
        """Seconds the masked path's step hooks took in the last protected block (the
        weight decay they apply replaces the one the optimizer would have applied)."""
        return self._masked.hook_s if self._masked is not None else 0.0

    @contextmanager
    def protect(self, optimizer: torch.optim.Optimizer | None = None) -> Iterator[None]:
        """Frozen rows of params and their optimizer state come out of the block unchanged
        (the optimizer: the one given, or the one the guard already serves)."""
        opt = self._optimizer(optimizer)
        if opt is None:
            raise ValueError("protect needs the optimizer (none was given to this guard yet)")
        if self._masked is not None:
            self._masked.arm(self._grads_masked)
            try:
                yield
            finally:
                self._masked.disarm()
                self._grads_masked = False
            return
        saved = []
        with torch.no_grad():
            for i, t in enumerate(self.targets):
                if not t.frozen.numel():
                    continue
                state = {}
                for k, v in param_state(opt, t.param).items():
                    local = local_tensor(v)
                    state[k] = self._rows((i, k), local, t.frozen_on(local))
                param = local_tensor(t.param)
                saved.append((t, self._rows((i, ""), param, t.frozen_on(param)), state))
        try:
            yield
        finally:
            self._restore(opt, saved)
            self._grads_masked = False

    def _rows(self, slot: tuple[int, str], src: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """``src[idx]`` (rows), into a buffer kept for ``slot`` when reusing buffers."""
        reuse = self.reuse_buffers
        if reuse is None:  # decided by where the rows are now, not where they were built
            reuse = src.device.type == "cpu"
        if not reuse:
            return src.index_select(0, idx)
        shape = (idx.numel(), *src.shape[1:])
        buf = self._buffers.get(slot)
        if buf is None or buf.shape != shape or buf.dtype != src.dtype or buf.device != src.device:
            buf = self._buffers[slot] = torch.empty(shape, dtype=src.dtype, device=src.device)
        return torch.index_select(src, 0, idx, out=buf)

    def extra_bytes(self) -> int:
        """Bytes LongAct keeps between steps for exactness: kept snapshot buffers
        (snapshot path) or the stash of frozen rows' moments (masked, ``keep``)."""
        kept = sum(b.numel() * b.element_size() for b in self._buffers.values())
        return kept + (self._masked.stash_bytes() if self._masked is not None else 0)

    @staticmethod
    @torch.no_grad()
    def _restore(optimizer: torch.optim.Optimizer, saved: list) -> None:
        for t, rows, state in saved:
            param = local_tensor(t.param)
            param.index_copy_(0, t.frozen_on(param), rows)
            for k, v in param_state(optimizer, t.param).items():
                local = local_tensor(v)
                if k in state:
                    local.index_copy_(0, t.frozen_on(local), state[k].to(local.device))
                else:  # created by this step: frozen rows keep the initial zeros
                    local.index_fill_(0, t.frozen_on(local), 0)

    def step(
        self, optimizer: torch.optim.Optimizer | None = None, closure: Callable | None = None
    ) -> Any:
        """``optimizer.step()`` with the frozen rows protected."""
        with self.protect(optimizer):
            opt = self.optimizer
            return opt.step() if closure is None else opt.step(closure)
