"""gpt-oss: separate ``q_proj`` / ``k_proj`` (with bias) on every layer, sliding-window
and full layers alike, rotate-half RoPE (YaRN-scaled frequencies; the pairing
``(j, j + D/2)`` is the one its ``_apply_rotary_emb`` chunks into halves).

Attention sinks (``self_attn.sinks``, one learned logit per query head) are not W_Q/W_K
rows: they train normally, like the MoE experts and router. No q/k norm, so only the
``proj`` capture point exists. No departure from the paper.
"""

from __future__ import annotations

from longact.core.arch.base import ArchAdapter, register


@register("gpt_oss")
class GptOss(ArchAdapter):
    family = "gpt-oss"
    norm_modules = {}
    notes = "attention sinks train normally; sliding and full layers both masked"
