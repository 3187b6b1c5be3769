"""Gemma 4 (``gemma4`` multimodal, ``gemma4_text``): per-layer geometry and shared K/V.

- Sliding layers use ``head_dim``; full (global) layers ``global_head_dim``.
- Full layers with ``attention_k_eq_v`` have no ``v_proj``: the values are the
  ``k_proj`` output (before ``k_norm``/RoPE) with ``num_global_key_value_heads`` heads.
  LongAct masks those ``k_proj`` rows as W_K rows, so on these layers a frozen K row is
  also a frozen value channel. Departure, stated: elsewhere V trains fully; leaving K
  unmasked here instead would give up the K sparsity the method is about.
- The last ``num_kv_shared_layers`` layers reuse an earlier layer's keys and values and
  have no ``k_proj``: LongAct masks only their ``q_proj``.
- RoPE is rotate-half over the whole head; full layers use "proportional" RoPE: only the
  first ``partial_rotary_factor * D / 2`` pairs turn, the others have frequency 0 (they
  stay pairs, as the rotation code pairs them).
- ``q_norm`` / ``k_norm`` are per head on ``(B, T, H, D)``: the ``norm`` capture point.

The text decoder's projections are plain ``nn.Linear``. The vision and audio towers wrap
theirs in ``Gemma4ClippableLinear`` (``q_proj.linear.weight``) under ``vision_tower`` /
``audio_tower``; those encoders are not the decoder and are never touched.
"""

from __future__ import annotations

from typing import Any

from longact.core.arch.base import ArchAdapter, register
from longact.core.arch.layout import ProjGeom


def _is_full(cfg: Any, layer: int) -> bool:
    return cfg.layer_types[layer] != "sliding_attention"


@register("gemma4", "gemma4_text")
class Gemma4(ArchAdapter):
    family = "gemma4"
    notes = "k_eq_v layers: K rows are also V; KV-shared layers: Q only"

    def head_dim(self, cfg: Any, layer: int) -> int:
        if _is_full(cfg, layer) and getattr(cfg, "global_head_dim", None):
            return int(cfg.global_head_dim)
        return int(cfg.head_dim)

    def layer_geoms(self, cfg: Any, layer: int) -> dict[str, ProjGeom]:
        d = self.head_dim(cfg, layer)
        rope = self.rope(cfg, layer, d)
        out = {"q": ProjGeom(int(cfg.num_attention_heads), d, rope)}
        first_shared = cfg.num_hidden_layers - int(getattr(cfg, "num_kv_shared_layers", 0) or 0)
        if layer >= first_shared:
            return out  # keys and values come from an earlier layer
        n_kv = cfg.num_key_value_heads
        if getattr(cfg, "attention_k_eq_v", False) and _is_full(cfg, layer):
            n_kv = cfg.num_global_key_value_heads
        out["k"] = ProjGeom(int(n_kv), d, rope)
        return out
