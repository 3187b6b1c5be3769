"""The wire format between training ranks and the saliency coordinator.

Wire cost (Qwen3-8B: 36 layers x (4096 + 1024) channels). A ``QKStats.state_dict()``
holds a count and one tensor per statistic for every key (288 tensors with all built-in
statistics) and Ray pickles each separately (~35 ms per rank on a CPU core, paid again to
unpickle). The flat form from :func:`stats_payload` is one float64 numpy vector per field
(``QKStats.to_fields``), which Ray ships out-of-band: one copy into the object store,
zero-copy reads. It carries only the fields the masks and metrics need
(:func:`payload_fields`: ``count`` and the statistics the configured score and
``MASS_SCORE`` declare in ``longact.core.scores``; for the default score, ``count`` and
``sum_abs``: 1.41 MiB per rank at 8B instead of 4.22 MiB with all three built-in
statistics). ``submit`` accepts both forms (:func:`read_payload`). Flat partials are
merged in place into one buffer per field by each field's declared reduction
(:func:`merge_fields_`: the same operations in the same order as ``QKStats.merge``, so
bit-identical); others take the generic merge. The published mask dict pickles as one
bit-packed buffer (1/8 byte per row, small enough for Ray to inline in each reply) and
unpickles as the usual ``{"3.q": bool tensor}`` dict (:class:`PackedMasks`).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from longact.core.arch import Key, key_str
from longact.core.masks import MaskSet
from longact.core.scores import fields_for, reduction_of
from longact.core.stats import Fields, QKStats, check_fields

FLAT_FORMAT = "flat"
MASS_SCORE = "mean_abs"  # the score of the coordinator's mass-kept metric (|x| mass)


def payload_fields(score: str) -> tuple[str, ...]:
    """Statistics fields a refresh needs for ``score``: ``count`` and the statistics
    ``score`` and the metrics (``MASS_SCORE``) declare, sorted."""
    return fields_for(score, MASS_SCORE)


def stats_payload(stats: QKStats, fields: Fields = None) -> dict[str, Any]:
    """The cheap wire form of one rank's statistics for ``exchange``/``submit``:
    ``{"format": "flat", "keys": ["0.k", "0.q", ...], "fields": {"count": (K,),
    "sum_abs": (R,), ...}}``, float64 numpy vectors from ``QKStats.to_fields`` (default:
    every field the statistics hold; torch tensors are accepted too)."""
    return {
        "format": FLAT_FORMAT,
        "keys": [key_str(k) for k in stats.keys()],
        "fields": {f: v.numpy() for f, v in stats.to_fields(fields).items()},
    }


def merge_fields_(acc: dict[str, torch.Tensor], part: dict[str, torch.Tensor]) -> dict:
    """Merge the flat fields ``part`` into ``acc`` in place, each by its declared
    reduction: the same operations as ``ChannelStats.merge``, so bit-identical."""
    if set(acc) != set(part):
        raise ValueError(f"cannot merge statistics fields {sorted(acc)} with {sorted(part)}")
    for f, v in part.items():
        reduction_of(f).combine_(acc[f], v)
    return acc


def read_payload(
    stats_state: dict[str, Any], layout: list[tuple[Key, int]], need: tuple[str, ...]
) -> dict[str, torch.Tensor] | QKStats:
    """A rank's partial statistics (either form), as flat fields when they cover exactly
    ``layout`` ((key, channels), sorted keys). Raises unless they hold every field in
    ``need`` (``payload_fields`` of the configured score)."""
    if stats_state.get("format") == FLAT_FORMAT:
        if list(stats_state["keys"]) != [key_str(k) for k, _ in layout]:
            raise ValueError("flat statistics do not cover the coordinator's layout")
        part = {f: _as_float64(v) for f, v in stats_state["fields"].items()}
        check_fields(layout, part)
    else:
        part = QKStats.from_state_dict(stats_state)
        part = part.to_fields() if part.layout() == layout else part
    missing = sorted(set(need) - set(part if isinstance(part, dict) else part.fields()))
    if missing:
        raise ValueError(f"statistics lack {missing}; the score and metrics need {list(need)}")
    return part


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
