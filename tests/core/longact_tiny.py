"""Tiny HF decoders built from configs (never downloaded) for the longact.core tests."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen3Config,
    Qwen3MoeConfig,
)

COMMON = {
    "vocab_size": 64,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
}
CONFIGS = {
    "qwen3": Qwen3Config,
    "qwen2": Qwen2Config,
    "llama": LlamaConfig,
    "mistral": MistralConfig,
    "qwen3_moe": Qwen3MoeConfig,
    "qwen2_moe": Qwen2MoeConfig,
    "gemma": GemmaConfig,
    "gemma2": Gemma2Config,
    "gemma3_text": Gemma3TextConfig,
}


def tiny_config(model_type: str = "qwen3", **overrides):
    kw = dict(COMMON)
    if model_type in ("qwen3_moe", "qwen2_moe"):
        kw.update(num_experts=2, num_experts_per_tok=1, moe_intermediate_size=16)
    if model_type == "qwen2_moe":
        kw.update(shared_expert_intermediate_size=16)
    kw.update(overrides)
    return CONFIGS[model_type](**kw)


def tiny_model(model_type: str = "qwen3", seed: int = 0, attn: str = "sdpa", **overrides):
    """fp32 model in training mode, deterministic init."""
    torch.manual_seed(seed)
    cfg = tiny_config(model_type, **overrides)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=torch.float32)
    return model.train()


def token_batch(seed: int, batch: int = 2, seq: int = 8, vocab: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (batch, seq), generator=g)


def runtime_step(rt, model, opt, seed: int, vocab: int = 64, seq: int = 16) -> None:
    """One training step as verl's engine runs it around a ``LongActRuntime``: forward and
    backward, refresh and gradient masking, clipping and the protected optimizer step."""
    ids = torch.randint(0, vocab, (2, seq), generator=torch.Generator().manual_seed(seed))
    model(input_ids=ids, labels=ids).loss.backward()
    rt.before_step()
    with rt.protect():
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    opt.zero_grad()
