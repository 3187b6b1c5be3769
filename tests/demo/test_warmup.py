"""The supervised warm-up stage (verl's SFT trainer under torchrun, FSDP2 on gloo).

A very short warm-up checks the mechanism, not the number: after it, the model puts
more probability on the correct answers of held-out prompts than before, and its
checkpoint loads as a plain HF model. verl's SFT trainer runs through LongAct's engine
class (registered for the CPU) and stays stock verl: LongAct is off without its section.
"""

from __future__ import annotations

import re

import pytest
import torch

from longact.demo.pipeline import load_config, stage_data, stage_sft

pytestmark = pytest.mark.slow


def _answer_logprob(model_dir, rows) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    total = 0.0
    for row in rows:
        prompt = tok.apply_chat_template(
            [dict(m) for m in row["prompt"]], add_generation_prompt=True, tokenize=False
        )
        p_ids = tok(prompt)["input_ids"]
        a_ids = tok(row["extra_info"]["answer"] + "<|im_end|>")["input_ids"]
        ids = torch.tensor([p_ids + a_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        targets = ids[0, 1:]
        picked = logp.gather(1, targets[:, None])[:, 0]
        total += float(picked[len(p_ids) - 1 :].sum())
    return total / len(rows)


def test_short_warmup_raises_answer_likelihood(tmp_path):
    from longact.data.tasks import make_dataset
    from longact.models.tiny import write_tiny_model

    cfg = load_config(
        [
            "sft.steps=40",
            "sft.ranks=1",
            "sft.samples_per_length=80",
            "sft.lengths=[64]",
            "rl.train_samples=8",
            "rl.val_samples=4",
            "rl.train_length=96",
        ]
    )
    model = write_tiny_model(tmp_path / "model", size="xxs", seed=0)
    data = tmp_path / "data"
    data.mkdir()
    stage_data(cfg, model, data)
    out = tmp_path / "sft"
    out.mkdir()
    result = stage_sft(cfg, model, data / "sft.parquet", out)
    trained = out / result["model"]
    held_out = make_dataset("niah_single", model, 64, 8, seed=99, **cfg["task"]["options"])
    before, after = _answer_logprob(model, held_out), _answer_logprob(trained, held_out)
    assert after > before + 1.0, (before, after)
    # verl's own SFT trainer, with LongAct installed (its engine class serves verl's
    # SFT engine too), trains as stock verl: no LongAct metric in its log
    log = (out / "sft.log").read_text(errors="replace")
    assert "loss" in log and not re.search(r"longact/\w+:", log)
