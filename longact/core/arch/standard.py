"""Llama, Mistral, Qwen2/Qwen2-MoE, Qwen3/Qwen3-MoE: separate ``q_proj`` / ``k_proj`` on
every layer, rotate-half RoPE over the whole head.

Qwen3 has a per-head ``q_norm`` / ``k_norm`` (output ``(B, T, H, D)``): the ``norm``
capture point. Biases (Qwen2 always, Llama with ``attention_bias``) follow their rows.
No departure from the paper (its experiments use Qwen-family models).
"""

from __future__ import annotations

from longact.core.arch.base import ArchAdapter, register


@register("llama", "mistral")
class Llama(ArchAdapter):
    family = "llama"
    norm_modules = {}


@register("qwen2", "qwen2_moe")
class Qwen2(ArchAdapter):
    family = "qwen2"
    norm_modules = {}


@register("qwen3", "qwen3_moe")
class Qwen3(ArchAdapter):
    family = "qwen3"
