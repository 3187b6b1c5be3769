"""Task generators: token budgets, determinism, depths, formats, parquet, SFT, CLI, errors."""

from __future__ import annotations

import pytest

from longact.cli.main import main
from longact.data.fit import TaskLengthError
from longact.data.tasks import TASKS, make_dataset, read_parquet, to_sft_rows, write_parquet

ALL = TASKS.names()


def _prompt_tokens(tok, row) -> int:
    text = tok.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
    return len(tok(text, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("task", ALL)
@pytest.mark.parametrize("length", [256, 1024, 4096])
def test_prompts_hit_the_budget(task, length, tiny_tok):
    rows = make_dataset(task, tiny_tok, length, 3, seed=0)
    for row in rows:
        n = _prompt_tokens(tiny_tok, row)
        assert abs(n - length) <= 0.02 * length
        assert n == row["extra_info"]["num_tokens"]


@pytest.mark.parametrize("task", ALL)
def test_budget_with_a_sentencepiece_style_tokenizer(task, sp_tok):
    for length in (400, 2048):
        for row in make_dataset(task, sp_tok, length, 2, seed=5):
            assert abs(_prompt_tokens(sp_tok, row) - length) <= 0.02 * length


def test_deterministic_by_seed(tiny_tok):
    for task in ALL:
        a = make_dataset(task, tiny_tok, 300, 3, seed=7)
        assert a == make_dataset(task, tiny_tok, 300, 3, seed=7)
        assert a != make_dataset(task, tiny_tok, 300, 3, seed=8)


def test_needle_depth_spread_evenly(tiny_tok):
    rows = make_dataset("niah_single", tiny_tok, 1024, 5, seed=0)
    assert [r["extra_info"]["depth"] for r in rows] == [0.0, 0.25, 0.5, 0.75, 1.0]
    positions = []
    for r in rows:
        content = r["prompt"][0]["content"]
        context = content.split("\n", 1)[1].rsplit("\n", 1)[0]
        positions.append(context.index("special magic") / len(context))
    assert positions == sorted(positions)
    assert positions[0] < 0.05 and positions[-1] > 0.9


def test_row_format(tiny_tok):
    (row,) = make_dataset("niah_multiquery", tiny_tok, 300, 1, seed=0, value_digits=6)
    assert row["data_source"] == "longact/niah_multiquery"
    assert row["prompt"][0]["role"] == "user" and len(row["prompt"]) == 1
    assert row["reward_model"]["style"] == "rule"
    gt = row["reward_model"]["ground_truth"]
    assert len(gt) == 4 and all(len(v) == 6 and v.isdigit() for v in gt)
    info = row["extra_info"]
    assert {"task", "length", "num_tokens", "depth", "index", "answer"} <= set(info)
    assert info["answer"] == " ".join(gt)
    assert row["prompt"][0]["content"].endswith("?")  # the question comes last


def test_every_word_is_one_tiny_token(tiny_tok):
    from longact.data import vocab

    for w in vocab.all_words():
        assert len(tiny_tok(" " + w, add_special_tokens=False)["input_ids"]) == 1, w


def test_parquet_round_trip_and_sft(tiny_tok, tmp_path):
    rows = make_dataset("vt", tiny_tok, 256, 2) + make_dataset("mcq", tiny_tok, 256, 2)
    back = read_parquet(write_parquet(rows, tmp_path / "rl.parquet"))
    assert [r["prompt"] for r in back] == [r["prompt"] for r in rows]
    assert [r["reward_model"] for r in back] == [r["reward_model"] for r in rows]
    sft = to_sft_rows(rows)
    assert sft[0]["messages"][-1] == {
        "role": "assistant",
        "content": rows[0]["extra_info"]["answer"],
    }
    assert sft[2]["messages"][-1]["content"].startswith("The correct answer is (")
    back = read_parquet(write_parquet(sft, tmp_path / "sft.parquet"))
    assert back[0]["messages"] == sft[0]["messages"]


def test_length_too_small_names_task_length_and_minimum(tiny_tok):
    with pytest.raises(TaskLengthError) as err:
        make_dataset("mcq", tiny_tok, 100, 4)
    msg = str(err.value)
    assert "'mcq'" in msg and "100 tokens" in msg and f"at least {err.value.minimum}" in msg
    make_dataset("mcq", tiny_tok, err.value.minimum, 4)  # the minimum fits every sample


def test_unknown_task_and_option(tiny_tok):
    with pytest.raises(ValueError, match="unknown task 'nope'; valid: cwe, fwe, mcq"):
        make_dataset("nope", tiny_tok, 256, 1)
    with pytest.raises(ValueError, match="unknown option.*num_kyes; valid: num_keys"):
        make_dataset("niah_multikey", tiny_tok, 256, 1, num_kyes=3)


def test_cli_make_list_and_errors(tiny_dir, tmp_path, capsys):
    out = tmp_path / "d.parquet"
    args = ["data", "make", "--task", "niah_single,cwe", "--length", "200,300", "--n", "2"]
    args += ["--tokenizer", str(tiny_dir), "--out", str(out), "--value-digits", "5"]
    assert main(args) == 0
    rows = read_parquet(out)
    assert len(rows) == 8 and len(rows[0]["reward_model"]["ground_truth"][0]) == 5
    assert main(["data", "list"]) == 0
    assert "niah_multikey" in capsys.readouterr().out
    bad = ["data", "make", "--length", "200", "--n", "1", "--tokenizer", str(tiny_dir)]
    assert main([*bad, "--task", "nope", "--out", str(out)]) == 2
    assert "valid: cwe" in capsys.readouterr().err
    assert main([*bad, "--task", "vt", "--length", "10", "--out", str(out)]) == 2
    assert "cannot fit in 10 tokens" in capsys.readouterr().err
    assert main([*bad, "--task", "vt", "--opt", "num_hops", "--out", str(out)]) == 2
    assert (
        main(
            [
                "data",
                "make",
                "--task",
                "vt",
                "--length",
                "99",
                "--n",
                "1",
                "--tokenizer",
                str(tmp_path / "missing"),
                "--out",
                str(out),
            ]
        )
        == 2
    )
    assert "does not exist" in capsys.readouterr().err
