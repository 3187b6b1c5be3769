"""Per-architecture adapters: where the query/key projections of an HF model live.

An adapter, looked up by the HF ``config.model_type``, tells LongAct for every decoder
layer which modules produce the query and key vectors (``q_proj`` / ``k_proj`` and, where
the model has them, the per-head ``q_norm`` / ``k_norm``), the attention geometry
(head_dim, query heads, key/value heads), whether the projections carry a bias, and how
RoPE pairs channels (rotate-half: channel ``i`` of a head turns with ``i + head_dim/2``).

Masks are applied by parameter name, so the adapter also maps parameter names such as
``model.layers.3.self_attn.q_proj.weight`` to ``(layer, proj, kind)``. Wrappers add
prefixes to names (FSDP1 ``_fsdp_wrapped_module.``, ``torch.compile``'s ``_orig_mod.``,
activation checkpointing's ``_checkpoint_wrapped_module.``); :func:`normalize_param_name`
strips them. FSDP2 (``fully_shard``) keeps the original names.

Shapes: ``q_proj.weight`` (n_heads*head_dim, hidden), ``k_proj.weight``
(n_kv_heads*head_dim, hidden); row ``r`` of a weight is output channel ``r``.
No departure from the paper: it does not say how the projections are found.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from longact.registry import Registry

PROJS = ("q", "k")
Key = tuple[int, str]  # (layer index, "q" | "k")

# Path components inserted by wrappers; removed wherever they appear in a dotted name.
WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_orig_mod.", "_checkpoint_wrapped_module.")


def normalize_param_name(name: str) -> str:
    """Drop wrapper path components: ``_orig_mod.model.layers.0...`` -> ``model.layers.0...``."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def key_str(key: Key) -> str:
    """(3, "q") -> "3.q" (used in state dicts)."""
    return f"{key[0]}.{key[1]}"


def parse_key(text: str) -> Key:
    layer, proj = text.split(".")
    return int(layer), proj


@dataclass(frozen=True)
class QKLayout:
    """Attention geometry: enough to size every row mask without touching a model."""

    num_layers: int
    head_dim: int
    num_attention_heads: int
    num_key_value_heads: int

    def heads(self, proj: str) -> int:
        return self.num_attention_heads if proj == "q" else self.num_key_value_heads

    def rows(self, proj: str) -> int:
        """Output channels of q_proj / k_proj = rows of W_Q / W_K."""
        return self.heads(proj) * self.head_dim

    def keys(self) -> list[Key]:
        return [(layer, p) for layer in range(self.num_layers) for p in PROJS]

    def __iter__(self) -> Iterator[Key]:
        return iter(self.keys())

    def row_counts(self) -> dict[Key, int]:
        return {key: self.rows(key[1]) for key in self.keys()}


def rope_pairs(n_channels: int, head_dim: int) -> torch.Tensor:
    """Rotate-half RoPE pairing: LongTensor (n_channels/2, 2) of [i, i + head_dim/2] per head."""
    if head_dim % 2 or n_channels % head_dim:
        raise ValueError(f"rope pairs need an even head_dim dividing {n_channels}, got {head_dim}")
    half = head_dim // 2
    base = torch.arange(0, n_channels, head_dim).repeat_interleave(half)  # (C/2,)
    first = base + torch.arange(half).repeat(n_channels // head_dim)  # (C/2,)
    return torch.stack([first, first + half], dim=1)


@dataclass
class LayerQK:
    """The q/k modules of one decoder layer. ``path`` is the normalized attention path."""

    index: int
    path: str
    q_proj: nn.Module
    k_proj: nn.Module
    q_norm: nn.Module | None
    k_norm: nn.Module | None

    def proj(self, proj: str) -> nn.Module:
        return self.q_proj if proj == "q" else self.k_proj

    def norm(self, proj: str) -> nn.Module | None:
        return self.q_norm if proj == "q" else self.k_norm


@dataclass(frozen=True)
class ParamRef:
    """What a W_Q / W_K parameter name points at."""

    layer: int
    proj: str  # "q" | "k"
    kind: str  # "weight" | "bias"

    @property
    def key(self) -> Key:
        return (self.layer, self.proj)


def _config_of(obj: Any) -> Any:
    return obj.config if isinstance(obj, nn.Module) else obj


@dataclass(frozen=True)
class ArchAdapter:
    """Where q/k live in one family of HF decoders (all use rotate-half RoPE)."""

    model_type: str
    has_qk_norm: bool
    bias_attr: str | None = "attention_bias"  # config flag for q/k bias; None: never
    always_bias: bool = False  # qwen2: q/k/v always have a bias
    layers_name: str = "layers"
    attn_name: str = "self_attn"
    q_name: str = "q_proj"
    k_name: str = "k_proj"
    q_norm_name: str = "q_norm"
    k_norm_name: str = "k_norm"
    rope_style: str = "rotate_half"
    # q_norm/k_norm output layout: (B, T, H, D) [qwen3] or heads first (B, H, T, D) [gemma3]
    norm_heads_first: bool = False

    # ---- geometry -------------------------------------------------------------------
    def layout(self, model_or_config: Any) -> QKLayout:
        cfg = _config_of(model_or_config)
        n_heads = int(cfg.num_attention_heads)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
        n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
        return QKLayout(int(cfg.num_hidden_layers), int(head_dim), n_heads, int(n_kv))

    def has_bias(self, model_or_config: Any) -> bool:
        if isinstance(model_or_config, nn.Module):
            layers = self.layers(model_or_config)
            return getattr(layers[0].q_proj, "bias", None) is not None
        if self.always_bias:
            return True
        return bool(self.bias_attr and getattr(model_or_config, self.bias_attr, False))

    def rope_pairs(self, proj: str, layout: QKLayout) -> torch.Tensor:
        return rope_pairs(layout.rows(proj), layout.head_dim)

    # ---- modules --------------------------------------------------------------------
    def layers(self, model: nn.Module) -> list[LayerQK]:
        """The q/k modules of every decoder layer, sorted by layer index."""
        pattern = re.compile(rf"(?:^|\.){self.layers_name}\.(\d+)\.{self.attn_name}$")
        found: dict[int, LayerQK] = {}
        for raw_name, module in model.named_modules():
            name = normalize_param_name(raw_name + ".").rstrip(".")
            m = pattern.search(name)
            if m is None:
                continue
            idx = int(m.group(1))
            q, k = getattr(module, self.q_name, None), getattr(module, self.k_name, None)
            if not isinstance(q, nn.Module) or not isinstance(k, nn.Module):
                raise ValueError(  # noqa: TRY004 - a config error, not a type error
                    f"attention module {name!r} ({type(module).__name__}) has no "
                    f"{self.q_name}/{self.k_name}; fused QKV projections are not supported"
                )
            if idx in found:
                raise ValueError(f"two attention modules claim layer {idx}: {found[idx].path!r}")
            qn = getattr(module, self.q_norm_name, None)
            kn = getattr(module, self.k_norm_name, None)
            found[idx] = LayerQK(idx, name, q, k, qn, kn)
        if not found:
            raise ValueError(
                f"no q/k projections found in {type(model).__name__}: looked for modules named "
                f"'*.{self.layers_name}.<i>.{self.attn_name}' with {self.q_name} and {self.k_name}"
            )
        return [found[i] for i in sorted(found)]

    # ---- parameter names --------------------------------------------------------------
    def _param_pattern(self) -> re.Pattern[str]:
        return re.compile(
            rf"(?:^|\.){self.layers_name}\.(\d+)\.{self.attn_name}\."
            rf"({self.q_name}|{self.k_name})\.(weight|bias)$"
        )

    def match_param(self, name: str) -> ParamRef | None:
        """``..._orig_mod.model.layers.2.self_attn.k_proj.bias`` -> ParamRef(2, "k", "bias")."""
        m = self._param_pattern().search(normalize_param_name(name))
        if m is None:
            return None
        proj = "q" if m.group(2) == self.q_name else "k"
        return ParamRef(int(m.group(1)), proj, m.group(3))

    def param_name(
        self, layer: int, proj: str, kind: str = "weight", prefix: str = "model."
    ) -> str:
        """Canonical name, e.g. param_name(0, "q") -> "model.layers.0.self_attn.q_proj.weight"."""
        mod = self.q_name if proj == "q" else self.k_name
        return f"{prefix}{self.layers_name}.{layer}.{self.attn_name}.{mod}.{kind}"

    def qk_params(self, model: nn.Module) -> list[tuple[str, ParamRef, nn.Parameter]]:
        """(normalized name, ref, parameter) for every W_Q/W_K weight and q/k bias."""
        out = []
        for name, param in model.named_parameters():
            ref = self.match_param(name)
            if ref is not None:
                out.append((normalize_param_name(name), ref, param))
        return out


ADAPTERS: Registry[ArchAdapter] = Registry("architecture")
for _adapter in (
    ArchAdapter("qwen3", has_qk_norm=True),
    ArchAdapter("qwen3_moe", has_qk_norm=True),
    ArchAdapter("qwen2", has_qk_norm=False, bias_attr=None, always_bias=True),
    ArchAdapter("qwen2_moe", has_qk_norm=False, bias_attr="qkv_bias"),
    ArchAdapter("llama", has_qk_norm=False),
    ArchAdapter("mistral", has_qk_norm=False, bias_attr=None),
    ArchAdapter("gemma", has_qk_norm=False),
    ArchAdapter("gemma2", has_qk_norm=False),
    ArchAdapter("gemma3_text", has_qk_norm=True, norm_heads_first=True),
):
    ADAPTERS.add(_adapter.model_type, _adapter)


def get_adapter(model_or_config: Any) -> ArchAdapter:
    """Adapter for an HF model, its config, or a model_type string."""
    if isinstance(model_or_config, str):
        model_type = model_or_config
    else:
        model_type = getattr(_config_of(model_or_config), "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(
            f"LongAct has no q/k adapter for model_type {model_type!r}; "
            f"supported: {', '.join(ADAPTERS.names())}"
        )
    return ADAPTERS.get(model_type)
