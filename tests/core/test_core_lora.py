"""LongAct over a peft LoRA adapter, on tiny models of three row layouts: separate
q_proj/k_proj (qwen3), a fused qkv_proj (phi3) and a q_proj carrying a gate (qwen3_5).

Frozen rows of q/k ``lora_B`` stay bit-identical (zero) through AdamW with weight decay
on both exact paths, with a mask refresh; trainable rows, ``lora_A`` and the other
adapters move; the merged model's W_Q/W_K differ from the base only in rows whose
channel was selected. And the refusals: q/k not targeted, DoRA, lora_bias, a non-zero
``lora_B``, two adapters.
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from longact.core import RowMaskGuard, build_masks, capture_qk_stats, get_adapter
from longact.core.arch import param_mask
from longact.core.lora import LoRAError, check_model, config_problem, describe, save_adapter
from longact.models.tiny import TinySize
from longact.models.tiny_arch import ATTN, tiny_config

SHAPE = TinySize(32, 4, 4, 2, 8, 64, 128)
FAMILIES = ["qwen3", "phi3", "qwen3_5"]
pytestmark = pytest.mark.filterwarnings("ignore")


def build(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    cfg = tiny_config(arch, SHAPE, 64)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=ATTN.get(arch, "sdpa"))
    return model.float().train()


def lora(model, r: int = 4, targets="all-linear", **kw):
    return get_peft_model(model, LoraConfig(r=r, lora_alpha=8, target_modules=targets, **kw))


def batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (2, 8), generator=g)
    return ids


def _q_weight(model, adapter, layer: int, proj: str) -> str:
    mod = next(a for a, ps in adapter.proj_modules.items() if proj in ps)
    return f"model.layers.{layer}.self_attn.{mod}.weight"


@pytest.mark.parametrize("path", ["masked", "snapshot"])
@pytest.mark.parametrize("arch", FAMILIES)
def test_frozen_lora_b_rows_stay_zero_and_merged_delta_stays_in_selected_rows(arch, path):
    base_sd = {k: v.clone() for k, v in build(arch).state_dict().items()}
    model = lora(build(arch))
    ad = get_adapter(model)
    layout = ad.layout(model)
    assert check_model(model, ad)["rank"] == 4
    with capture_qk_stats(model) as cap:  # statistics through the LoRA layers' outputs
        model(input_ids=batch(1), labels=batch(1)).loss.backward()
    model.zero_grad()
    first = build_masks(cap.stats, layout, ratio=0.3, version=1)
    second = build_masks(None, layout, ratio=0.3, policy="random", seed=3, version=2)
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=1e-2, weight_decay=0.1)
    guard = RowMaskGuard(model, first, optimizer=opt, exact_path=path)
    assert guard.path == path
    targets = {name: (ref, p) for name, ref, p in ad.qk_params(model)}
    assert targets and all(ref.kind == "lora_B" for ref, _ in targets.values())
    assert {k for ref, _ in targets.values() for k in ref.keys} == set(layout.keys())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ever = {k: first[k].clone() for k in layout}
    masks = first
    for step in range(4):
        if step == 2:
            guard.set_masks(second, opt)
            masks = second
            ever = {k: ever[k] | second[k] for k in layout}
        frozen_before = {
            n: p.detach()[
                ~param_mask(ad.param_rows(ref, layout, p.shape[0]), masks, p.shape[0])
            ].clone()
            for n, (ref, p) in targets.items()
        }
        model(input_ids=batch(10 + step), labels=batch(10 + step)).loss.backward()
        guard.mask_grads()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        guard.step(opt)
        opt.zero_grad()
        for n, (ref, p) in targets.items():
            keep = param_mask(ad.param_rows(ref, layout, p.shape[0]), masks, p.shape[0])
            assert torch.equal(p.detach()[~keep], frozen_before[n]), f"{n}: a frozen row moved"
    params = dict(model.named_parameters())
    for n, (ref, p) in targets.items():
        rows = ad.param_rows(ref, layout, p.shape[0])
        never = ~param_mask(rows, ever, p.shape[0])
        assert never.any() and not p.detach()[never].any(), f"{n}: never-selected rows not zero"
        moved = (p.detach() != before[n]).any(1)
        assert moved[param_mask(rows, second, p.shape[0])].all(), f"{n}: trainable rows still"
    others = [n for n, q in params.items() if q.requires_grad and n not in targets]
    assert any(".lora_A." in n for n in others) and any("v_proj" in n or "qkv" in n for n in others)
    for n in others:
        assert not torch.equal(params[n], before[n]), f"{n} did not train"
    # the merged model: W_Q/W_K differ from the base only in rows ever selected
    merged = model.merge_and_unload().state_dict()
    for key in layout:
        name = _q_weight(model, ad, *key)
        rows = dict(ad.param_rows(ad.match_param(name), layout, merged[name].shape[0]))[key]
        changed = (merged[name][rows] != base_sd[name][rows]).any(1)
        assert changed.any(), f"{key}: no update reached W"
        assert not changed[~ever[key]].any(), f"{key}: a never-selected row of W changed"


def test_adapter_saved_by_longact_loads_with_peft_and_merges_the_same(tmp_path):
    model = lora(build("qwen3"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    out = save_adapter(model, tmp_path / "lora_adapter", base="unused")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["peft_type"] == "LORA"
    loaded = PeftModel.from_pretrained(build("qwen3"), out)
    ids = batch(5)
    with torch.no_grad():
        a = model(input_ids=ids).logits
        b = loaded(input_ids=ids).logits
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"targets": ["v_proj", "o_proj"]}, "has no LoRA adapter"),
        ({"use_dora": True}, "DoRA"),
        ({"lora_bias": True}, "bias on lora_B"),
        ({"init_lora_weights": False}, "not zero when LongAct starts"),
    ],
)
def test_refusals_say_why(kw, match):
    model = lora(build("qwen3"), **kw)
    with pytest.raises(LoRAError, match=match):
        check_model(model, get_adapter(model))


def test_two_adapters_and_no_adapter():
    model = lora(build("qwen3"))
    model.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj", "k_proj"]))
    with pytest.raises(LoRAError, match="2 adapters"):
        check_model(model, get_adapter(model))
    plain = build("qwen3")
    assert check_model(plain, get_adapter(plain)) is None


def test_config_problem_names_the_untargeted_projection():
    std, phi = get_adapter("qwen3"), get_adapter("phi3")
    assert config_problem(std, "all-linear", None) is None
    assert config_problem(std, ["q_proj", "k_proj", "v_proj"], None) is None
    assert config_problem(phi, ["qkv_proj"], None) is None
    assert "leaves k_proj without LoRA" in config_problem(std, ["q_proj", "v_proj"], None)
    assert "leaves qkv_proj" in config_problem(phi, ["q_proj", "k_proj"], None)
    assert "excludes q_proj" in config_problem(std, "all-linear", ["q_proj"])


def test_describe_counts_rows_rank_and_params():
    cfg = tiny_config("phi3", SHAPE, 64)
    lines = describe(cfg, get_adapter(cfg), ratio=0.25, rank=8)
    text = "\n".join(lines)
    q = next(ln for ln in lines if ln.strip().startswith("q "))
    k = next(ln for ln in lines if ln.strip().startswith("k "))
    # 4 layers x 32 q rows, 25% kept = 8 per layer; lora_B params = rows x rank
    assert "32 / 128" in q and "256 / 1,024" in q and "qkv_proj" in q
    assert "16 / 64" in k and "shared" in k  # k: 4 per layer of 16; lora_A shared with q
    assert "r=8" in text


def test_fsdp2_two_ranks_save_adapter_and_merged_sync_keep_the_rows(tmp_path):
    """2 gloo ranks (``fsdp2_lora_worker.py``): frozen rows on sharded lora_B, the adapter
    gathered from both shards, and verl's merged sync of it, against the same steps
    unsharded in this process."""
    from pathlib import Path

    import fsdp2_lora_worker as worker
    from gloo_ranks import run_ranks
    from longact_tiny import tiny_model
    from safetensors.torch import load_file

    run_ranks(Path(__file__).parent / "fsdp2_lora_worker.py", tmp_path)
    merged = torch.load(tmp_path / "merged.pt")
    model = worker.lora_model()
    layout = get_adapter(model).layout(model)
    first, second = worker.masks_for(layout)
    worker.train(model, first, second)  # the same steps, unsharded
    adapter = load_file(str(tmp_path / "lora_adapter" / "adapter_model.safetensors"))
    live = {n: p.detach() for n, p in model.named_parameters() if "lora_" in n}
    assert sorted(adapter) == sorted(n.replace(".default", "") for n in live)
    for n, p in live.items():
        torch.testing.assert_close(adapter[n.replace(".default", "")], p, rtol=1e-5, atol=1e-6)
    base = tiny_model("qwen3", seed=0).state_dict()
    ever = {k: first[k] | second[k] for k in layout}
    for key in layout:
        name = f"model.layers.{key[0]}.self_attn.{key[1]}_proj.weight"
        changed = (merged[name] != base[name]).any(1)
        assert changed[second[key]].all(), f"{key}: a trainable row did not reach the rollout"
        assert not changed[~ever[key]].any(), f"{key}: the merged sync changed a frozen row"
