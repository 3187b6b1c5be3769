"""``longact eval`` / ``evaluate``: files, table = mean of samples, wiring, input errors."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from longact.cli.main import main
from longact.data import longbench as lb
from longact.data.tasks import make_dataset
from longact.eval import runner
from longact.eval.runner import EvalError, evaluate, resolve_model_dir

TASKS = ["niah_single", "vt", "qa"]
LENGTHS = [128, 160, 192]


def test_cli_eval_writes_table_plot_and_json(tiny_dir, tmp_path, capsys):
    out = tmp_path / "ev"
    args = ["eval", "--model", str(tiny_dir), "--tasks", ",".join(TASKS), "--n", "2"]
    args += ["--lengths", ",".join(map(str, LENGTHS)), "--out", str(out)]
    assert main([*args, "--max-new-tokens", "4", "--batch-size", "2", "--quiet"]) == 0
    assert "| niah_single |" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert (out / "accuracy_vs_length.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(results["samples"]) == len(TASKS) * len(LENGTHS) * 2
    table = {}
    for line in (out / "results.md").read_text().splitlines():
        m = re.match(r"\| (\w+) \| (.*) \|$", line)
        if m and m.group(1) in TASKS:
            table[m.group(1)] = [float(x) for x in m.group(2).split(" | ")]
    assert set(table) == set(TASKS)
    for task in TASKS:
        for j, length in enumerate(LENGTHS):
            scores = [
                s["score"]
                for s in results["samples"]
                if s["task"] == task and s["length"] == length
            ]
            entry = next(
                e for e in results["summary"] if e["task"] == task and e["length"] == length
            )
            assert entry["n"] == len(scores) == 2
            assert entry["accuracy"] == sum(scores) / len(scores)
            assert table[task][j] == round(100 * entry["accuracy"], 1)


class OracleGenerator:
    """Stands in for the model: answers each prompt with the generator's ideal answer."""

    answers: dict[str, str] = {}

    def __init__(self, model_dir, tokenizer, max_new_tokens):
        pass

    def __call__(self, prompts):
        return [self.answers[p] for p in prompts]


def test_evaluate_wiring_with_perfect_answers(tiny_dir, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    render = lambda row: tok.apply_chat_template(  # noqa: E731
        row["prompt"], tokenize=False, add_generation_prompt=True
    )
    records = lb.to_records(make_dataset("mcq", tok, 500, 4, seed=9))
    path = lb.write_json(records, tmp_path / "lb.json")
    answers = {}
    for task in ["cwe", "mcq"]:
        for row in make_dataset(task, tok, 256, 3, seed=1):
            answers[render(row)] = row["extra_info"]["answer"]
    for i, row in enumerate(lb.make_rows(records, tok, 256)):  # cut contexts: still "right"
        answers[render(row)] = f"The correct answer is ({records[i]['answer']})"
    monkeypatch.setattr(OracleGenerator, "answers", answers)
    monkeypatch.setattr(runner, "HFGenerator", OracleGenerator)
    res = evaluate(tiny_dir, ["cwe", "mcq"], [256], 3, seed=1, longbench=path, progress=False)
    assert [e["accuracy"] for e in res["summary"]] == [1.0, 1.0, 1.0]
    assert res["longbench"]["256"]["accuracy"] == 1.0
    assert res["longbench"]["256"]["by_difficulty"]["hard"]["n"] == 1  # first n=3 records


def test_input_errors(tiny_dir, tmp_path):
    with pytest.raises(EvalError, match="model directory .* does not exist"):
        evaluate(tmp_path / "missing", ["niah_single"], [128], 1)
    with pytest.raises(ValueError, match="unknown task 'nope'; valid: cwe"):
        evaluate(tiny_dir, ["nope"], [128], 1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvalError, match="no config.json"):
        resolve_model_dir(tmp_path / "empty")
    # a verl checkpoint: actor/huggingface holds the model
    ckpt = tmp_path / "global_step_5" / "actor"
    shutil.copytree(tiny_dir, ckpt / "huggingface")
    assert resolve_model_dir(ckpt) == ckpt / "huggingface"
    assert resolve_model_dir(ckpt.parent) == ckpt / "huggingface"
    for f in (ckpt / "huggingface").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(EvalError, match="no weights"):
        resolve_model_dir(ckpt)
    # a tokenizer without a chat template
    bare = tmp_path / "bare"
    shutil.copytree(tiny_dir, bare)
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((bare / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(EvalError, match="has no chat template"):
        evaluate(bare, ["niah_single"], [128], 1)
    assert (
        main(
            [
                "eval",
                "--model",
                str(bare),
                "--tasks",
                "vt",
                "--lengths",
                "128",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )


def test_lora_adapter_is_evaluated_merged_into_its_base(tiny_dir, tmp_path):
    """An adapter folder answers as the same adapter merged by hand does, not as its base;
    the merged copy lives in a temporary folder only for the run."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from longact.core.lora import save_adapter

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_dir), LoraConfig(r=4, target_modules="all-linear")
    )
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.5)
    adapter = save_adapter(model, tmp_path / "lora_adapter", base=str(tiny_dir))
    by_hand = tmp_path / "merged"
    model.merge_and_unload().save_pretrained(by_hand)
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(by_hand)
    args = (["niah_single"], [64], 3)
    kw = {"max_new_tokens": 4, "progress": False}
    got = evaluate(tmp_path, *args, **kw)  # the folder holding lora_adapter/
    assert got["model"] == str(adapter)
    responses = [s["response"] for s in got["samples"]]
    assert responses == [s["response"] for s in evaluate(by_hand, *args, **kw)["samples"]]
    assert responses != [s["response"] for s in evaluate(tiny_dir, *args, **kw)["samples"]]
