"""Fixtures for the data tests: the tiny tokenizer (built once) and a SentencePiece-style one."""

from __future__ import annotations

import random

import pytest


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny (xxs) model + tokenizer directory, written once per session."""
    from longact.models.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "model", size="xxs", seed=0)


@pytest.fixture(scope="session")
def tiny_tok(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


@pytest.fixture(scope="session")
def sp_tok():
    """A Metaspace (SentencePiece-style) BPE: words are often several tokens and spaces
    attach differently, so the additive length estimate is not exact by construction."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from longact.data import vocab
    from longact.models.tiny import CHAT_TEMPLATE

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    rng = random.Random(0)
    words = vocab.all_words()
    lines = [" ".join(rng.choice(words) for _ in range(50)) for _ in range(200)]
    lines.append(" ".join(list('.,?:()=<>/"\n0123456789')))
    specials = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(lines, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<unk>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast
