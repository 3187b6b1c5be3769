"""Tiny configs of every model family LongAct supports (``longact tiny-model --arch``).

``tiny_config(arch, shape, vocab_size, pad_id, eos_id)`` builds an HF config of that
family at a :class:`~longact.models.tiny.TinySize` (never downloaded), with each family's
own structure kept so LongAct's adapter has something to find:

============  =====================  ==============================================
arch          model_type written     structure kept
============  =====================  ==============================================
qwen3         qwen3                  per-head q/k norm, GQA
llama         llama                  plain q/k
gemma3        gemma3_text            sliding/full layers, q/k norm heads-first
gemma4        gemma4_text            global head_dim x2, k_eq_v global layers,
                                     KV-sharing last layer (4+ layers)
qwen3_5       qwen3_5_text           linear/full hybrid, gated q_proj, partial RoPE
qwen3_5_moe   qwen3_5_moe_text       the same with MoE MLPs
qwen3_next    qwen3_next             the same (Qwen3-Next)
gpt_oss       gpt_oss                sinks, sliding/full layers, MoE (eager attention)
olmo2         olmo2                  whole-width q/k norm
olmo3         olmo3                  whole-width q/k norm, sliding/full layers
glm4_moe      glm4_moe               partial rotary 0.5, q/k norm, dense + MoE layers
smollm3       smollm3                NoPE every 2nd layer
phi3          phi3                   fused qkv_proj, partial rotary 0.75
============  =====================  ==============================================

Text-only model types are written for the multimodal families (``*_text``): that is what
``AutoModelForCausalLM`` loads; LongAct's adapter is the same for both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from longact.registry import Registry

Builder = Callable[[dict[str, Any]], Any]  # common kwargs -> config
ARCHS: Registry[Builder] = Registry("tiny-model architecture")
ATTN: dict[str, str] = {"gpt_oss": "eager"}  # attention implementation, default sdpa


def _alternating(n: int, other: str, last: str = "full_attention") -> list[str]:
    """[other, full, other, full, ...] of n layers, the last one ``last``."""
    types = [other if i % 2 == 0 else "full_attention" for i in range(n)]
    types[-1] = last
    return types


def _linear(kw: dict) -> dict:
    """Gated DeltaNet sizes of the Qwen3.5 / Qwen3-Next linear-attention layers."""
    d = kw["head_dim"]
    return {
        "linear_num_key_heads": kw["num_key_value_heads"],
        "linear_num_value_heads": kw["num_key_value_heads"],
        "linear_key_head_dim": d,
        "linear_value_head_dim": d,
        "linear_conv_kernel_dim": 2,
        "layer_types": _alternating(kw["num_hidden_layers"], "linear_attention"),
    }


def _moe(kw: dict) -> dict:
    return {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": kw["hidden_size"]}


def _register(name: str):
    def deco(fn: Builder) -> Builder:
        ARCHS.add(name, fn)
        return fn

    return deco


@_register("qwen3")
def _qwen3(kw: dict):
    from transformers import Qwen3Config

    return Qwen3Config(**kw, rope_theta=10000.0, attention_bias=False, use_cache=True)


@_register("llama")
def _llama(kw: dict):
    from transformers import LlamaConfig

    return LlamaConfig(**kw)


@_register("gemma3")
def _gemma3(kw: dict):
    from transformers import Gemma3TextConfig

    types = _alternating(kw["num_hidden_layers"], "sliding_attention")
    return Gemma3TextConfig(**kw, sliding_window=64, layer_types=types)


@_register("gemma4")
def _gemma4(kw: dict):
    from transformers import Gemma4TextConfig

    n = kw["num_hidden_layers"]
    return Gemma4TextConfig(
        **kw,
        sliding_window=64,
        layer_types=_alternating(n, "sliding_attention"),
        global_head_dim=2 * kw["head_dim"],
        attention_k_eq_v=True,
        num_global_key_value_heads=1,
        num_kv_shared_layers=1 if n >= 4 else 0,
        hidden_size_per_layer_input=8,
        vocab_size_per_layer_input=kw["vocab_size"],
    )


@_register("qwen3_5")
def _qwen3_5(kw: dict):
    from transformers import Qwen3_5TextConfig

    return Qwen3_5TextConfig(**kw, **_linear(kw))


@_register("qwen3_5_moe")
def _qwen3_5_moe(kw: dict):
    from transformers import Qwen3_5MoeTextConfig

    shared = {"shared_expert_intermediate_size": kw["hidden_size"]}
    return Qwen3_5MoeTextConfig(**kw, **_linear(kw), **_moe(kw), **shared)


@_register("qwen3_next")
def _qwen3_next(kw: dict):
    from transformers import Qwen3NextConfig

    shared = {"shared_expert_intermediate_size": kw["hidden_size"]}
    return Qwen3NextConfig(**kw, **_linear(kw), **_moe(kw), **shared)


@_register("gpt_oss")
def _gpt_oss(kw: dict):
    from transformers import GptOssConfig

    return GptOssConfig(
        **kw,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=64,
        layer_types=_alternating(kw["num_hidden_layers"], "sliding_attention"),
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )


@_register("olmo2")
def _olmo2(kw: dict):
    from transformers import Olmo2Config

    return Olmo2Config(**kw)


@_register("olmo3")
def _olmo3(kw: dict):
    from transformers import Olmo3Config

    types = _alternating(kw["num_hidden_layers"], "sliding_attention")
    return Olmo3Config(**kw, sliding_window=64, layer_types=types)


@_register("glm4_moe")
def _glm4_moe(kw: dict):
    from transformers import Glm4MoeConfig

    return Glm4MoeConfig(
        **kw,
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=kw["hidden_size"],
        first_k_dense_replace=1,
        use_qk_norm=True,
        partial_rotary_factor=0.5,
    )


@_register("smollm3")
def _smollm3(kw: dict):
    from transformers import SmolLM3Config

    return SmolLM3Config(**kw, no_rope_layer_interval=2)


@_register("phi3")
def _phi3(kw: dict):
    from transformers import Phi3Config

    return Phi3Config(**kw, partial_rotary_factor=0.75)


def tiny_config(arch: str, shape: Any, vocab_size: int, eos_id: int = 0, **over):
    """A config of family ``arch`` at ``shape`` (a TinySize); ``over`` overrides fields.
    No pad token at construction (the caller sets it after init, so the embedding row of
    the pad token is initialized like the others, as in the original Qwen3 factory)."""
    build = ARCHS.get(arch)
    kw = asdict(shape) | {
        "vocab_size": vocab_size,
        "tie_word_embeddings": True,
        "rms_norm_eps": 1e-6,
        "pad_token_id": None,
        "eos_token_id": eos_id,
        "bos_token_id": None,
    }
    kw.update(over)
    config = build(kw)
    config._attn_implementation = ATTN.get(arch, "sdpa")
    return config
