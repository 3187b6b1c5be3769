"""Recipes: each composes on the launcher's search path with its documented values, and
``longact-train`` rejects an unknown recipe name before Hydra or Ray start."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from longact.train.config import ConfigError, available_recipes
from longact.train.entry import SEARCH_PATH, hydra_argv

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*engine is not available:UserWarning"),
    pytest.mark.filterwarnings("ignore:Ray state API:DeprecationWarning"),
]

RECIPES = ["dapo", "dapo_cpu", "grpo", "grpo_cpu", "paper_dapo", "paper_grpo"]


def test_available_recipes():
    assert available_recipes() == RECIPES


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_composes(compose_recipe, recipe):
    cfg = compose_recipe(recipe)
    actor = cfg.actor_rollout_ref.actor
    assert cfg.algorithm.adv_estimator == "grpo"
    assert actor.strategy == "fsdp2" and cfg.actor_rollout_ref.ref.strategy == "fsdp2"
    assert actor.loss_agg_mode == "token-mean"
    assert cfg.longact.enable is True and cfg.longact.ratio == 0.3
    assert cfg.longact.policy == "topk" and cfg.longact.granularity == "channel"
    assert cfg.trainer.experiment_name == recipe
    dapo = "dapo" in recipe
    if dapo:
        assert actor.clip_ratio_low == 0.2 and actor.clip_ratio_high == 0.28
        assert actor.use_kl_loss is False
        assert cfg.algorithm.filter_groups.enable is True
        assert cfg.reward.reward_manager.name == "dapo"
        assert cfg.reward.reward_kwargs.max_resp_len == cfg.data.max_response_length
    else:
        assert actor.use_kl_loss is True and actor.kl_loss_type == "low_var_kl"
        assert cfg.algorithm.filter_groups.enable is False
    if recipe.endswith("_cpu"):
        assert cfg.actor_rollout_ref.rollout.name == "hf"
        assert cfg.trainer.n_gpus_per_node == 2
        assert cfg.ray_kwargs.ray_init.num_gpus == cfg.trainer.n_gpus_per_node
        assert cfg.trainer.device == "cpu"
        assert actor.fsdp_config.dtype == "float32"
        assert cfg.actor_rollout_ref.rollout.tensor_model_parallel_size == 1
    else:
        assert cfg.actor_rollout_ref.rollout.name == "vllm"
        assert cfg.trainer.n_gpus_per_node == 8
    if recipe == "dapo_cpu":
        assert cfg.reward.reward_kwargs.overlong_buffer_cfg.len == 4
    if recipe.startswith("paper_"):  # Qwen3-8B at 32k on 8 GPUs (README, "Sizing")
        assert cfg.data.max_prompt_length + cfg.data.max_response_length == 32768
        assert actor.fsdp_config.ulysses_sequence_parallel_size == 2
        assert cfg.actor_rollout_ref.model.use_fused_kernels is True


def test_cpu_recipe_ray_gpus_follow_ranks(compose_recipe):
    cfg = compose_recipe("grpo_cpu", ["trainer.n_gpus_per_node=3"])
    assert cfg.ray_kwargs.ray_init.num_gpus == 3


def test_hydra_argv():
    assert hydra_argv(["recipe=dapo", "longact.ratio=0.2"]) == [
        "--config-name",
        "dapo",
        SEARCH_PATH,
        "longact.ratio=0.2",
    ]
    with pytest.raises(ConfigError) as e:
        hydra_argv(["recipe=nope", "x=1"])
    assert str(e.value) == f"unknown recipe 'nope'; available: {', '.join(RECIPES)}"


def test_default_recipe_follows_the_runs_gpus(monkeypatch, capsys):
    """Without recipe=, the GPUs counted are the cluster's when the driver joins one (a
    head node often has none), else this host's; one line says which was chosen."""
    import longact.train.config as config

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(config, "resolve_address", lambda address, temp_dir=None: address)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 0)
    assert hydra_argv([])[1] == "grpo_cpu"
    assert "this host has 0 GPUs, so recipe=grpo_cpu" in capsys.readouterr().err
    seen = []
    monkeypatch.setattr(config, "cluster_gpus", lambda address: seen.append(address) or 2.0)
    argv = hydra_argv(["ray_kwargs.ray_init.address=10.0.0.1:6379", "trainer.nnodes=1"])
    assert argv[1] == "grpo" and seen == ["10.0.0.1:6379"]
    assert "the Ray cluster at 10.0.0.1:6379 has 2 GPUs, so recipe=grpo" in capsys.readouterr().err
    monkeypatch.setattr(config, "cluster_gpus", lambda address: 0.0)
    assert hydra_argv(["+ray_kwargs.ray_init.address=10.0.0.1:6379"])[1] == "grpo_cpu"


def test_console_script_rejects_unknown_recipe():
    script = Path(sys.executable).parent / "longact-train"
    # a missing console script is a broken install (setup.py's entry points): fail, never skip
    assert script.exists(), f"longact-train console script missing next to {sys.executable}"
    env = dict(os.environ, RAY_ADDRESS="127.0.0.1:1")  # would fail loudly if Ray were used
    proc = subprocess.run(
        [str(script), "recipe=nope", "longact.ratio=0.2"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"longact-train: error: unknown recipe 'nope'; available: {', '.join(RECIPES)}"
    )
    assert "Traceback" not in proc.stderr
    assert "ray" not in (proc.stdout + proc.stderr).lower()
