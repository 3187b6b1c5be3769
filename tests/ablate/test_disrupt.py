"""The disruption hooks on a tiny model of every supported family: exactly the chosen
channels change at the capture point, to the calibration mean (or 0), the logits move
while the hooks are in and are exactly as before once they are gone; the calibration
means are the means over real tokens only."""

from __future__ import annotations

import pytest
import torch

from longact.ablate import CalibrationCapture, Disruption, replacement
from longact.core.arch import get_adapter
from longact.models.tiny_arch import ARCHS

NORM_ARCHS = ["qwen3", "gemma3", "olmo2"]  # heads_last, heads_first, flat norm layouts


@pytest.fixture(scope="module")
def family_models():
    """{arch: fp32 eval-mode model}, tiny, built from configs (never downloaded)."""
    from longact.models.tiny import build_model

    return {a: build_model("xxs", seed=0, arch=a).eval() for a in ARCHS.names()}


def _record(model, module, ids):
    """The hooked module's output (first element of a tuple) on ``ids``."""
    seen = []
    h = module.register_forward_hook(
        lambda m, a, o: seen.append((o[0] if isinstance(o, tuple) else o).detach().clone())
    )
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    h.remove()
    return seen[0]


def _channel_view(adapter, la, proj, point, out, head_dim):
    """(B, T, C) channels of one projection in a hooked output (test's own reading)."""
    if point == "proj":
        return out[..., la.rows[proj]]
    if adapter.norm_layout == "heads_first":
        out = out.transpose(-3, -2)
    if adapter.norm_layout == "flat":
        return out
    return out.reshape(*out.shape[:-2], -1)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize(
    "arch,point", [(a, "proj") for a in ARCHS.names()] + [(a, "norm") for a in NORM_ARCHS]
)
@pytest.mark.parametrize("mode", ["mean", "zero"])
def test_only_the_chosen_channels_change(family_models, arch, point, mode):
    model = family_models[arch]
    adapter = get_adapter(model)
    layout = adapter.layout(model)
    la = adapter.layers(model)[0]  # first layer LongAct applies to: nothing upstream changes
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(1))
    with CalibrationCapture(model.base_model, adapter, point) as cap:
        with torch.no_grad():
            model.base_model(input_ids=ids, use_cache=False)
        means = cap.means()
    gen = torch.Generator().manual_seed(2)
    chosen = {}
    for proj in la.modules:
        c = layout.rows((la.index, proj))
        chosen[(la.index, proj)] = torch.randperm(c, generator=gen) < max(1, c // 3)
    values = replacement(chosen, means, mode)
    for proj in la.modules:
        key = (la.index, proj)
        mod = la.proj(proj) if point == "proj" else la.norm(proj)
        before = _record(model, mod, ids)
        with Disruption(model, values, adapter, point):
            after = _record(model, mod, ids)
        assert before.shape == after.shape
        d = layout.geom(key).head_dim
        b = _channel_view(adapter, la, proj, point, before, d)
        a = _channel_view(adapter, la, proj, point, after, d)
        mask = chosen[key]
        assert torch.equal(a[..., ~mask], b[..., ~mask])  # other channels untouched
        want = means[key][mask].float() if mode == "mean" else torch.zeros(int(mask.sum()))
        assert torch.allclose(a[..., mask], want.expand_as(a[..., mask]))
        assert not torch.equal(a[..., mask], b[..., mask])
        if point == "proj":  # rows holding no chosen channel (gate, v; Phi-3: one module)
            other = torch.ones(before.shape[-1], dtype=torch.bool)
            for p in la.modules:
                if la.proj(p) is mod:
                    other[la.rows[p][chosen[(la.index, p)]]] = False
            assert torch.equal(after[..., other], before[..., other])
    # every chosen key at once: the logits move while the hooks are in, and once they
    # are gone the model is exactly as before
    logits = _logits(model, ids)
    with Disruption(model, values, adapter, point):
        disrupted = _logits(model, ids)
    assert not torch.allclose(disrupted, logits)
    assert torch.equal(_logits(model, ids), logits)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def test_calibration_means_count_real_tokens_only(family_models):
    model = family_models["qwen3"]
    adapter = get_adapter(model)
    la = adapter.layers(model)[0]
    ids = torch.randint(3, 200, (2, 10), generator=torch.Generator().manual_seed(3))
    attn = torch.ones_like(ids)
    attn[1, 6:] = 0  # right padding on the second row
    with CalibrationCapture(model.base_model, adapter) as cap:
        cap.set_token_mask(attn.bool())
        with torch.no_grad():
            model.base_model(input_ids=ids, attention_mask=attn, use_cache=False)
        means = cap.means()
    out = _record_masked(model, la.proj("q"), ids, attn)[..., la.rows["q"]]  # (B, T, C)
    want = out[attn.bool()].double().mean(0)
    assert torch.allclose(means[(la.index, "q")], want, atol=1e-6)


def _record_masked(model, module, ids, attn):
    seen = []
    h = module.register_forward_hook(lambda m, a, o: seen.append(o.detach().clone()))
    with torch.no_grad():
        model.base_model(input_ids=ids, attention_mask=attn, use_cache=False)
    h.remove()
    return seen[0]


def test_generation_is_disrupted_at_every_decoding_step(family_models):
    """With a KV cache each step feeds one new token: the hook overwrites it too."""
    model = family_models["qwen3"]
    adapter = get_adapter(model)
    la = adapter.layers(model)[0]
    key = (la.index, "k")
    chosen = {key: torch.arange(adapter.layout(model).rows(key)) % 3 == 0}
    values = replacement(chosen, {key: torch.linspace(-2, 2, chosen[key].numel())}, "mean")
    seen = []
    with Disruption(model, values, adapter):
        h = la.proj("k").register_forward_hook(lambda m, a, o: seen.append(o.detach()))
        with torch.no_grad():
            model.generate(
                torch.randint(3, 200, (1, 9)),
                max_new_tokens=3,
                do_sample=False,
                min_new_tokens=3,
                pad_token_id=0,
            )
        h.remove()
    assert [s.shape[1] for s in seen] == [9, 1, 1]  # prefill, then one token per step
    want = values[key][1].float()
    for s in seen:
        assert torch.allclose(s[..., la.rows["k"][chosen[key]]], want.expand(*s.shape[:2], -1))


def test_bad_input_is_named():
    model = __import__("longact.models.tiny", fromlist=["build_model"]).build_model("xxs")
    with pytest.raises(ValueError, match="unknown disruption mode 'half'; valid: mean, zero"):
        replacement({}, {}, "half")
    with pytest.raises(ValueError, match=r"keys \[\(7, 'q'\)\] are not q/k keys"):
        Disruption(model, {(7, "q"): (torch.tensor([0]), torch.tensor([0.0]))})
    with pytest.raises(ValueError, match="unknown capture point"):
        Disruption(model, {}, point="rope")
