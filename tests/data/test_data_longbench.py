"""LongBench v2 reader: schema validation, middle truncation, prompts, scoring breakdown."""

from __future__ import annotations

import json

import pytest

from longact.data import longbench as lb
from longact.data.tasks import make_dataset


def record(i: int, answer="A", difficulty="easy", length="short", context=None) -> dict:
    return {
        "_id": f"id{i}",
        "domain": "Single-Document QA",
        "sub_domain": "Academic",
        "difficulty": difficulty,
        "length": length,
        "question": f"Which river is named in story {i}?",
        "choice_A": "amber",
        "choice_B": "cedar",
        "choice_C": "lotus",
        "choice_D": "raven",
        "answer": answer,
        "context": context if context is not None else " the old river." * 50,
    }


def test_load_json_and_jsonl(tmp_path):
    recs = [record(0), record(1, "C", "hard", "long")]
    (tmp_path / "a.json").write_text(json.dumps(recs))
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    assert lb.load(tmp_path / "a.json") == recs == lb.load(tmp_path / "b.jsonl")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"choice_C": None}, "row 1 (_id=id1): missing field 'choice_C'"),
        ({"question": "  "}, "row 1 (_id=id1): missing field 'question'"),
        ({"answer": "E"}, "row 1 (_id=id1): field 'answer' is 'E', not one of A, B, C, D"),
        ({"answer": "AB"}, "field 'answer' is 'AB'"),
        ({"difficulty": "medium"}, "row 1 (_id=id1): field 'difficulty' is 'medium'"),
        ({"length": 5}, "row 1 (_id=id1): field 'length' must be a string"),
    ],
)
def test_validation_errors_name_row_id_and_field(tmp_path, change, message):
    bad = record(1)
    bad.update(change)
    if change.get("choice_C", 1) is None:
        del bad["choice_C"]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([record(0), bad]))
    with pytest.raises(lb.LongBenchError, match=message.replace("(", r"\(").replace(")", r"\)")):
        lb.load(path)


def test_file_errors(tmp_path):
    with pytest.raises(lb.LongBenchError, match="does not exist"):
        lb.load(tmp_path / "none.json")
    (tmp_path / "x.json").write_text('{"_id": 1}')
    with pytest.raises(lb.LongBenchError, match="expected a list"):
        lb.load(tmp_path / "x.json")
    (tmp_path / "y.json").write_text("not json")
    with pytest.raises(lb.LongBenchError, match="not JSON"):
        lb.load(tmp_path / "y.json")


def test_single_record_jsonl_and_non_utf8_files(tmp_path):
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps(record(0)) + "\n")
    assert lb.load(one) == [record(0)]
    latin = tmp_path / "latin.json"
    latin.write_bytes(json.dumps([record(0, context=" caf\u00e9")]).encode("utf-8")[:-3] + b"\xe9]")
    with pytest.raises(lb.LongBenchError, match=r"latin.json is not UTF-8 text \(byte \d+"):
        lb.load(latin)


def test_truncate_middle_keeps_head_and_tail(tiny_tok):
    text = " amber" * 10 + " the" * 500 + " zephyr" * 10
    cut = lb.truncate_middle(text, tiny_tok, 40)
    assert len(tiny_tok(cut, add_special_tokens=False)["input_ids"]) == 40
    assert cut.startswith(" amber" * 10) and cut.endswith(" zephyr" * 10)
    assert lb.truncate_middle("short text", tiny_tok, 40) == "short text"


def test_prompt_and_rows_fit_the_budget(tiny_tok):
    recs = [record(0), record(1, context=" the old river." * 5)]
    prompt = lb.build_prompt(recs[0])
    assert prompt.endswith(
        'Format your response as follows: "The correct answer is (insert answer here)".'
    )
    assert "(C) lotus" in prompt and lb.context_of(prompt) == recs[0]["context"]
    rows = lb.make_rows(recs, tiny_tok, 150)
    for row in rows:
        text = tiny_tok.apply_chat_template(
            row["prompt"], tokenize=False, add_generation_prompt=True
        )
        assert len(tiny_tok(text, add_special_tokens=False)["input_ids"]) <= 150
        assert row["data_source"] == "longbench_v2" and row["reward_model"]["ground_truth"] == ["A"]
    assert rows[0]["extra_info"]["truncated"] and not rows[1]["extra_info"]["truncated"]
    with pytest.raises(lb.LongBenchError, match="row 0 \\(_id=id0\\): question and choices"):
        lb.make_rows(recs, tiny_tok, 60)


def test_score_breakdown():
    recs = [
        record(0, "A", "easy", "short"),
        record(1, "B", "hard", "short"),
        record(2, "C", "hard", "long"),
        record(3, "D", "easy", "medium"),
    ]
    responses = ["The correct answer is (A)", "The correct answer is B", "(D)", None]
    s = lb.score(recs, responses)
    assert s["accuracy"] == 0.5 and s["n"] == 4
    assert s["by_difficulty"] == {
        "easy": {"accuracy": 0.5, "n": 2},
        "hard": {"accuracy": 0.5, "n": 2},
    }
    assert s["by_length"]["short"] == {"accuracy": 1.0, "n": 2}
    assert s["by_length"]["long"] == {"accuracy": 0.0, "n": 1}
    with pytest.raises(ValueError, match="4 records but 1 responses"):
        lb.score(recs, ["A"])


def test_mcq_rows_are_longbench_records(tiny_tok, tmp_path):
    rows = make_dataset("mcq", tiny_tok, 400, 4, seed=2)
    recs = lb.to_records(rows)
    assert [r["difficulty"] for r in recs] == ["easy", "hard", "easy", "hard"]
    loaded = lb.load(lb.write_json(recs, tmp_path / "mcq.json"))
    assert loaded == recs and set(loaded[0]) == set(lb.FIELDS)
    assert lb.build_prompt(loaded[0]) == rows[0]["prompt"][0]["content"]
    answers = [f"The correct answer is ({r['answer']})" for r in recs]
    assert lb.score(loaded, answers)["accuracy"] == 1.0


def test_cli_longbench(tiny_dir, tmp_path, capsys):
    from longact.cli.main import main
    from longact.data.tasks import read_parquet

    path = lb.write_json([record(0), record(1)], tmp_path / "lb.json")
    out = tmp_path / "lb.parquet"
    args = ["data", "longbench", "--input", str(path), "--tokenizer", str(tiny_dir)]
    assert main([*args, "--length", "150", "--out", str(out)]) == 0
    assert len(read_parquet(out)) == 2 and "2 contexts cut" in capsys.readouterr().out
    path.write_text(json.dumps([record(0, answer="Z")]))
    assert main([*args, "--length", "150", "--out", str(out)]) == 2
    assert "row 0 (_id=id0): field 'answer'" in capsys.readouterr().err
