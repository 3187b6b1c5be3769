"""``ablate`` and ``longact ablate`` on tiny models written in the test: the ``none`` arm
is exactly ``longact eval``; the arms pick the channels LongAct's masks pick from the
same statistics; calibration never sees an evaluated prompt; the files and the errors."""

from __future__ import annotations

import json

import pytest
import torch

from longact.ablate import AblateError, ablate, compare, write
from longact.cli.main import main
from longact.core import build_masks, capture_qk_stats
from longact.core.arch import key_str

PNG = b"\x89PNG\r\n\x1a\n"
OPTS = {"value_digits": 2}
COMMON = dict(n=6, calib_n=3, batch_size=4, max_new_tokens=6, task_opts=OPTS, progress=False)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from longact.models.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("ablate") / "m", "xxs", 0)


@pytest.fixture(scope="module")
def result(model_dir):
    return ablate(model_dir, ["niah_single"], [96, 128], seeds=(0, 1), **COMMON)


def test_none_arm_is_exactly_longact_eval(model_dir, result):
    from longact.eval.runner import evaluate

    plain = evaluate(
        model_dir,
        ["niah_single"],
        [96, 128],
        6,
        seed=0,
        batch_size=4,
        max_new_tokens=6,
        task_opts=OPTS,
        progress=False,
    )
    none = next(a for a in result["arms"] if a["name"] == "none")
    assert none["responses"] == [s["response"] for s in plain["samples"]]
    assert none["scores"] == [s["score"] for s in plain["samples"]]
    assert [(e["length"], e["accuracy"]) for e in none["summary"]] == [
        (e["length"], e["accuracy"]) for e in plain["summary"]
    ]


def assert_arms_pick_what_the_masks_pick(
    model_dir, saved: dict, lengths: list[int], calib_n: int, arms: list[tuple]
) -> None:
    """Recompute the statistics of the calibration prompts (default seed 1000) with
    LongAct's own capture and build the masks at ratio 0.3 for the expected ``arms``
    ((policy, seed) in order): ``saved``'s arms disrupted exactly those channels."""
    from transformers import AutoModelForCausalLM

    from longact.ablate.runner import calibration_rows
    from longact.core.arch import get_adapter
    from longact.eval.runner import load_tokenizer, prompt_texts

    tok = load_tokenizer(model_dir)
    rows = calibration_rows(tok, ["niah_single"], lengths, calib_n, 1000, OPTS, None)
    texts = prompt_texts(tok, rows)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    adapter = get_adapter(model)
    tok.padding_side = "right"
    with capture_qk_stats(model.base_model, adapter, during_no_grad=True) as cap:
        for t in texts:  # one prompt per pass: no padding at all
            with torch.no_grad():
                model.base_model(**tok(t, return_tensors="pt", add_special_tokens=False))
        stats = cap.take()
    layout = adapter.layout(model)
    assert saved["calibration"]["tokens"] == int(stats.token_count(layout.keys()[0]))
    assert [(a["policy"], a["seed"]) for a in saved["arms"]] == arms
    for arm in saved["arms"]:
        if arm["policy"] == "none":
            assert arm["channels"] == {}
            continue
        masks = build_masks(stats, layout, ratio=0.3, policy=arm["policy"], seed=arm["seed"] or 0)
        for key in layout:
            want = torch.nonzero(masks[key]).flatten().tolist()
            assert arm["channels"][key_str(key)] == want, (arm["name"], key)


def test_arms_pick_what_the_mask_policies_pick(model_dir, result):
    """ablate(): every arm's channels are the mask its policy builds."""
    arms = [("none", None), ("topk", None), ("random", 0), ("random", 1), ("bottomk", None)]
    assert_arms_pick_what_the_masks_pick(model_dir, result, [96, 128], 3, arms)
    chans = {a["name"]: a["channels"] for a in result["arms"]}
    assert chans["random:0"] != chans["random:1"] != chans["topk"] != chans["bottomk"]


def test_calibration_prompts_never_overlap_evaluation(model_dir, tmp_path):
    from longact.ablate.runner import calibration_rows
    from longact.data.tasks import write_parquet
    from longact.eval.runner import load_tokenizer, make_jobs, prompt_texts

    tok = load_tokenizer(model_dir)
    jobs = make_jobs(tok, ["niah_single"], [96], 8, 0, OPTS)
    evaluated = set(prompt_texts(tok, jobs[0][2]))
    calib = prompt_texts(tok, calibration_rows(tok, ["niah_single"], [96], 8, 1000, OPTS, None))
    assert len(set(calib)) == 8 and not evaluated & set(calib)
    # a calibration file holding 3 of the evaluated prompts: those 3 are dropped
    extra = make_jobs(tok, ["niah_single"], [96], 4, 77, OPTS)[0][2]
    path = write_parquet(jobs[0][2][:3] + extra, tmp_path / "calib.parquet")
    res = ablate(
        model_dir,
        ["niah_single"],
        [96],
        policies=["none", "topk"],
        calib_data=str(path),
        **{**COMMON, "n": 8, "calib_n": 7},
    )
    assert res["calibration"]["dropped_overlap"] == 3
    assert res["calibration"]["prompts"] == 4
    with pytest.raises(AblateError, match="equals the evaluation seed"):
        ablate(model_dir, ["niah_single"], [96], calib_seed=0, **COMMON)


def test_compare_pairs_prompts():
    """topk - random uses the random arms' per-prompt mean over seeds; intervals are t
    intervals over prompts."""
    from longact.eval.stats import mean_ci

    prompts = [{"task": "t", "length": n, "index": i} for n in (10, 20) for i in range(4)]
    arms = [
        {"policy": "none", "seed": None, "scores": [1, 1, 1, 1, 1, 1, 1, 0]},
        {"policy": "topk", "seed": None, "scores": [0, 0, 1, 0, 0, 0, 0, 0]},
        {"policy": "random", "seed": 0, "scores": [1, 0, 1, 1, 1, 1, 0, 0]},
        {"policy": "random", "seed": 1, "scores": [1, 1, 1, 1, 0, 1, 1, 0]},
    ]
    rows = compare({"prompts": prompts, "arms": arms})
    pooled = next(r for r in rows if r["pair"] == "topk - random" and r["length"] is None)
    diffs = [-1, -0.5, 0, -1, -0.5, -1, -0.5, 0]
    assert pooled["n"] == 8
    assert (pooled["mean"], pooled["half"]) == pytest.approx(mean_ci(diffs))
    at10 = next(r for r in rows if r["pair"] == "topk - none" and r["length"] == 10)
    assert at10["mean"] == pytest.approx(-0.75) and at10["n"] == 4
    assert not any(r["pair"] == "bottomk - none" for r in rows)  # bottomk was not run


def test_files_and_cli(model_dir, result, tmp_path, capsys):
    """The written files; ``longact ablate`` prints the table and its ablate.json holds
    the channels the masks pick, as ablate() does."""
    files = write(result, tmp_path / "api")
    saved = json.loads(open(files["json"]).read())
    assert [a["name"] for a in saved["arms"]] == ["none", "topk", "random:0", "random:1", "bottomk"]
    assert all(
        0 <= e["low"] <= e["accuracy"] <= e["high"] <= 1
        for a in saved["arms"]
        for e in a["summary"]
    )
    assert open(files["png"], "rb").read(8) == PNG
    out = tmp_path / "cli"
    code = main(
        [
            "ablate",
            "--model",
            str(model_dir),
            "--tasks",
            "niah_single",
            "--lengths",
            "96",
            "--n",
            "4",
            "--calib-n",
            "2",
            "--arms",
            "none,topk,random",
            "--seeds",
            "5",
            "--mode",
            "zero",
            "--max-new-tokens",
            "4",
            "--opt",
            "value_digits=2",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "| random:5 |" in printed and "topk - random" in printed
    assert (out / "ablate.png").read_bytes()[:8] == PNG
    saved = json.loads((out / "ablate.json").read_text())
    assert saved["settings"]["mode"] == "zero"
    arms = [("none", None), ("topk", None), ("random", 5)]
    assert_arms_pick_what_the_masks_pick(model_dir, saved, [96], 2, arms)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--arms", "topk,half"], "unknown arm(s) ['half']; valid: none, topk, random, bottomk"),
        (["--ratio", "1.5"], "mask ratio must be in (0, 1], got 1.5"),
        (["--tasks", "nope"], "unknown task 'nope'"),
        (["--model", "/no/such/dir"], "model directory /no/such/dir does not exist"),
        (["--score", "median"], "unknown score 'median'"),
        (["--seeds", "a"], "--seeds must be integers"),
        (["--calib-seed", "0"], "equals the evaluation seed"),
    ],
)
def test_clear_errors(model_dir, tmp_path, capsys, args, message):
    base = {
        "--model": str(model_dir),
        "--tasks": "niah_single",
        "--lengths": "96",
        "--out": str(tmp_path / "x"),
    }
    flags = dict(zip(args[::2], args[1::2]))
    argv = ["ablate", *[x for k, v in {**base, **flags}.items() for x in (k, v)], "--quiet"]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x" / "ablate.json").exists()


def test_longbench_file_is_an_extra_task(model_dir, tmp_path):
    from longact.data import longbench as lb
    from longact.data.tasks import make_dataset
    from longact.eval.runner import load_tokenizer

    tok = load_tokenizer(model_dir)
    path = lb.write_json(
        lb.to_records(make_dataset("mcq", tok, 300, 3, seed=9)), tmp_path / "l.json"
    )
    res = ablate(model_dir, ["niah_single"], [160], policies=["none", "topk"], longbench=path,
                 **{**COMMON, "n": 2})  # fmt: skip
    assert res["tasks"] == ["niah_single", lb.DATA_SOURCE]
    assert [(p["task"], p["length"]) for p in res["prompts"]] == [
        ("niah_single", 160), ("niah_single", 160), (lb.DATA_SOURCE, 160), (lb.DATA_SOURCE, 160)
    ]  # fmt: skip
    for arm in res["arms"]:
        assert {e["task"] for e in arm["summary"]} == set(res["tasks"])
    files = write(res, tmp_path / "out")
    assert f"**{lb.DATA_SOURCE}**" in open(files["md"]).read()


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize(
    "arch,point", [("phi3", "proj"), ("qwen3_5", "proj"), ("gemma3", "norm"), ("gpt_oss", "proj")]
)
def test_other_families_end_to_end(tmp_path, arch, point):
    """Fused qkv (Phi-3), a hybrid with a gated q_proj (Qwen3.5), a heads-first norm
    (Gemma 3), sinks and MoE (gpt-oss): ablate runs, disrupts every q/k key of the layers
    LongAct applies to, and its none arm is longact eval."""
    from transformers import AutoConfig

    from longact.core.arch import get_adapter
    from longact.eval.runner import evaluate
    from longact.models.tiny import write_tiny_model

    model = write_tiny_model(tmp_path / arch, "xxs", 0, arch=arch)
    kw = {**COMMON, "n": 2, "calib_n": 2, "max_new_tokens": 3}
    res = ablate(model, ["niah_single"], [96], policies=["none", "topk"], point=point, **kw)
    config = AutoConfig.from_pretrained(model)
    layout = get_adapter(config).layout(config)
    topk = next(a for a in res["arms"] if a["policy"] == "topk")
    assert set(topk["channels"]) == {key_str(k) for k in layout}
    assert all(len(v) >= 1 for v in topk["channels"].values())
    plain = evaluate(model, ["niah_single"], [96], 2, seed=0, batch_size=4, max_new_tokens=3,
                     task_opts=OPTS, progress=False)  # fmt: skip
    none = next(a for a in res["arms"] if a["policy"] == "none")
    assert none["responses"] == [s["response"] for s in plain["samples"]]
