"""capture_qk_stats on real tiny HF models: padding, packing, no_grad, checkpointing."""

import pytest
import torch
import torch.nn.functional as F
from longact_tiny import tiny_model, token_batch

from longact.core.capture import QKCapture, capture_qk_stats

# left padding in row 0, right padding in row 1
ATTN = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])


def _grab_inputs(model, point="proj", heads_first=False):
    """Forward hooks recording, per (layer, proj), the reference activation (B, T, C)."""
    grabbed, handles = {}, []
    for i, layer in enumerate(model.model.layers):
        for p in "qk":
            proj = getattr(layer.self_attn, f"{p}_proj")
            if point == "proj":  # recompute q_proj(hidden) from the grabbed hidden states

                def hook(mod, args, out, key=(i, p)):
                    grabbed[key] = F.linear(args[0].detach(), mod.weight, mod.bias).detach()

                handles.append(proj.register_forward_hook(hook))
            else:
                norm = getattr(layer.self_attn, f"{p}_norm")

                def hook(mod, args, out, key=(i, p)):
                    if heads_first:  # (B, H, T, D) -> (B, T, H, D)
                        out = out.transpose(1, 2)
                    grabbed[key] = out.detach().flatten(-2)

                handles.append(norm.register_forward_hook(hook))
    return grabbed, handles


def _reference(x, mask):
    x = x[mask.bool()].double()  # (n_real, C)
    return {
        "count": torch.tensor(float(x.shape[0]), dtype=torch.float64),
        "sum_abs": x.abs().sum(0),
        "sum_sq": (x * x).sum(0),
        "max_abs": x.abs().amax(0),
    }


def _assert_matches(stats, grabbed, mask):
    assert stats.keys() == sorted(grabbed)
    for key, x in grabbed.items():
        ref = _reference(x, mask)
        for field, value in ref.items():
            torch.testing.assert_close(getattr(stats[key], field), value, rtol=1e-12, atol=0)


@pytest.mark.parametrize("point", ["proj", "norm"])
def test_padding_excluded_exactly(qwen3, point):
    ids = token_batch(1, 2, 6)
    grabbed, handles = _grab_inputs(qwen3, point)
    with capture_qk_stats(qwen3, point=point) as cap:
        qwen3(input_ids=ids, attention_mask=ATTN).logits.sum().backward()
    for h in handles:
        h.remove()
    assert cap.stats[(0, "q")].n_channels == 32 and cap.stats[(1, "k")].n_channels == 16
    assert cap.stats.token_count((0, "q")) == 8
    _assert_matches(cap.stats, grabbed, ATTN)


@pytest.mark.filterwarnings("ignore")
def test_gemma3_norm_point_heads_first():
    model = tiny_model("gemma3_text", attn="eager")
    ids = token_batch(1, 2, 6)
    grabbed, handles = _grab_inputs(model, "norm", heads_first=True)
    with capture_qk_stats(model, point="norm") as cap:
        model(input_ids=ids, attention_mask=ATTN)
    for h in handles:
        h.remove()
    _assert_matches(cap.stats, grabbed, ATTN)


def test_attention_mask_as_positional_arg(qwen3):
    ids = token_batch(1, 2, 6)
    with capture_qk_stats(qwen3) as cap:
        qwen3(ids, ATTN)
    assert cap.stats.token_count((1, "k")) == 8


def test_explicit_token_mask_overrides_attention_mask(qwen3):
    ids = token_batch(2, 2, 6)
    only = torch.zeros(2, 6, dtype=torch.bool)
    only[0, 3:] = True  # three tokens of row 0
    grabbed, handles = _grab_inputs(qwen3)
    with capture_qk_stats(qwen3, token_mask=only) as cap:
        qwen3(input_ids=ids, attention_mask=ATTN)
    _assert_matches(cap.stats, grabbed, only)
    cap.set_token_mask(None)
    with cap:  # re-attach: now the attention mask decides
        stats_before = cap.take()
        qwen3(input_ids=ids, attention_mask=ATTN)
    for h in handles:
        h.remove()
    assert stats_before.token_count((0, "q")) == 3
    _assert_matches(cap.stats, grabbed, ATTN)


def test_packed_inputs_count_every_token(qwen3):
    ids = token_batch(3, 1, 9)  # remove-padding layout: (1, total_nnz)
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1]])
    grabbed, handles = _grab_inputs(qwen3)
    with capture_qk_stats(qwen3) as cap:
        qwen3(input_ids=ids, position_ids=pos)
    for h in handles:
        h.remove()
    _assert_matches(cap.stats, grabbed, torch.ones(1, 9))


def test_no_grad_and_eval_passes_are_skipped_unless_asked(qwen3):
    ids = token_batch(4, 2, 6)
    with capture_qk_stats(qwen3) as cap:
        with torch.no_grad():
            qwen3(input_ids=ids)
        qwen3.eval()
        qwen3(input_ids=ids)
        qwen3.train()
    assert cap.stats.token_count((0, "q")) == 0
    with capture_qk_stats(qwen3, during_no_grad=True) as cap, torch.no_grad():
        qwen3.eval()
        qwen3(input_ids=ids, attention_mask=ATTN)
    assert cap.stats.token_count((0, "q")) == 8


def test_hooks_removed_on_exit(qwen3):
    attn = qwen3.model.layers[0].self_attn
    before = (len(qwen3._forward_pre_hooks), len(attn.q_proj._forward_hooks))
    with capture_qk_stats(qwen3) as cap:
        assert len(attn.q_proj._forward_hooks) == before[1] + 1
    assert (len(qwen3._forward_pre_hooks), len(attn.q_proj._forward_hooks)) == before
    qwen3(input_ids=token_batch(5, 1, 4))
    assert cap.stats.token_count((0, "q")) == 0


def test_bad_point_and_missing_norm_and_bad_mask(qwen3):
    with pytest.raises(ValueError, match="valid: proj, norm"):
        capture_qk_stats(qwen3, point="rope")
    with pytest.raises(ValueError, match="needs q_norm/k_norm"):
        capture_qk_stats(tiny_model("llama"), point="norm")
    with (
        pytest.raises(ValueError, match="does not fit"),
        capture_qk_stats(qwen3, token_mask=torch.ones(2, 5)),
    ):
        qwen3(input_ids=token_batch(6, 2, 6))
    # generation with a KV cache: a longer attention mask maps to its newest positions
    last = QKCapture._fit_mask(torch.tensor([[1, 1, 0], [0, 1, 1]]), torch.Size([2, 1]))
    assert last.tolist() == [[False], [True]]


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_does_not_double_count(reentrant):
    ids = token_batch(7, 2, 6)
    plain, ckpt = tiny_model("qwen3", seed=1), tiny_model("qwen3", seed=1)
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    calls = []
    ckpt.model.layers[0].self_attn.q_proj.register_forward_hook(lambda *a: calls.append(1))
    results = []
    for model in (plain, ckpt):
        with capture_qk_stats(model) as cap:
            model(input_ids=ids, attention_mask=ATTN, labels=ids).loss.backward()
        results.append(cap.stats)
    assert len(calls) == 2  # the forward really was replayed during backward
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None
    ref, got = results
    for key in ref:
        assert got.token_count(key) == ref.token_count(key) == 8
        for field in ("sum_abs", "sum_sq", "max_abs"):
            assert torch.equal(getattr(got[key], field), getattr(ref[key], field))


@pytest.mark.parametrize(
    ("local_len", "pad", "sp", "expected"),
    [
        (7, 0, 1, [7]),  # packed, nothing appended
        (8, 3, 1, [5]),  # pad_to_length's bucket pad
        (5, 3, 2, [5, 2]),  # Ulysses: 7 real tokens padded to 10, split in two
        (4, 5, 2, [3, 0]),  # the pad reaches into the first rank's slice
    ],
)
def test_packed_token_mask_excludes_the_appended_padding(local_len, pad, sp, expected):
    from longact.core.capture import packed_token_mask

    masks = [packed_token_mask(local_len, pad, r, sp) for r in range(sp)]
    assert [int(m.sum()) for m in masks] == expected
    for m in masks:  # real tokens first, padding last, in every slice
        assert m.shape == (1, local_len) and torch.equal(m, m.sort(descending=True).values)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_capture_follows_the_model_across_offload():
    """Built while verl keeps the model on the CPU (param offload), the capture gathers on
    the GPU once the model computes there, and moves to the CPU while it is offloaded."""
    model = tiny_model("qwen3", seed=0)
    cap = QKCapture(model).attach()
    model.to("cuda")
    ids = token_batch(0, 2, 8)
    model(input_ids=ids.cuda())
    assert cap.stats[(0, "q")].sum_abs.device.type == "cuda"
    cap.to("cpu")  # the engine offloads
    assert cap.stats[(0, "q")].sum_abs.device.type == "cpu"
    model(input_ids=ids.cuda())
    assert cap.stats.token_count((0, "q")) == 32  # two passes of 2 x 8 tokens, kept
