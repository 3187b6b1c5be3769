"""The wire format between training ranks and the saliency coordinator.

Wire cost (Qwen3-8B: 36 layers x (4096 + 1024) channels). A ``QKStats.state_dict()``
holds 4 tensors per key (288 here) and Ray pickles each separately (~35 ms per rank on
a CPU core, paid again to unpickle). The flat form from :func:`stats_payload` is one
float64 numpy vector per statistics field (``QKStats.to_fields``), which Ray ships
out-of-band: one copy into the object store, zero-copy reads. It carries only the fields
the masks and metrics need (:func:`payload_fields`): ``count`` and ``sum_abs`` always
(the ``mean_abs`` score and the |x| mass-kept metric), plus ``sum_sq`` for ``rms`` and
``max_abs`` for ``max_abs``; 1.41 MiB per rank at 8B instead of 4.22 MiB for all four.
The coordinator's running statistics then hold zeros in the fields nobody sent.
``submit`` accepts both forms. Flat partials are merged in place into one buffer per
field (the same additions in the same order as ``QKStats.merge``, so bit-identical);
others take the generic merge. The published mask dict pickles as one bit-packed buffer
(1/8 byte per row, small enough for Ray to inline in each reply) and unpickles as the
usual ``{"3.q": bool tensor}`` dict (:class:`PackedMasks`).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from longact.core.adapters import key_str
from longact.core.masks import MaskSet
from longact.core.stats import FIELDS, QKStats

FLAT_FORMAT = "flat"


def payload_fields(score: str) -> tuple[str, ...]:
    """Statistics fields a refresh needs for ``score`` (all of them for a score this
    module does not know, e.g. one registered by a user)."""
    extra = {"mean_abs": (), "rms": ("sum_sq",), "max_abs": ("max_abs",)}
    return ("count", "sum_abs", *extra[score]) if score in extra else FIELDS


def stats_payload(stats: QKStats, fields: tuple[str, ...] = FIELDS) -> dict[str, Any]:
    """The cheap wire form of one rank's statistics for ``exchange``/``submit``:
    ``{"format": "flat", "keys": ["0.k", "0.q", ...], "fields": {"count": (K,),
    "sum_abs": (R,), ...}}``, float64 numpy vectors from ``QKStats.to_fields``
    (torch tensors are accepted too)."""
    return {
        "format": FLAT_FORMAT,
        "keys": [key_str(k) for k in stats.keys()],
        "fields": {f: v.numpy() for f, v in stats.to_fields(fields).items()},
    }


def _as_float64(x: Any) -> torch.Tensor:
    """A float64 tensor over x (no copy for float64 numpy arrays, even read-only ones
    out of Ray's object store: they are only read)."""
    if isinstance(x, np.ndarray):
        with warnings.catch_warnings():  # "not writable": we never write to it
            warnings.simplefilter("ignore", UserWarning)
            return torch.as_tensor(x, dtype=torch.float64)
    return torch.as_tensor(x, dtype=torch.float64)


def _unpack_masks(names: list[str], sizes: list[int], bits: np.ndarray) -> dict:
    flat = torch.from_numpy(np.unpackbits(bits, count=sum(sizes)).astype(bool))
    return {n: p.clone() for n, p in zip(names, torch.split(flat, sizes))}


class PackedMasks(dict):
    """``{name: 1-D bool tensor}`` that pickles as one bit-packed numpy buffer and
    unpickles as a plain dict of bool tensors (Ray would pickle each tensor separately,
    ~0.1 ms apiece, once for every rank that receives the published masks)."""

    def __init__(self, masks: dict[str, torch.Tensor]):
        super().__init__(masks)
        names = list(self)
        flat = torch.cat([self[n].reshape(-1).to(torch.bool) for n in names]) if names else None
        sizes = [int(self[n].numel()) for n in names]
        self._packed = (names, sizes, None if flat is None else np.packbits(flat.numpy()))

    def __reduce__(self):
        if self._packed[2] is None:
            return (dict, (dict(self),))
        return (_unpack_masks, self._packed)


def _packed(masks: MaskSet) -> dict[str, Any]:
    """``masks.state_dict()`` with the mask tensors in a PackedMasks (cheap to pickle)."""
    sd = masks.state_dict()
    sd["masks"] = PackedMasks(sd["masks"])
    return sd
