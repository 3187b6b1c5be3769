"""Adapters of the original families: q/k modules, geometry, parameter names and their
normalization, errors. (The newer families: tests/core/arch/.)"""

import pytest
import torch
from longact_tiny import tiny_config, tiny_model
from torch import nn
from transformers import GPT2Config

from longact.core.arch import (
    ADAPTERS,
    ParamRef,
    ProjGeom,
    QKLayout,
    get_adapter,
    normalize_param_name,
)

EXPECTED = {  # model_type: (has_bias, has_qk_norm)
    "qwen3": (False, True),
    "qwen2": (True, False),
    "llama": (False, False),
    "mistral": (False, False),
    "qwen3_moe": (False, True),
    "qwen2_moe": (True, False),
    "gemma": (False, False),
    "gemma2": (False, False),
    "gemma3_text": (False, True),
}


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("model_type", list(EXPECTED))
def test_adapter_finds_qk_modules_and_geometry(model_type):
    model = tiny_model(model_type)
    ad = get_adapter(model)
    assert ad is get_adapter(model.config) is get_adapter(model_type)
    assert ad.layout(model) == QKLayout(2, 8, 4, 2)
    assert ad.layout(model).rows("q") == 32 and ad.layout(model).rows("k") == 16
    has_bias, has_norm = EXPECTED[model_type]
    layers = ad.layers(model)
    assert [la.index for la in layers] == [0, 1]
    for la in layers:
        attn = model.model.layers[la.index].self_attn
        assert la.proj("q") is attn.q_proj and la.proj("k") is attn.k_proj
        assert la.path == f"model.layers.{la.index}.self_attn"
        assert (la.norm("q") is not None) is has_norm and (la.norm("k") is not None) is has_norm
        assert la.rows["q"].tolist() == list(range(32)) and la.rows["k"].tolist() == list(range(16))
    names = [n for n, _, _ in ad.qk_params(model)]
    kinds = ("weight", "bias") if has_bias else ("weight",)
    expected = [ad.param_name(i, p, k) for i in range(2) for p in "qk" for k in kinds]
    assert sorted(names) == sorted(expected)
    params = dict(model.named_parameters())
    for name, ref, param in ad.qk_params(model):
        assert params[name] is param
        assert param.shape[0] == ad.layout(model).rows(ref.key)


def test_llama_bias_follows_config():
    model = tiny_model("llama", attention_bias=True)
    kinds = {ref.kind for _, ref, _ in get_adapter(model).qk_params(model)}
    assert kinds == {"weight", "bias"}


def test_wrapper_prefixes_are_normalized():
    ad = get_adapter("qwen3")
    for raw in (
        "_orig_mod.model.layers.1.self_attn.k_proj.weight",
        "model._fsdp_wrapped_module.layers.1._fsdp_wrapped_module.self_attn.k_proj.weight",
        "model.layers.1._checkpoint_wrapped_module.self_attn.k_proj.weight",
    ):
        assert normalize_param_name(raw) == "model.layers.1.self_attn.k_proj.weight"
        assert ad.match_param(raw) == ParamRef(1, ("k",), "weight")
    assert ad.match_param("layers.0.self_attn.q_proj.bias") == ParamRef(0, ("q",), "bias")
    assert ad.match_param("layers.0.self_attn.q_proj.bias").key == (0, "q")
    assert ad.match_param("model.layers.0.self_attn.v_proj.weight") is None
    assert ad.match_param("model.layers.0.self_attn.q_norm.weight") is None


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_compiled_wrapper_names():
    model = tiny_model("qwen3")
    wrapped = torch.compile(model)  # not run: only the _orig_mod. prefix matters here
    ad = get_adapter(wrapped)
    assert len(ad.layers(wrapped)) == 2
    names = sorted(n for n, _, _ in ad.qk_params(wrapped))
    assert names == sorted(n for n, _, _ in ad.qk_params(model))
    assert all(n.startswith("model.layers.") for n in names)


def test_rope_pairs_rotate_half():
    assert ProjGeom(2, 4).pairs().tolist() == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert QKLayout(1, 8, 4, 2).geom((0, "k")).pairs().shape == (8, 2)
    assert get_adapter("qwen3").layout(tiny_config("qwen3")) == QKLayout(2, 8, 4, 2)
    with pytest.raises(ValueError, match="even"):
        ProjGeom(2, 3).pairs()


def test_unsupported_model_type_lists_supported():
    with pytest.raises(ValueError, match="gpt2.*supported: .*qwen3") as err:
        get_adapter(GPT2Config())
    for name in ("llama", "mistral", "qwen2", "qwen3"):
        assert name in str(err.value)
    assert "qwen3" in ADAPTERS


class _NoAttn(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = tiny_config("qwen3")
        self.layers = nn.ModuleList([nn.Linear(4, 4)])


class _FusedAttn(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv_proj = nn.Linear(4, 12)


def test_model_without_qk_projections_errors():
    with pytest.raises(ValueError, match="no q/k projections found"):
        get_adapter("qwen3").layers(_NoAttn())
    model = _NoAttn()
    model.layers = nn.ModuleList([nn.Module(), nn.Module()])
    for layer in model.layers:
        layer.self_attn = _FusedAttn()
    with pytest.raises(ValueError, match="has no q_proj for W_Q"):
        get_adapter("qwen3").layers(model)
