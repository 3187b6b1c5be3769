"""The calibration pass (profile-first mode) in one rank: it runs at step 1, in eval
mode, without a KV cache, with the logits of the last position only and prompts cut to
``calibration.max_length``; a resumed run never runs it again."""

from __future__ import annotations

import contextlib

import torch
from longact_tiny import runtime_step
from transformers import AutoModelForCausalLM

from longact.config import LongActConfig
from longact.distributed.coordinator import SaliencyCoordinator
from longact.train.runtime import LongActRuntime


def _setup(tiny_xxs, tmp_path, max_length: int):
    from longact.data.tasks import make_dataset, write_parquet

    data = write_parquet(
        make_dataset("niah_single", tiny_xxs, length=96, n=6, seed=3), tmp_path / "cal.parquet"
    )
    return LongActConfig.from_dict(
        {
            "ratio": 0.3,
            "refresh_interval": 2,
            "calibration": {
                "enable": True,
                "data": str(data),
                "num_samples": 5,
                "batch_size": 2,
                "max_length": max_length,
            },
        }
    )


def _runtime(tiny_xxs, cfg):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_xxs, dtype=torch.float32).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    rt = LongActRuntime(
        model, opt, cfg, model_path=str(tiny_xxs), coordinator=SaliencyCoordinator(cfg, None, 1)
    )
    calls, inside = [], []

    @contextlib.contextmanager
    def engine_context():  # the engine's (verl's Ulysses patches off), here a marker
        inside.append(True)
        try:
            yield
        finally:
            inside.pop()

    rt.calibration_context = engine_context

    def record(module, args, kwargs):
        if not module.training:  # the calibration forwards
            calls.append(
                {
                    **{k: kwargs.get(k) for k in ("use_cache", "logits_to_keep", "return_dict")},
                    "tokens": kwargs["input_ids"].shape[1],
                    "in_engine_context": bool(inside),
                }
            )

    model.register_forward_pre_hook(record, with_kwargs=True)
    return rt, model, opt, calls


def test_calibration_runs_once_lean_and_never_after_a_resume(tiny_xxs, tmp_path):
    cfg = _setup(tiny_xxs, tmp_path, max_length=40)
    rt, model, opt, calls = _runtime(tiny_xxs, cfg)
    assert calls == []  # nothing runs before the first step (a resume may still come)
    runtime_step(rt, model, opt, 1)
    assert rt.version == 1 and rt.last_refresh == 0  # the calibrated mask, from step 1 on
    assert len(calls) == 3  # 5 prompts in batches of 2
    assert all(c["use_cache"] is False and c["logits_to_keep"] == 1 for c in calls)
    # verl's fused-kernel forward raises without return_dict; the engine's context (SP off)
    # is around every calibration forward
    assert all(c["return_dict"] is True and c["in_engine_context"] for c in calls)
    assert all(c["tokens"] <= 40 for c in calls)  # the 96-token prompts were cut
    assert model.training  # back in train mode
    for step in (2, 3):
        runtime_step(rt, model, opt, step)
    assert rt.version == 2 and len(calls) == 3  # a refresh at step 2, no more calibration
    rt.save(str(tmp_path / "ckpt"))

    resumed, model2, opt2, calls2 = _runtime(tiny_xxs, cfg)
    resumed.load(str(tmp_path / "ckpt"))
    runtime_step(resumed, model2, opt2, 4)
    assert calls2 == []  # the resumed run keeps its masks
    assert resumed.version == 3 and resumed.step == 4  # the refresh due at step 4 ran
