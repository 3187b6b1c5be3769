"""One rank of the 2-process FSDP2 test on Phi-3's fused ``qkv_proj`` (gloo, CPU); also
the unsharded reference.

Run by test_core_arch_fsdp2.py as ``python fsdp2_phi3_worker.py OUT_DIR`` with RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT set. The tiny Phi-3 has 2 heads and 2 KV heads of
8 channels: ``qkv_proj.weight`` has 48 rows (q 0-15, k 16-31, v 32-47), so FSDP2's
``Shard(0)`` gives rank 0 rows 0-23 (all of q, half of k) and rank 1 rows 24-47 (the
other half of k and all of v): each shard mixes projections.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from longact.core import RowMaskGuard, build_masks, get_adapter
from longact.models.tiny import TinySize
from longact.models.tiny_arch import tiny_config

SHAPE = TinySize(32, 2, 2, 2, 8, 64, 128)
STEPS = 3
PATHS = ("masked", "snapshot")


def model_and_masks():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("phi3", SHAPE, 64), dtype=torch.float32)
    layout = get_adapter(model).layout(model)
    first = build_masks(None, layout, ratio=0.3, policy="random", seed=1, version=1)
    second = build_masks(None, layout, ratio=0.3, policy="random", seed=2, version=2)
    return model, first, second


def batch(step: int) -> torch.Tensor:
    return torch.randint(1, 64, (2, 8), generator=torch.Generator().manual_seed(step))


def train(sharded: bool, path: str = "snapshot") -> dict[str, torch.Tensor]:
    """3 AdamW steps (weight decay, clipping, one mask refresh); full weights back."""
    model, first, second = model_and_masks()
    model.train()
    if sharded:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    guard = RowMaskGuard(model, first, optimizer=opt, exact_path=path)
    if sharded:
        rank = dist.get_rank()
        qkv = next(t for t in guard.targets if t.name.endswith("0.self_attn.qkv_proj.weight"))
        assert (qkv.start, qkv.stop) == (24 * rank, 24 * rank + 24), (qkv.start, qkv.stop)
        assert model.model.layers[0].self_attn.qkv_proj.weight.to_local().shape == (24, 32)
    for step in range(STEPS):
        if step == 1:
            guard.set_masks(second, opt)
        ids = batch(step)  # the same batch on every rank
        model(input_ids=ids, labels=ids).loss.backward()
        guard.mask_grads()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.05)
        guard.step(opt)
        opt.zero_grad()
    out = {}
    for name, p in model.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name] = full.detach().clone()
    return out


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    out = {path: train(sharded=True, path=path) for path in PATHS}
    if dist.get_rank() == 0:
        torch.save(out, os.path.join(out_dir, "phi3_sharded.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
