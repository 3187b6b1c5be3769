"""``longact inspect`` / ``inspect_model``: files, consistent numbers, comparison, errors."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

from longact.cli.main import main
from longact.data.tasks import read_parquet
from longact.inspect import (
    InspectError,
    compare_results,
    inspect_model,
    plot_heatmaps,
)

PNG = b"\x89PNG\r\n\x1a\n"


def run_cli(*args: str) -> int:
    return main(["inspect", *args])


def test_cli_writes_png_and_consistent_json(tiny_models, niah_parquet, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--model", str(tiny_models[0]), "--data", str(niah_parquet), "--out", str(out)]
    assert run_cli(*args, "--n", "4", "--batch-size", "3") == 0
    printed = capsys.readouterr().out
    assert "top30%" in printed and " mean  all" in printed
    assert (out / "heatmaps.png").read_bytes()[:8] == PNG
    assert not (out / "compare.png").exists()
    res = json.loads((out / "inspect.json").read_text())
    lo = res["layout"]
    assert res["n"] == 4 and res["model_type"] == "qwen3"
    assert len(res["keys"]) == 2 * lo["num_layers"]
    for r in res["keys"]:
        assert 0.0 <= r["top10_share"] <= r["top30_share"] <= 1.0
        assert 0.3 <= r["top30_share"] <= 0.45, r  # random init: close to uniform
        assert r["max_over_mean"] >= 1.0
        assert 0.0 <= r["low_freq_top30"] <= 1.0
        assert r["kept_fraction"] == pytest.approx(0.3, abs=0.02)
        # topk by mean_abs per channel keeps exactly the top-30% channels
        assert r["kept_mass"] == pytest.approx(r["top30_share"])
        ch = res["channels"][f"{r['layer']}.{r['proj']}"]
        assert (
            len(ch["mean_abs"])
            == r["channels"]
            == lo["head_dim"]
            * (lo["num_attention_heads"] if r["proj"] == "q" else lo["num_key_value_heads"])
        )
    for proj in ("q", "k", "all"):
        assert 0.0 <= res["overall"][proj]["top10_share"] <= res["overall"][proj]["top30_share"]


def test_real_tokens_only_padding_not_counted(tiny_models, niah_parquet):
    """Prompts of 128 and 160 tokens: one padded batch gives the statistics of four
    separate passes, and the token count is the sum of the prompt lengths."""
    lengths = [r["extra_info"]["num_tokens"] for r in read_parquet(niah_parquet)]
    batched = inspect_model(tiny_models[0], niah_parquet, n=4, batch_size=4)
    single = inspect_model(tiny_models[0], niah_parquet, n=4, batch_size=1)
    assert batched["tokens"] == single["tokens"] == sum(lengths)
    for key, ch in batched["channels"].items():
        assert ch["mean_abs"] == pytest.approx(single["channels"][key]["mean_abs"], rel=1e-4)


def test_compare_same_model_is_jaccard_one(tiny_models, niah_parquet, tmp_path, capsys):
    out = tmp_path / "same"
    m = str(tiny_models[0])
    assert (
        run_cli("--model", m, "--compare", m, "--data", str(niah_parquet), "--out", str(out)) == 0
    )
    assert "jaccard" in capsys.readouterr().out
    assert (out / "compare.png").read_bytes()[:8] == PNG
    res = json.loads((out / "inspect.json").read_text())
    assert all(r["jaccard"] == 1.0 for r in res["compare"]["jaccard"])
    assert res["compare"]["jaccard_mean"]["all"] == 1.0


def test_compare_other_seed_overlaps_less(tiny_models, niah_parquet, tmp_path):
    a = inspect_model(tiny_models[0], niah_parquet, n=4)
    b = inspect_model(tiny_models[1], niah_parquet, n=4)
    cmp_ = compare_results(a, b)
    assert a["compare"] is cmp_ and cmp_["model_name"] == "m1"
    assert len(cmp_["jaccard"]) == len(a["keys"])
    assert all(0.0 <= r["jaccard"] <= 1.0 for r in cmp_["jaccard"])
    assert cmp_["jaccard_mean"]["all"] < 1.0
    # the API round trip: a saved result redraws
    png = plot_heatmaps(json.loads(json.dumps(a)), tmp_path / "again.png")
    assert png.read_bytes()[:8] == PNG


def test_verl_checkpoint_folder_and_norm_point(tiny_models, niah_parquet, tmp_path):
    step = tmp_path / "run" / "global_step_3"
    shutil.copytree(tiny_models[0], step / "actor" / "huggingface")
    for path in (step, step / "actor", step / "actor" / "huggingface"):
        res = inspect_model(path, niah_parquet, n=1, point="norm")
        assert res["model_name"] == "run/global_step_3"
        assert res["settings"]["point"] == "norm"
        assert res["tokens"] > 0


def fails(capsys, *args: str) -> str:
    assert run_cli(*args) == 2
    return capsys.readouterr().err


def test_clear_errors(tiny_models, niah_parquet, tmp_path, capsys):
    m, d = str(tiny_models[0]), str(niah_parquet)
    err = fails(capsys, "--model", str(tmp_path / "nope"), "--data", d)
    assert "longact inspect: error:" in err and "does not exist" in err
    assert "data file" in fails(capsys, "--model", m, "--data", str(tmp_path / "x.parquet"))
    no_prompt = tmp_path / "noprompt.parquet"
    pd.DataFrame({"question": ["a", "b"]}).to_parquet(no_prompt)
    err = fails(capsys, "--model", m, "--data", str(no_prompt))
    assert "no 'prompt' column" in err and "question" in err
    assert "n must be at least 1" in fails(capsys, "--model", m, "--data", d, "--n", "0")
    assert "unknown mask policy" in fails(capsys, "--model", m, "--data", d, "--policy", "x")
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (gpt2 / "model.safetensors").write_bytes(b"")
    err = fails(capsys, "--model", str(gpt2), "--data", d)
    assert "'gpt2'" in err and "supported:" in err and "qwen3" in err
    err = fails(capsys, "--model", m, "--compare", str(tmp_path / "gone"), "--data", d)
    assert "does not exist" in err
    with pytest.raises(InspectError, match="n must be at least 1"):
        inspect_model(m, d, n=-1)


def test_calibration_split_chooses_on_other_prompts(tiny_models, niah_parquet, tmp_path, capsys):
    """--calib-n: the mask comes from the calibration rows alone (the same as an in-sample
    inspection of those rows), every number from the evaluation rows; overlaps dropped."""
    rows = read_parquet(niah_parquet)
    split = inspect_model(tiny_models[0], niah_parquet, n=2, calib_n=2)
    on_calib = inspect_model(tiny_models[0], rows[2:4], n=2)
    on_eval = inspect_model(tiny_models[0], rows[:2], n=2)
    assert split["calibration"] == {"source": "rows 2.. of the data", "n": 2,
                                    "dropped_overlap": 0, "tokens": on_calib["tokens"]}  # fmt: skip
    assert split["tokens"] == on_eval["tokens"]
    for key, ch in split["channels"].items():
        assert ch["kept"] == on_calib["channels"][key]["kept"]
        assert ch["mean_abs"] == on_eval["channels"][key]["mean_abs"]
    # held-out mass on calibration-chosen channels is at most the in-sample top-30% mass
    for r in split["keys"]:
        assert r["kept_mass"] <= r["top30_share"] + 1e-9
    part = inspect_model(tiny_models[0], niah_parquet, n=2, calib_n=3, calib_data=rows[1:4])
    assert part["calibration"]["dropped_overlap"] == 1 and part["calibration"]["n"] == 2
    with pytest.raises(InspectError, match="every calibration prompt is also an evaluation"):
        inspect_model(tiny_models[0], niah_parquet, n=4, calib_n=2, calib_data=rows)
    out = tmp_path / "split"
    args = ["--model", str(tiny_models[0]), "--data", str(niah_parquet), "--out", str(out)]
    assert run_cli(*args, "--n", "2", "--calib-n", "2") == 0
    lines = capsys.readouterr().out.strip().splitlines()
    last = lines[-2]  # the table's last line; then the "wrote ..." line
    assert last.startswith("summary: the topk 30% channels, chosen on 2 calibration prompts")
    assert "of |q| and" in last and "low-frequency half of RoPE" in last
    assert run_cli(*args, "--n", "2") == 0
    assert "in-sample" in capsys.readouterr().out.strip().splitlines()[-2]


def test_lora_adapter_is_inspected_on_its_base(tiny_models, niah_parquet, tmp_path, capsys):
    """A LoRA run's step folder: the adapter is loaded onto the base it records, unmerged,
    and the statistics pass through it (its q_proj adapters change every layer's |Q|;
    layer 0's |K|, before any adapter acts, is the base's). A base that is not there is an
    error naming --base."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from longact.core.lora import save_adapter

    base = tiny_models[0]
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, target_modules=["q_proj"])
    )
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    step = tmp_path / "run" / "global_step_2"
    save_adapter(model, step / "actor" / "lora_adapter", base=str(base))
    plain = inspect_model(base, niah_parquet, n=2)
    res = inspect_model(step, niah_parquet, n=2)
    assert res["model_name"] == "run/global_step_2"
    for key, ch in res["channels"].items():
        same = ch["mean_abs"] == plain["channels"][key]["mean_abs"]
        if key != "1.k":  # layer 1's K reads a residual stream layer 0's adapter changed
            assert same == (key == "0.k"), key
    moved = tmp_path / "moved"
    save_adapter(model, moved, base=str(tmp_path / "gone"))
    err = fails(capsys, "--model", str(moved), "--data", str(niah_parquet), "--n", "1")
    assert "base model of the LoRA adapter" in err and "--base DIR" in err
    out = tmp_path / "with_base"
    args = ["--model", str(moved), "--base", str(base), "--data", str(niah_parquet), "--n", "1"]
    assert run_cli(*args, "--out", str(out)) == 0
    assert json.loads((out / "inspect.json").read_text())["model_name"] == "moved"
