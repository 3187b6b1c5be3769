"""GLM-4.5 / GLM-4.6 (``glm4_moe``): separate ``q_proj`` / ``k_proj`` (with bias),
partial rotary, optional per-head q/k norm.

RoPE is rotate-half over the first ``head_dim * partial_rotary_factor`` channels of each
head (0.5 by default: 64 of 128); channels past that pass through unrotated, so under
``rope_pair`` granularity each of them is a unit of its own. With ``use_qk_norm`` the
per-head ``q_norm`` / ``k_norm`` (``(B, T, H, D)``) is the ``norm`` capture point;
without it, only ``proj`` exists. Dense first layers and MoE layers are masked alike.
No departure from the paper.
"""

from __future__ import annotations

from typing import Any

from longact.core.arch.base import ArchAdapter, register


@register("glm4_moe")
class Glm4Moe(ArchAdapter):
    family = "glm4.5"
    notes = "partial rotary: unrotated channels are their own rope_pair units"

    def has_norm(self, config: Any) -> bool:
        return bool(getattr(self.text_config(config), "use_qk_norm", False))
