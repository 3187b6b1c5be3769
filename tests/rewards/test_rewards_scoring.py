"""Rewards: hand-made responses per scorer, and the call paths of verl's reward managers."""

from __future__ import annotations

import numpy as np
import pytest

from longact.rewards import DATA_SOURCES, compute_score
from longact.rewards.scoring import clean_response, extract_choice, parse_references


def score(source, response, gt, **kw) -> float:
    return compute_score(source, response, gt, **kw)["score"]


NIAH = "longact/niah_single"


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("4821", 1.0),  # right
        ("4821<|im_end|>", 1.0),  # chat end token stripped
        ("<think>maybe 1111</think>4821", 1.0),  # thinking block dropped
        ("The special magic number for amber is 4821.", 1.0),  # words do not count as items
        ("1234", 0.0),  # wrong
        ("48210", 0.0),  # a longer number is not the answer
        ("", 0.0),  # empty
        (None, 0.0),  # malformed: no text at all
        ("\x00\ufffd##", 0.0),  # malformed: garbage
        ("4821 1111", 0.5),  # the right number among extras: scaled by 1/2
        (" ".join(str(1000 + i) for i in range(100)) + " 4821", 1 / 101),  # dump
    ],
)
def test_single_answer(response, expected):
    assert score(NIAH, response, ["4821"]) == pytest.approx(expected)


def test_partial_credit_and_ruler_recall():
    gt = ["1111", "2222", "3333", "4444"]
    src = "longact/niah_multivalue"
    assert score(src, "1111 2222 3333 4444", gt) == 1.0
    assert score(src, "4444 3333 2222 1111", gt) == 1.0  # order does not matter
    assert score(src, "1111 2222", gt) == 0.5  # partly right
    assert score(src, "1111 2222 9999 8888", gt) == 0.5
    dump = " ".join(gt + [str(5000 + i) for i in range(12)])
    result = compute_score(src, dump, gt)
    assert result["recall"] == 1.0 and result["score"] == pytest.approx(0.25)
    assert score(src, dump, gt, strict=False) == 1.0  # the bare RULER metric
    assert set(result) == {"score", "acc", "recall"} and result["acc"] == result["score"]


def test_word_answers_are_case_insensitive_whole_words():
    gt = ["river", "amber", "lotus"]
    assert score("longact/cwe", "River AMBER lotus", gt) == 1.0
    assert score("longact/cwe", "rivers amberlotus", gt) == 0.0
    assert score("longact/vt", "AXQ BRT", ["AXQ", "BRT", "CDM", "DLP"]) == 0.5
    assert score("longact/qa", "red", ["red"]) == 1.0
    assert score("longact/qa", "The answer is red.", ["red"]) == 1.0
    assert score("longact/qa", "red blue green gold", ["red"]) == 0.25  # spraying values
    assert score("longact/qa", "ordered", ["red"]) == 0.0


@pytest.mark.parametrize(
    ("response", "letter"),
    [
        ("The correct answer is (B)", "B"),
        ("**The correct answer is (B)**", "B"),
        ("The correct answer is B.", "B"),
        ("I think (B).", "B"),
        ("B", "B"),
        ("(B)", "B"),
        ("(A) or (B)", None),  # ambiguous
        ("The correct answer is (E)", None),
        ("", None),
        ("Because", None),
    ],
)
def test_multiple_choice_parsing(response, letter):
    assert extract_choice(response) == letter
    for src in ("longact/mcq", "longbench_v2"):
        assert score(src, response, ["B"]) == (1.0 if letter == "B" else 0.0)


def test_ground_truth_forms():
    assert parse_references(["1", "2"]) == ["1", "2"]
    assert parse_references(np.array(["1", "2"], dtype=object)) == ["1", "2"]
    assert parse_references('["a", "b"]') == ["a", "b"]
    assert parse_references("4821") == ["4821"]
    assert parse_references(None) == [] and parse_references("") == []
    assert score(NIAH, "4821", "4821") == score(NIAH, "4821", '["4821"]') == 1.0
    assert score(NIAH, "4821", []) == 0.0
    assert clean_response(b"12<|im_end|><|endoftext|>") == "12"


@pytest.mark.filterwarnings("ignore")  # verl's optional engines warn on import
def test_unknown_data_source_lists_ours_and_verl_sources_still_work():
    with pytest.raises(ValueError, match="unknown reward data_source 'foo'; valid: longact/cwe"):
        compute_score("foo", "x", "y")
    assert score("openai/gsm8k", "so #### 42", "42") == 1.0
    assert set(DATA_SOURCES) >= {"longact/niah_single", "longact/mcq", "longbench_v2"}


@pytest.fixture(scope="module")
def tok():
    from longact.models.tiny import build_tokenizer

    return build_tokenizer()


def _batch(tok, response: str, gt: list[str], pad_to: int = 24):
    import torch
    from verl import DataProto

    prompt = tok("What is it?", add_special_tokens=False)["input_ids"]
    resp = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    mask = [1] * (len(prompt) + len(resp)) + [0] * (pad_to - len(resp))
    resp = resp + [tok.pad_token_id] * (pad_to - len(resp))
    obj = lambda x: np.array([x], dtype=object)  # noqa: E731
    return DataProto.from_dict(
        tensors={
            "prompts": torch.tensor([prompt]),
            "responses": torch.tensor([resp]),
            "attention_mask": torch.tensor([mask]),
        },
        non_tensors={
            "data_source": obj(NIAH),
            "reward_model": obj({"style": "rule", "ground_truth": gt}),
            "extra_info": obj({"index": 0}),
        },
    )


@pytest.mark.filterwarnings("ignore")
def test_verl_reward_loop_managers(tok):
    """verl's naive and dapo managers load compute_score from this file, call it, and (dapo)
    add the overlong penalty on top."""
    from omegaconf import OmegaConf
    from verl.experimental.reward_loop.reward_manager.dapo import DAPORewardManager
    from verl.experimental.reward_loop.reward_manager.naive import NaiveRewardManager
    from verl.trainer.ppo.reward import get_custom_reward_fn

    import longact.rewards.scoring as scoring

    cfg = OmegaConf.create(
        {
            "reward": {
                "custom_reward_function": {
                    "path": scoring.__file__,
                    "name": "compute_score",
                    "reward_kwargs": {"strict": True},
                },
                "reward_kwargs": {
                    "max_resp_len": 16,
                    "overlong_buffer_cfg": {
                        "enable": True,
                        "len": 8,
                        "penalty_factor": 1.0,
                        "log": True,
                    },
                },
            }
        }
    )
    fn = get_custom_reward_fn(cfg)
    naive = NaiveRewardManager(cfg, tok, fn)
    dapo = DAPORewardManager(cfg, tok, fn)
    short = _batch(tok, "4821", ["4821"])  # 5 tokens with the end token: no penalty
    long = _batch(tok, "4821" + "\n" * 7, ["4821"])  # 12 tokens: 4 over 16 - 8 -> -0.5
    run = naive.loop.run_until_complete
    out = run(naive.run_single(short))
    assert out["reward_score"] == 1.0 and out["reward_extra_info"]["recall"] == 1.0
    assert run(dapo.run_single(short))["reward_score"] == 1.0
    out = run(dapo.run_single(long))
    assert out["reward_score"] == pytest.approx(0.5)
    assert out["reward_extra_info"]["overlong_reward"] == pytest.approx(-0.5)
    assert run(dapo.run_single(_batch(tok, "1234", ["4821"])))["reward_score"] == 0.0
