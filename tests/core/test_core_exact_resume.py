"""Resuming the masked exact path from checkpoints written by either path or by plain
training (LongAct turned on at the resume): model, optimizer, lr scheduler and the
guard's state go through ``torch.save`` / ``torch.load``; the resumed run continues
bitwise like the snapshot path."""

from __future__ import annotations

import io

import pytest
import torch
from longact_tiny import tiny_model, token_batch
from test_core_exact_update import (
    OPTIMIZERS,
    STEPS,
    _assert_same_params,
    _frozen_state_is_zero,
    _schedule,
    _warmup,
)

from longact.core.arch import get_adapter
from longact.core.exact_update import param_state
from longact.core.masks import MaskSet
from longact.core.sparse_update import RowMaskGuard


def _run(model, opt, sched, guard, schedule, steps):
    for step in steps:
        if guard is not None and step in schedule and step:
            guard.set_masks(schedule[step])
        ids = token_batch(step, 2, 8)
        model(input_ids=ids, labels=ids).loss.backward()
        if guard is not None:
            guard.mask_grads()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.05)
        if guard is not None:
            guard.step()
        else:
            opt.step()
        opt.zero_grad()
        sched.step()


RESUME_AT = 5  # after rows left the mask (step 3), before they re-enter (step 6)


@pytest.mark.parametrize("opt_name", ["adamw_foreach", "sgd_momentum_wd"])
@pytest.mark.parametrize("reentry", ["reset", "keep"])
@pytest.mark.parametrize("writer", ["snapshot", "masked", "plain"])
@pytest.mark.parametrize("reader", ["masked", "snapshot"])
def test_resume_continues_like_the_snapshot_path(writer, reader, reentry, opt_name):
    """A checkpoint (model, optimizer and LongAct's guard state, through torch.save)
    written by the snapshot path (frozen rows with moments), by the masked path, or by
    plain training (LongAct turned on at the resume), read back by either path, continues
    bitwise like the snapshot path without interruption (plain: like a snapshot-path
    resume of the same checkpoint)."""
    make = OPTIMIZERS[opt_name]

    def fresh(path):
        model = tiny_model("qwen3", seed=0)
        opt = make(model)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup)
        schedule = _schedule(get_adapter(model).layout(model))
        guard = None
        if path != "plain":
            guard = RowMaskGuard(model, schedule[0], reentry=reentry, optimizer=opt,
                                 exact_path=path)  # fmt: skip
        return model, opt, sched, guard, schedule

    def resume(blob, path):
        model = tiny_model("qwen3", seed=7)  # other values everywhere: all come from blob
        ckpt = torch.load(io.BytesIO(blob), weights_only=False)
        model.load_state_dict(ckpt["model"])
        opt = make(model)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup)
        opt.load_state_dict(ckpt["opt"])  # after the scheduler set its lr: the saved lr
        sched.load_state_dict(ckpt["sched"])
        layout = get_adapter(model).layout(model)
        schedule = _schedule(layout)
        # as LongActRuntime.load: full mask, the masks in force, then the loaded state
        guard = RowMaskGuard(model, MaskSet.full(layout), reentry=reentry, optimizer=opt,
                             exact_path=path)  # fmt: skip
        guard.set_masks(schedule[3], restored=True)
        guard.optimizer_state_loaded(ckpt["guard"])
        if path == "masked":
            assert _frozen_state_is_zero(guard, opt)
        return model, opt, sched, guard, schedule

    model, opt, sched, guard, schedule = fresh(writer)
    _run(model, opt, sched, guard, schedule, range(RESUME_AT))
    buf = io.BytesIO()
    torch.save(
        {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
         "guard": guard.state_dict() if guard is not None else None},
        buf,
    )  # fmt: skip
    if writer == "snapshot":  # frozen rows that left at step 3 carry moments
        t = guard.targets[0]
        left = schedule[0][t.ref.key] & ~schedule[3][t.ref.key]
        assert next(iter(param_state(opt, t.param).values()))[left].any()
    resumed = resume(buf.getvalue(), reader)
    _run(*resumed, range(RESUME_AT, STEPS))

    if writer == "plain":  # reference: the snapshot path resumes the same checkpoint
        ref = resume(buf.getvalue(), "snapshot")
        _run(*ref, range(RESUME_AT, STEPS))
    else:  # reference: the snapshot path, never interrupted
        ref = fresh("snapshot")
        _run(*ref, range(STEPS))
    _assert_same_params(resumed[0], ref[0])
