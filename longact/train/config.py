"""LongAct's ``longact:`` config section and the checks run before any worker starts.

``prepare_config`` validates the composed Hydra config (LongAct's section, the recipe's
platform against this host, the model directory) and fills in what a CPU host needs,
so a bad value fails in the driver with one clear line instead of in a Ray worker.
"""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict


class ConfigError(ValueError):
    """A config value LongAct cannot run with; the message names it and what is allowed."""


@dataclass
class CalibrationConfig:
    """Profile-first mode: the first mask comes from a pass over calibration prompts."""

    enable: bool = False
    """Run the calibration pass before step 1 (otherwise the first mask is chosen from
    the statistics of step 1's own training forwards, and step 1 trains with `full`)."""
    data: str | None = None
    """Parquet file in verl's RL format whose prompts are run through the model."""
    num_samples: int = 32
    """How many prompts of that file to run."""
    batch_size: int = 4
    """Prompts per forward pass during calibration."""


@dataclass
class LongActConfig:
    """What LongAct does on top of verl's trainer (the ``longact:`` section)."""

    enable: bool = True
    """Master switch; false gives verl's plain RL."""
    ratio: float = 0.3
    """Fraction of q_proj / k_proj output channels kept trainable per layer and projection,
    in (0, 1]."""
    policy: str = "topk"
    """topk (the method), bottomk or random (ablations), full (everything trainable)."""
    score: str = "mean_abs"
    """Per-channel statistic ranking the channels: mean_abs, rms or max_abs."""
    granularity: str = "channel"
    """Unit of selection: channel, rope_pair or head."""
    capture_point: str = "proj"
    """proj (q_proj / k_proj outputs) or norm (after q_norm / k_norm, Qwen3-style models)."""
    refresh_interval: int = 1
    """Recompute the masks every N optimizer steps (>= 1)."""
    refresh_async: bool = False
    """Overlap each refresh with the next step: masks from step t's statistics are
    installed at step t+1 instead of step t, and the coordinator's work leaves the
    critical path."""
    ema: float = 0.0
    """EMA decay in [0, 1) on per-channel statistics across refreshes."""
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    """Optional calibration pass (the paper's profile-first mode)."""
    seed: int = 0
    """Seed of the random policy."""
    run_id: str = ""
    """Names the run's saliency coordinator actor; generated when empty."""

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> LongActConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            listed = ", ".join(f"longact.{k}" for k in unknown)
            raise ConfigError(f"unknown key(s) {listed}; valid: {', '.join(sorted(known))}")
        raw = dict(raw)
        cal = raw.pop("calibration", None) or {}
        cal_known = {f.name for f in fields(CalibrationConfig)}
        bad = sorted(set(cal) - cal_known)
        if bad:
            raise ConfigError(
                f"unknown key(s) longact.calibration.{bad}; valid: {', '.join(sorted(cal_known))}"
            )
        cfg = cls(**raw, calibration=CalibrationConfig(**cal))
        cfg.validate()
        return cfg

    def validate(self) -> None:
        from longact.core.masks import GRANULARITIES, POLICIES, SCORES

        r = self.ratio
        if not isinstance(r, (int, float)) or math.isnan(r) or not (0.0 < r <= 1.0):
            raise ConfigError(f"longact.ratio={r!r} is outside (0, 1]")
        for name, reg, value in (
            ("policy", POLICIES, self.policy),
            ("score", SCORES, self.score),
            ("granularity", GRANULARITIES, self.granularity),
        ):
            if value not in reg:
                raise ConfigError(
                    f"unknown longact.{name} {value!r}; valid: {', '.join(reg.names())}"
                )
        if self.capture_point not in ("proj", "norm"):
            raise ConfigError(f"longact.capture_point={self.capture_point!r}; valid: norm, proj")
        if not isinstance(self.refresh_interval, int) or self.refresh_interval < 1:
            raise ConfigError(f"longact.refresh_interval={self.refresh_interval!r} must be >= 1")
        if not isinstance(self.refresh_async, bool):
            raise ConfigError(f"longact.refresh_async={self.refresh_async!r} must be true or false")
        if not (0.0 <= self.ema < 1.0):
            raise ConfigError(f"longact.ema={self.ema!r} is outside [0, 1)")
        cal = self.calibration
        if cal.enable:
            if not cal.data or not Path(cal.data).is_file():
                raise ConfigError(
                    f"longact.calibration.enable=true needs longact.calibration.data to be a "
                    f"parquet file; got {cal.data!r}"
                )
            if cal.num_samples < 1 or cal.batch_size < 1:
                raise ConfigError("longact.calibration.num_samples and batch_size must be >= 1")


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
        from longact.core.adapters import ADAPTERS

        if cfg.model_type not in ADAPTERS:
            raise ConfigError(
                f"LongAct has no q/k adapter for model_type {cfg.model_type!r} ({model_id}); "
                f"supported: {', '.join(ADAPTERS.names())}; or run with longact.enable=false"
            )


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
        from longact.core.adapters import ADAPTERS

        model_type = json.loads(cfg_file.read_text()).get("model_type")
        if model_type not in ADAPTERS:
            raise ConfigError(
                f"LongAct has no q/k adapter for model_type {model_type!r} ({p}); supported: "
                f"{', '.join(ADAPTERS.names())}; or run with longact.enable=false"
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


def _check_platform(config: DictConfig) -> None:
    import torch

    rollout = config.actor_rollout_ref.rollout.name
    if not torch.cuda.is_available() and rollout in ("vllm", "sglang", "trtllm"):
        raise ConfigError(
            f"rollout {rollout!r} needs a GPU and none is visible; on a CPU host use a *_cpu "
            f"recipe (available: {', '.join(available_recipes())}) or "
            "actor_rollout_ref.rollout.name=hf with +platform=cpu"
        )
    n = config.trainer.n_gpus_per_node
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"trainer.n_gpus_per_node={n!r}: the number of ranks must be >= 1")
    if config.trainer.nnodes < 1:
        raise ConfigError(f"trainer.nnodes={config.trainer.nnodes!r} must be >= 1")
    if not config.trainer.get("use_v1", True):
        raise ConfigError(
            "longact-train runs verl's v1 trainer; trainer.use_v1=false is not supported"
        )


def _absolute_paths(config: DictConfig) -> None:
    """Relative local paths become absolute: Ray workers do not share the shell's cwd."""

    def fix(value):
        if (
            isinstance(value, str)
            and value
            and "://" not in value
            and not Path(value).is_absolute()
        ):
            p = Path(value).expanduser()
            if p.exists() or value.startswith((".", "~")):
                return str(p.resolve())
        return value

    model = config.actor_rollout_ref.model
    model.path = fix(model.path)
    for key in ("train_files", "val_files"):
        files = config.data.get(key)
        if isinstance(files, str):
            config.data[key] = fix(files)
        elif files is not None:
            config.data[key] = [fix(f) for f in files]
    if config.trainer.get("default_local_dir"):
        d = str(config.trainer.default_local_dir)
        if not Path(d).is_absolute():
            config.trainer.default_local_dir = str(Path(d).resolve())


def prepare_config(config: DictConfig) -> DictConfig:
    """Validate ``config`` in place and return it (raises ConfigError)."""
    raw = OmegaConf.to_container(config.get("longact") or {}, resolve=True)
    longact = LongActConfig.from_dict(raw)
    _check_platform(config)
    with open_dict(config):
        _absolute_paths(config)
    _check_model_dir(config.actor_rollout_ref.model.path, longact)
    with open_dict(config):
        config.longact = OmegaConf.structured(longact)
        if not config.longact.get("run_id"):
            # names this run's saliency coordinator (a Ray actor) on a shared cluster
            config.longact.run_id = uuid.uuid4().hex[:12]
    return config
