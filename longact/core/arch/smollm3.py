"""SmolLM3: separate ``q_proj`` / ``k_proj``; every 4th layer (by default) has no RoPE.

``config.no_rope_layers[i]`` is 1 where layer ``i`` applies RoPE and 0 where it does
not (NoPE). LongAct masks both kinds of layer alike. On a NoPE layer no channel turns
with another, so ``rope_pair`` granularity has no pairs to keep together: every channel
is its own unit there (``rope_pair`` = ``channel`` on that layer, same ``n_keep``
rounding over its C channels). In ``longact inspect`` all its channels count as
frequency 0 (low frequency). No q/k norm: only the ``proj`` capture point.
"""

from __future__ import annotations

from typing import Any

from longact.core.arch.base import ArchAdapter, register
from longact.core.arch.layout import Rope


@register("smollm3")
class SmolLM3(ArchAdapter):
    family = "smollm3"
    norm_modules = {}
    notes = "NoPE layers: rope_pair = channel there"

    def rope(self, cfg: Any, layer: int, head_dim: int) -> Rope:
        if not cfg.no_rope_layers[layer]:
            return Rope("none")
        return super().rope(cfg, layer, head_dim)
