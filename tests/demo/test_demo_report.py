"""The demo's one-page report, from stage outputs made up in the test: the paired gain
at the RL length, the four figures and the sentences that say what they show."""

from __future__ import annotations

import json

import pytest

from longact.ablate import write as write_ablation
from longact.demo.pipeline import load_config
from longact.demo.report import paired_gain, write_report
from longact.eval.stats import mean_ci


class _Stages:
    timings = {"model": 3.0, "sft": 100.0, "ablate": 20.0, "rl": 150.0}
    cached = ["model"]


def _cfg():
    cfg = load_config(["eval.samples=4", "eval.lengths=[64,128]", "rl.steps=6"])
    assert cfg["rl"]["train_length"] == 128
    return cfg


def test_paired_gain_per_length():
    before = [1, 1, 0, 0, 0, 0, 1, 0]  # 64: 4 prompts, then 128: 4 prompts
    after = [1, 1, 1, 0, 1, 1, 1, 1]
    gain = paired_gain(_cfg(), before, after)
    assert gain[64]["before"] == 0.5 and gain[64]["after"] == 0.75
    assert (gain[128]["gain"], gain[128]["gain_half"]) == pytest.approx(mean_ci([1, 1, 0, 1]))
    assert gain[128]["n"] == 4
    low, high = gain[128]["after_ci"]
    assert low < 1.0 == high


def test_report_has_four_figures_with_sentences(tmp_path):
    cfg = _cfg()
    (tmp_path / "rl").mkdir()
    metrics = {
        str(s): {"critic/score/mean": 0.1 * s, "actor/longact/mask_version": s} for s in range(1, 7)
    }
    (tmp_path / "rl" / "metrics.json").write_text(json.dumps(metrics))
    prompts = [
        {"task": "niah_single", "length": n, "index": i} for n in (64, 128) for i in range(4)
    ]

    def arm(policy, seed, scores):
        return {
            "policy": policy,
            "seed": seed,
            "name": policy,
            "scores": scores,
            "summary": [
                {
                    "task": "niah_single",
                    "length": n,
                    "accuracy": 0.5,
                    "n": 4,
                    "low": 0.2,
                    "high": 0.8,
                }
                for n in (64, 128)
            ],
        }

    ablation = {
        "model": "m",
        "tasks": ["niah_single"],
        "lengths": [64, 128],
        "n": 4,
        "seed": 4,
        "prompts": prompts,
        "settings": {
            "ratio": 0.3,
            "mode": "mean",
            "score": "mean_abs",
            "granularity": "channel",
            "point": "proj",
        },
        "calibration": {"source": "s", "prompts": 8, "tokens": 100, "dropped_overlap": 0},
        "arms": [
            arm("none", None, [1] * 8),
            arm("topk", None, [0] * 8),
            arm("random", 0, [1, 1, 1, 1, 0, 1, 1, 1]),
        ],
    }
    write_ablation(ablation, tmp_path / "ablate")
    before = {"scores": [1, 1, 0, 0, 0, 0, 1, 0]}
    after = {"scores": [1, 1, 1, 0, 1, 1, 1, 1]}
    insp = {
        "jaccard_sft_rl": {"q": 0.8, "k": 0.7},
        "summary_sft": "summary: the topk 30% channels, chosen on 16 calibration prompts",
    }
    # the inspect stage's figures (a page is refused when it links a figure no stage wrote)
    (tmp_path / "inspect").mkdir()
    with pytest.raises(RuntimeError, match=r"links figures no stage wrote: inspect/heatmaps_sft"):
        write_report(tmp_path, cfg, _Stages(), before, after, {}, insp, 287.0)
    assert (tmp_path / "report.md").is_file()  # written all the same, to look at
    for name in ("heatmaps_sft.png", "compare_sft_rl.png"):
        (tmp_path / "inspect" / name).write_bytes(b"\x89PNG")
    path = write_report(tmp_path, cfg, _Stages(), before, after, {}, insp, 287.0)
    text = path.read_text()
    for fig in (
        "ablate/ablate.png",
        "accuracy_vs_length.png",
        "reward_per_step.png",
        "inspect/heatmaps_sft.png",
    ):
        assert f"]({fig})" in text
    assert (tmp_path / "accuracy_vs_length.png").read_bytes()[:4] == b"\x89PNG"
    assert "287 s of stages" in text
    assert "costs more accuracy than disrupting as many random ones" in text
    assert "At the RL length (128 tokens) accuracy moved within noise: 25.0% -> 100.0%" in text
    assert "from 0.10 (first 1 steps) to 0.60 (last 1) over 6 steps" in text
    assert "Warm-up model: the topk 30% channels" in text
    assert "Jaccard 0.80 (q) and 0.70 (k)" in text and "version 6" in text
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["gain"]["128"]["gain"] == pytest.approx(0.75)


def test_ablate_and_eval_stages_score_the_same_prompts(tmp_path):
    """The demo's before (the ablation's none arm) and after (eval_rl) are paired prompt
    by prompt: on the same model they agree exactly, so the gain is 0 at every length."""
    from longact.demo.pipeline import stage_ablate, stage_eval
    from longact.models.tiny import write_tiny_model

    model = write_tiny_model(tmp_path / "m", "xxs", 0)
    cfg = load_config(["eval.samples=4", "eval.lengths=[64,96]", "ablate.seeds=[0]",
                       "ablate.calib_n=2"])  # fmt: skip
    before = stage_ablate(cfg, model, tmp_path / "ablate")
    after = stage_eval(cfg, model, tmp_path / "eval")
    assert before["scores"] == after["scores"] and len(before["scores"]) == 8
    assert before["accuracy"] == after["accuracy"]
    none = json.loads((tmp_path / "ablate" / "ablate.json").read_text())["arms"][0]
    samples = json.loads((tmp_path / "eval" / "results.json").read_text())["samples"]
    assert none["responses"] == [s["response"] for s in samples]  # not only equal scores
    gain = paired_gain(cfg, before["scores"], after["scores"])
    assert all(g["gain"] == 0.0 for g in gain.values())
