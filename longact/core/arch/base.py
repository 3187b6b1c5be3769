"""The adapter base class: where one family of HF decoders keeps its query/key channels.

An adapter answers, for a model or just its config:

- which decoder layers have attention LongAct applies to, and each one's q/k geometry
  and RoPE pairing (:meth:`ArchAdapter.layout`, a :class:`~.layout.QKLayout`);
- which module of a layer's attention produces each projection's channels, and which
  rows of that module's weight hold them (:meth:`ArchAdapter.channel_rows`): a plain
  ``q_proj``, a ``q_proj`` that also carries a gate (Qwen3.5), a fused ``qkv_proj``
  (Phi-3). Rows of a matched parameter that hold no q/k channel (gate, v) are never masked;
- where the ``norm`` capture point is and how its output is laid out
  (``norm_layout``: per head ``(B, T, H, D)`` / ``(B, H, T, D)``, or ``flat`` ``(B, T, C)``
  when the norm runs over the whole projection, OLMo 2/3).

Parameter names map to a :class:`ParamRef` (layer, projections carried, weight/bias, or
``lora_B``: under a peft LoRA adapter the base weight is frozen and the rows of the
projection's ``lora_B.<adapter>.weight``, shape (out, r), are its output channels, laid out
like the base weight's rows; see ``longact/core/lora.py``).
Wrappers add path components (FSDP1 ``_fsdp_wrapped_module.``, ``torch.compile``'s
``_orig_mod.``, activation checkpointing's ``_checkpoint_wrapped_module.``);
:func:`normalize_param_name` strips them (FSDP2 keeps the original names). Modules under
a vision or audio tower (``TOWERS``) are never decoder layers, whatever their names.

Family modules subclass :class:`ArchAdapter`, override what differs and register with
``@register("model_type", ...)`` under every model_type their checkpoints carry.
No departure from the paper: it does not say how the projections are found.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from longact.core.arch.layout import PROJS, Key, ProjGeom, QKLayout, Rope
from longact.registry import Registry

WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_orig_mod.", "_checkpoint_wrapped_module.")
TOWERS = ("vision_tower", "audio_tower", "visual", "vision_model", "audio_model")
NORM_LAYOUTS = ("heads_last", "heads_first", "flat")
ROW_MATRICES = ("weight", "lora_B")  # ParamRef kinds whose rows are output channels


def normalize_param_name(name: str) -> str:
    """Drop wrapper path components: ``_orig_mod.model.layers.0...`` -> ``model.layers.0...``."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def in_tower(name: str) -> bool:
    """True for a (normalized) name inside a vision/audio encoder of a multimodal model."""
    return any(part in TOWERS for part in name.split("."))


@dataclass(frozen=True)
class ParamRef:
    """What a W_Q / W_K (or fused) parameter name points at."""

    layer: int
    projs: tuple[str, ...]  # projections whose channels live in this parameter's rows
    kind: str  # "weight" | "bias" | "lora_B"

    @property
    def row_matrix(self) -> bool:
        """A matrix whose rows are output channels (a weight or a LoRA ``lora_B``)."""
        return self.kind in ROW_MATRICES

    @property
    def keys(self) -> tuple[Key, ...]:
        return tuple((self.layer, p) for p in self.projs)

    @property
    def key(self) -> Key:
        """The one key of a single-projection parameter (fused ones: use ``keys``)."""
        if len(self.projs) != 1:
            raise ValueError(f"a fused parameter carries {self.projs}: use ParamRef.keys")
        return self.keys[0]


@dataclass
class LayerQK:
    """The q/k modules of one decoder layer. ``path`` is the normalized attention path."""

    index: int
    path: str
    modules: dict[str, nn.Module]  # proj -> module whose output holds its channels
    rows: dict[str, torch.Tensor]  # proj -> (C,) long: those channels' output features
    norms: dict[str, nn.Module]  # proj -> norm module over its channels (may be empty)

    def proj(self, proj: str) -> nn.Module:
        return self.modules[proj]

    def norm(self, proj: str) -> nn.Module | None:
        return self.norms.get(proj)


def config_of(obj: Any) -> Any:
    return obj.config if isinstance(obj, nn.Module) else obj


def rope_parameters(cfg: Any, layer: int) -> dict:
    """The RoPE settings of ``layer`` (per layer type where the config has them)."""
    rp = dict(getattr(cfg, "rope_parameters", None) or {})
    types = getattr(cfg, "layer_types", None)
    if types and isinstance(rp.get(types[layer]), dict):
        rp = dict(rp[types[layer]])
    if "partial_rotary_factor" not in rp and getattr(cfg, "partial_rotary_factor", None):
        rp["partial_rotary_factor"] = cfg.partial_rotary_factor
    return rp


class ArchAdapter:
    """Separate ``q_proj`` / ``k_proj`` on every layer, per-head q/k norm if present,
    rotate-half RoPE (partial when the config says so). Families override parts."""

    family = "standard"
    model_types: tuple[str, ...] = ()  # filled by @register
    layers_name = "layers"
    attn_name = "self_attn"
    # attention attribute -> projections whose channels it produces (in that order)
    proj_modules: Mapping[str, tuple[str, ...]] = {"q_proj": ("q",), "k_proj": ("k",)}
    norm_modules: Mapping[str, str] = {"q": "q_norm", "k": "k_norm"}
    norm_layout = "heads_last"  # q_norm output (B, T, H, D); see NORM_LAYOUTS
    notes = ""  # what LongAct does differently for this family (doctor prints it)

    # ---- config -> geometry -----------------------------------------------------------
    def text_config(self, obj: Any) -> Any:
        """The decoder config (``text_config`` of a multimodal config)."""
        cfg = config_of(obj)
        get = getattr(cfg, "get_text_config", None)
        return get(decoder=True) if callable(get) else cfg

    def head_dim(self, cfg: Any, layer: int) -> int:
        return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)

    def rope(self, cfg: Any, layer: int, head_dim: int) -> Rope:
        """Rotate-half over ``int(head_dim * partial_rotary_factor)`` channels; the
        ``proportional`` type rotates the whole head with the last pairs at frequency 0."""
        rp = rope_parameters(cfg, layer)
        factor = float(rp.get("partial_rotary_factor") or 1.0)
        if rp.get("rope_type") == "proportional":
            return Rope("half", None, int(factor * head_dim // 2))
        rotary = int(head_dim * factor)
        return Rope("half", None if rotary == head_dim else rotary)

    def layer_geoms(self, cfg: Any, layer: int) -> dict[str, ProjGeom]:
        """{proj: geometry} of one layer; empty for a layer LongAct does not touch."""
        d = self.head_dim(cfg, layer)
        rope = self.rope(cfg, layer, d)
        n_kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        return {
            "q": ProjGeom(int(cfg.num_attention_heads), d, rope),
            "k": ProjGeom(int(n_kv), d, rope),
        }

    def layout(self, model_or_config: Any) -> QKLayout:
        cfg = self.text_config(model_or_config)
        n = int(cfg.num_hidden_layers)
        keys = {(i, p): g for i in range(n) for p, g in self.layer_geoms(cfg, i).items()}
        return QKLayout(n, keys=keys)

    def has_norm(self, model_or_config: Any) -> bool:
        """Whether this model has the q/k norms of the ``norm`` capture point."""
        return bool(self.norm_modules)

    def channel_rows(self, proj: str, geoms: Mapping[str, ProjGeom]) -> torch.Tensor:
        """(C,) long: the output rows (of the module producing ``proj``) holding its C
        channels, in channel order; ``geoms`` is the layer's {proj: geometry}."""
        return torch.arange(geoms[proj].rows)

    # ---- modules ------------------------------------------------------------------------
    def _attn_pattern(self) -> re.Pattern[str]:
        return re.compile(rf"(?:^|\.){self.layers_name}\.(\d+)\.{self.attn_name}$")

    def layers(self, model: nn.Module) -> list[LayerQK]:
        """The q/k modules of every layer LongAct applies to, sorted by layer index."""
        layout = self.layout(model)
        by_layer = {layer: layout.layer_geoms(layer) for layer in layout.layers()}
        pattern, found = self._attn_pattern(), {}
        for raw_name, module in model.named_modules():
            name = normalize_param_name(raw_name + ".").rstrip(".")
            m = pattern.search(name)
            if m is None or in_tower(name) or int(m.group(1)) not in by_layer:
                continue
            idx = int(m.group(1))
            if idx in found:
                raise ValueError(f"two attention modules claim layer {idx}: {found[idx].path!r}")
            found[idx] = self._layer(idx, name, module, by_layer[idx])
        missing = sorted(set(by_layer) - set(found))
        if missing:
            raise ValueError(
                f"no q/k projections found in {type(model).__name__} for layers {missing}: "
                f"looked for modules named '*.{self.layers_name}.<i>.{self.attn_name}' "
                f"with {' and '.join(self.proj_modules)} ({self.family} adapter)"
            )
        return [found[i] for i in sorted(found)]

    def _layer(self, idx: int, path: str, attn: nn.Module, geoms: dict) -> LayerQK:
        modules, rows, norms = {}, {}, {}
        for attr, projs in self.proj_modules.items():
            for proj in projs:
                if proj not in geoms:
                    continue
                mod = getattr(attn, attr, None)
                if not isinstance(mod, nn.Module):
                    raise ValueError(  # noqa: TRY004 - a model/adapter mismatch
                        f"attention module {path!r} ({type(attn).__name__}) has no {attr} "
                        f"for W_{proj.upper()}; the {self.family} adapter expects "
                        f"{', '.join(self.proj_modules)}"
                    )
                modules[proj], rows[proj] = mod, self.channel_rows(proj, geoms)
                norm = getattr(attn, self.norm_modules.get(proj, ""), None)
                if isinstance(norm, nn.Module):
                    norms[proj] = norm
        return LayerQK(idx, path, modules, rows, norms)

    # ---- parameter names ----------------------------------------------------------------
    def _param_pattern(self) -> re.Pattern[str]:
        mods = "|".join(map(re.escape, self.proj_modules))
        return re.compile(
            rf"(?:^|\.){self.layers_name}\.(\d+)\.{self.attn_name}\.({mods})\."
            r"(?:(weight|bias)|(lora_B)\.[^.]+\.weight)$"
        )

    def match_param(self, name: str) -> ParamRef | None:
        """``_orig_mod.model.layers.2.self_attn.k_proj.bias`` -> ParamRef(2, ("k",), "bias");
        ``...layers.2.self_attn.k_proj.lora_B.default.weight`` -> ParamRef(2, ("k",), "lora_B").
        A LoRA layer's frozen ``base_layer.weight`` is not matched."""
        name = normalize_param_name(name)
        m = self._param_pattern().search(name)
        if m is None or in_tower(name):
            return None
        return ParamRef(int(m.group(1)), self.proj_modules[m.group(2)], m.group(3) or m.group(4))

    def param_name(
        self, layer: int, proj: str, kind: str = "weight", prefix: str = "model."
    ) -> str:
        """Canonical name, e.g. param_name(0, "q") -> "model.layers.0.self_attn.q_proj.weight"."""
        mod = next(a for a, projs in self.proj_modules.items() if proj in projs)
        return f"{prefix}{self.layers_name}.{layer}.{self.attn_name}.{mod}.{kind}"

    def qk_params(self, model: nn.Module) -> list[tuple[str, ParamRef, nn.Parameter]]:
        """(normalized name, ref, parameter) for every parameter holding W_Q/W_K rows."""
        layout = self.layout(model) if hasattr(model, "config") else None
        out = []
        for name, param in model.named_parameters():
            ref = self.match_param(name)
            if ref is not None and (layout is None or any(k in layout for k in ref.keys)):
                out.append((normalize_param_name(name), ref, param))
        return out

    def param_rows(
        self, ref: ParamRef, layout: QKLayout | None, n_rows: int
    ) -> list[tuple[Key, torch.Tensor]]:
        """[(key, (C,) rows of the parameter holding that key's channels)]. Without a
        layout (a bare module, no config) only a single-projection parameter whose rows
        are exactly its channels can be mapped."""
        if layout is None:
            if len(ref.projs) != 1 or type(self).channel_rows is not ArchAdapter.channel_rows:
                raise ValueError(
                    f"the {self.family} adapter needs the model config to map rows of "
                    f"layer {ref.layer}'s {'/'.join(ref.projs)} parameter"
                )
            return [(ref.key, torch.arange(n_rows))]
        geoms = {p: layout.geom((ref.layer, p)) for p in PROJS if (ref.layer, p) in layout}
        out = []
        for key in ref.keys:
            if key not in layout:
                continue
            rows = self.channel_rows(key[1], geoms)
            if rows.numel() and int(rows.max()) >= n_rows:
                raise ValueError(
                    f"{key} needs row {int(rows.max())} but the parameter has {n_rows} rows: "
                    f"the config does not match the model ({self.family} adapter)"
                )
            out.append((key, rows))
        return out


def param_mask(sources: list[tuple[Key, torch.Tensor]], masks: Any, n_rows: int) -> torch.Tensor:
    """(n_rows,) bool: True = trainable. Rows of ``sources`` follow their key's mask in
    ``masks``; every other row (v, gate) is trainable."""
    out = torch.ones(n_rows, dtype=torch.bool)
    for key, rows in sources:
        out[rows] = masks[key]
    return out


ADAPTERS: Registry[ArchAdapter] = Registry("architecture")
REFUSED: dict[str, str] = {}  # model_type -> why LongAct does not support it


def register(*model_types: str):
    """Class decorator: one adapter instance under each of ``model_types``."""

    def deco(cls: type[ArchAdapter]) -> type[ArchAdapter]:
        if cls.norm_layout not in NORM_LAYOUTS:
            raise ValueError(f"{cls.__name__}.norm_layout must be one of {NORM_LAYOUTS}")
        instance = cls()
        instance.model_types = tuple(model_types)
        for model_type in model_types:
            ADAPTERS.add(model_type, instance)
        return cls

    return deco


def refuse(reason: str, *model_types: str) -> None:
    """Make ``get_adapter`` reject these model types with ``reason``."""
    for model_type in model_types:
        if model_type in REFUSED or model_type in ADAPTERS:
            raise ValueError(f"architecture {model_type!r} is already registered")
        REFUSED[model_type] = reason


def get_adapter(model_or_config: Any) -> ArchAdapter:
    """Adapter for an HF model, its config, or a model_type string."""
    if isinstance(model_or_config, str):
        model_type = model_or_config
    else:
        model_type = getattr(config_of(model_or_config), "model_type", None)
    supported = ", ".join(ADAPTERS.names())
    if model_type in REFUSED:
        raise ValueError(
            f"LongAct does not support model_type {model_type!r}: {REFUSED[model_type]}. "
            f"Supported: {supported}"
        )
    if model_type not in ADAPTERS:
        raise ValueError(
            f"LongAct has no q/k adapter for model_type {model_type!r}; supported: {supported}"
        )
    return ADAPTERS.get(model_type)
