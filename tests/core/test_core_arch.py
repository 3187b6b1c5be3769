"""Every supported family end to end on a tiny model built from its config: where W_Q/W_K
rows live, capture of real tokens only, mask shapes and skipped layers, exact updates
(frozen rows bit-identical; trainable, gate and v rows train), RoPE pairs checked
against each family's own rotary code, plus the refusal and registry errors."""

from __future__ import annotations

import inspect
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from longact.core import (
    QKStats,
    RowMaskGuard,
    build_masks,
    capture_qk_stats,
    get_adapter,
    n_keep,
)
from longact.core.arch import ADAPTERS, ParamRef, param_mask, register
from longact.models.tiny import TinySize
from longact.models.tiny_arch import ATTN, tiny_config

SHAPE = TinySize(32, 4, 4, 2, 8, 64, 128)  # hidden, layers, heads, kv heads, head_dim, mlp
FAMILIES = ["qwen3_5", "qwen3_5_moe", "qwen3_next", "gpt_oss", "olmo2", "olmo3", "glm4_moe",
            "smollm3", "phi3", "gemma3", "gemma4", "qwen3", "llama"]  # fmt: skip
# arch: the layers LongAct applies to when not all four (hybrids skip linear attention)
EXPECTED = {
    "qwen3_5": [1, 3],
    "qwen3_5_moe": [1, 3],
    "qwen3_next": [1, 3],
}


def build(arch: str, seed: int = 0, **over):
    torch.manual_seed(seed)
    cfg = tiny_config(arch, SHAPE, 64, **over)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=ATTN.get(arch, "sdpa"))
    return model.float().train()


def batch(seed: int, lengths=(8, 5)):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (len(lengths), max(lengths)), generator=g)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return ids, mask


# ---- where the rows are -----------------------------------------------------------------
@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("arch", FAMILIES)
def test_layout_and_rows_match_the_model(arch):
    model = build(arch)
    ad = get_adapter(model)
    assert ad is get_adapter(model.config.model_type)
    layout = ad.layout(model)
    assert ad.layout(model.config) == layout
    assert layout.layers() == EXPECTED.get(arch, [0, 1, 2, 3])
    layers = ad.layers(model)
    assert [la.index for la in layers] == layout.layers()
    for la in layers:
        for proj, rows in la.rows.items():
            g = layout.geom((la.index, proj))
            assert rows.shape == (g.rows,) and rows.unique().numel() == g.rows
            assert int(rows.max()) < la.proj(proj).weight.shape[0]
    n_params = 0
    for name, ref, param in ad.qk_params(model):
        sources = ad.param_rows(ref, layout, param.shape[0])
        assert [k for k, _ in sources] == [k for k in ref.keys if k in layout], name
        n_params += 1
    assert n_params >= len(layout) // 2


def test_qwen3_5_query_rows_skip_the_gate():
    model = build("qwen3_5")
    la = get_adapter(model).layers(model)[0]
    # per head 2*D rows: query [0, 8), gate [8, 16)
    assert la.rows["q"][:10].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 16, 17]
    x = torch.randn(3, 32)
    out = la.proj("q")(x).view(3, 4, 16)  # the attention's own split: query, gate = chunk
    query, _ = torch.chunk(out, 2, dim=-1)
    torch.testing.assert_close(la.proj("q")(x)[:, la.rows["q"]], query.reshape(3, 32))
    assert not any("linear_attn" in n for n, _, _ in get_adapter(model).qk_params(model))


def test_phi3_fused_rows_and_gemma4_shared_layers():
    phi = build("phi3")
    ad = get_adapter(phi)
    (name, ref, param), *_ = ad.qk_params(phi)
    assert name.endswith("self_attn.qkv_proj.weight") and ref == ParamRef(0, ("q", "k"), "weight")
    src = dict(ad.param_rows(ref, ad.layout(phi), param.shape[0]))
    assert src[(0, "q")].tolist() == list(range(32)) and src[(0, "k")].tolist() == list(
        range(32, 48)
    )
    gemma = build("gemma4")
    layout = get_adapter(gemma).layout(gemma)
    assert layout.geom((1, "q")).head_dim == 16 and layout.geom((1, "k")).heads == 1  # k_eq_v
    assert (3, "k") not in layout and (3, "q") in layout  # KV-sharing layer: Q only
    assert gemma.model.layers[1].self_attn.v_proj is None


# ---- capture ---------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.parametrize("point", ["proj", "norm"])
def test_capture_counts_real_tokens_only(arch, point):
    model = build(arch).eval()
    ad = get_adapter(model)
    if point == "norm" and not ad.has_norm(model):
        with pytest.raises(ValueError, match="point='norm' needs q_norm/k_norm"):
            capture_qk_stats(model, point=point)
        return
    ids, mask = batch(1)
    with torch.no_grad(), capture_qk_stats(model, point=point, during_no_grad=True) as cap:
        model(input_ids=ids, attention_mask=mask)
    single = QKStats()
    for i in range(2):
        n = int(mask[i].sum())
        with torch.no_grad(), capture_qk_stats(model, point=point, during_no_grad=True) as c1:
            model(input_ids=ids[i : i + 1, :n])
        single = single.merge(c1.stats)
    layout = ad.layout(model)
    assert set(cap.stats.keys()) == set(layout.keys())
    for key in layout:
        assert cap.stats.token_count(key) == 13  # 8 + 5 real tokens, padding dropped
        assert cap.stats[key].n_channels == layout.geom(key).rows
        torch.testing.assert_close(
            cap.stats[key].sum_abs, single[key].sum_abs, rtol=1e-4, atol=1e-5
        )


# ---- masks and exact updates ----------------------------------------------------------------
@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.parametrize("path", ["masked", "snapshot"])
def test_exact_update_freezes_only_masked_rows(arch, path):
    model = build(arch)
    ad = get_adapter(model)
    layout = ad.layout(model)
    ids, mask = batch(2)
    with capture_qk_stats(model) as cap:
        model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    model.zero_grad()
    masks = build_masks(cap.stats, layout, ratio=0.3)
    for key in layout:
        assert masks[key].shape == (layout.geom(key).rows,)
        assert int(masks[key].sum()) == n_keep(0.3, layout.geom(key).rows)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    guard = RowMaskGuard(model, masks, optimizer=opt, exact_path=path)
    assert guard.path == path
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    had_grad = set()
    for step in range(3):
        ids, mask = batch(10 + step)
        model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
        had_grad |= {n for n, p in model.named_parameters() if p.grad is not None}
        guard.mask_grads()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        guard.step(opt)
        opt.zero_grad()
    params = dict(model.named_parameters())
    qk = {}
    for name, ref, p in ad.qk_params(model):
        trainable = param_mask(ad.param_rows(ref, layout, p.shape[0]), masks, p.shape[0])
        qk[name] = trainable
        assert torch.equal(p[~trainable], before[name][~trainable]), name  # bit-identical
        moved = (p[trainable] != before[name][trainable]).reshape(int(trainable.sum()), -1)
        assert moved.any(1).all(), name  # every trainable row (q/k, gate, v) moved
    assert had_grad - set(qk)
    for name in had_grad - set(qk):  # everything else trains normally (AdamW moves it)
        assert not torch.equal(params[name], before[name]), name


@pytest.mark.parametrize("arch", ["qwen3_5", "phi3"])
def test_gate_and_v_rows_are_not_masked(arch):
    model = build(arch)
    ad = get_adapter(model)
    layout = ad.layout(model)
    masks = build_masks(None, layout, ratio=0.3, policy="random")
    (_, ref, p), *_ = [t for t in ad.qk_params(model) if t[1].layer == layout.layers()[0]]
    trainable = param_mask(ad.param_rows(ref, layout, p.shape[0]), masks, p.shape[0])
    if arch == "phi3":  # q 32 rows, k 16 rows, v 16 rows: v always trainable
        assert trainable[48:].all() and int(trainable[:48].sum()) == 10 + 5
    else:  # q_proj: 4 heads x (8 query + 8 gate) rows: gate rows always trainable
        per_head = trainable.view(4, 16)
        assert per_head[:, 8:].all() and int(per_head[:, :8].sum()) == 10


# ---- RoPE pairs -----------------------------------------------------------------------------
def _mixing(model, layer: int, head_dim: int) -> torch.Tensor:
    """(D, D) bool: channel j of a head feeds channel i after the family's own RoPE at
    position 3 (from its modeling module's rotary embedding and apply function)."""
    base = model.model
    attn = base.layers[layer].self_attn
    mod = sys.modules[type(attn).__module__]
    x = torch.zeros(1, 1, head_dim)
    pos = torch.tensor([[3]])
    kw = {}
    if "layer_type" in inspect.signature(base.rotary_emb.forward).parameters:
        kw["layer_type"] = model.config.layer_types[layer]
    cos, sin = base.rotary_emb(x, pos, **kw)  # (1, 1, R)
    eye = torch.eye(head_dim).reshape(1, head_dim, 1, head_dim)  # one-hot per "head"
    params = inspect.signature(mod.apply_rotary_pos_emb).parameters
    out = (
        mod.apply_rotary_pos_emb(eye, cos, sin)
        if "q" not in params
        else (mod.apply_rotary_pos_emb(eye, eye, cos, sin)[0])
    )
    return out.reshape(head_dim, head_dim).abs().gt(1e-6).T  # [i, j]: j feeds i


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("arch", FAMILIES)
def test_rope_pairs_are_the_familys_own(arch):
    model = build(arch)
    ad = get_adapter(model)
    layout = ad.layout(model)
    for layer in layout.layers():
        g = layout.geom((layer, "q"))
        attn = model.model.layers[layer].self_attn
        if not getattr(attn, "use_rope", True):  # SmolLM3 NoPE layer
            assert g.rope.style == "none" and g.pairs().numel() == 0
            continue
        mix = _mixing(model, layer, g.head_dim)
        freq = g.rope.freq_index(g.head_dim)
        paired = set()
        for a, b in g.rope.pairs(g.head_dim).tolist():
            paired |= {a, b}
            turns = bool(mix[a, b] and mix[b, a])
            assert turns or (freq[a] == 1.0 and freq[b] == 1.0), (arch, layer, a, b)
        for j in range(g.head_dim):  # a channel the code mixes is in one of our pairs
            if mix[:, j].sum() > 1:
                assert j in paired, (arch, layer, j)
    # rope_pair masks keep every pair whole; NoPE / unrotated channels stand alone
    scores = {k: torch.rand(layout.geom(k).rows) for k in layout}
    stats = QKStats()
    for k, s in scores.items():
        stats.update(k, s.reshape(1, -1))
    masks = build_masks(stats, layout, ratio=0.3, granularity="rope_pair")
    for key in layout:
        g = layout.geom(key)
        pairs = g.pairs()
        assert torch.equal(masks[key][pairs[:, 0]], masks[key][pairs[:, 1]]), key
        if g.rope.style == "none":
            chan = build_masks(stats, layout, ratio=0.3)[key]
            assert torch.equal(masks[key], chan)


# ---- errors -------------------------------------------------------------------------------
def test_deepseek_mla_is_refused_with_the_reason():
    from transformers import DeepseekV3Config

    with pytest.raises(ValueError, match="does not support model_type 'deepseek_v3': multi-head"):
        get_adapter(DeepseekV3Config())
    with pytest.raises(ValueError, match="Supported: .*phi3.*qwen3_5"):
        get_adapter("deepseek_v2")


def test_registry_duplicate_and_unknown():
    with pytest.raises(ValueError, match="'phi3' is already registered"):
        register("phi3")(type("Again", (ADAPTERS.get("llama").__class__,), {}))
    with pytest.raises(ValueError, match="no q/k adapter for model_type 'mamba'.*olmo2"):
        get_adapter("mamba")


def test_vision_and_audio_towers_are_never_decoder_layers():
    for arch in ("gemma3", "gemma4"):
        ad = get_adapter(arch)
        assert ad.match_param("model.language_model.layers.2.self_attn.q_proj.weight") == (
            ParamRef(2, ("q",), "weight")
        )
        for tower in (
            "model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight",
            "model.vision_tower.encoder.layers.0.self_attn.q_proj.linear.weight",
            "model.audio_tower.layers.0.self_attn.k_proj.linear.weight",
        ):
            assert ad.match_param(tower) is None
