"""The tiny Qwen3 factory: deterministic files, loadable with transformers, a tokenizer
with the properties verl and the tasks rely on, and parameter counts per size."""

from __future__ import annotations

import json

import pytest
import torch

from longact.models.tiny import BPE_VOCAB_SIZE, EOS, PAD, SIZES, build_model, write_tiny_model


def _bytes(d, name):
    return (d / name).read_bytes()


def test_same_seed_gives_identical_files_other_seed_other_weights(tmp_path, tiny_xxs):
    again = write_tiny_model(tmp_path / "again", size="xxs", seed=0)
    other = write_tiny_model(tmp_path / "other", size="xxs", seed=1)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert _bytes(again, name) == _bytes(tiny_xxs, name), name
    assert _bytes(other, "tokenizer.json") == _bytes(tiny_xxs, "tokenizer.json")
    assert _bytes(other, "model.safetensors") != _bytes(tiny_xxs, "model.safetensors")
    meta = json.loads((other / "longact_tiny.json").read_text())
    assert meta["size"] == "xxs" and meta["seed"] == 1 and meta["parameters"] > 0


def test_loads_with_auto_classes(tiny_xxs, tiny_tok):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_xxs, dtype=torch.float32)
    assert model.config.model_type == "qwen3"
    assert model.config.tie_word_embeddings
    vocab = model.config.vocab_size
    assert vocab % 64 == 0 and len(tiny_tok) <= vocab
    ids = tiny_tok("the fox ran", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], vocab)
    assert torch.isfinite(logits).all()
    eos = tiny_tok.convert_tokens_to_ids(EOS)
    pad = tiny_tok.convert_tokens_to_ids(PAD)
    assert model.config.eos_token_id == eos and model.generation_config.eos_token_id == eos
    assert model.config.pad_token_id == pad and model.generation_config.pad_token_id == pad


def _enc(tok, text):
    return tok.encode(text, add_special_tokens=False)


def test_newline_and_digits_are_single_tokens(tiny_tok):
    assert len(_enc(tiny_tok, "\n")) == 1
    nl = _enc(tiny_tok, "\n")[0]
    assert _enc(tiny_tok, "a\nb").count(nl) == 1
    for d in "0123456789":
        assert len(_enc(tiny_tok, d)) == 1, d
    ids = _enc(tiny_tok, "20240917")
    assert len(ids) == 8
    assert [tiny_tok.decode([i]) for i in ids] == list("20240917")


def test_every_task_word_is_one_token_with_leading_space(tiny_tok):
    from longact.data.vocab import all_words

    multi = {w: _enc(tiny_tok, " " + w) for w in all_words()}
    multi = {w: ids for w, ids in multi.items() if len(ids) != 1}
    assert not multi, f"words split into several tokens: {sorted(multi)[:10]}"


@pytest.mark.parametrize(
    "text",
    [
        "The secret code is 7312.\nAnswer: fox",
        "  leading spaces, tabs\tand ünïcödé ✓ 🙂 — end",
        "VAR AXQ = VAR BRT\n\n{json: [1, 2]}",
    ],
)
def test_decode_encode_round_trip(tiny_tok, text):
    assert tiny_tok.decode(_enc(tiny_tok, text)) == text


def test_chat_template_and_special_tokens(tiny_tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    text = tiny_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    no_prompt = tiny_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
    assert not no_prompt.endswith("assistant\n")
    assert tiny_tok.eos_token == "<|im_end|>"
    assert tiny_tok.pad_token == "<|endoftext|>"
    for special in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert len(_enc(tiny_tok, special)) == 1, special


def test_parameter_counts_per_size():
    counts = {}
    for size in ("xxs", "xs", "s"):
        model = build_model(size, vocab_size=1856)  # the padded table write_tiny_model uses
        counts[size] = sum(p.numel() for p in model.parameters())
    assert 100_000 <= counts["xxs"] < 500_000, counts
    assert 500_000 <= counts["xs"] < 2_000_000, counts
    assert 2_000_000 <= counts["s"] < 10_000_000, counts
    assert counts["xxs"] < counts["xs"] < counts["s"]
    assert set(SIZES.names()) == {"xxs", "xs", "s"}
    assert BPE_VOCAB_SIZE >= 1856


def test_unknown_size_raises_before_writing(tmp_path):
    with pytest.raises(ValueError, match="huge"):
        write_tiny_model(tmp_path / "m", size="huge")
    assert not (tmp_path / "m").exists()
