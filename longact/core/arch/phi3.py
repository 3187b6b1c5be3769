"""Phi-3 and Phi-4 (``phi3``): one fused ``qkv_proj`` per layer.

``qkv_proj.weight`` is (Hq*D + 2*Hkv*D, hidden): rows ``[0, Hq*D)`` are W_Q, rows
``[Hq*D, Hq*D + Hkv*D)`` W_K, the rest W_V (and so the output is split in the attention
code). LongAct masks the q and k rows of that one parameter; the v rows are never
masked and train normally. Under FSDP2 the parameter is sharded ``Shard(0)`` along these
rows, so a rank's shard may hold q, k and v rows at once: each rank applies its slice of
the combined row mask (``longact.core.sharding``). Capture reads the q and k slices of
the ``qkv_proj`` output. RoPE is rotate-half over ``head_dim * partial_rotary_factor``
channels (Phi-4-mini: 0.75). No q/k norm: only the ``proj`` capture point.
No departure from the paper.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from longact.core.arch.base import ArchAdapter, register
from longact.core.arch.layout import ProjGeom


@register("phi3")
class Phi3(ArchAdapter):
    family = "phi3"
    proj_modules = {"qkv_proj": ("q", "k")}
    norm_modules = {}
    notes = "fused qkv_proj: q and k rows masked, v rows train normally"

    def channel_rows(self, proj: str, geoms: Mapping[str, ProjGeom]) -> torch.Tensor:
        start = 0 if proj == "q" else geoms["q"].rows
        return torch.arange(start, start + geoms[proj].rows)
