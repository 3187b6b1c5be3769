"""LongActRuntime (in-process coordinator) on families whose W_Q/W_K rows are not whole
parameters or whose layers differ: refreshes run, frozen rows stay bit-identical."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from longact.core.arch import get_adapter, param_mask
from longact.distributed.coordinator import SaliencyCoordinator
from longact.models.tiny import TinySize
from longact.models.tiny_arch import ATTN, tiny_config
from longact.train.runtime import LongActRuntime

SHAPE = TinySize(32, 4, 4, 2, 8, 64, 128)  # 4 layers: hybrids and KV sharing show
CFG = {"ratio": 0.25, "policy": "topk", "score": "mean_abs", "refresh_interval": 2}


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("arch", ["phi3", "qwen3_5", "gemma4", "smollm3"])
def test_runtime_refreshes_and_keeps_frozen_rows(arch):
    torch.manual_seed(0)
    cfg = tiny_config(arch, SHAPE, 64)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=ATTN.get(arch, "sdpa"))
    model.float().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ad = get_adapter(model)
    layout = ad.layout(model)
    rt = LongActRuntime(model, opt, CFG, coordinator=SaliencyCoordinator(CFG, layout, 1))
    for step in range(1, 5):
        before = {k: v.detach().clone() for k, v in model.named_parameters()}
        ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(step))
        model(input_ids=ids, labels=ids).loss.backward()
        rt.before_step()
        with rt.protect():
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        opt.zero_grad()
        for name, ref, p in ad.qk_params(model):
            keep = param_mask(ad.param_rows(ref, layout, p.shape[0]), rt.guard.masks, p.shape[0])
            assert torch.equal(p[~keep], before[name][~keep]), (step, name)
            assert (p[keep] != before[name][keep]).any(), (step, name)
    assert rt.version == 2
