"""RowMaskGuard: frozen W_Q/W_K rows stay bit-identical through AdamW steps, on the
masked (snapshot-free) path and on the snapshot path."""

import copy

import pytest
import torch
from longact_tiny import tiny_model, token_batch
from torch import nn

from longact.core.arch import get_adapter
from longact.core.capture import capture_qk_stats
from longact.core.masks import MaskSet, build_masks
from longact.core.sparse_update import RowMaskGuard


def _loss(model, seed):
    ids = token_batch(seed, 2, 8)
    return model(input_ids=ids, labels=ids).loss


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _adam_state(opt, param):
    return {k: v.clone() for k, v in opt.state[param].items() if k != "step"}


@pytest.mark.parametrize("path", ["masked", "snapshot"])
def test_adamw_frozen_rows_bit_identical_with_mask_refresh(path):
    model = tiny_model("qwen3", seed=0)
    ad = get_adapter(model)
    layout = ad.layout(model)
    with capture_qk_stats(model) as cap:
        _loss(model, 100).backward()
    model.zero_grad()
    first = build_masks(cap.stats, layout, ratio=0.3, version=1)
    second = build_masks(None, layout, ratio=0.3, policy="random", seed=5, version=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    guard = RowMaskGuard(model, first, exact_path=path)
    qk = {name: (ref, p) for name, ref, p in ad.qk_params(model)}
    params = dict(model.named_parameters())
    masks = first
    for step in range(6):
        if step == 3:
            old_state = {n: _adam_state(opt, p) for n, (_, p) in qk.items()}
            info = guard.set_masks(second, opt)
            masks = second
            for name, (ref, p) in qk.items():
                entering = second[ref.key] & ~first[ref.key]
                leaving = first[ref.key] & ~second[ref.key]
                # the masked path zeroes leaving rows' moments, the snapshot path keeps them
                staying = ~entering & ~leaving if path == "masked" else ~entering
                for k, v in opt.state[p].items():
                    if k == "step":
                        continue
                    assert not v[entering].any()  # reentry="reset"
                    assert torch.equal(v[staying], old_state[name][k][staying])
                    assert path == "snapshot" or not v[leaving].any()
            expected_in = sum(int((second[k] & ~first[k]).sum()) for k in layout)
            assert info["rows_entering"] == expected_in > 0
        _loss(model, step).backward()
        guard.mask_grads()
        grads = [p.grad for p in model.parameters()]
        manual = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        total = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.05)
        torch.testing.assert_close(total, manual)  # clipping sees the masked grads
        assert total > 0.05
        before = _snapshot(model)
        state_before = {n: _adam_state(opt, p) for n, (_, p) in qk.items()} if step else None
        guard.step(opt)
        opt.zero_grad()
        for name, p in params.items():
            if name not in qk:
                assert not torch.equal(p, before[name]), name  # everything else trains
                continue
            ref, _ = qk[name]
            keep = masks[ref.key]
            assert torch.equal(p[~keep], before[name][~keep]), (step, name)
            changed = (p != before[name]).reshape(p.shape[0], -1).any(1)
            assert changed[keep].all(), (step, name)
            for k, v in opt.state[p].items():
                if k == "step":
                    continue
                old = state_before[name][k][~keep] if state_before else 0
                assert torch.equal(v[~keep], torch.zeros_like(v[~keep]) + old), (step, name, k)


@pytest.mark.parametrize("path", ["masked", "snapshot"])
@pytest.mark.parametrize("opt_name", ["adamw", "sgd"])
def test_full_mask_is_bit_identical_to_plain(opt_name, path):
    plain = tiny_model("qwen3", seed=2)
    masked = copy.deepcopy(plain)

    def make(m):
        if opt_name == "adamw":
            return torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)
        return torch.optim.SGD(m.parameters(), lr=1e-2, momentum=0.9, weight_decay=0.1)

    opt_p, opt_m = make(plain), make(masked)
    guard = RowMaskGuard(masked, MaskSet.full(get_adapter(masked).layout(masked)), exact_path=path)
    for step in range(3):
        for model, opt in ((plain, opt_p), (masked, opt_m)):
            _loss(model, step).backward()
            if model is masked:
                guard.mask_grads()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            guard.step(opt) if model is masked else opt.step()
            opt.zero_grad()
    for (n, a), b in zip(plain.named_parameters(), masked.parameters(), strict=True):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("path", ["masked", "snapshot"])
@pytest.mark.parametrize("reentry", ["reset", "keep"])
def test_bias_rows_and_sgd_momentum(reentry, path):
    model = tiny_model("qwen2", seed=3)
    layout = get_adapter(model).layout(model)
    a = build_masks(None, layout, ratio=0.3, policy="random", seed=1)
    b = build_masks(None, layout, ratio=0.3, policy="random", seed=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    guard = RowMaskGuard(model, a, reentry=reentry, exact_path=path)
    bias = model.model.layers[1].self_attn.k_proj.bias
    for step in range(4):
        if step == 2:
            mom = opt.state[bias]["momentum_buffer"].clone()
            guard.set_masks(b, opt)
            entering = b[(1, "k")] & ~a[(1, "k")]
            assert entering.any()
            got = opt.state[bias]["momentum_buffer"][entering]
            assert torch.equal(got, torch.zeros_like(got) if reentry == "reset" else mom[entering])
        keep = (a if step < 2 else b)[(1, "k")]
        before = bias.detach().clone()
        _loss(model, step).backward()
        guard.mask_grads()
        assert not bias.grad[~keep].any()
        guard.step(opt)
        opt.zero_grad()
        assert torch.equal(bias[~keep], before[~keep])
        assert (bias[keep] != before[keep]).all()


def test_mask_errors():
    model = tiny_model("qwen3")
    layout = get_adapter(model).layout(model)
    masks = MaskSet.full(layout).masks
    bad = dict(masks)
    bad[(0, "q")] = torch.ones(30, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"has 30 rows but model.layers.0.self_attn.q_proj"):
        RowMaskGuard(model, MaskSet(bad))
    missing = {k: v for k, v in masks.items() if k != (1, "k")}
    with pytest.raises(ValueError, match="no mask for"):
        RowMaskGuard(model, MaskSet(missing))
    extra = dict(masks)
    extra[(7, "q")] = torch.ones(32, dtype=torch.bool)
    with pytest.raises(ValueError, match="no W_Q/W_K in the model"):
        RowMaskGuard(model, MaskSet(extra))
    with pytest.raises(ValueError, match="reentry"):
        RowMaskGuard(model, MaskSet(masks), reentry="zero")
    guard = RowMaskGuard(model, build_masks(None, layout, policy="random", seed=1))
    with pytest.raises(ValueError, match="pass the optimizer"):
        guard.set_masks(build_masks(None, layout, policy="random", seed=2))
    lin = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="no q/k projection parameters"):
        RowMaskGuard(lin, MaskSet(masks), adapter=get_adapter("qwen3"))


def test_reused_snapshot_buffers_give_the_same_steps():
    """Kept buffers (the CPU default) and fresh copies train bit-identically; the kept
    buffers are the same storage from step to step."""
    runs = {}
    for reuse in (True, False):
        model = tiny_model("qwen3", seed=0)
        masks = build_masks(None, get_adapter(model).layout(model), ratio=0.3, policy="random")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        guard = RowMaskGuard(model, masks, reuse_buffers=reuse, exact_path="snapshot")
        assert guard.reuse_buffers is reuse
        ptrs = []
        for step in range(3):
            _loss(model, step).backward()
            guard.mask_grads()
            guard.step(opt)
            opt.zero_grad()
            ptrs.append(sorted(b.data_ptr() for b in guard._buffers.values()))
        assert (ptrs[1] == ptrs[2] and len(ptrs[2]) > 0) if reuse else ptrs[2] == []
        runs[reuse] = _snapshot(model)
    for name, p in runs[True].items():
        assert torch.equal(p, runs[False][name]), name
    assert RowMaskGuard(tiny_model("qwen3"), masks).reuse_buffers is None  # by device


def test_snapshot_buffers_follow_the_rows_device_and_leave_on_offload():
    """A guard built while FSDP had the parameters offloaded (on the CPU) must not keep
    snapshot buffers on the accelerator it later steps on: whether a buffer is kept
    follows each tensor's device, and ``drop_device_copies`` (the engine offloads) frees
    any accelerator memory the guard holds. "meta" stands in for the accelerator."""
    model = tiny_model("qwen3", seed=0)
    masks = build_masks(None, get_adapter(model).layout(model), ratio=0.3, policy="random")
    guard = RowMaskGuard(model, masks, exact_path="snapshot")  # built on the CPU
    idx = torch.tensor([0, 2])
    guard._rows((0, "w"), torch.randn(4, 3), idx)  # CPU rows: kept between steps
    guard._rows((1, "w"), torch.empty(4, 3, device="meta"), idx.to("meta"))  # not kept
    assert [b.device.type for b in guard._buffers.values()] == ["cpu"]
    assert guard.device_bytes() == 0
    guard.reuse_buffers = True  # forced: kept on the accelerator too ...
    guard._rows((1, "w"), torch.empty(4, 3, device="meta"), idx.to("meta"))
    guard.targets[0]._on[torch.device("meta")] = idx.to("meta")
    assert guard.device_bytes() == 2 * 3 * 4 + 2 * 8
    guard.drop_device_copies()  # ... until the engine offloads
    assert guard.device_bytes() == 0
    assert [b.device.type for b in guard._buffers.values()] == ["cpu"]


def _offload_round_trip(device: str, path: str) -> None:
    """Masks installed while the model is on the CPU (verl offloads it, then installs the
    masks of a resume or a calibration), training on ``device``, offload again: every
    index meets its tensor on that tensor's device, and none stays behind."""
    model = tiny_model("qwen3", seed=0)
    layout = get_adapter(model).layout(model)
    masks = build_masks(None, layout, ratio=0.3, policy="random", version=1)
    guard = RowMaskGuard(model, masks, exact_path=path)
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(2):
        before = _snapshot(model)
        ids = token_batch(step, 2, 8).to(device)
        model(input_ids=ids, labels=ids).loss.backward()
        guard.mask_grads()
        with guard.protect(opt):
            opt.step()
        opt.zero_grad()
        for t in guard.targets:
            keep = guard.masks[t.ref.key].to(device)
            w0, w1 = before[t.name], dict(model.named_parameters())[t.name].detach()
            assert torch.equal(w0[~keep], w1[~keep]), f"{t.name}: a frozen row moved"
    on_device = [t for t in guard.targets if t._on]
    assert bool(on_device) == (torch.device(device).type != "cpu")
    assert all(t.frozen.device.type == "cpu" for t in guard.targets)
    guard.drop_device_copies()  # the engine offloads: LongAct keeps nothing there
    assert not any(t._on for t in guard.targets)
    # a refresh installed while offloaded, with optimizer state on the device
    model.to("cpu")
    new = build_masks(None, layout, ratio=0.3, policy="random", seed=9, version=2)
    guard.set_masks(new, opt)
    assert not any(t._on for t in guard.targets)


@pytest.mark.parametrize("path", ["masked", "snapshot"])
def test_row_indices_follow_their_tensors_across_offload_on_the_cpu(path):
    _offload_round_trip("cpu", path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("path", ["masked", "snapshot"])
def test_row_indices_follow_their_tensors_across_offload_on_cuda(path):
    _offload_round_trip("cuda", path)
