"""Bounded DAPO dynamic sampling (longact/train/sampling.py), without Ray.

The sampler is verl's own v1 ``ReplayBuffer`` with a bound; here the TransferQueue it
reads is replaced by a dict of prompt groups (uid -> carries signal?), and the trainer's
refill function by a generator of new groups, so ``sample`` runs verl's real loop.
"""

from __future__ import annotations

from collections import Counter

import pytest
from omegaconf import OmegaConf

from longact.train import sampling
from longact.train.sampling import DynamicSamplingExhausted, install

PID = "train"


def make_buffer(signal, *, max_rounds=2, batch=4):
    """A BoundedReplayBuffer over an in-memory queue; ``signal(i)`` says whether the
    i-th generated group carries signal. The trainer's first batch is already there."""
    base = sampling.BoundedReplayBuffer

    class InMemory(base):
        def __init__(self):
            kwargs = {
                sampling.KWARGS_KEY: {
                    "metric": "acc",
                    "max_num_gen_batches": max_rounds,
                    "train_batch_size": batch,
                }
            }
            self.store: dict[str, bool] = {}
            self.generated = 0
            super().__init__(
                trainer_mode="sync",
                trainer_config=OmegaConf.create({}),
                max_off_policy_threshold=None,
                max_off_policy_strategy="drop",
                sampler_kwargs=kwargs,
                refill_fn=self.generate,
                poll_interval=0.0,
            )

        def generate(self, n: int) -> int:
            for _ in range(n):
                self.store[f"g{self.generated}"] = bool(signal(self.generated))
                self.generated += 1
            return n

        # the TransferQueue, in memory: every dispatched group is finished at once
        def _sync_metadata_from_transfer_queue(self):
            self.finished_keys[PID] = set(self.store)
            self.partitions[PID] = {f"{u}_0": {} for u in self.store}

        def _dapo_filtered_keys(self, partition_id):
            dropped = {u for u, has in self.store.items() if not has}
            return dropped, Counter({0.0: len(dropped)})

        def _clear_groups(self, partition_id, uids):
            for u in uids:
                self.store.pop(u, None)
                self.partitions[partition_id].pop(f"{u}_0", None)

        def _materialize_batch(self, partition_id, selected, snapshot):
            return sorted(selected)

    buf = InMemory()
    buf.generate(batch)  # what the trainer's prepare_step dispatched
    return buf


def test_no_signal_stops_within_the_bound():
    buf = make_buffer(lambda i: False, max_rounds=2, batch=4)
    with pytest.raises(DynamicSamplingExhausted) as err:
        buf.sample(global_steps=3, partition_id=PID, batch_size=4)
    msg = str(err.value)
    assert buf.generated == 8  # 2 rounds of 4 prompts, not one more
    assert "step 3: after 2 generation rounds (8 prompts" in msg
    assert "max_num_gen_batches=2" in msg
    assert "8 of 8 finished groups (100%) were filtered" in msg and "'acc'" in msg
    for hint in ("longact warmup", "data.max_prompt_length", "recipe=grpo", "enable=false"):
        assert hint in msg


def test_some_signal_fills_the_batch_and_logs_the_share():
    # every other group carries signal: the batch of 4 fills in the 2nd or 3rd round
    buf = make_buffer(lambda i: i % 2 == 1, max_rounds=4, batch=4)
    batch, metrics = buf.sample(global_steps=1, partition_id=PID, batch_size=4)
    assert len(batch) == 4
    assert all(int(u[1:]) % 2 == 1 for u in batch)
    share = metrics[sampling.SHARE_METRIC]
    evicted = metrics["training/filter_groups/evicted_samples"]  # verl's own count
    assert share == pytest.approx(evicted / (evicted + 4))
    assert 0 < share < 1
    assert 2 <= metrics[sampling.ROUNDS_METRIC] <= 4
    assert buf.refill_fn == buf.generate  # the bound is lifted between steps


def test_all_signal_needs_one_round():
    buf = make_buffer(lambda i: True, max_rounds=1, batch=4)
    batch, metrics = buf.sample(global_steps=1, partition_id=PID, batch_size=4)
    assert len(batch) == 4 and buf.generated == 4
    assert metrics[sampling.SHARE_METRIC] == 0.0 and metrics[sampling.ROUNDS_METRIC] == 1


def test_sampler_needs_its_settings():
    with pytest.raises(ValueError, match="sampler_kwargs.longact_dynamic_sampling"):
        sampling.BoundedReplayBuffer(
            trainer_mode="sync",
            trainer_config=OmegaConf.create({}),
            max_off_policy_threshold=None,
            max_off_policy_strategy="drop",
            sampler_kwargs={},
            refill_fn=lambda n: n,
        )


# ---- which configs get the bound ----------------------------------------------------
def _cfg(enable=True, rounds=4, mode="sync", custom=None):
    return OmegaConf.create(
        {
            "algorithm": {
                "filter_groups": {"enable": enable, "metric": "acc", "max_num_gen_batches": rounds}
            },
            "data": {"train_batch_size": 8},
            "reward": {"reward_model": {"enable": False}},
            "trainer": {
                "v1": {
                    "trainer_mode": mode,
                    "sampler": {
                        "custom_sampler": custom or {"path": None, "name": None},
                        "sampler_kwargs": {},
                    },
                }
            },
        }
    )


def test_install_points_verl_at_the_bounded_sampler():
    cfg = _cfg()
    settings = install(cfg)
    assert settings.max_num_gen_batches == 4 and settings.train_batch_size == 8
    assert cfg.trainer.v1.sampler.custom_sampler.path == "pkg://longact.train.sampling"
    assert cfg.trainer.v1.sampler.sampler_kwargs.longact_dynamic_sampling.metric == "acc"
    # verl's loader finds the class the config names
    from verl.utils.import_utils import load_extern_object

    cls = load_extern_object(cfg.trainer.v1.sampler.custom_sampler.path, "BoundedReplayBuffer")
    from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer

    assert issubclass(cls, ReplayBuffer)


@pytest.mark.parametrize(
    "cfg",
    [
        _cfg(enable=False),
        _cfg(rounds=0),  # verl's default: unbounded, verl's behaviour kept
        _cfg(mode="fully_async"),
        _cfg(custom={"path": "/x/mine.py", "name": "Mine"}),  # the user's own sampler
    ],
    ids=["filter-off", "unbounded", "async", "custom-sampler"],
)
def test_install_leaves_other_configs_alone(cfg):
    before = OmegaConf.to_yaml(cfg)
    assert install(cfg) is None
    assert OmegaConf.to_yaml(cfg) == before
