"""``make demo``: the whole LongAct pipeline on the CPU with a tiny Qwen3, end to end.

Stages (each cached under ``--out``; a rerun reuses finished ones):

1. ``model``   a tiny Qwen3 and its offline tokenizer;
2. ``data``    supervised warm-up data at short contexts, RL data at a longer one;
3. ``sft``     supervised warm-up with verl's SFT trainer (torchrun, FSDP2 on gloo): the
               paper starts RL from an SFT model, and RL needs a non-zero reward to start;
4. ``ablate``  ``longact ablate`` of the warm-up model: accuracy by length with its top-k
               Q/K channels disrupted, with as many random ones, with the lowest, and
               with none - the ``none`` arm is the accuracy before RL;
5. ``rl``      RL with LongAct (ratio 0.3) through ``longact-train``, 2 ranks, at a
               context length where the warm-up alone falls off;
6. ``eval_rl`` accuracy by context length after RL, on the same held-out prompts;
7. ``inspect`` per-channel |Q| / |K| heatmaps with the mask (chosen on calibration
               prompts, measured on others), SFT vs RL model;
8. ``report``  ``report.md``: one page of plots, each with what it shows.

Settings live in ``hydra_configs/demo.yaml``; ``key=value`` arguments override them.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from importlib import resources
from pathlib import Path

from omegaconf import OmegaConf

from longact.demo.runner import Stages, bin_path, stream
from longact.train.logs import parse_step_metrics


def load_config(overrides: list[str]) -> dict:
    base = OmegaConf.load(resources.files("longact.hydra_configs") / "demo.yaml")
    return OmegaConf.to_container(OmegaConf.merge(base, OmegaConf.from_dotlist(overrides)))


def _say(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)


# ---- stages ----------------------------------------------------------------------------
def stage_model(cfg: dict, out: Path) -> dict:
    from longact.models.tiny import write_tiny_model

    write_tiny_model(out / "model", size=cfg["model"]["size"], seed=cfg["model"]["seed"])
    return {}


def stage_data(cfg: dict, model_dir: Path, out: Path) -> dict:
    from longact.data.tasks import make_dataset, to_sft_rows, write_parquet

    task, opts = cfg["task"]["name"], cfg["task"]["options"]
    sft_rows = []
    for length in cfg["sft"]["lengths"]:
        sft_rows += make_dataset(
            task, model_dir, length, cfg["sft"]["samples_per_length"], seed=1, **opts
        )
    sft = to_sft_rows(sft_rows)
    random.Random(0).shuffle(sft)
    write_parquet(sft, out / "sft.parquet")
    rl = cfg["rl"]
    length = rl["train_length"]
    write_parquet(
        make_dataset(task, model_dir, length, rl["train_samples"], 2, **opts),
        out / "rl_train.parquet",
    )
    write_parquet(
        make_dataset(task, model_dir, length, rl["val_samples"], 3, **opts), out / "rl_val.parquet"
    )
    return {"sft_rows": len(sft), "rl_train_rows": rl["train_samples"]}


def stage_sft(cfg: dict, model_dir: Path, data: Path, out: Path) -> dict:
    from longact.train.warmup import warmup

    sft = cfg["sft"]
    hf, losses = warmup(
        model_dir, data, out, sft["steps"], sft["ranks"], sft["overrides"], log=_say
    )
    (out / "loss.json").write_text(json.dumps(losses))
    return {"model": str(hf.relative_to(out))}


EVAL_SEED = 4  # held-out prompts: the data stage uses seeds 1-3


def _eval_kw(cfg: dict) -> dict:
    """The evaluation both the ablation's ``none`` arm and ``eval_rl`` run: same prompts,
    same batches, so the two are paired prompt by prompt."""
    ev = cfg["eval"]
    return dict(seed=EVAL_SEED, batch_size=ev["batch_size"], max_new_tokens=8,
                task_opts=cfg["task"]["options"])  # fmt: skip


def stage_ablate(cfg: dict, model_dir: Path, out: Path) -> dict:
    from longact.ablate import ablate, headline, write

    ab, ev = cfg["ablate"], cfg["eval"]
    res = ablate(
        model_dir, [cfg["task"]["name"]], ev["lengths"], ev["samples"], seeds=ab["seeds"],
        ratio=ab["ratio"], calib_n=ab["calib_n"], **_eval_kw(cfg),
    )  # fmt: skip
    write(res, out)
    _say("  " + headline(res, res["comparisons"]))
    none = next(a for a in res["arms"] if a["policy"] == "none")
    acc = {int(e["length"]): e["accuracy"] for e in none["summary"]}
    _say("  accuracy by length (no disruption): "
         + ", ".join(f"{k}: {v:.2f}" for k, v in acc.items()))  # fmt: skip
    return {"accuracy": acc, "scores": none["scores"]}


def stage_eval(cfg: dict, model_dir: Path, out: Path) -> dict:
    from longact.eval.runner import evaluate

    ev = cfg["eval"]
    res = evaluate(model_dir, [cfg["task"]["name"]], ev["lengths"], ev["samples"], out_dir=out,
                   progress=False, **_eval_kw(cfg))  # fmt: skip
    acc = {int(r["length"]): r["accuracy"] for r in res["summary"]}
    _say("  accuracy by length: " + ", ".join(f"{k}: {v:.2f}" for k, v in acc.items()))
    return {"accuracy": acc, "scores": [s["score"] for s in res["samples"]]}


def _val_reward(m: dict[str, float]) -> float | None:
    keys = [k for k in m if k.startswith("val-core/") and "/acc/mean" in k]
    keys = keys or [k for k in m if k.startswith("val-core/") and "/reward/mean" in k]
    return m[keys[0]] if keys else None


def stage_rl(cfg: dict, sft_model: Path, data_dir: Path, out: Path) -> dict:
    rl = cfg["rl"]
    steps = rl["steps"]
    cmd = [
        bin_path("longact-train"), f"recipe={rl['recipe']}",
        f"data.train_files={data_dir / 'rl_train.parquet'}",
        f"data.val_files={data_dir / 'rl_val.parquet'}",
        f"actor_rollout_ref.model.path={sft_model}",
        f"trainer.total_training_steps={steps}", f"trainer.save_freq={steps}",
        f"trainer.test_freq={rl['test_freq']}",
        f"trainer.val_before_train={str(rl['test_freq'] > 0).lower()}",
        f"trainer.default_local_dir={out / 'ckpt'}", "trainer.experiment_name=demo",
        "actor_rollout_ref.actor.checkpoint.save_contents=[model,optimizer,extra,hf_model]",
        *rl["overrides"],
    ]  # fmt: skip
    seen: dict[int, dict] = {}

    def progress(line: str) -> None:
        for step, m in parse_step_metrics(line).items():
            seen.setdefault(step, {}).update(m)
            val = _val_reward(m)
            parts = [f"  rl step {step}/{steps}"]
            if "critic/score/mean" in m:
                parts.append(f"batch reward {m['critic/score/mean']:.3f}")
            if val is not None:
                parts.append(f"val reward {val:.3f}")
            if "actor/longact/mask_version" in m:
                parts.append(f"mask v{int(m['actor/longact/mask_version'])}")
            if "timing_s/step" in m:
                parts.append(f"{m['timing_s/step']:.1f}s")
            _say("  ".join(parts))

    t0 = time.time()
    stream(cmd, out / "rl.log", progress, env={"RAY_DEDUP_LOGS": "0"})
    (out / "metrics.json").write_text(json.dumps(seen, indent=1))
    hf = f"ckpt/global_step_{steps}/actor/huggingface"
    if not (out / hf / "model.safetensors").is_file():
        raise RuntimeError(f"RL wrote no loadable model at {out / hf}")
    vals = {s: v for s, m in sorted(seen.items()) if (v := _val_reward(m)) is not None}
    return {"model": hf, "val_reward": vals, "seconds": time.time() - t0}


def stage_inspect(cfg: dict, sft_model: Path, rl_model: Path, data: Path, out: Path) -> dict:
    from longact.inspect import compare_results, inspect_model, plot_compare, plot_heatmaps
    from longact.inspect.report import summary_line

    ins = cfg["inspect"]
    kw = dict(n=ins["samples"], ratio=ins["ratio"], calib_n=ins["calib_n"])
    sft = inspect_model(sft_model, data, **kw)
    rl = inspect_model(rl_model, data, **kw)
    plot_heatmaps(sft, out / "heatmaps_sft.png")
    compare = compare_results(sft, rl)  # also stored as sft["compare"]
    plot_compare(sft, out / "compare_sft_rl.png")
    (out / "inspect.json").write_text(json.dumps(sft, indent=1, default=str))
    return {"sft_overall": sft.get("overall"), "jaccard_sft_rl": compare["jaccard_mean"],
            "summary_sft": summary_line(sft), "summary_rl": summary_line(rl)}  # fmt: skip


# ---- driver ----------------------------------------------------------------------------
def sft_key(cfg: dict) -> list:
    """Cache key of the SFT warm-up stage (what its result depends on)."""
    return [cfg["sft"], cfg["task"], cfg["model"]]


def shared_stages(st: Stages, cfg: dict) -> tuple[Path, Path, Path]:
    """model -> data -> SFT warm-up, the stages the demo and ``make reproduce`` share
    (same cache keys, so either reuses the other's results); (model dir, data dir, SFT
    model dir)."""
    st.run("model", cfg["model"], lambda d: stage_model(cfg, d))
    model_dir = st.dir("model") / "model"
    key = [cfg["task"], cfg["sft"], cfg["rl"], cfg["model"]]
    st.run("data", key, lambda d: stage_data(cfg, model_dir, d))
    data_dir = st.dir("data")
    sft = st.run(
        "sft", sft_key(cfg), lambda d: stage_sft(cfg, model_dir, data_dir / "sft.parquet", d)
    )
    return model_dir, data_dir, st.dir("sft") / sft["model"]


def run(out: Path, cfg: dict) -> Path:
    from longact.demo.report import write_report

    st = Stages(out, log=_say)
    t_start = time.time()
    _, data_dir, sft_model = shared_stages(st, cfg)
    ev_sft = st.run(
        "ablate",
        [cfg["eval"], cfg["ablate"], cfg["sft"], cfg["task"]],
        lambda d: stage_ablate(cfg, sft_model, d),
    )
    rl = st.run(
        "rl", [cfg["rl"], cfg["sft"], cfg["task"]], lambda d: stage_rl(cfg, sft_model, data_dir, d)
    )
    rl_model = st.dir("rl") / rl["model"]
    ev_rl = st.run(
        "eval_rl", [cfg["eval"], cfg["rl"], cfg["sft"]], lambda d: stage_eval(cfg, rl_model, d)
    )
    insp = st.run(
        "inspect",
        [cfg["inspect"], cfg["rl"], cfg["sft"]],
        lambda d: stage_inspect(cfg, sft_model, rl_model, data_dir / "rl_val.parquet", d),
    )
    report = write_report(out, cfg, st, ev_sft, ev_rl, rl, insp, time.time() - t_start)
    _say(f"report: {report}  (total {time.time() - t_start:.0f}s)")
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m longact.demo.pipeline", description=__doc__.split("\n")[0]
    )
    p.add_argument("--out", default="runs/demo", help="output folder (stages cached here)")
    p.add_argument("overrides", nargs="*", help="demo.yaml overrides, e.g. sft.steps=600")
    args = p.parse_args(argv)
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        p.error(f"overrides must be key=value, got {bad}")
    run(Path(args.out).resolve(), load_config(args.overrides))
    return 0


if __name__ == "__main__":
    sys.exit(main())
