"""Snapshot-free exact sparse updates for optimizers whose zero update is exactly zero.

:class:`~longact.core.sparse_update.RowMaskGuard` keeps frozen W_Q/W_K rows bit-identical
through ``optimizer.step()``. Its first way (the "snapshot" path) copies the frozen rows
of each parameter and of its optimizer state before the step and writes them back after.
This module is the second way (the "masked" path): nothing is copied; the step itself
leaves frozen rows untouched, because for the optimizers below the update of a row is
exactly zero when its gradient and its param-shaped optimizer state are zero.

The rule (:func:`exact_path_for`). The masked path is used when the optimizer is *exactly*
``torch.optim.AdamW``, ``torch.optim.Adam`` or ``torch.optim.SGD`` (not a subclass, whose
``step`` may do anything) and every param group holding a W_Q/W_K parameter has a float
``lr`` and ``weight_decay``, ``maximize=False`` and ``differentiable=False``; for
Adam/AdamW also ``amsgrad=False``, ``capturable=False`` and ``eps > 0``; and the class
has no constructor option this module does not know (a newer torch may add one). SGD's
momentum, dampening and nesterov, and foreach / fused implementations, are all allowed.
Anything else takes the snapshot path. Why a zero row stays put:

- Adam/AdamW: ``m = lerp(0, 0, 1-b1) = 0``, ``v = b2*0 + (1-b2)*0*0 = 0``, and the update
  is ``param + (-step_size) * 0 / (0 + eps)`` = ``param + (-0.0)``, which is ``param``
  exactly (also for -0.0); ``eps > 0`` keeps 0/0 (NaN) out. The step counter is per
  tensor and advances as usual.
- SGD: the momentum buffer stays ``0*momentum + (1-dampening)*0 = 0`` (nesterov adds
  ``momentum*0``) and ``param + (-lr)*0 == param``. ``maximize`` would negate a zero into
  -0.0 and make ``-0.0`` weights +0.0, hence excluded.

What keeps gradients and state zero on frozen rows:

- gradients: ``RowMaskGuard.mask_grads()`` before clipping (the pre-step hook masks them
  itself if that was skipped);
- state: frozen rows' param-shaped state (``exp_avg``, ``exp_avg_sq``,
  ``momentum_buffer``) is zeroed when rows leave the mask (:meth:`MaskedUpdate.freeze`),
  when the guard meets the optimizer, and when the optimizer state was loaded from a
  checkpoint (:meth:`MaskedUpdate.adopt`: snapshot-path checkpoints and plain ones carry
  moments in frozen rows). State created lazily by the first step is zero already.
  ``reentry="reset"``: rows entering the mask start from zero moments, as on the snapshot
  path. ``reentry="keep"``: the moments of leaving rows are set aside on the CPU (the
  *stash*) and put back when the rows re-enter, a cost paid per refresh, not per step;
  the stash is saved with LongAct's own checkpoint state.

Weight decay would still move a frozen row. While :meth:`MaskedUpdate.arm` is in force
(``RowMaskGuard.protect``), a step pre-hook sets ``weight_decay`` to 0 in every param
group holding a W_Q/W_K parameter with a gradient, and applies the decay itself, with the
lr of that step, to every parameter of the group that has a gradient; the post-hook
puts the group's ``weight_decay`` back (checkpoints keep the user's value). A step the
caller skips (verl skips ``optimizer.step()`` on a non-finite grad norm) runs neither
hook. Arithmetic, per torch 2.13's implementations (``torch/optim/adam.py``, ``sgd.py``):

- decoupled (AdamW, Adam with ``decoupled_weight_decay=True``): torch multiplies the
  parameter by ``1 - lr*wd`` before anything else in the step; the hook does the same
  just before it (``torch._foreach_mul_``). A W_Q/W_K parameter is multiplied on its
  trainable rows only: fp32/fp64 on the CPU by ``index_reduce_(..., "prod")`` over those
  rows (it touches 30 % of the rows where torch's decay touches all: cheaper than the
  decay it replaces); otherwise by a per-row column that is ``1 - lr*wd`` on trainable
  rows and exactly 1.0 on frozen rows, held in the op's compute dtype. Either way a
  trainable row gets the single rounding of torch's scalar multiply. Bitwise identical
  to the snapshot path for the single-tensor and foreach implementations, any float
  dtype. A fused kernel decays inside the kernel without rounding the decayed value to
  the parameter dtype (on CUDA it may also contract decay and update into one
  multiply-add): fp32 on the CPU is still bitwise identical (tested); otherwise one step
  agrees to one unit in the last place of the parameter dtype at the larger magnitude
  of the parameter before and after the step (tested for bf16 on the CPU; the CUDA
  tests carry the same bound).
- coupled (Adam default, SGD): torch adds ``wd * param`` to the gradient; the hook does
  so with the same op (``grad.add_`` or ``torch._foreach_add_`` per device and dtype, as
  the group's implementation would) on whole gradients, then zeroes the frozen rows of
  W_Q/W_K gradients again. Bitwise identical to the snapshot path for single-tensor and
  foreach (and fp32 fused SGD on the CPU, tested); fused kernels add the decay inside
  the kernel (same tolerance as above). Sparse gradients are refused.

Deliberate departures from plain torch: with coupled decay ``param.grad`` holds the
decayed gradient after the step (torch computes it out of place); a frozen row's
optimizer state is zero (the snapshot path keeps the moments it had when the row left
the mask); a fused optimizer stepped through an AMP ``GradScaler`` cannot have its decay
applied outside the kernel and raises (use ``exact_path="snapshot"``), and so does a step
after a param group's settings were changed to ones the rule excludes (checked by the
pre-step hook before it touches anything). Steps outside ``protect`` are left alone.
"""

from __future__ import annotations

import inspect
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import _default_to_fused_or_foreach

from longact.core.arch import Key, ParamRef
from longact.core.sharding import local_tensor

# constructor options of each class this module understands (torch 2.13)
_KNOWN_OPTIONS = {
    torch.optim.Adam: {
        "params", "lr", "betas", "eps", "weight_decay", "amsgrad", "foreach", "maximize",
        "capturable", "differentiable", "fused", "decoupled_weight_decay",
    },
    torch.optim.SGD: {
        "params", "lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize",
        "foreach", "differentiable", "fused",
    },
}  # fmt: skip
_KNOWN_OPTIONS[torch.optim.AdamW] = _KNOWN_OPTIONS[torch.optim.Adam] - {"decoupled_weight_decay"}


@dataclass
class _Target:
    """One parameter holding W_Q/W_K rows (or q/k bias entries) and this rank's view of
    its row mask. ``sources``: [(key, (C,) global rows holding that key's channels)];
    rows in no source (v of a fused qkv_proj, Qwen3.5's gate) are always trainable."""

    name: str
    ref: ParamRef
    param: nn.Parameter
    start: int  # global rows [start, stop) held locally
    stop: int
    sources: list[tuple[Key, torch.Tensor]]
    frozen: torch.Tensor  # (n_frozen_local,) long, local row indices, always on the CPU
    kept: torch.Tensor  # (n_local - n_frozen_local,) long, the trainable ones, CPU
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


def param_state(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> dict[str, Any]:
    """Param-shaped tensors of the optimizer state of ``param`` (exp_avg, ...)."""
    state = optimizer.state.get(param) or {}
    return {
        k: v
        for k, v in state.items()
        if torch.is_tensor(v) and tuple(v.shape) == tuple(param.shape)
    }


def _group_problem(cls: type, group: dict) -> str | None:
    """Why this param group's settings rule out the masked path (None: they don't)."""
    for key in ("lr", "weight_decay"):
        if not isinstance(group[key], (int, float)):
            return f"{key} is a {type(group[key]).__name__}, not a float"
    for key, allowed in (("maximize", False), ("differentiable", False)):
        if group.get(key, allowed) is not allowed:
            return f"{key}={group[key]!r} (the masked path needs {key}={allowed})"
    if cls is torch.optim.SGD:
        return None
    for key in ("amsgrad", "capturable"):
        if group.get(key, False) is not False:
            return f"{key}={group[key]!r} (the masked path needs {key}=False)"
    if not group["eps"] > 0:
        return f"eps={group['eps']!r} (the masked path needs eps > 0: 0/(0+eps) must be 0)"
    return None


def exact_path_for(
    optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor] | None = None
) -> tuple[str, str]:
    """``("masked" | "snapshot", reason)``: how RowMaskGuard keeps frozen rows exact under
    ``optimizer`` (the rule is in this module's docstring). Only the param groups holding
    one of ``params`` (the W_Q/W_K parameters; all groups when None) are checked."""
    cls = type(optimizer)
    name = f"{cls.__module__}.{cls.__qualname__}"
    if cls not in _KNOWN_OPTIONS:
        return "snapshot", (
            f"{name} is not exactly torch.optim.AdamW, torch.optim.Adam or torch.optim.SGD"
        )
    unknown = set(inspect.signature(cls.__init__).parameters) - _KNOWN_OPTIONS[cls] - {"self"}
    if unknown:
        return "snapshot", f"{name} has options this LongAct does not know: {sorted(unknown)}"
    wanted = None if params is None else {id(p) for p in params}
    for i, group in enumerate(optimizer.param_groups):
        if wanted is not None and not any(id(p) in wanted for p in group["params"]):
            continue
        problem = _group_problem(cls, group)
        if problem is not None:
            return "snapshot", f"{name}, param group {i}: {problem}"
    return "masked", f"{name}: a zero gradient with zero moments updates a row by exactly 0"


def _by_device_dtype(*lists: list[torch.Tensor]) -> list[tuple[list[torch.Tensor], ...]]:
    """The lists split by (device, dtype) of the first, as torch's foreach paths do."""
    out: dict[tuple, tuple[list[torch.Tensor], ...]] = {}
    for items in zip(*lists, strict=True):
        key = (items[0].device, items[0].dtype)
        bucket = out.setdefault(key, tuple([] for _ in lists))
        for b, x in zip(bucket, items, strict=True):
            b.append(x)
    return list(out.values())


def _uses_foreach(group: dict, params: list[torch.Tensor]) -> bool:
    """Whether torch runs this group through its foreach implementation (else single
    tensor or fused), with the defaults ``torch.optim.adam`` / ``sgd`` apply."""
    if group.get("foreach") is None and group.get("fused") is None:
        return _default_to_fused_or_foreach(params, differentiable=False, use_fused=False)[1]
    return bool(group.get("foreach"))


class MaskedUpdate:
    """The masked path for one optimizer and a guard's targets (see module docstring)."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        targets: list[_Target],
        reentry: str,
        mask_grads: Callable[[], None],
    ):
        self.optimizer = optimizer
        self.targets = targets
        self.reentry = reentry
        self._mask_grads = mask_grads
        self._by_param = {id(t.param): t for t in targets}
        self._index = {id(t): i for i, t in enumerate(targets)}
        # reentry="keep": (target index, state key) -> (local rows, their values, CPU)
        self.stash: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self._armed = False
        self._grads_masked = False
        self._saved_wd: list[tuple[dict, float]] = []
        self.hook_s = 0.0  # seconds in the hooks during the last armed block
        optimizer.register_step_pre_hook(self._pre_step)  # inert unless armed
        optimizer.register_step_post_hook(self._post_step)

    # ---- optimizer state of frozen rows ------------------------------------------------
    @torch.no_grad()
    def freeze(self, t: _Target, rows: torch.Tensor) -> None:
        """Local ``rows`` of ``t`` leave the mask: zero their state (stash it first
        under ``reentry="keep"``)."""
        for k, v in param_state(self.optimizer, t.param).items():
            local = local_tensor(v)
            idx = rows.to(local.device)
            if self.reentry == "keep":
                self._put(t, k, rows, local.index_select(0, idx).cpu())
            local.index_fill_(0, idx, 0)

    @torch.no_grad()
    def thaw(self, t: _Target, rows: torch.Tensor) -> None:
        """Local ``rows`` of ``t`` enter the mask: zero state (``reset``) or the stashed
        moments put back (``keep``; rows never stashed keep their zero state)."""
        for k, v in param_state(self.optimizer, t.param).items():
            local = local_tensor(v)
            if self.reentry == "reset":
                local.index_fill_(0, rows.to(local.device), 0)
                continue
            got = self._take(t, k, rows)
            if got is not None:
                idx, values = got
                local.index_copy_(0, idx.to(local.device), values.to(local.device))

    @torch.no_grad()
    def adopt(self) -> None:
        """The optimizer state was replaced (a checkpoint was loaded) or is met for the
        first time: zero the state of every frozen row, stashing rows that hold moments
        under ``reentry="keep"``. The stash of earlier state is dropped."""
        self.stash.clear()
        for t in self.targets:
            if not t.frozen.numel():
                continue
            state = param_state(self.optimizer, t.param)
            if self.reentry == "keep" and state:
                rows = {k: local_tensor(v).index_select(0, t.frozen_on(local_tensor(v))).cpu()
                        for k, v in state.items()}  # fmt: skip
                held = torch.zeros(t.frozen.numel(), dtype=torch.bool)
                for r in rows.values():
                    held |= r.reshape(r.shape[0], -1).ne(0).any(1)
                for k, r in rows.items():
                    if held.any():
                        self._put(t, k, t.frozen[held], r[held])
            for v in state.values():
                local = local_tensor(v)
                local.index_fill_(0, t.frozen_on(local), 0)

    def _put(self, t: _Target, key: str, rows: torch.Tensor, values: torch.Tensor) -> None:
        slot = (self._index[id(t)], key)
        old = self.stash.get(slot)
        if old is not None:  # rows stashed again replace their old values
            keep = ~torch.isin(old[0], rows)
            rows, values = torch.cat([old[0][keep], rows]), torch.cat([old[1][keep], values])
        self.stash[slot] = (rows, values)

    def _take(self, t: _Target, key: str, rows: torch.Tensor):
        slot = (self._index[id(t)], key)
        old = self.stash.get(slot)
        if old is None:
            return None
        hit = torch.isin(old[0], rows)
        if hit.all():
            del self.stash[slot]
        else:
            self.stash[slot] = (old[0][~hit], old[1][~hit])
        return old[0][hit], old[1][hit]

    def stash_bytes(self) -> int:
        return sum(v.numel() * v.element_size() for _, v in self.stash.values())

    # ---- the step hooks ------------------------------------------------------------------
    def arm(self, grads_masked: bool) -> None:
        """Hooks act on the next step (until :meth:`disarm`). ``grads_masked``: the
        frozen gradient rows were zeroed since the last step."""
        self._armed, self._grads_masked, self.hook_s = True, grads_masked, 0.0

    def disarm(self) -> None:
        """End of the protected block: put back any weight decay a failed step left at 0."""
        self._armed = False
        self._restore_wd()

    def _restore_wd(self) -> None:
        for group, wd in self._saved_wd:
            group["weight_decay"] = wd
        self._saved_wd.clear()

    @torch.no_grad()
    def _pre_step(self, optimizer, args, kwargs) -> None:
        if not self._armed:
            return
        t0 = time.perf_counter()
        if not self._grads_masked:
            self._mask_grads()
            self._grads_masked = True
        todo = []  # (group, params with a grad): groups holding a W_Q/W_K param with a grad
        for i, group in enumerate(optimizer.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            if not any(id(p) in self._by_param for p in params):
                continue
            problem = _group_problem(type(optimizer), group)  # settings changed since?
            if problem is not None:
                raise RuntimeError(
                    f"param group {i} no longer fits the masked exact path: {problem}; "
                    "build the RowMaskGuard with exact_path='snapshot'"
                )
            if group["weight_decay"] != 0:
                todo.append((group, params))
        if todo and getattr(optimizer, "grad_scale", None) is not None:
            raise RuntimeError(
                "a fused optimizer stepped through a GradScaler: weight decay cannot be "
                "applied outside its kernel; build the RowMaskGuard with exact_path='snapshot'"
            )
        for group, params in todo:
            wd = group["weight_decay"]
            self._saved_wd.append((group, wd))
            group["weight_decay"] = 0
            decoupled = type(optimizer) is torch.optim.AdamW or group.get("decoupled_weight_decay")
            if decoupled:
                self._decay_params(params, 1 - group["lr"] * wd)
            else:
                self._decay_grads(params, wd, _uses_foreach(group, params))
        self.hook_s += time.perf_counter() - t0

    def _post_step(self, optimizer, args, kwargs) -> None:
        if self._armed:
            self._restore_wd()

    def _decay_params(self, params: list[torch.Tensor], factor: float) -> None:
        """``p *= factor`` on every parameter, trainable rows only for W_Q/W_K."""
        others = [local_tensor(p) for p in params if id(p) not in self._by_param]
        if others:
            torch._foreach_mul_(others, factor)
        for p in params:
            t = self._by_param.get(id(p))
            if t is None:
                continue
            local = local_tensor(p)
            if not t.frozen.numel():
                local.mul_(factor)
                continue
            dtype = torch.promote_types(local.dtype, torch.float32)  # the op's compute dtype
            if local.device.type == "cpu" and local.dtype == dtype:  # fp32, fp64
                ones = (1,) * local.dim()
                src = torch.full(ones, factor, dtype=dtype).expand(t.kept.numel(), *local.shape[1:])
                with warnings.catch_warnings():  # "index_reduce() is in beta"
                    warnings.simplefilter("ignore", UserWarning)
                    local.index_reduce_(0, t.kept, src, "prod")
                continue
            shape = (local.shape[0],) + (1,) * (local.dim() - 1)
            col = torch.full(shape, factor, dtype=dtype, device=local.device)
            local.mul_(col.index_fill_(0, t.frozen_on(col), 1.0))

    def _decay_grads(self, params: list[torch.Tensor], wd: float, foreach: bool) -> None:
        """``grad += wd * p`` as the group's implementation does it, then frozen rows of
        W_Q/W_K gradients back to zero."""
        grads = [local_tensor(p.grad) for p in params]
        if any(g.is_sparse for g in grads):
            raise RuntimeError(
                "the masked exact path cannot add coupled weight decay to sparse gradients; "
                "build the guard with exact_path='snapshot'"
            )
        locals_ = [local_tensor(p) for p in params]
        if foreach:
            for g, p in _by_device_dtype(grads, locals_):
                torch._foreach_add_(g, p, alpha=wd)
        else:
            for g, p in zip(grads, locals_, strict=True):
                g.add_(p, alpha=wd)
        for p, g in zip(params, grads, strict=True):
            t = self._by_param.get(id(p))
            if t is not None and t.frozen.numel():
                g.index_fill_(0, t.frozen_on(g), 0)
