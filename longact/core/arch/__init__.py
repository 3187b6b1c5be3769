"""Per-architecture adapters, one short module per family, registered by model_type.

``get_adapter(model | config | "model_type")`` returns the family's adapter; an unknown
model_type raises listing the supported ones, a refused one (DeepSeek MLA) says why.

===============  ==================================================================
module           model_types
===============  ==================================================================
standard         llama, mistral, qwen2, qwen2_moe, qwen3, qwen3_moe
gemma            gemma, gemma2, gemma3, gemma3_text
gemma4           gemma4, gemma4_text
qwen3_5          qwen3_5, qwen3_5_text, qwen3_5_moe, qwen3_5_moe_text, qwen3_next
gpt_oss          gpt_oss
olmo             olmo2, olmo3
glm4_moe         glm4_moe
smollm3          smollm3
phi3             phi3
deepseek         deepseek_v2, deepseek_v3 (refused)
===============  ==================================================================
"""

from longact.core.arch import (  # noqa: F401  (each registers its adapters)
    deepseek,
    gemma,
    gemma4,
    glm4_moe,
    gpt_oss,
    olmo,
    phi3,
    qwen3_5,
    smollm3,
    standard,
)
from longact.core.arch.base import (
    ADAPTERS,
    REFUSED,
    ArchAdapter,
    LayerQK,
    ParamRef,
    get_adapter,
    normalize_param_name,
    param_mask,
    register,
)
from longact.core.arch.layout import PROJS, Key, ProjGeom, QKLayout, Rope, key_str, parse_key

__all__ = [
    "ADAPTERS",
    "PROJS",
    "REFUSED",
    "ArchAdapter",
    "Key",
    "LayerQK",
    "ParamRef",
    "ProjGeom",
    "QKLayout",
    "Rope",
    "get_adapter",
    "key_str",
    "normalize_param_name",
    "param_mask",
    "parse_key",
    "register",
]
