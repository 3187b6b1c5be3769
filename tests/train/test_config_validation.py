"""``prepare_config`` on composed recipes: bad values fail in the driver, before any
worker starts, with one ConfigError naming the value and what is allowed."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from longact.config import LongActConfig
from longact.train.config import ConfigError, prepare_config

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*engine is not available:UserWarning"),
    pytest.mark.filterwarnings("ignore:Ray state API:DeprecationWarning"),
]


@pytest.fixture
def prepare(compose_values, model_dir):
    """prepare(*overrides, recipe="grpo_cpu", model=model_dir) -> validated config."""

    def run(*overrides, recipe="grpo_cpu", model=None):
        path = model if model is not None else model_dir
        cfg = compose_values(recipe, [f"actor_rollout_ref.model.path={path}", *overrides])
        return prepare_config(cfg)

    return run


def test_full_compose_then_prepare(compose_recipe, model_dir):
    """One uncached composition, exactly as the launcher builds it."""
    cfg = compose_recipe("dapo_cpu", [f"actor_rollout_ref.model.path={model_dir}"])
    assert prepare_config(cfg).longact.enable is True
    bad = compose_recipe(
        "dapo_cpu", [f"actor_rollout_ref.model.path={model_dir}", "longact.ratio=0"]
    )
    with pytest.raises(ConfigError, match=r"longact.ratio=0.0 is outside \(0, 1\]"):
        prepare_config(bad)


def test_valid_cpu_recipe_is_filled_in(prepare, model_dir):
    cfg = prepare("longact.ratio=0.5", "longact.policy=random")
    assert cfg.longact.ratio == 0.5 and cfg.longact.policy == "random"
    assert len(cfg.longact.run_id) == 12
    assert cfg.actor_rollout_ref.model.path == str(model_dir)
    again = prepare("++longact.run_id=myrun")  # no run_id key in the YAML
    assert again.longact.run_id == "myrun"
    assert OmegaConf.to_container(again.longact)["calibration"]["enable"] is False


@pytest.mark.parametrize("ratio", ["0", "1.5", "-0.1"])
def test_ratio_outside_unit_interval(prepare, ratio):
    # the schema is typed: the shell's "0" arrives as the float 0.0
    with pytest.raises(ConfigError, match=rf"longact.ratio={float(ratio)} is outside \(0, 1\]"):
        prepare(f"longact.ratio={ratio}")


def test_ratio_one_is_allowed(prepare):
    assert prepare("longact.ratio=1").longact.ratio == 1.0


@pytest.mark.parametrize(
    ("name", "valid"),
    [
        ("policy", "bottomk, full, random, topk"),
        ("score", "max_abs, mean_abs, rms"),
        ("granularity", "channel, head, rope_pair"),
    ],
)
def test_unknown_choice_lists_valid_ones(prepare, name, valid):
    with pytest.raises(ConfigError) as e:
        prepare(f"longact.{name}=bogus")
    assert str(e.value) == f"unknown longact.{name} 'bogus'; valid: {valid}"


@pytest.mark.parametrize("value", ["0", "-2"])
def test_refresh_interval_below_one(prepare, value):
    with pytest.raises(ConfigError, match=f"longact.refresh_interval={value} must be >= 1"):
        prepare(f"longact.refresh_interval={value}")


@pytest.mark.parametrize("value", ["1.0", "-0.5"])
def test_ema_outside_range(prepare, value):
    with pytest.raises(ConfigError, match=rf"longact.ema={value} is outside \[0, 1\)"):
        prepare(f"longact.ema={value}")


def test_unknown_longact_key(prepare):
    with pytest.raises(ConfigError, match=r"unknown key\(s\) longact.ratoi; valid: .*ratio"):
        prepare("+longact.ratoi=0.2")


def test_calibration_needs_a_data_file(prepare, tmp_path):
    missing = tmp_path / "calib.parquet"
    with pytest.raises(ConfigError, match="calib.parquet"):
        prepare("longact.calibration.enable=true", f"longact.calibration.data={missing}")


def test_unsupported_model_type_unless_longact_is_off(prepare, make_model_dir):
    gpt2 = make_model_dir("gpt2", model_type="gpt2")
    with pytest.raises(ConfigError) as e:
        prepare(model=gpt2)
    msg = str(e.value)
    assert "'gpt2'" in msg and "qwen3" in msg and "longact.enable=false" in msg
    assert prepare("longact.enable=false", model=gpt2).longact.enable is False
    assert prepare("longact.policy=full", model=gpt2).longact.policy == "full"


def test_missing_model_directory(prepare, tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ConfigError, match=f"model directory '{missing}' does not exist"):
        prepare(model=missing)


def test_model_directory_without_config_json(prepare, tmp_path):
    with pytest.raises(ConfigError, match="has no config.json"):
        prepare(model=tmp_path)


def test_tokenizer_without_chat_template(prepare, make_model_dir):
    bare = make_model_dir("bare", chat_template="none")
    with pytest.raises(ConfigError) as e:
        prepare(model=bare)
    assert str(e.value).startswith(f"tokenizer in '{bare}' has no chat template;")
    # also with LongAct off: verl needs the template either way
    with pytest.raises(ConfigError, match="has no chat template"):
        prepare("longact.enable=false", model=bare)
    prepare(model=make_model_dir("jinja", chat_template="jinja"))
    prepare(model=make_model_dir("key", chat_template="key"))
    prepare(model=make_model_dir("no_tok", chat_template="no_tokenizer"))


def test_tiny_model_passes_the_chat_template_check(prepare, tiny_xxs):
    assert prepare(model=tiny_xxs).actor_rollout_ref.model.path == str(tiny_xxs)


def test_zero_ranks_is_rejected(prepare):
    with pytest.raises(ConfigError, match=r"trainer.n_gpus_per_node=0: the number of ranks"):
        prepare("trainer.n_gpus_per_node=0")


def test_gpu_rollout_on_a_cpu_host(prepare):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(ConfigError, match="rollout 'vllm' needs a GPU.*grpo_cpu"):
        prepare(recipe="grpo")


def test_longact_config_from_dict_directly():
    assert LongActConfig.from_dict({}).ratio == 0.3
    with pytest.raises(ConfigError, match=r"longact.calibration.\['foo'\]"):
        LongActConfig.from_dict({"calibration": {"foo": 1}})
    with pytest.raises(ConfigError, match="capture_point='qkv'; valid: proj, norm"):
        LongActConfig.from_dict({"capture_point": "qkv"})
