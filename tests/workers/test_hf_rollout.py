"""The ``hf`` rollout server without Ray: greedy batches with left padding, log-probs
that match a plain forward pass, eos truncation, weight loading and the async path."""

from __future__ import annotations

import asyncio
import types

import pytest
import torch

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*engine is not available:UserWarning"),
    pytest.mark.filterwarnings("ignore:Ray state API:DeprecationWarning"),
]

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13]]  # different lengths: left padding
MAX_NEW = 6


@pytest.fixture
def server(tiny_xxs):
    from verl.workers.config import RolloutConfig

    from longact.workers.hf_rollout import HFRolloutServer

    cfg = RolloutConfig(
        name="hf", prompt_length=64, response_length=8, tensor_model_parallel_size=1
    )
    model_config = types.SimpleNamespace(local_path=str(tiny_xxs), path=str(tiny_xxs))
    return HFRolloutServer(cfg, model_config)


def _greedy(max_tokens=MAX_NEW):
    from longact.workers.hf_rollout import _sampling_key

    return _sampling_key({"temperature": 0.0}, max_tokens)


@torch.no_grad()
def _forward_logprobs(model, prompt, generated):
    ids = torch.tensor([prompt + generated])
    logp = torch.log_softmax(model(ids).logits.float(), dim=-1)[0]  # (T, V)
    pos = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(generated))
    return logp[pos, torch.tensor(generated)]


def _check_logprobs(server, outs):
    for prompt, (toks, logps) in zip(PROMPTS, outs, strict=True):
        assert len(toks) == len(logps) >= 1
        ref = _forward_logprobs(server.model, prompt, toks)
        torch.testing.assert_close(torch.tensor(logps), ref, atol=1e-4, rtol=0)


def test_construction(server, tiny_xxs):
    import json

    gen = json.loads((tiny_xxs / "generation_config.json").read_text())
    assert server.eos_ids == {gen["eos_token_id"]}
    assert server.pad_id == gen["pad_token_id"]
    assert server.max_model_len == 64 + 8
    assert server.device == torch.device("cpu")
    assert not server.model.training


def test_greedy_batch_logprobs_match_forward(server):
    outs = server._generate_batch(_greedy(), PROMPTS)
    assert [len(t) for t, _ in outs] == [MAX_NEW, MAX_NEW]  # a random model: no eos here
    assert all(t not in server.eos_ids for toks, _ in outs for t in toks)
    _check_logprobs(server, outs)
    # greedy is deterministic, and batching does not change a prompt's continuation
    assert server._generate_batch(_greedy(), PROMPTS) == outs
    alone = server._generate_batch(_greedy(), [PROMPTS[1]])[0]
    assert alone[0] == outs[1][0]
    torch.testing.assert_close(torch.tensor(alone[1]), torch.tensor(outs[1][1]), atol=1e-4, rtol=0)
    assert server.num_generated == 5


def test_load_weights_changes_outputs_and_stops_at_eos(server):
    before = server._generate_batch(_greedy(), PROMPTS)
    first = before[0][0][0]  # prompt 0's greedy first token
    (eos,) = server.eos_ids
    emb = server.model.get_input_embeddings().weight
    # make eos's (tied) output row a scaled copy of the winning token's row: eos then wins
    # wherever that token would, so prompt 0 now stops after its first token
    ref = _forward_logprobs(server.model, PROMPTS[0], [first])
    assert float(ref[0]) > -20
    with torch.no_grad():
        logits = server.model(torch.tensor([PROMPTS[0]])).logits[0, -1]
    assert float(logits[first]) > 0, "the scaling trick needs a positive winning logit"
    new_row = emb[first].detach().clone() * 3.0
    state = {"model.embed_tokens.weight": emb.detach().clone()}
    state["model.embed_tokens.weight"][eos] = new_row
    checksum = asyncio.run(server.get_state_checksum())
    assert asyncio.run(server.load_weights(state)) == 1
    assert asyncio.run(server.get_state_checksum()) != checksum
    assert torch.equal(server.model.lm_head.weight[eos], new_row)  # tied alias follows

    after = server._generate_batch(_greedy(), PROMPTS)
    assert after != before
    toks0, logps0 = after[0]
    assert toks0 == [eos] and len(logps0) == 1  # stopped right after eos
    for toks, _ in after:
        if eos in toks:
            assert toks.index(eos) == len(toks) - 1  # nothing kept after eos
    _check_logprobs(server, after)


def test_load_weights_rejects_unknown_names(server):
    checksum = asyncio.run(server.get_state_checksum())
    bad = {
        "model.layers.0.self_attn.q_proj.weight": torch.zeros(64, 64),
        "model.not_a_layer.weight": torch.zeros(3),
    }
    with pytest.raises(KeyError, match="model.not_a_layer.weight"):
        asyncio.run(server.load_weights(bad))
    assert asyncio.run(server.get_state_checksum()) == checksum  # nothing was copied


def test_unmerged_lora_sync_serves_the_adapter(server, tiny_xxs):
    """verl's unmerged LoRA sync: base tensors under ``.base_layer`` names first, then
    the adapter under peft's names; the server then computes what the trained peft
    model computes."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    trained = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_xxs, dtype=torch.float32),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"]),
    ).eval()
    with torch.no_grad():
        for n, p in trained.named_parameters():
            if "lora_B" in n or "embed_tokens" in n:
                p.add_(torch.randn_like(p) * 0.5)
    cfg = trained.peft_config["default"].to_dict()
    base = {
        n.replace("base_model.model.", ""): t.clone()
        for n, t in trained.state_dict().items()
        if "lora_" not in n
    }
    assert any(".base_layer." in n for n in base)
    assert asyncio.run(server.load_weights(base, cfg)) == len(base)
    adapter = get_peft_model_state_dict(trained)
    assert asyncio.run(server.load_weights(adapter, cfg)) == len(adapter)
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        torch.testing.assert_close(server.model(ids).logits, trained(ids).logits)
    _check_logprobs(server, server._generate_batch(_greedy(), PROMPTS))
    with pytest.raises(KeyError, match="LoRA sync: weights not in the served model"):
        asyncio.run(server.load_weights({"model.nope.lora_A.weight": torch.zeros(1)}, cfg))


def test_async_generate_returns_token_output(server):
    from verl.workers.rollout.replica import TokenOutput

    async def run():
        server.global_steps = 3
        a, b = await asyncio.gather(
            server.generate(PROMPTS[0], {"temperature": 0.0, "max_tokens": 4}, "r0"),
            server.generate(PROMPTS[1], {"temperature": 0.0, "max_tokens": 4}, "r1"),
        )
        default = await server.generate(PROMPTS[1], {"temperature": 0.0}, "r2")
        no_lp = await server.generate(PROMPTS[1], {"temperature": 0.0, "logprobs": False}, "r3")
        server._worker.cancel()
        return a, b, default, no_lp

    a, b, default, no_lp = asyncio.run(run())
    for out in (a, b):
        assert isinstance(out, TokenOutput)
        assert 1 <= len(out.token_ids) <= 4
        assert len(out.log_probs) == len(out.token_ids)
        assert out.extra_fields["global_steps"] == 3
    assert len(default.token_ids) == 8  # response_length when max_tokens is not given
    assert default.token_ids[:4] == b.token_ids
    assert no_lp.log_probs is None


def test_generate_rejects_prompt_without_room(server):
    async def run():
        return await server.generate([5] * 72, {"temperature": 0.0}, "too-long")

    with pytest.raises(ValueError, match="max_model_len=72"):
        asyncio.run(run())
