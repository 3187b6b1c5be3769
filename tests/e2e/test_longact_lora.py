"""LongAct with LoRA through ``longact-train`` (CPU, verl's v1 trainer, 2 FSDP2 ranks).

GRPO, ``lora_rank=8`` on all linear layers, 3 steps, masks refreshed every 2 optimizer
steps (versions 1, 1, 2), the adapter synced to the hf rollout unmerged (verl's default:
the server serves it through peft; the rollout's token probabilities match the actor's
at every step). At every step, from the ``lora_adapter/`` LongAct saves beside verl's
shards:

- the adapter loads with peft, and merged into the base its W_Q/W_K differ from the base
  only in rows whose channel was selected at some step so far (``longact/core/lora.py``);
- frozen q/k ``lora_B`` rows are bit-identical to the previous step's, and zero where the
  channel was never selected; the trainable ones, and every other adapter, moved;

then ``longact eval`` scores the last step's adapter.
"""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from e2e_utils import BIN, base_overrides, env, load_weights, masks_at, run, step_metrics

from longact.core.arch import get_adapter, param_mask
from longact.core.lora import ADAPTER_DIR, load_with_adapter
from longact.train.ckpt_read import lora_qk_rows, lora_weights

pytestmark = pytest.mark.slow
STEPS = (1, 2, 3)
PROB_TOL = 1e-4  # fp32 both sides, ~2e-5 measured; the base model alone, ~3e-4 and up


@pytest.fixture(scope="module")
def lora_run(tiny_dir, rl_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora")
    ckpt = out / "ckpt"
    cmd = [
        str(BIN / "longact-train"),
        "recipe=grpo_cpu",
        *base_overrides(tiny_dir, rl_data, ckpt),
        "actor_rollout_ref.model.lora_rank=8",
        "actor_rollout_ref.model.lora_alpha=16",
        "actor_rollout_ref.model.target_modules=all-linear",
        "trainer.total_training_steps=3",
        "trainer.save_freq=1",
        "actor_rollout_ref.actor.optim.lr=3e-2",
        "actor_rollout_ref.actor.checkpoint.save_contents=[model,optimizer,extra]",
        "longact.refresh_interval=2",
    ]
    return out, ckpt, run(cmd, out / "train.log")


def test_lora_steps_keep_frozen_rows_and_merged_weights_in_selected_rows(lora_run, tiny_dir):
    from transformers import AutoConfig

    _, ckpt, log = lora_run
    metrics = step_metrics(log)
    assert [metrics[s]["actor/longact/mask_version"] for s in STEPS] == [1.0, 1.0, 2.0]
    for step in STEPS:  # the rollout served the adapter trained so far (non-zero from step 2)
        diff = metrics[step]["training/rollout_probs_diff_max"]
        assert diff < PROB_TOL, f"step {step}: rollout vs actor probability diff {diff}"
    config = AutoConfig.from_pretrained(tiny_dir)
    adapter = get_adapter(config)
    layout = adapter.layout(config)
    base = load_weights(tiny_dir / "model.safetensors")
    prev = None
    ever = None
    for step in STEPS:
        masks, _ = masks_at(ckpt, step)
        ever = {k: masks[k].clone() if ever is None else ever[k] | masks[k] for k in layout}
        folder = ckpt / f"global_step_{step}" / "actor" / ADAPTER_DIR
        saved = json.loads((folder / "adapter_config.json").read_text())
        assert saved["r"] == 8 and saved["base_model_name_or_path"] == str(tiny_dir)
        cur = lora_weights(ckpt, step)
        qk = lora_qk_rows(cur, config)
        assert sorted({k for rows in qk.values() for k, _ in rows}) == sorted(layout.keys())
        for name, rows in qk.items():
            b, n_rows = cur[name], cur[name].shape[0]
            keep = param_mask(rows, masks, n_rows)
            b0 = prev[name] if prev is not None else torch.zeros_like(b)
            assert torch.equal(b[~keep], b0[~keep]), f"step {step} {name}: a frozen row moved"
            assert (b[keep] != b0[keep]).any(1).all(), f"step {step} {name}: a row did not train"
            never = ~param_mask(rows, ever, n_rows)
            assert never.any() and not b[never].any(), f"{name}: never-selected row not zero"
        others = [n for n in cur if n not in qk]
        assert any(".lora_A." in n for n in others) and any("v_proj" in n for n in others)
        for name in others:
            b0 = prev[name] if prev is not None else None
            if b0 is not None or ".lora_B." in name:  # B starts at zero, A at random
                assert not torch.equal(cur[name], b0 if b0 is not None else 0 * cur[name])
        # merged into the base with peft: W_Q/W_K change only in rows ever selected
        merged = load_with_adapter(folder, tiny_dir, merge=True).state_dict()
        for key in layout:
            name = adapter.param_name(*key)
            rows = dict(adapter.param_rows(adapter.match_param(name), layout, base[name].shape[0]))
            changed = (merged[name][rows[key]] != base[name][rows[key]]).any(1)
            assert changed.any(), f"step {step} {key}: the adapter changed nothing"
            assert not changed[~ever[key]].any(), f"step {step} {key}: a never-selected row"
        prev = cur


def test_longact_eval_runs_on_the_saved_adapter(lora_run):
    out, ckpt, _ = lora_run
    report = out / "eval"
    cmd = [
        str(BIN / "longact"),
        "eval",
        "--model",
        str(ckpt / "global_step_3" / "actor"),
        "--tasks",
        "niah_single",
        "--lengths",
        "96",
        "--n",
        "2",
        "--max-new-tokens",
        "4",
        "--out",
        str(report),
        "--quiet",
    ]
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((report / "results.json").read_text())
    assert results["model"].endswith(ADAPTER_DIR)
    assert len(results["samples"]) == 2
