"""LongAct's FSDP engine glue around verl's own calls, on an engine object that skips
verl's set-up (no model, no process group): what runs when, and in which order."""

from __future__ import annotations

from types import SimpleNamespace

import pytest


@pytest.fixture
def engine(monkeypatch):
    """A LongActFSDPEngine whose verl parents only record the calls they get."""
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    from longact.workers.fsdp_engine import engine_class

    calls: list = []

    def verl_to(self, device, model=True, optimizer=True, grad=True):
        calls.append(("verl.to", device, model))

    monkeypatch.setattr(FSDPEngineWithLMHead, "to", verl_to)
    monkeypatch.setattr(
        FSDPEngineWithLMHead, "save_checkpoint", lambda self, path, *a, **k: calls.append("verl")
    )
    cls = engine_class()
    eng = cls.__new__(cls)
    eng.longact = SimpleNamespace(
        offloaded=lambda: calls.append("offloaded"),
        before_save=lambda: calls.append("before_save"),
        save=lambda path: calls.append("save"),
    )
    return eng, calls


def test_offload_hook_only_when_the_model_leaves_the_accelerator(engine):
    """verl calls ``to("cpu", ...)`` on every context exit, moving only what is offloaded;
    LongAct copies its statistics to the host and drops its index copies only when the
    model really moved (no per-step copies without parameter offload)."""
    eng, calls = engine
    eng.to(device="cpu", model=False, optimizer=False, grad=False)  # nothing offloaded
    eng.to(device="cpu", model=False, optimizer=True, grad=False)  # optimizer offload only
    assert calls == [("verl.to", "cpu", False)] * 2
    calls.clear()
    eng.to(device="cpu", model=True, optimizer=True, grad=True)  # parameter offload
    assert calls == [("verl.to", "cpu", True), "offloaded"]
    calls.clear()
    eng.to("cuda", model=True)  # loading back: nothing for LongAct to do
    assert calls == [("verl.to", "cuda", True)]


def test_masks_settle_before_verl_writes_the_optimizer(engine):
    """A checkpoint installs the refresh in flight (async mode) before verl writes its
    optimizer shard, so the saved moments agree with the masks saved after it."""
    eng, calls = engine
    eng.save_checkpoint("/nowhere", global_step=3)
    assert calls == ["before_save", "verl", "save"]


def test_calibration_runs_with_ulysses_off(monkeypatch):
    """Calibration feeds each rank its own whole prompts: inside the engine's calibration
    context verl's Ulysses patches see no sequence-parallel group (world size 1, so no
    all-to-all across ranks), and the group is back afterwards, even after an error."""
    from verl.utils import ulysses

    from longact.workers.fsdp_engine import _without_ulysses

    group = object()  # stands in for the SP process group the engine set
    monkeypatch.setattr(ulysses, "_ULYSSES_SEQUENCE_PARALLEL_GROUP", group)
    monkeypatch.setattr(ulysses.dist, "get_world_size", lambda g: 2)
    assert ulysses.get_ulysses_sequence_parallel_world_size() == 2
    with pytest.raises(RuntimeError), _without_ulysses():
        assert ulysses.get_ulysses_sequence_parallel_group() is None
        assert ulysses.get_ulysses_sequence_parallel_world_size() == 1
        raise RuntimeError("a calibration forward failed")
    assert ulysses.get_ulysses_sequence_parallel_group() is group
