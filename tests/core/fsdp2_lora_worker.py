"""One rank of the 2-process FSDP2 (gloo, CPU) LoRA test (``test_core_lora.py``).

``python fsdp2_lora_worker.py OUT_DIR`` with RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
set. A tiny qwen3 with a peft LoRA adapter on all linear layers, sharded like verl's
FSDP2 engine does it (each decoder layer, then the root), trains 3 AdamW steps under a
RowMaskGuard on the masked path with one mask refresh (``train``, also the test's unsharded
reference), then:

- ``save_adapter`` gathers the adapter from both ranks' shards (rank 0 writes it);
- verl's merged weight sync (``model.lora.merge=true``: ``merged_lora_context`` and
  ``normalize_peft_param_name``, each tensor gathered with ``full_tensor``) is collected
  on rank 0 into ``OUT_DIR/merged.pt``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))

from longact_tiny import tiny_model, token_batch

from longact.core import RowMaskGuard, build_masks, get_adapter
from longact.core.lora import check_model, save_adapter


def lora_model():
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    return get_peft_model(tiny_model("qwen3", seed=0), config)


def masks_for(layout):
    first = build_masks(None, layout, ratio=0.3, policy="random", seed=1, version=1)
    second = build_masks(None, layout, ratio=0.3, policy="random", seed=2, version=2)
    return first, second


def train(model, first, second) -> RowMaskGuard:
    """3 AdamW steps (weight decay, clipping) on the masked path, a refresh after step 1."""
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=1e-2, weight_decay=0.1)
    guard = RowMaskGuard(model, first, optimizer=opt, exact_path="masked")
    for step in range(3):
        if step == 1:
            guard.set_masks(second, opt)
        ids = token_batch(step, 2, 8)  # the same batch on every rank
        model(input_ids=ids, labels=ids).loss.backward()
        guard.mask_grads()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        guard.step(opt)
        opt.zero_grad()
    return guard


def main(out: Path) -> None:
    from torch.distributed.fsdp import fully_shard
    from verl.utils.fsdp_utils import merged_lora_context, normalize_peft_param_name

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = lora_model()
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    adapter = get_adapter(model)
    assert check_model(model, adapter)["rank"] == 4  # the zero-B check agrees across ranks
    guard = train(model, *masks_for(adapter.layout(model)))
    spans = {t.name.split(".layers.")[-1]: (t.start, t.stop) for t in guard.targets}
    # q lora_B: 32 rows, each rank holds its half
    assert spans["0.self_attn.q_proj.lora_B.default.weight"] == (16 * rank, 16 * rank + 16)
    save_adapter(model, out / "lora_adapter", write=rank == 0, base="tiny")
    with torch.no_grad(), merged_lora_context(model, backup_adapters=True):
        merged = {
            n: (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()
            for n, t in normalize_peft_param_name(model.state_dict()).items()
        }
    if rank == 0:
        torch.save(merged, out / "merged.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(Path(sys.argv[1]))
