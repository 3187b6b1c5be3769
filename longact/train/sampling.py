"""DAPO's dynamic sampling with a bound on regeneration (plumbing over verl's v1 trainer).

DAPO drops every prompt group whose samples all score the same on the filter metric
(``algorithm.filter_groups.metric``, e.g. ``acc``) and generates more prompts until a
batch of groups that carry signal is full. verl 0.9.1's v1 ``ReplayBuffer`` does the
filtering but ignores ``algorithm.filter_groups.max_num_gen_batches``: a model that
gets every prompt right or every prompt wrong (an untrained model on a hard task)
regenerates forever and the log shows nothing but generation.

``BoundedReplayBuffer`` is verl's own sync ``ReplayBuffer`` with that bound put back. It
enters through verl's custom-sampler extension point
(``trainer.v1.sampler.custom_sampler``), which ``install`` fills in from the composed
config; verl then passes the sampler only its base arguments, so the dynamic-sampling
settings travel in ``trainer.v1.sampler.sampler_kwargs.longact_dynamic_sampling``.

The bound counts prompts dispatched for generation at one training step, the trainer's
first batch included: a round is ``data.train_batch_size`` prompts, as in DAPO's
original ``num_gen_batches``. Refills are cut at ``max_num_gen_batches`` rounds; once
those prompts are all generated and judged and the batch still lacks groups with
signal, the step fails with :class:`DynamicSamplingExhausted`, whose message names the
filtered share, the metric and what to do. ``max_num_gen_batches <= 0`` (verl's
default) leaves verl's unbounded behaviour in place: ``install`` then changes nothing.

Each training step also logs ``training/filter_groups/filtered_share`` (filtered groups
over groups judged) and ``training/filter_groups/gen_rounds``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from longact.config import ConfigError

SAMPLER_PATH = "pkg://longact.train.sampling"
SAMPLER_NAME = "BoundedReplayBuffer"
KWARGS_KEY = "longact_dynamic_sampling"
SHARE_METRIC = "training/filter_groups/filtered_share"
ROUNDS_METRIC = "training/filter_groups/gen_rounds"


class DynamicSamplingExhausted(RuntimeError):
    """Dynamic sampling used up its generation rounds without a full batch of signal."""


@dataclass
class DynamicSampling:
    """The dynamic-sampling settings the bounded sampler needs (from the composed config)."""

    metric: str
    """``algorithm.filter_groups.metric``: groups whose samples all share its value are dropped."""
    max_num_gen_batches: int
    """Generation rounds allowed at one step (a round is ``train_batch_size`` prompts)."""
    train_batch_size: int
    """``data.train_batch_size``: prompt groups per training step."""
    max_inflight_gen_batches: int = 1
    """verl's bound on concurrently pending or running rounds."""
    sync_refill_failed_groups: bool = False
    """verl's ``trainer.v1.sampler.sync_refill_failed_groups``."""


def bound_applies(config: DictConfig) -> bool:
    """True when the composed config asks for bounded dynamic sampling that the sync v1
    trainer would otherwise ignore (filtering on, ``max_num_gen_batches > 0``, verl's
    built-in sampler)."""
    fg = config.algorithm.get("filter_groups") or {}
    if not fg.get("enable", False) or int(fg.get("max_num_gen_batches", 0) or 0) <= 0:
        return False
    v1 = config.trainer.get("v1") or {}
    if v1.get("trainer_mode", "sync") != "sync":
        return False
    custom = (v1.get("sampler") or {}).get("custom_sampler") or {}
    return not (custom.get("path") or custom.get("name")) or is_installed(config)


def is_installed(config: DictConfig) -> bool:
    """True when the config already names LongAct's bounded sampler."""
    custom = config.trainer.get("v1", {}).get("sampler", {}).get("custom_sampler") or {}
    return custom.get("path") == SAMPLER_PATH and custom.get("name") == SAMPLER_NAME


def install(config: DictConfig) -> DynamicSampling | None:
    """Point verl's sync v1 trainer at :class:`BoundedReplayBuffer` when DAPO's filter is
    on with a positive ``max_num_gen_batches``; returns the settings, or None when
    nothing applies (the config is then left as it was)."""
    if not bound_applies(config):
        return None
    fg = config.algorithm.filter_groups
    if not fg.get("metric"):
        raise ConfigError(
            "algorithm.filter_groups.enable=true needs algorithm.filter_groups.metric (e.g. acc)"
        )
    rm = config.reward.get("reward_model") or {}
    if rm.get("enable", False) and not rm.get("enable_resource_pool", False):
        raise ConfigError(
            "algorithm.filter_groups needs the reward at sampling time: use a rule-based reward "
            "or reward.reward_model.enable_resource_pool=true"
        )
    sampler = config.trainer.v1.sampler
    settings = DynamicSampling(
        metric=str(fg.metric),
        max_num_gen_batches=int(fg.max_num_gen_batches),
        train_batch_size=int(config.data.train_batch_size),
        max_inflight_gen_batches=int(fg.get("max_inflight_gen_batches", 1) or 1),
        sync_refill_failed_groups=bool(sampler.get("sync_refill_failed_groups", False)),
    )
    with open_dict(config):
        sampler.custom_sampler.path = SAMPLER_PATH
        sampler.custom_sampler.name = SAMPLER_NAME
        if sampler.get("sampler_kwargs") is None:
            sampler.sampler_kwargs = {}
        sampler.sampler_kwargs[KWARGS_KEY] = asdict(settings)
    return settings


def exhausted_message(
    step: int, rounds: int, prompts: int, filtered: int, judged: int, have: int, need: int, s
) -> str:
    """The error a user sees when the bound is reached (``s``: DynamicSampling)."""
    share = filtered / judged if judged else 1.0
    return (
        f"DAPO dynamic sampling at step {step}: after {rounds} generation rounds "
        f"({prompts} prompts, algorithm.filter_groups.max_num_gen_batches="
        f"{s.max_num_gen_batches}) only {have} of the {need} prompt groups a batch needs "
        f"carry signal; {filtered} of {judged} finished groups ({share:.0%}) were filtered "
        f"because all their samples had the same {s.metric!r}. The model gets (almost) "
        "every prompt right or every prompt wrong. Warm the model up first (SFT: "
        "`longact warmup`), shorten the context (data.max_prompt_length and the task "
        "length), use GRPO (recipe=grpo or grpo_cpu), or turn the filter off "
        "(algorithm.filter_groups.enable=false)."
    )


def _replay_buffer_base():
    from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer

    return ReplayBuffer


class _Round:
    """Book-keeping of one ``sample`` call (one training step)."""

    def __init__(self, step: int, need: int, dispatched: int):
        self.step = step  # verl's global step
        self.need = need  # groups with signal the batch needs
        self.dispatched = dispatched  # prompts sent to generation for this step
        self.filtered = 0  # groups dropped by the filter
        self.sampleable = 0  # groups with signal, at the last poll


def __getattr__(name: str) -> Any:
    # verl's custom-sampler loader does getattr(module, "BoundedReplayBuffer"); the class
    # subclasses verl's ReplayBuffer, so it is built on first use (verl imported lazily)
    if name == SAMPLER_NAME:
        cls = _build_class()
        globals()[name] = cls
        return cls
    raise AttributeError(name)


def _build_class():
    base = _replay_buffer_base()

    class BoundedReplayBuffer(base):
        """verl's sync ReplayBuffer with ``max_num_gen_batches`` enforced."""

        def __init__(self, *, sampler_kwargs=None, **kwargs):
            raw = (sampler_kwargs or {}).get(KWARGS_KEY)
            if raw is None:
                raise ValueError(
                    f"{SAMPLER_NAME} needs trainer.v1.sampler.sampler_kwargs.{KWARGS_KEY} "
                    "(longact-train fills it in from algorithm.filter_groups)"
                )
            if isinstance(raw, DictConfig):
                raw = OmegaConf.to_container(raw, resolve=True)
            self.dynamic = DynamicSampling(**raw)
            super().__init__(
                sampler_kwargs=sampler_kwargs,
                filter_groups_metric=self.dynamic.metric,
                train_batch_size=self.dynamic.train_batch_size,
                gen_batch_size=1,  # what verl's own sync DAPO uses
                max_inflight_gen_batches=self.dynamic.max_inflight_gen_batches,
                sync_refill_failed_groups=self.dynamic.sync_refill_failed_groups,
                **kwargs,
            )
            self._round: _Round | None = None

        # -- counting, on top of verl's own steps ------------------------------------
        def _evict_terminal_groups(self, global_steps, partition_id, eviction_reasons):
            out = super()._evict_terminal_groups(global_steps, partition_id, eviction_reasons)
            if self._round is not None:
                self._round.filtered += out[2]  # DAPO-filtered groups
            return out

        def _sampleable_terminal_keys(self, partition_id, eviction_reasons):
            keys = super()._sampleable_terminal_keys(partition_id, eviction_reasons)
            if self._round is not None:
                self._round.sampleable = len(keys)
            return keys

        def _bounded_refill(self, refill):
            budget = self.dynamic.max_num_gen_batches * self.dynamic.train_batch_size

            def bounded(n: int):
                # dispatch what the budget allows; verl's credit for the rest is dropped, and
                # _wait_for_next_poll fails the step once nothing is left in flight
                r = self._round
                m = min(n, budget - r.dispatched)
                if m <= 0:
                    return 0
                r.dispatched += m
                return refill(m)

            return bounded

        def _wait_for_next_poll(self, partition_id, last_debug_time):
            r = self._round
            if r is not None and partition_id != "val":
                budget = self.dynamic.max_num_gen_batches * self.dynamic.train_batch_size
                inflight = len(self.pending_keys[partition_id]) + len(
                    self.running_keys[partition_id]
                )
                if r.dispatched >= budget and inflight == 0 and r.sampleable < r.need:
                    raise DynamicSamplingExhausted(
                        exhausted_message(
                            r.step,
                            self.rounds(),
                            r.dispatched,
                            r.filtered,
                            r.filtered + r.sampleable,
                            r.sampleable,
                            r.need,
                            self.dynamic,
                        )  # fmt: skip
                    )
            return super()._wait_for_next_poll(partition_id, last_debug_time)

        def rounds(self) -> int:
            """Generation rounds used at the current step."""
            return math.ceil(self._round.dispatched / self.dynamic.train_batch_size)

        def sample(self, global_steps: int, partition_id: str, batch_size: int):
            if partition_id == "val":
                return super().sample(global_steps, partition_id, batch_size)
            refill = self.refill_fn
            self._round = _Round(global_steps, need=batch_size, dispatched=batch_size)
            self.refill_fn = self._bounded_refill(refill)
            try:
                batch, metrics = super().sample(global_steps, partition_id, batch_size)
                r = self._round
                judged = r.filtered + batch_size
                metrics[SHARE_METRIC] = r.filtered / judged if judged else 0.0
                metrics[ROUNDS_METRIC] = self.rounds()
                return batch, metrics
            finally:
                self.refill_fn = refill
                self._round = None

    BoundedReplayBuffer.__module__ = __name__
    return BoundedReplayBuffer
