"""Qwen3.5 dense and MoE, Qwen3-Next: hybrid decoders with a gated query.

Only ``full_attention`` layers (``config.layer_types``) have Q/K with RoPE; the
``linear_attention`` layers (Gated DeltaNet, ``linear_attn``) have neither and LongAct
skips them: no mask, no capture, every parameter trains normally.

``q_proj`` produces ``2 * head_dim`` features per head, query then output gate::

    q_proj(x).view(B, T, H, 2*D) -> query = [..., :D], gate = [..., D:]

so query channel ``h*D + j`` is row ``h*2D + j`` of ``q_proj.weight`` and rows
``h*2D + D + j`` are gate rows. Only the query rows are W_Q rows for LongAct. The gate
rows train normally, like every non-Q/K parameter: the gate scales the attention output
(``o_proj(attn * sigmoid(gate))``), the same role as V/O, which LongAct does not
restrict; it never enters the q·k logits whose channel saliency picks the mask.

RoPE is rotate-half over the first ``head_dim * partial_rotary_factor`` channels of a
head (0.25 by default: 64 of 256), the rest pass through; interleaved M-RoPE sections
(vision positions) change which position drives a frequency, not the pairing.
``q_norm`` / ``k_norm`` are per head on the query part only, ``(B, T, H, D)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from longact.core.arch.base import ArchAdapter, register
from longact.core.arch.layout import ProjGeom


@register("qwen3_5", "qwen3_5_text", "qwen3_5_moe", "qwen3_5_moe_text", "qwen3_next")
class Qwen35(ArchAdapter):
    family = "qwen3.5"
    notes = "linear-attention layers skipped; q_proj gate rows train normally"

    def layer_geoms(self, cfg: Any, layer: int) -> dict[str, ProjGeom]:
        if cfg.layer_types[layer] != "full_attention":
            return {}
        return super().layer_geoms(cfg, layer)

    def channel_rows(self, proj: str, geoms: Mapping[str, ProjGeom]) -> torch.Tensor:
        g = geoms[proj]
        if proj == "k":
            return torch.arange(g.rows)
        heads = torch.arange(g.heads)[:, None] * (2 * g.head_dim)  # (H, 1) head block starts
        return (heads + torch.arange(g.head_dim)[None, :]).reshape(-1)  # (H*D,) query rows
