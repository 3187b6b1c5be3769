"""The masked (snapshot-free) exact path against the snapshot path, on tiny models.

Same steps, same masks, both paths: frozen W_Q/W_K rows and their optimizer state never
change, and every parameter (trainable rows and the rest of the model) comes out bitwise
identical to the snapshot path for the single-tensor, foreach and fused (fp32, CPU)
implementations of AdamW, Adam and SGD. The stated tolerance, one unit in the last
place per step: fused kernels on bf16 parameters, which keep the decayed value in fp32
while the masked path rounds it to bf16 first
(``test_fused_bf16_within_one_rounding_per_step``), and CUDA's fused kernels (GPU tests,
skipped without CUDA). Resumes from snapshot-path, masked-path and plain checkpoints
continue bitwise like the snapshot path (``test_core_exact_resume.py``).
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from longact_tiny import tiny_model, token_batch

from longact.core.arch import get_adapter
from longact.core.exact_update import exact_path_for, param_state
from longact.core.masks import MaskSet, build_masks
from longact.core.sparse_update import RowMaskGuard

STEPS = 9


def _schedule(layout) -> dict[int, MaskSet]:
    """Masks by the step they take effect: rows leave at step 3 and re-enter at 6."""
    a = build_masks(None, layout, ratio=0.3, policy="random", seed=1, version=1)
    b = build_masks(None, layout, ratio=0.3, policy="random", seed=2, version=2)
    return {0: a, 3: b, 6: a}


def _warmup(step: int) -> float:
    return min(1.0, (step + 1) / 4)


OPTIMIZERS = {
    "adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.01, foreach=False),
    "adamw_foreach": lambda m: torch.optim.AdamW(
        m.parameters(), lr=1e-2, weight_decay=0.01, foreach=True
    ),
    "adamw_fused": lambda m: torch.optim.AdamW(
        m.parameters(), lr=1e-2, weight_decay=0.01, fused=True
    ),
    "adam_coupled": lambda m: torch.optim.Adam(
        m.parameters(), lr=1e-2, weight_decay=0.01, foreach=False
    ),
    "adam_coupled_foreach": lambda m: torch.optim.Adam(
        m.parameters(), lr=1e-2, weight_decay=0.01, foreach=True
    ),
    "adam_decoupled": lambda m: torch.optim.Adam(
        m.parameters(), lr=1e-2, weight_decay=0.01, decoupled_weight_decay=True
    ),
    "sgd_momentum_wd": lambda m: torch.optim.SGD(
        m.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01, foreach=False
    ),
    "sgd_nesterov_foreach": lambda m: torch.optim.SGD(
        m.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01, foreach=True
    ),
    "sgd_dampening_fused": lambda m: torch.optim.SGD(
        m.parameters(), lr=0.1, momentum=0.9, dampening=0.5, weight_decay=0.01, fused=True
    ),
    "sgd_plain_default_impl": lambda m: torch.optim.SGD(m.parameters(), lr=0.1, weight_decay=0.01),
}


def _grouped_adamw(model):
    """q/k and the other matrices decayed, norms and biases not, different lrs."""
    decay = [p for p in model.parameters() if p.dim() > 1]
    rest = [p for p in model.parameters() if p.dim() <= 1]
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": 0.05},
            {"params": rest, "weight_decay": 0.0, "lr": 5e-3},
        ],
        lr=2e-2,
        foreach=True,
    )


def _frozen_state_is_zero(guard: RowMaskGuard, opt) -> bool:
    return all(
        not v[~guard.masks[t.ref.key].to(v.device)].any()
        for t in guard.targets
        for v in param_state(opt, t.param).values()
    )


def train(
    path: str,
    make_opt,
    model_type: str = "qwen3",
    reentry: str = "reset",
    steps: int = STEPS,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
):
    """``steps`` steps with the mask schedule, a warm-up lr, clipping; every step checks
    that frozen rows (params and state) did not move. Returns (model, opt, guard)."""
    model = tiny_model(model_type, seed=0).to(device=device, dtype=dtype)
    layout = get_adapter(model).layout(model)
    schedule = _schedule(layout)
    opt = make_opt(model)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup)
    guard = RowMaskGuard(model, schedule[0], reentry=reentry, optimizer=opt, exact_path=path)
    assert guard.path == path
    for step in range(steps):
        if step in schedule and step:
            guard.set_masks(schedule[step])
        ids = token_batch(step, 2, 8).to(device)
        model(input_ids=ids, labels=ids).loss.backward()
        guard.mask_grads()
        manual = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(p.grad) for p in model.parameters()])
        )
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.05)
        torch.testing.assert_close(norm, manual)  # clipping sees the masked gradients
        before = {t.name: t.param.detach().clone() for t in guard.targets}
        state_before = {
            t.name: {k: v.clone() for k, v in param_state(opt, t.param).items()}
            for t in guard.targets
        }
        wds = [g["weight_decay"] for g in opt.param_groups]
        with guard.protect():
            opt.step()
        opt.zero_grad()
        lr_sched.step()
        assert [g["weight_decay"] for g in opt.param_groups] == wds
        for t in guard.targets:
            frozen = ~guard.masks[t.ref.key].to(device)
            assert torch.equal(t.param.detach()[frozen], before[t.name][frozen]), (step, t.name)
            assert t.param.detach()[~frozen].ne(before[t.name][~frozen]).any(), (step, t.name)
            for k, v in param_state(opt, t.param).items():
                old = state_before[t.name].get(k)
                if old is not None:  # the frozen rows' state did not move either
                    assert torch.equal(v[frozen], old[frozen]), (step, t.name, k)
        if path == "masked":
            assert _frozen_state_is_zero(guard, opt)
    return model, opt, guard


def _assert_same_params(a, b):
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_masked_path_matches_snapshot_bitwise(name):
    masked = train("masked", OPTIMIZERS[name])
    snap = train("snapshot", OPTIMIZERS[name])
    _assert_same_params(masked[0], snap[0])
    # trainable rows' optimizer state agrees too; frozen rows' is zero on the masked path
    for tm, ts in zip(masked[2].targets, snap[2].targets, strict=True):
        keep = masked[2].masks[tm.ref.key]
        sm, ss = param_state(masked[1], tm.param), param_state(snap[1], ts.param)
        assert sm.keys() == ss.keys()
        for k in sm:
            assert torch.equal(sm[k][keep], ss[k][keep]), (tm.name, k)


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])  # qwen2: q/k biases
@pytest.mark.parametrize("name", ["adamw_foreach", "sgd_momentum_wd"])
def test_reentry_keep_puts_moments_back(name, model_type):
    """reentry='keep': rows that left at step 3 re-enter at step 6 with the moments they
    had; the masked path set them aside on the CPU meanwhile (the snapshot path left them
    in the optimizer state)."""
    masked = train("masked", OPTIMIZERS[name], model_type, reentry="keep", steps=6)
    snap = train("snapshot", OPTIMIZERS[name], model_type, reentry="keep", steps=6)
    guard, opt_s = masked[2], snap[1]
    assert guard._masked.stash and guard.extra_bytes() == guard._masked.stash_bytes() > 0
    for (i, k), (rows, values) in guard._masked.stash.items():  # = what the snapshot kept
        assert torch.equal(values, param_state(opt_s, snap[2].targets[i].param)[k][rows])
    masked = train("masked", OPTIMIZERS[name], model_type, reentry="keep")
    snap = train("snapshot", OPTIMIZERS[name], model_type, reentry="keep")
    _assert_same_params(masked[0], snap[0])


def test_param_groups_with_and_without_decay():
    """Only groups holding a q/k param are touched; each with its own lr and decay."""
    masked = train("masked", _grouped_adamw)
    snap = train("snapshot", _grouped_adamw)
    _assert_same_params(masked[0], snap[0])
    assert [g["weight_decay"] for g in masked[1].param_groups] == [0.05, 0.0]


def _one_step_each_path(make, dtype: torch.dtype, device: str = "cpu"):
    """Both paths take one step from the same parameters, moments and gradients."""
    base = tiny_model("qwen3", seed=0).to(device=device, dtype=dtype)
    masks = _schedule(get_adapter(base).layout(base))[0]
    warm = make(base)
    for step in range(2):  # plain steps: moments everywhere
        ids = token_batch(step, 2, 8).to(device)
        base(input_ids=ids, labels=ids).loss.backward()
        warm.step()
        warm.zero_grad()
    out = {}
    for path in ("masked", "snapshot"):
        model = copy.deepcopy(base)
        opt = make(model)
        opt.load_state_dict(copy.deepcopy(warm.state_dict()))  # no tensors shared
        guard = RowMaskGuard(model, masks, optimizer=opt, exact_path=path)
        ids = token_batch(5, 2, 8).to(device)
        model(input_ids=ids, labels=ids).loss.backward()
        guard.mask_grads()
        guard.step()
        out[path] = {n: p.detach().float() for n, p in model.named_parameters()}
    before = {n: p.detach().float() for n, p in base.named_parameters()}
    return out["masked"], out["snapshot"], before, masks


def _assert_within_one_ulp(masked, snap, before, masks, bits: int) -> int:
    """Every element within one unit in the last place (``bits`` significant bits) at
    the larger magnitude of before / after; frozen rows exact. Returns how many differ."""
    differ = 0
    ad = get_adapter("qwen3")
    for name, a in masked.items():
        b, ref = snap[name], before[name]
        # the masked path rounds p * (1 - lr*wd) (magnitude of the old p) to the param
        # dtype, then the update's result: one ulp at the larger of the two magnitudes
        _, exp = torch.frexp(torch.maximum(torch.maximum(a.abs(), b.abs()), ref.abs()))
        ulp = torch.ldexp(torch.ones_like(a), exp - bits)
        assert ((a - b).abs() <= ulp).all(), name
        differ += int((a != b).sum())
        key = ad.match_param(name)
        if key is not None:
            frozen = ~masks[key.key].to(a.device)
            assert torch.equal(a[frozen], ref[frozen]) and torch.equal(b[frozen], ref[frozen])
    return differ


def test_fused_bf16_within_one_rounding_per_step():
    """Stated tolerance: fused AdamW keeps ``p * (1 - lr*wd)`` in fp32 inside its kernel,
    the masked path decays before the kernel and rounds to bf16 once more. From the same
    parameters, moments and gradients, one step of each path agrees to one bf16 unit in
    the last place (ulp) at the larger magnitude of the parameter before and after the
    step, on every element; frozen rows are exact on both. (Over many steps the
    difference is not bounded: a changed weight changes the next gradients.)"""
    got = _one_step_each_path(OPTIMIZERS["adamw_fused"], torch.bfloat16)
    assert _assert_within_one_ulp(*got, bits=8) > 0  # needed: fused bf16 is not bitwise


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["adamw", "adamw_foreach", "adam_coupled_foreach",
                                  "sgd_nesterov_foreach"])  # fmt: skip
def test_masked_path_matches_snapshot_bitwise_on_cuda(name):
    masked = train("masked", OPTIMIZERS[name], device="cuda")
    snap = train("snapshot", OPTIMIZERS[name], device="cuda")
    _assert_same_params(masked[0], snap[0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype, bits", [(torch.float32, 24), (torch.bfloat16, 8)])
@pytest.mark.parametrize("name", ["adamw_fused", "sgd_dampening_fused"])
def test_fused_on_cuda_within_one_rounding_per_step(name, dtype, bits):
    """Stated tolerance for CUDA's fused kernels, which decay inside the kernel (and may
    contract the decay and the update into one fused multiply-add): one step of each path
    from the same state agrees to one ulp of the parameter dtype, frozen rows exact."""
    _assert_within_one_ulp(*_one_step_each_path(OPTIMIZERS[name], dtype, "cuda"), bits=bits)


# ---- the rule and the fallback ------------------------------------------------------------
class MyAdamW(torch.optim.AdamW):
    pass


def _qk(model):
    return [p for _, _, p in get_adapter(model).qk_params(model)]


def test_rule():
    model = tiny_model("qwen3")
    ps = list(model.parameters())
    masked = [
        torch.optim.AdamW(ps),
        torch.optim.Adam(ps, weight_decay=0.1),
        torch.optim.Adam(ps, decoupled_weight_decay=True, fused=True),
        torch.optim.SGD(ps, momentum=0.9, nesterov=True, weight_decay=0.1, foreach=True),
        torch.optim.SGD(ps, momentum=0.5, dampening=0.1),
    ]
    for opt in masked:
        assert exact_path_for(opt)[0] == "masked", exact_path_for(opt)
    snapshot = {
        "RMSprop is not exactly": torch.optim.RMSprop(ps),
        "MyAdamW is not exactly": MyAdamW(ps),
        "amsgrad=True": torch.optim.Adam(ps, amsgrad=True),
        "maximize=True": torch.optim.SGD(ps, maximize=True),
        "capturable=True": torch.optim.AdamW(ps, capturable=True),
        "eps=0": torch.optim.AdamW(ps, eps=0.0),
        "lr is a Tensor": torch.optim.AdamW(ps, lr=torch.tensor(1e-3), foreach=False),
    }
    for why, opt in snapshot.items():
        path, reason = exact_path_for(opt)
        assert path == "snapshot" and why in reason, (why, reason)
    # only the groups holding q/k params count
    qk = _qk(model)
    others = [p for p in ps if not any(p is q for q in qk)]
    opt = torch.optim.Adam([{"params": qk}, {"params": others, "amsgrad": True}])
    assert exact_path_for(opt, qk)[0] == "masked"
    assert exact_path_for(opt)[0] == "snapshot"


def test_choice_is_logged_once_and_forced_paths(caplog):
    model = tiny_model("qwen3")
    masks = MaskSet.full(get_adapter(model).layout(model))
    with caplog.at_level(logging.INFO, logger="longact.core.sparse_update"):
        g = RowMaskGuard(model, masks, optimizer=torch.optim.RMSprop(model.parameters()))
        with g.protect():
            pass
        g.bind(g.optimizer)
    lines = [r for r in caplog.records if "exact with the" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    assert "snapshot path" in lines[0].getMessage() and "RMSprop" in lines[0].getMessage()
    assert g.path == "snapshot"
    with pytest.raises(ValueError, match="exact_path='masked' is not possible: .*RMSprop"):
        RowMaskGuard(
            model, masks, optimizer=torch.optim.RMSprop(model.parameters()), exact_path="masked"
        )
    with pytest.raises(ValueError, match=r"unknown exact_path 'fast'; valid: auto, masked"):
        RowMaskGuard(model, masks, exact_path="fast")
    with pytest.raises(ValueError, match="cannot switch to another optimizer"):
        g.bind(torch.optim.SGD(model.parameters()))
    with pytest.raises(ValueError, match="protect needs the optimizer"):
        RowMaskGuard(model, masks).protect().__enter__()
    forced = RowMaskGuard(model, masks, optimizer=torch.optim.AdamW(model.parameters()),
                          exact_path="snapshot")  # fmt: skip
    assert forced.path == "snapshot" and "was asked for" in forced.path_reason


@pytest.mark.parametrize(
    "make",
    [
        lambda m: torch.optim.RMSprop(m.parameters(), lr=1e-2, momentum=0.9, weight_decay=0.1),
        lambda m: torch.optim.Adam(m.parameters(), lr=1e-2, amsgrad=True, weight_decay=0.1),
        lambda m: MyAdamW(m.parameters(), lr=1e-2, weight_decay=0.1),
    ],
    ids=["rmsprop", "adam_amsgrad", "adamw_subclass"],
)
def test_other_optimizers_fall_back_to_the_snapshot_and_stay_exact(make):
    model, opt, guard = train("snapshot", make)  # every step checked frozen rows exact
    auto = RowMaskGuard(model, guard.masks, optimizer=opt)
    assert auto.path == "snapshot" and auto.path_reason


# ---- skipped, failed and unmasked steps ------------------------------------------------------
def _one_masked_setup(make=OPTIMIZERS["adamw_foreach"]):
    model = tiny_model("qwen3", seed=0)
    layout = get_adapter(model).layout(model)
    opt = make(model)
    guard = RowMaskGuard(model, _schedule(layout)[0], optimizer=opt)
    ids = token_batch(0, 2, 8)
    model(input_ids=ids, labels=ids).loss.backward()
    guard.mask_grads()
    guard.step()  # state exists from here
    opt.zero_grad()
    return model, opt, guard


def test_skipped_step_on_non_finite_norm_changes_nothing():
    """verl skips optimizer.step() when the clipped norm is not finite: no hook runs,
    parameters, state and each group's weight decay stay as they were."""
    model, opt, guard = _one_masked_setup()
    params = [p.detach().clone() for p in model.parameters()]
    state = {k: v.clone() for p in model.parameters() for k, v in param_state(opt, p).items()}
    ids = token_batch(1, 2, 8)
    model(input_ids=ids, labels=ids).loss.backward()
    model.lm_head.weight.grad[0, 0] = float("inf")
    guard.mask_grads()
    with guard.protect():
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        assert not torch.isfinite(norm)
        opt.zero_grad()  # the engine's skip
    assert opt.param_groups[0]["weight_decay"] == 0.01
    for a, b in zip(model.parameters(), params, strict=True):
        assert torch.equal(a, b)
    after = {k: v for p in model.parameters() for k, v in param_state(opt, p).items()}
    assert all(torch.equal(after[k], v) for k, v in state.items())


def test_step_that_raises_restores_weight_decay():
    model, opt, guard = _one_masked_setup()

    def closure():  # runs inside step(), after the pre-step hook
        assert opt.param_groups[0]["weight_decay"] == 0  # the hook took the decay over
        raise RuntimeError("loss blew up")

    ids = token_batch(1, 2, 8)
    model(input_ids=ids, labels=ids).loss.backward()
    guard.mask_grads()
    with pytest.raises(RuntimeError, match="loss blew up"):
        guard.step(closure=closure)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01]
    assert not guard._masked._saved_wd


def test_settings_changed_after_the_choice_raise_before_anything_moves():
    model, opt, guard = _one_masked_setup()
    params = [p.detach().clone() for p in model.parameters()]
    opt.param_groups[0]["amsgrad"] = True
    ids = token_batch(1, 2, 8)
    model(input_ids=ids, labels=ids).loss.backward()
    guard.mask_grads()
    with pytest.raises(RuntimeError, match="param group 0 no longer fits .*amsgrad=True"):
        guard.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), params, strict=True))
    assert opt.param_groups[0]["weight_decay"] == 0.01


def test_protect_masks_gradients_it_was_not_given_masked():
    """A step whose caller forgot mask_grads still leaves frozen rows exact."""
    model, opt, guard = _one_masked_setup()
    before = {t.name: t.param.detach().clone() for t in guard.targets}
    ids = token_batch(1, 2, 8)
    model(input_ids=ids, labels=ids).loss.backward()
    with guard.protect():
        opt.step()
    for t in guard.targets:
        frozen = ~guard.masks[t.ref.key]
        assert torch.equal(t.param.detach()[frozen], before[t.name][frozen])
    assert _frozen_state_is_zero(guard, opt)


def test_unprotected_steps_are_left_alone():
    """Hooks act only inside protect (two guards may share one optimizer)."""
    model, opt, guard = _one_masked_setup()
    other = RowMaskGuard(model, guard.masks, optimizer=opt)
    assert other.path == "masked"
    ids = token_batch(1, 2, 8)
    model(input_ids=ids, labels=ids).loss.backward()
    guard.mask_grads()
    w = guard.targets[0].param.detach().clone()
    opt.step()  # plain step: decay reaches frozen rows, as without LongAct
    frozen = ~guard.masks[guard.targets[0].ref.key]
    assert torch.equal(guard.targets[0].param.detach()[frozen], w[frozen] * (1 - 1e-2 * 0.01))
