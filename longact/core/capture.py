"""Forward hooks that accumulate q/k channel statistics (plumbing around stats.py).

``capture_qk_stats(model)`` registers forward hooks, on every layer the adapter applies
to, on the module producing each projection's channels (``point="proj"``, default: works
for every architecture) or on q_norm / k_norm (``point="norm"``; an error for models
without them) and accumulates :class:`~longact.core.stats.QKStats` from the real tokens
of each pass.
Hooks are removed on exit; the capture object can also be kept attached for a whole
training run (``attach()`` / ``detach()``), with ``take()`` returning and clearing the
statistics at each mask refresh.

``fields`` limits which statistics are held and accumulated (default: every registered
one, ``longact.core.scores``): the training runtime asks only for what its score needs
(``wire.payload_fields``), one reduction per hook call instead of three.

Shapes: the producing module's output (B, T, R) holds the key's C = heads*head_dim
channels at the rows ``LayerQK.rows`` gives (all R for a plain q_proj; the query half of
each head's block for Qwen3.5's gated q_proj; a slice of Phi-3's fused qkv_proj), read
as (B, T, C). A norm output is laid out per ``ArchAdapter.norm_layout``: (B, T, H, D)
(Qwen3), (B, H, T, D) (Gemma 3) or (B, T, C) (OLMo's whole-width norm), flattened to
(B, T, C). Statistics are per channel of that last dim.

Which tokens count, in order of precedence:
1. a mask given with ``token_mask=`` / ``set_token_mask(mask)`` (B, T) bool;
2. the ``attention_mask`` (B, T) passed to the model's forward (read by a forward
   pre-hook on ``model``); if it is longer than the activation (generation with a KV
   cache), its last T columns are used;
3. otherwise every token (packed / remove-padding inputs of shape (1, total_nnz)).
verl's engine pads packed inputs (Ulysses alignment, ``pad_to_length``): LongAct's
engine sets :func:`packed_token_mask` for each such micro-batch, so padding never counts.
A 2-D mask whose shape does not fit the activation raises.

Which passes count: a top-level forward of ``model`` counts if grad mode is on and the
model is in training mode at entry, or always with ``during_no_grad=True`` (calibration
passes). Gradient checkpointing replays layer forwards during backward; a hook that fires
inside the autograd engine (``torch._C._current_graph_task_id() != -1``) is such a replay
and is skipped. This covers non-reentrant checkpointing (first forward with grad on,
replay in backward) and reentrant checkpointing (first forward under no_grad inside a
grad-enabled top-level pass, so judged by the state at model entry; replay in backward).
Hooks fired outside a top-level forward of ``model`` use the current grad mode and the
module's training flag.

``record_s`` adds up the host wall-clock seconds spent recording (``pop_record_s()`` reads
and clears it): the direct cost of capture, as a metric. On CUDA it is kernel-launch time.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from typing import Any, Self

import torch
from torch import nn

from longact.core.arch import ArchAdapter, Key, get_adapter
from longact.core.stats import Fields, QKStats

POINTS = ("proj", "norm")


def _in_backward() -> bool:
    """True while the autograd engine runs (e.g. a checkpoint recomputation)."""
    return torch._C._current_graph_task_id() != -1


class QKCapture:
    """Accumulates q/k statistics from forward hooks. Use as a context manager."""

    def __init__(
        self,
        model: nn.Module,
        adapter: ArchAdapter | None = None,
        point: str = "proj",
        token_mask: torch.Tensor | None = None,
        during_no_grad: bool = False,
        fields: Fields = None,
    ):
        if point not in POINTS:
            raise ValueError(f"unknown capture point {point!r}; valid: {', '.join(POINTS)}")
        self.model = model
        self.adapter = adapter or get_adapter(model)
        self.point = point
        self.during_no_grad = during_no_grad
        self.fields = None if fields is None else tuple(fields)  # held statistics; None: all
        self.layout = self.adapter.layout(model)
        self.layers = self.adapter.layers(model)
        if point == "norm" and any(set(la.norms) != set(la.modules) for la in self.layers):
            raise ValueError(
                f"point='norm' needs q_norm/k_norm modules; {type(model).__name__} "
                f"({self.adapter.family} adapter) has none on some layers: use point='proj'"
            )
        first = self.layers[0].modules[next(iter(self.layers[0].modules))]
        self._device = next(first.parameters()).device
        # key -> (C,) rows of the producing module's output, and per-device copies
        self._rows = {(la.index, p): r for la in self.layers for p, r in la.rows.items()}
        self._slices = {k: _as_slice(r) for k, r in self._rows.items()}
        self._rows_on: dict[tuple[Key, torch.device], torch.Tensor] = {}
        self.stats = QKStats.empty(self.layout.row_counts(), self._device, self.fields)
        self._token_mask = token_mask
        self._pass_mask: torch.Tensor | None = None
        self._pass_active: bool | None = None  # None: not inside a top-level forward
        self._mask_arg_index = self._find_mask_arg_index(model)
        self._handles: list[Any] = []
        self.record_s = 0.0  # host seconds spent in _record since the last pop_record_s

    # ---- public ----------------------------------------------------------------------
    def set_token_mask(self, mask: torch.Tensor | None) -> None:
        """(B, T) bool/int mask of tokens to count for the next passes; None to clear."""
        self._token_mask = mask

    def to(self, device: torch.device | str) -> QKCapture:
        """Keep the statistics gathered so far on ``device`` (e.g. the CPU while verl
        offloads the model); the next recorded activation brings them to its own device."""
        device = torch.device(device)
        if device != self._device:
            self.stats = self.stats.to(device)
            self._device = device
        return self

    def take(self) -> QKStats:
        """Return the statistics gathered so far and start from zero."""
        out = self.stats
        self.stats = QKStats.empty(self.layout.row_counts(), self._device, self.fields)
        return out

    def pop_record_s(self) -> float:
        """Seconds spent recording statistics since the last call (then reset to 0)."""
        out, self.record_s = self.record_s, 0.0
        return out

    def attach(self) -> QKCapture:
        if self._handles:
            return self
        self._handles.append(
            self.model.register_forward_pre_hook(self._on_model_entry, with_kwargs=True)
        )
        self._handles.append(
            self.model.register_forward_hook(self._on_model_exit, always_call=True)
        )
        for layer in self.layers:
            for proj in layer.modules:
                mod = layer.proj(proj) if self.point == "proj" else layer.norm(proj)
                self._handles.append(
                    mod.register_forward_hook(self._make_hook((layer.index, proj)))
                )
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._pass_active, self._pass_mask = None, None

    def __enter__(self) -> Self:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    # ---- hooks -----------------------------------------------------------------------
    @staticmethod
    def _find_mask_arg_index(model: nn.Module) -> int | None:
        try:
            params = list(inspect.signature(model.forward).parameters)
        except (TypeError, ValueError):
            return None
        return params.index("attention_mask") if "attention_mask" in params else None

    def _on_model_entry(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._pass_active = self.during_no_grad or (torch.is_grad_enabled() and module.training)
        mask = kwargs.get("attention_mask")
        if mask is None and self._mask_arg_index is not None and len(args) > self._mask_arg_index:
            mask = args[self._mask_arg_index]
        self._pass_mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    def _on_model_exit(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._pass_active, self._pass_mask = None, None

    def _active(self, module: nn.Module) -> bool:
        if _in_backward():
            return False  # gradient-checkpointing replay
        if self._pass_active is not None:
            return self._pass_active
        return self.during_no_grad or (torch.is_grad_enabled() and module.training)

    def _make_hook(self, key: Key) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if not self._active(module):
                return
            out = output[0] if isinstance(output, tuple) else output
            t0 = time.perf_counter()
            self._record(key, out)
            self.record_s += time.perf_counter() - t0

        return hook

    def _channels(self, key: Key, out: torch.Tensor) -> torch.Tensor:
        """The key's channels (B, T, C) of a hooked module's output."""
        n_channels = self.layout.rows(key)
        layout = self.adapter.norm_layout
        if self.point == "norm" and layout != "flat":
            if layout == "heads_first":
                out = out.transpose(-3, -2)  # (B, H, T, D) -> (B, T, H, D)
            return out.reshape(*out.shape[:-2], n_channels)  # (B, T, C)
        if self.point == "norm":
            return out  # (B, T, C): a norm over the whole projection
        sl = self._slices[key]
        if sl is not None:
            return out[..., sl]  # (B, T, R) -> (B, T, C), a view
        idx = self._rows_on.get((key, out.device))
        if idx is None:
            idx = self._rows_on[(key, out.device)] = self._rows[key].to(out.device)
        return out.index_select(-1, idx)  # (B, T, C)

    @torch.no_grad()
    def _record(self, key: Key, out: torch.Tensor) -> None:
        x = self._channels(key, out.detach())  # (B, T, C)
        lead = x.shape[:-1]
        if x.device != self._device:  # the model moved (verl's param offload): follow it
            self.to(x.device)
        mask = self._token_mask if self._token_mask is not None else self._pass_mask
        if mask is not None:
            mask = self._fit_mask(mask, lead)  # (B, T) bool
        self.stats.update(key, x, mask)

    @staticmethod
    def _fit_mask(mask: torch.Tensor, lead: torch.Size) -> torch.Tensor:
        if tuple(mask.shape) == tuple(lead):
            return mask.to(torch.bool)
        fits_rows = mask.dim() == 2 and len(lead) == 2 and mask.shape[0] == lead[0]
        if fits_rows and mask.shape[1] > lead[1]:  # KV-cache decoding: the newest T positions
            return mask[:, -lead[1] :].to(torch.bool)
        raise ValueError(
            f"token mask of shape {tuple(mask.shape)} does not fit activations with "
            f"token dims {tuple(lead)}"
        )


def _as_slice(rows: torch.Tensor) -> slice | None:
    """``rows`` as a slice when they are consecutive (a view instead of a gather)."""
    start = int(rows[0])
    if torch.equal(rows, torch.arange(start, start + rows.numel())):
        return slice(start, start + rows.numel())
    return None


def packed_token_mask(
    local_len: int, pad_size: int, sp_rank: int = 0, sp_size: int = 1, device: Any = None
) -> torch.Tensor:
    """(1, local_len) bool: the real tokens of one sequence-parallel rank's slice of a
    packed (remove-padding) sequence.

    verl packs a micro-batch into one row of ``local_len * sp_size`` tokens whose last
    ``pad_size`` are padding (its Ulysses alignment pad plus ``pad_to_length``'s bucket
    pad), then gives SP rank r the slice ``[r * local_len, (r + 1) * local_len)``.
    """
    start = sp_rank * local_len
    real = max(0, min(local_len, local_len * sp_size - pad_size - start))
    mask = torch.zeros((1, local_len), dtype=torch.bool, device=device)
    mask[:, :real] = True
    return mask


def capture_qk_stats(
    model: nn.Module,
    adapter: ArchAdapter | None = None,
    point: str = "proj",
    token_mask: torch.Tensor | None = None,
    during_no_grad: bool = False,
) -> QKCapture:
    """``with capture_qk_stats(model) as cap: ...; stats = cap.stats`` (hooks gone after)."""
    return QKCapture(model, adapter, point, token_mask, during_no_grad)
