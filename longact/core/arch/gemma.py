"""Gemma, Gemma 2, Gemma 3 (``gemma3`` multimodal and ``gemma3_text``).

Separate ``q_proj`` / ``k_proj``, rotate-half RoPE over the whole head (Gemma 3: a RoPE
base per layer type, sliding or full; the pairing is the same). Gemma 3 applies its
per-head ``q_norm`` / ``k_norm`` after moving heads first, so the ``norm`` capture point
sees ``(B, H, T, D)``. In the multimodal ``gemma3`` checkpoint the decoder sits under
``model.language_model``; the SigLIP vision tower (``vision_tower``, whose encoder layers
also have ``self_attn.q_proj``) is never touched. No departure from the paper.
"""

from __future__ import annotations

from longact.core.arch.base import ArchAdapter, register


@register("gemma", "gemma2")
class Gemma(ArchAdapter):
    family = "gemma"
    norm_modules = {}


@register("gemma3", "gemma3_text")
class Gemma3(ArchAdapter):
    family = "gemma3"
    norm_layout = "heads_first"
