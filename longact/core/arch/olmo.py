"""OLMo 2 and OLMo 3: ``q_norm`` / ``k_norm`` normalise the whole projection.

Unlike Qwen3's per-head norms, OLMo's RMSNorm runs over all ``heads * head_dim`` output
channels of ``q_proj`` / ``k_proj`` (weight of that width), before the split into
heads. The ``norm`` capture point therefore sees ``(B, T, C)`` directly. Masks are on
rows of ``q_proj`` / ``k_proj``; the norm weights train normally.

Departure to know about: with a whole-width norm, a frozen W_Q row does not freeze that
channel's normalised query: the RMS denominator mixes every channel, so updates of the
trainable rows (and of ``q_norm.weight``) still rescale it. The paper's setting
(per-head or no norm) does not have this coupling. OLMo 3's sliding-window layers are
masked like its full layers; RoPE is rotate-half over the whole head.
"""

from __future__ import annotations

from longact.core.arch.base import ArchAdapter, register


@register("olmo2", "olmo3")
class Olmo(ArchAdapter):
    family = "olmo"
    norm_layout = "flat"
    notes = "q_norm/k_norm span the whole projection: frozen rows are still renormalised"
