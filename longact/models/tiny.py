"""Tiny models of every supported family and an offline tokenizer: the CPU default.

``write_tiny_model(out, size, seed, arch="qwen3")`` writes a directory that loads with
``AutoModelForCausalLM`` / ``AutoTokenizer`` (and, for Qwen3, with verl):

- a byte-level BPE tokenizer trained here, on text built from the task word lists
  (``longact.data.vocab``), so no download is needed. It can encode any text (byte
  fallback, like Qwen's own tokenizer), keeps digits one token each, makes ``"\\n"``
  a single token (verl's chat-token builder requires it), and carries a ChatML chat
  template with ``<|im_end|>`` as eos and ``<|endoftext|>`` as pad;
- a model built from a config (Qwen3 by default: q_norm / k_norm, GQA, RoPE, tied
  embeddings; other families: ``longact.models.tiny_arch``), initialized from a seed:
  the same seed gives byte-identical weights.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from longact.data import vocab
from longact.registry import Registry

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
PAD, BOS_TURN, EOS = SPECIAL_TOKENS
BPE_VOCAB_SIZE = 2048

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@dataclass(frozen=True)
class TinySize:
    """Shape of a tiny model of any family (all fp32, tied embeddings)."""

    hidden_size: int
    """Model width."""
    num_hidden_layers: int
    """Decoder layers."""
    num_attention_heads: int
    """Query heads."""
    num_key_value_heads: int
    """Key/value heads (GQA when fewer than query heads)."""
    head_dim: int
    """Channels per head; q_proj has num_attention_heads * head_dim output rows."""
    intermediate_size: int
    """MLP width."""
    max_position_embeddings: int = 8192
    """Longest context the RoPE tables are built for."""


SIZES: Registry[TinySize] = Registry("tiny-model size")
SIZES.add("xxs", TinySize(64, 2, 4, 2, 16, 128))  # ~0.19M: unit tests
SIZES.add("xs", TinySize(128, 2, 4, 2, 32, 512))  # ~0.73M: demo and experiments
SIZES.add("s", TinySize(256, 4, 4, 2, 64, 1024))  # ~4.4M: slower, more capacity


def _training_corpus(seed: int = 0) -> list[str]:
    """Lines of text in which each task word is frequent in the form the tasks use it.

    Lower-case words with a leading space dominate haystacks; format words also appear
    capitalized (sentence starts, with and without a leading space); variable names
    are upper case.
    """
    rng = random.Random(seed)
    words = vocab.FILLER + vocab.KEYS + vocab.VALUES + vocab.FORMAT_WORDS
    lines = []
    for _ in range(30):
        shuffled = words[:]
        rng.shuffle(shuffled)
        lines.append(" ".join(shuffled))
        variables = vocab.VARIABLES[:]
        rng.shuffle(variables)
        lines.append(" ".join(f"VAR {v} = VAR {w}" for v, w in zip(variables, variables[1:])))
    capitalized = sorted({w.capitalize() for w in vocab.FORMAT_WORDS + vocab.FILLER[:120]})
    for _ in range(6):
        rng.shuffle(capitalized)
        lines.append(". ".join(capitalized))
        lines.extend(capitalized)  # at the start of a line: no leading space
    lines += [" ".join(vocab.SYMBOLS + vocab.DIGITS)] * 10
    return lines


def build_tokenizer():
    """Train the byte-level BPE tokenizer (deterministic) and wrap it for transformers."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Split words (with their leading space), single digits, newlines and symbols, then
    # map bytes to printable characters as GPT-2/Qwen do.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(
                Regex(r" ?[A-Za-z]+|\d| ?[^\sA-Za-z\d]+|\n|[ \t]+"), behavior="isolated"
            ),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=None,
        model_max_length=SIZES.get("xs").max_position_embeddings,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(
    size: str = "xs",
    vocab_size: int = BPE_VOCAB_SIZE,
    seed: int = 0,
    arch: str = "qwen3",
    eos_id: int = 0,
):
    """A freshly initialized causal LM of family ``arch`` and the named size (fp32, CPU)."""
    from transformers import AutoModelForCausalLM

    from longact.models.tiny_arch import tiny_config

    config = tiny_config(arch, SIZES.get(size), vocab_size, eos_id=eos_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.to(torch.float32)
    return model


def write_tiny_model(
    out: str | Path, size: str = "xs", seed: int = 0, arch: str = "qwen3", vocab_multiple: int = 64
) -> Path:
    """Write tokenizer + model of family ``arch`` to ``out`` and return the path.

    The embedding table is padded to a multiple of ``vocab_multiple`` rows, as released
    models pad theirs. verl's vLLM rollout bans the padded ids (no tokenizer id maps to
    them), so its log-probs are normalized over the tokenizer's ids while the actor's are
    over the whole table: on an untrained model the two differ by about
    ``log(table / tokenizer)`` (0.007 for xs at 64). ``vocab_multiple=1`` leaves no
    padding, for checks that compare the two at fp32 tolerance.
    """
    from longact.models.tiny_arch import ARCHS

    SIZES.get(size), ARCHS.get(arch)  # validate before touching the disk
    if not isinstance(vocab_multiple, int) or vocab_multiple < 1:
        raise ValueError(f"vocab_multiple={vocab_multiple!r}: must be an integer >= 1")
    out = Path(out)
    tokenizer = build_tokenizer()
    vocab_size = -(-len(tokenizer) // vocab_multiple) * vocab_multiple
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    pad_id = tokenizer.convert_tokens_to_ids(PAD)
    model = build_model(size, vocab_size, seed, arch, eos_id=eos_id)
    model.config.eos_token_id = eos_id
    model.config.pad_token_id = pad_id
    model.config.bos_token_id = None
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = pad_id
    model.generation_config.bos_token_id = None
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    n_params = sum(p.numel() for p in model.parameters())
    (out / "longact_tiny.json").write_text(
        json.dumps({"arch": arch, "size": size, "seed": seed, "parameters": n_params}, indent=2)
        + "\n"
    )
    return out
