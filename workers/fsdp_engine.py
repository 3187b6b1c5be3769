"""verl's FSDP/FSDP2 language-model engine with LongAct's training hook.

``LongActFSDPEngine`` subclasses verl's ``FSDPEngineWithLMHead`` and is registered in
verl's ``EngineRegistry`` for the ``cpu`` device and for ``(cuda, nvidia)`` (verl tries
the (device, vendor) key before its own ``cuda`` entry), so verl's training loop is
used unchanged. It adds:

- LongAct (when the launcher exported an enabled ``longact:`` section, see
  ``longact.train.runtime``): statistics from the real tokens of training forwards
  (padding excluded in the padded, packed, Ulysses-SP and ``pad_to_length`` layouts;
  the packed layouts' padding reported as ``longact/pad_tokens``), mask refreshes through
  the saliency coordinator, gradient masking before clipping and exact frozen rows
  through the optimizer step, coordinator state in checkpoints. Forward-only engines
  (the reference policy) are left alone. Without the section it is verl's engine.
- CPU: a forward-only engine (the reference policy) is wrapped with
  ``CPUOffloadPolicy(pin_memory=True)``, and pinning needs an accelerator, so on the
  ``cpu`` device the policy is built with ``pin_memory`` off.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

_REGISTERED = False


@contextlib.contextmanager
def _unpinned_offload_policy() -> Iterator[None]:
    """Inside the block, verl's engine module builds CPUOffloadPolicy without pinning."""
    from verl.workers.engine.fsdp import transformer_impl

    original = transformer_impl.CPUOffloadPolicy

    def unpinned(*args, **kwargs):
        kwargs["pin_memory"] = False
        return original(*args, **kwargs)

    transformer_impl.CPUOffloadPolicy = unpinned
    try:
        yield
    finally:
        transformer_impl.CPUOffloadPolicy = original


@contextlib.contextmanager
def _without_ulysses() -> Iterator[None]:
    """Inside the block verl's Ulysses patches see no sequence-parallel group. Calibration
    feeds each rank its own whole prompts; with the group set, the patched attention would
    all-to-all unrelated sequences across the SP ranks (a shape error or a hang)."""
    from verl.utils import ulysses

    group = ulysses.get_ulysses_sequence_parallel_group()
    ulysses.set_ulysses_sequence_parallel_group(None)
    try:
        yield
    finally:
        ulysses.set_ulysses_sequence_parallel_group(group)


def _real_tokens(engine, model_inputs: dict, output_args: dict):
    """The token mask LongAct's capture should use for this micro-batch.

    Padded layout: None (the capture reads the ``attention_mask`` the model is given).
    Packed layout (``use_remove_padding``): every position of this rank's slice except
    the padding verl appended for Ulysses SP alignment and ``pad_to_length``.
    """
    from longact.core.capture import packed_token_mask

    if model_inputs.get("attention_mask") is not None:
        return None
    ids = model_inputs["input_ids"]  # (1, local_len)
    sp_rank, sp_size = 0, 1
    if getattr(engine, "use_ulysses_sp", False):
        sp_rank = engine.ulysses_device_mesh["sp"].get_local_rank()
        sp_size = engine.ulysses_sequence_parallel_size
    pad = int(output_args.get("pad_size", 0) or 0)
    return packed_token_mask(ids.shape[-1], pad, sp_rank, sp_size, device=ids.device)


def engine_class():
    """The engine class LongAct registers (created lazily: verl is imported here)."""
    import torch
    from verl.utils.device import get_device_name
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    from longact.config import LongActConfig
    from longact.train.runtime import LongActRuntime

    class LongActFSDPEngine(FSDPEngineWithLMHead):
        longact: LongActRuntime | None = None

        def _build_fsdp_module(self, module):
            if get_device_name() != "cpu":
                return super()._build_fsdp_module(module)
            with _unpinned_offload_policy():
                return super()._build_fsdp_module(module)

        def initialize(self):
            super().initialize()
            cfg = LongActConfig.from_env()
            if cfg is not None and not self.engine_config.forward_only:
                path = getattr(self.model_config, "local_path", None) or self.model_config.path
                self.longact = LongActRuntime(self.module, self.optimizer, cfg, model_path=path)
                self.longact.calibration_context = _without_ulysses

        def prepare_model_inputs(self, micro_batch):
            model_inputs, output_args = super().prepare_model_inputs(micro_batch)
            if self.longact is not None:
                self.longact.capture.set_token_mask(_real_tokens(self, model_inputs, output_args))
                if torch.is_grad_enabled():  # a training forward (log-prob passes: no_grad)
                    self.longact.pad_tokens += int(output_args.get("pad_size", 0) or 0)
            return model_inputs, output_args

        def to(self, device, model: bool = True, optimizer: bool = True, grad: bool = True):
            out = super().to(device, model=model, optimizer=optimizer, grad=grad)
            # verl calls this on every context exit, moving only what is offloaded: LongAct
            # lets go of accelerator memory when the model really left it, and otherwise
            # keeps its statistics and index copies there (no per-step copies)
            if self.longact is not None and str(device) == "cpu" and model:
                self.longact.offloaded()
            return out

        def optimizer_step(self):
            if self.longact is None:
                return super().optimizer_step()
            self.longact.before_step()  # refresh if due; zero frozen rows' grads
            with self.longact.protect():  # frozen rows bit-identical through the step
                return super().optimizer_step()

        def train_batch(self, data, loss_function):
            outputs = super().train_batch(data, loss_function)
            if self.longact is not None and self.is_mp_src_rank_with_outputs():
                # per-micro-batch lists, like the metrics verl gathers across ranks
                outputs["metrics"].update({k: [v] for k, v in self.longact.pop_metrics().items()})
            return outputs

        def save_checkpoint(self, local_path, *args, **kwargs):
            if self.longact is not None:
                # masks first (async: the refresh in flight), so the optimizer state verl
                # writes next agrees with the masks LongAct writes after it
                self.longact.before_save()
            super().save_checkpoint(local_path, *args, **kwargs)
            if self.longact is not None:
                self.longact.save(local_path)

        def load_checkpoint(self, local_path, *args, **kwargs):
            super().load_checkpoint(local_path, *args, **kwargs)
            if self.longact is not None:
                self.longact.load(local_path)

    return LongActFSDPEngine


def register() -> None:
    """Register the engine for language models on cpu and (cuda, nvidia) (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from verl.workers.engine.base import EngineRegistry

    registry = EngineRegistry._engines.get("language_model", {}).get("fsdp2", {})
    if "cpu" not in registry:
        cls = engine_class()
        EngineRegistry.register(
            model_type="language_model", backend=["fsdp", "fsdp2"], device="cpu"
        )(cls)
        EngineRegistry.register(
            model_type="language_model", backend=["fsdp", "fsdp2"], device="cuda", vendor="nvidia"
        )(cls)
    _REGISTERED = True
