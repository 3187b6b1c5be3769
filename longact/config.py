"""LongAct's typed configuration: the one schema of the ``longact:`` section.

Every default and every value check lives here. The same object travels the whole way:

- Hydra: ``register_schema()`` puts :class:`LongActConfig` in Hydra's ConfigStore, and
  ``hydra_configs/longact_trainer.yaml`` builds its ``longact:`` node from it, so shell
  overrides are typed and an unknown key is refused by Hydra itself;
- the driver: ``longact.train.config.prepare_config`` validates it once
  (:meth:`LongActConfig.validate`) and exports it (``LONGACT_CONFIG``);
- every rank and the saliency coordinator: :meth:`LongActConfig.from_env` /
  :meth:`LongActConfig.coerce` rebuild the same validated dataclass, and the code reads
  attributes, never ``dict.get`` with a default of its own.

This module imports neither Ray nor verl nor torch.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional

CONFIG_ENV = "LONGACT_CONFIG"
"""Environment variable that carries the validated section (YAML) to every Ray worker."""

CAPTURE_POINTS = ("proj", "norm")


class ConfigError(ValueError):
    """A config value LongAct cannot run with; the message names it and what is allowed."""


@dataclass
class CalibrationConfig:
    """Profile-first mode: the first mask comes from a pass over calibration prompts."""

    enable: bool = False
    """Run the calibration pass before step 1 (otherwise the first mask is chosen from
    the statistics of step 1's own training forwards, and step 1 trains with `full`)."""
    data: Optional[str] = None  # noqa: UP045 (OmegaConf reads the annotation)
    """Parquet file in verl's RL format whose prompts are run through the model."""
    num_samples: int = 32
    """How many prompts of that file to run."""
    batch_size: int = 4
    """Prompts per forward pass during calibration."""
    max_length: int = 0
    """Tokens kept per calibration prompt (its last ones); 0 takes
    ``data.max_prompt_length`` (longact-train fills it in)."""


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
    """Score ranking the channels (``longact.core.scores``): mean_abs, rms or max_abs."""
    granularity: str = "channel"
    """Unit of selection: channel, rope_pair or head."""
    capture_point: str = "proj"
    """proj (q_proj / k_proj outputs) or norm (after q_norm / k_norm, Qwen3-style models)."""
    refresh_interval: int = 1
    """Recompute the masks every N optimizer steps (>= 1)."""
    refresh_async: bool = False
    """Overlap each refresh with the next step: masks from step t's statistics are
    installed at step t+1 instead of step t, and the coordinator's work leaves the
    critical path (the GPU recipes turn this on)."""
    ema: float = 0.0
    """EMA decay in [0, 1) on per-channel statistics across refreshes."""
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    """Optional calibration pass (the paper's profile-first mode)."""
    seed: int = 0
    """Seed of the random policy."""
    timeout_s: float = 300.0
    """Longest wait, in seconds, at one refresh for the other ranks' statistics and the
    coordinator's answer. Past it every waiting rank fails with an error naming the run,
    the step and the ranks that never arrived, instead of hanging."""
    coordinator_restarts: int = 3
    """How often Ray may restart a saliency coordinator that died; the ranks rebuild
    the restarted one from the masks they hold (running statistics restart empty).
    0: a dead coordinator fails the run with a clear error."""
    run_id: str = ""
    """Names the run's saliency coordinator actor; generated when empty."""

    # ---- construction ---------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> LongActConfig:
        """A validated config from a plain mapping; unknown keys are refused."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            listed = ", ".join(f"longact.{k}" for k in unknown)
            raise ConfigError(f"unknown key(s) {listed}; valid: {', '.join(sorted(known))}")
        raw = dict(raw)
        cal = dict(raw.pop("calibration", None) or {})
        cal_known = {f.name for f in fields(CalibrationConfig)}
        bad = sorted(set(cal) - cal_known)
        if bad:
            raise ConfigError(
                f"unknown key(s) longact.calibration.{bad}; valid: {', '.join(sorted(cal_known))}"
            )
        cfg = cls(**raw, calibration=CalibrationConfig(**cal))
        cfg.validate()
        return cfg

    @classmethod
    def coerce(cls, cfg: LongActConfig | dict[str, Any] | None) -> LongActConfig:
        """``cfg`` itself, or the validated config of a mapping (None: the defaults)."""
        if isinstance(cfg, cls):
            return cfg
        return cls.from_dict(dict(cfg or {}))

    @classmethod
    def from_env(cls) -> LongActConfig | None:
        """The section the launcher exported, or None when it is absent or disabled."""
        import yaml

        raw = os.environ.get(CONFIG_ENV)
        if not raw:
            return None
        cfg = cls.from_dict(yaml.safe_load(raw) or {})
        return cfg if cfg.enable else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=True)

    # ---- checks -----------------------------------------------------------------------
    def validate(self) -> None:
        """Value checks (no file system, no devices): raise ConfigError on a bad value."""
        from longact.core.masks import GRANULARITIES, POLICIES, SCORES

        r = self.ratio
        number = isinstance(r, (int, float)) and not isinstance(r, bool) and not math.isnan(r)
        if not number or not (0.0 < r <= 1.0):
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
        if self.capture_point not in CAPTURE_POINTS:
            raise ConfigError(
                f"longact.capture_point={self.capture_point!r}; valid: {', '.join(CAPTURE_POINTS)}"
            )
        for name in ("enable", "refresh_async"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"longact.{name}={getattr(self, name)!r} must be true or false")
        if not _is_int(self.refresh_interval) or self.refresh_interval < 1:
            raise ConfigError(f"longact.refresh_interval={self.refresh_interval!r} must be >= 1")
        if not isinstance(self.ema, (int, float)) or not (0.0 <= self.ema < 1.0):
            raise ConfigError(f"longact.ema={self.ema!r} is outside [0, 1)")
        t = self.timeout_s
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not (t > 0) or math.isinf(t):
            raise ConfigError(f"longact.timeout_s={t!r} must be a finite number of seconds > 0")
        if not _is_int(self.coordinator_restarts) or self.coordinator_restarts < 0:
            raise ConfigError(
                f"longact.coordinator_restarts={self.coordinator_restarts!r} must be an "
                "integer >= 0"
            )
        if not _is_int(self.seed):
            raise ConfigError(f"longact.seed={self.seed!r} must be an integer")
        cal = self.calibration
        if cal.enable:
            if not cal.data:
                raise ConfigError(
                    "longact.calibration.enable=true needs longact.calibration.data "
                    "(a parquet file of prompts in verl's RL format)"
                )
            if not _is_int(cal.num_samples) or cal.num_samples < 1:
                raise ConfigError(
                    f"longact.calibration.num_samples={cal.num_samples!r} must be >= 1"
                )
            if not _is_int(cal.batch_size) or cal.batch_size < 1:
                raise ConfigError(f"longact.calibration.batch_size={cal.batch_size!r} must be >= 1")
            if not _is_int(cal.max_length) or cal.max_length < 0:
                raise ConfigError(f"longact.calibration.max_length={cal.max_length!r} must be >= 0")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def register_schema() -> None:
    """Put the schema in Hydra's ConfigStore as ``longact_schema`` (``{longact: ...}``),
    which ``longact_trainer.yaml`` lists in its defaults (idempotent)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="longact_schema", node={"longact": LongActConfig})
