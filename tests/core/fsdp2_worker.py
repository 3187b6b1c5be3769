"""One rank of the 2-process FSDP2 (gloo, CPU) test; also the unsharded reference.

Run by test_core_fsdp2.py as ``python fsdp2_worker.py OUT_DIR`` with RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT set; ``train(sharded=False)`` is the single-process reference.
The sharded run trains once per ``VARIANTS`` entry: RowMaskGuard's masked path (AdamW
on DTensors, single-tensor and foreach) and its snapshot path.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

from longact_tiny import tiny_model, token_batch

from longact.core import (
    ChannelStats,
    MaskSet,
    QKStats,
    RowMaskGuard,
    build_masks,
    get_adapter,
    local_row_range,
)
from longact.core.exact_update import param_state

STEPS = 3
VARIANTS = {  # name: (exact path, AdamW's foreach)
    "masked": ("masked", None),
    "masked_foreach": ("masked", True),
    "snapshot": ("snapshot", None),
}


def masks_for(layout):
    first = build_masks(None, layout, ratio=0.3, policy="random", seed=1, version=1)
    second = build_masks(None, layout, ratio=0.3, policy="random", seed=2, version=2)
    return first, second


def train(
    sharded: bool, path: str = "snapshot", foreach: bool | None = None
) -> dict[str, torch.Tensor]:
    """3 AdamW steps (weight decay, clipping, one mask refresh); full weights back."""
    model = tiny_model("qwen3", seed=0)
    layout = get_adapter(model).layout(model)
    first, second = masks_for(layout)
    if sharded:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, foreach=foreach)
    guard = RowMaskGuard(model, first, optimizer=opt, exact_path=path)
    if sharded:  # really sharded: each rank holds its half of the rows
        rank = dist.get_rank()
        spans = {t.name: (t.start, t.stop) for t in guard.targets}
        assert spans["model.layers.0.self_attn.q_proj.weight"] == (16 * rank, 16 * rank + 16)
        assert spans["model.layers.1.self_attn.k_proj.weight"] == (8 * rank, 8 * rank + 8)
        assert model.model.layers[0].self_attn.q_proj.weight.to_local().shape == (16, 32)
    for step in range(STEPS):
        if step == 1:
            guard.set_masks(second, opt)
        ids = token_batch(step, 2, 8)  # the same batch on every rank
        model(input_ids=ids, labels=ids).loss.backward()
        guard.mask_grads()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.05)
        guard.step(opt)
        opt.zero_grad()
        assert opt.param_groups[0]["weight_decay"] == 0.1
        if path == "masked":  # frozen rows' moments stay zero on this rank's shard
            for t in guard.targets:
                for v in param_state(opt, t.param).values():
                    local = v.to_local() if sharded else v
                    assert not local[t.frozen].any(), (step, t.name)
    out = {}
    for name, p in model.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name] = full.detach().clone()
    return out


class _Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(4, 5)  # 5 rows over 2 ranks: 3 + 2
        self.k_proj = nn.Linear(4, 1)  # 1 row: rank 1 holds none


class _Uneven(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Module()])
        self.layers[0].self_attn = _Attn()

    def forward(self, x):
        attn = self.layers[0].self_attn
        return attn.q_proj(x).square().sum() + attn.k_proj(x).sum()


def train_uneven(sharded: bool, path: str = "snapshot") -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = _Uneven()
    masks = MaskSet({(0, "q"): [True, False, False, True, False], (0, "k"): [False]})
    if sharded:
        from torch.distributed.fsdp import fully_shard

        fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    guard = RowMaskGuard(model, masks, adapter=get_adapter("llama"), optimizer=opt, exact_path=path)
    if sharded:
        spans = sorted((t.name, t.start, t.stop) for t in guard.targets)
        expected = [[(0, 1), (0, 1), (0, 3), (0, 3)], [(1, 1), (1, 1), (3, 5), (3, 5)]]
        assert [s[1:] for s in spans] == expected[dist.get_rank()], spans
    for step in range(2):
        model(torch.full((3, 4), float(step + 1))).backward()
        guard.mask_grads()
        guard.step(opt)
        opt.zero_grad()
    return {
        n: (p.full_tensor() if sharded else p).detach().clone() for n, p in model.named_parameters()
    }


def check_offsets(rank: int, world: int) -> None:
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    for rows in (5, 1, 8):
        full = torch.arange(rows * 3, dtype=torch.float32).reshape(rows, 3)
        dt = distribute_tensor(full, mesh, [Shard(0)])
        start, stop = local_row_range(dt)
        assert torch.equal(dt.to_local(), full[start:stop]), (rows, rank, start, stop)
        assert (start, stop) == {5: [(0, 3), (3, 5)], 1: [(0, 1), (1, 1)], 8: [(0, 4), (4, 8)]}[
            rows
        ][rank]


def check_stats_all_reduce(rank: int, world: int) -> None:
    xs = [torch.randn(4 + r, 6, generator=torch.Generator().manual_seed(r)) for r in range(world)]
    mine = QKStats.empty({(0, "q"): 6, (1, "k"): 6})
    mine.update((0, "q"), xs[rank])  # (1, "k") stays empty on every rank
    reduced = mine.all_reduce()
    ref = ChannelStats.of(torch.cat(xs))
    for f in ("count", "sum_abs", "sum_sq", "max_abs"):
        torch.testing.assert_close(getattr(reduced[(0, "q")], f), getattr(ref, f))
    assert reduced.token_count((1, "k")) == 0


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    check_offsets(rank, world)
    check_stats_all_reduce(rank, world)
    out = {}
    for name, (path, foreach) in VARIANTS.items():
        out[name] = {
            "weights": train(sharded=True, path=path, foreach=foreach),
            "uneven": train_uneven(sharded=True, path=path),
        }
    if rank == 0:
        torch.save(out, os.path.join(out_dir, "sharded.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
