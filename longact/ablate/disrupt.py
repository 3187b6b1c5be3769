"""Disrupting chosen query/key channels at inference: the hooks behind ``longact ablate``.

Two pieces of plumbing around the capture point that LongAct's statistics use
(``longact.core.capture``: the output of the module producing a projection's channels,
``point="proj"``, or of its q/k norm, ``point="norm"``):

* :class:`CalibrationCapture` - a :class:`~longact.core.capture.QKCapture` that also sums
  the signed value of every channel over the real tokens of the calibration prompts. Its
  ``stats`` feed the same scores and mask policies as training; ``means()`` gives each
  channel's mean value, the replacement of ``mode="mean"``.
* :class:`Disruption` - forward hooks that overwrite the chosen channels of each
  (layer, proj) at the capture point, on every forward (prefill and each decoding step):
  with that channel's calibration mean (``mode="mean"``, the default) or with 0
  (``mode="zero"``). Every other channel, and every other module, is left as it was.

Our choice, not the paper's (the paper does not ablate): "mean" is the calibration mean
of the channel, one constant per channel, not a mean over the evaluated prompt's own
tokens. It removes what the channel says about each token while keeping its average
offset, needs no look at the evaluation prompt, and is the same during prefill and
KV-cached decoding. Zeroing also removes the offset, which for a massive channel is most
of its value.

Shapes: a channel view is (B, T, C) with C = heads * head_dim of that projection. At
``proj`` the hooked output is (B, T, R) and the channels sit at ``LayerQK.rows`` (a
subset of R for a gated q_proj or a fused qkv_proj); at ``norm`` it is laid out per
``ArchAdapter.norm_layout``: (B, T, H, D), (B, H, T, D) or (B, T, C).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from longact.core.arch import ArchAdapter, Key
from longact.core.capture import QKCapture

MODES = ("mean", "zero")


class CalibrationCapture(QKCapture):
    """QKCapture (always counting, also under no_grad) that also keeps the signed sum of
    every channel over the counted tokens."""

    def __init__(self, model: nn.Module, adapter: ArchAdapter | None = None, point: str = "proj"):
        super().__init__(model, adapter, point=point, during_no_grad=True)
        self._sums: dict[Key, torch.Tensor] = {}  # key -> (C,) float64
        self._counts: dict[Key, int] = {}

    @torch.no_grad()
    def _record(self, key: Key, out: torch.Tensor) -> None:
        super()._record(key, out)
        x = self._channels(key, out.detach()).double()  # (B, T, C)
        mask = self._token_mask if self._token_mask is not None else self._pass_mask
        if mask is not None:
            keep = self._fit_mask(mask, x.shape[:-1])  # (B, T) bool
            x, n = x[keep], int(keep.sum())  # (N, C)
        else:
            x, n = x.reshape(-1, x.shape[-1]), x.shape[:-1].numel()
        total = x.sum(0).cpu()
        self._sums[key] = self._sums.get(key, torch.zeros_like(total)) + total
        self._counts[key] = self._counts.get(key, 0) + n

    def means(self) -> dict[Key, torch.Tensor]:
        """{key: (C,) float64 mean value of each channel over the counted tokens}."""
        if not self._counts or min(self._counts.values()) == 0:
            raise ValueError("no calibration tokens were captured")
        return {k: s / self._counts[k] for k, s in self._sums.items()}


def replacement(
    chosen: Mapping[Key, torch.Tensor], means: Mapping[Key, torch.Tensor], mode: str
) -> dict[Key, tuple[torch.Tensor, torch.Tensor]]:
    """{key: (channel indices (n,), values (n,))} to write: the chosen channels' means
    (``mean``) or zeros (``zero``). Keys with no chosen channel are left out."""
    if mode not in MODES:
        raise ValueError(f"unknown disruption mode {mode!r}; valid: {', '.join(MODES)}")
    out = {}
    for key, mask in chosen.items():
        idx = torch.nonzero(mask).flatten()  # (n,)
        if idx.numel():
            vals = means[key][idx] if mode == "mean" else torch.zeros(idx.numel())
            out[key] = (idx, vals.double())
    return out


class Disruption:
    """Forward hooks overwriting channels at the capture point; a context manager.

    ``values``: {(layer, proj): (channel indices (n,), values (n,))} in the key's channel
    order (as :func:`replacement` gives). Keys must be ones the adapter applies to."""

    def __init__(
        self,
        model: nn.Module,
        values: Mapping[Key, tuple[torch.Tensor, torch.Tensor]],
        adapter: ArchAdapter | None = None,
        point: str = "proj",
    ):
        probe = QKCapture(model, adapter, point=point)  # validates point and adapter
        self.adapter, self.point = probe.adapter, point
        self.layers = {la.index: la for la in probe.layers}
        unknown = sorted(set(values) - set(probe.layout.keys()))
        if unknown:
            raise ValueError(f"keys {unknown} are not q/k keys of this model")
        # key -> (index tuple into the hooked output's trailing dims, values (n,)), worked
        # out once here: the hooks run on every decoding step
        self._where = {k: self._positions(k, idx, probe.layout.geom(k).head_dim)
                       for k, (idx, _) in values.items()}  # fmt: skip
        self.values = {k: v.double() for k, (_, v) in values.items()}
        self._on: dict[tuple[Key, torch.device, torch.dtype], tuple] = {}
        self._handles: list[Any] = []

    def _positions(self, key: Key, idx: torch.Tensor, head_dim: int) -> tuple:
        """Where the key's channels ``idx`` sit in the hooked module's output."""
        if self.point == "proj":
            return (self.layers[key[0]].rows[key[1]][idx],)  # last dim of (B, T, R)
        if self.adapter.norm_layout == "flat":
            return (idx,)  # (B, T, C)
        return (idx // head_dim, idx % head_dim)  # (.., H, D) after heads_first's transpose

    def _module(self, key: Key) -> nn.Module:
        la = self.layers[key[0]]
        return la.proj(key[1]) if self.point == "proj" else la.norm(key[1])

    def _write(self, key: Key, out: torch.Tensor) -> torch.Tensor:
        cached = self._on.get((key, out.device, out.dtype))
        if cached is None:
            where = tuple(t.to(out.device) for t in self._where[key])
            cached = self._on[(key, out.device, out.dtype)] = (
                where,
                self.values[key].to(out.device, out.dtype),
            )
        where, vals = cached
        y = out.clone()
        if self.point == "norm" and self.adapter.norm_layout == "heads_first":
            y.transpose(-3, -2)[(..., *where)] = vals  # (B, H, T, D) viewed as (B, T, H, D)
        else:
            y[(..., *where)] = vals  # writes the chosen channels only
        return y

    def _hook(self, key: Key):
        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            if isinstance(output, tuple):
                return (self._write(key, output[0]), *output[1:])
            return self._write(key, output)

        return hook

    def attach(self) -> Disruption:
        if not self._handles:
            for key in sorted(self.values):
                self._handles.append(self._module(key).register_forward_hook(self._hook(key)))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> Disruption:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()
