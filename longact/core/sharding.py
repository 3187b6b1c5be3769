"""Local row slices of (possibly) FSDP2-sharded tensors, without communication.

FSDP2 (``torch.distributed.fsdp.fully_shard``) stores every parameter, gradient and
optimizer-state tensor as a DTensor placed ``Shard(0)`` on the data-parallel mesh (HSDP:
``(Replicate(), Shard(0))``). A row mask of W_Q / W_K therefore lines up with the shards:
each rank owns rows ``[start, stop)`` of the global tensor and applies that slice of the
mask to ``tensor.to_local()``.

Row offsets follow torch's ``Shard(0)`` chunking (the ``torch.chunk`` rule): with ``n``
rows over ``w`` ranks the chunk size is ``ceil(n / w)``; rank ``r`` owns
``[min(r*cs, n), min((r+1)*cs, n))``, so the last shards may be short or empty. FSDP2 pads
its storage to equal chunks, but the DTensor's local tensor is the unpadded view.
Several mesh dims sharding dim 0 nest in mesh-dim order, like torch's own
``compute_local_shape_and_global_offset``. Other placements of dim 0 raise.
"""

from __future__ import annotations

import torch

try:  # torch.distributed may be absent in minimal builds
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover
    DTensor = None  # type: ignore[assignment,misc]


def is_dtensor(t: torch.Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The rank-local storage of t (t itself for a plain tensor). Call under no_grad so the
    result aliases the DTensor's storage and in-place edits reach it."""
    return t.to_local() if is_dtensor(t) else t


def local_row_range(t: torch.Tensor) -> tuple[int, int]:
    """Global rows [start, stop) of dim 0 held by this rank's local tensor."""
    n_rows = t.shape[0]
    if not is_dtensor(t):
        return 0, n_rows
    mesh, placements = t.device_mesh, t.placements
    coord = mesh.get_coordinate()
    if coord is None:  # this rank is not part of the mesh: it holds nothing
        return 0, 0
    start, size = 0, n_rows
    for mesh_dim, placement in enumerate(placements):
        if isinstance(placement, Replicate):
            continue
        if type(placement) is not Shard:  # _StridedShard, Partial, ...
            raise NotImplementedError(
                f"row masks support Shard/Replicate placements, got {placement!r}"
            )
        if placement.dim != 0:
            continue  # sharding another dim leaves the rows whole
        world = mesh.size(mesh_dim)
        chunk = -(-size // world)  # ceil(size / world)
        lo = min(coord[mesh_dim] * chunk, size)
        hi = min(lo + chunk, size)
        start, size = start + lo, hi - lo
    with torch.no_grad():
        local_rows = local_tensor(t).shape[0]
    if local_rows != size:
        raise RuntimeError(f"local shard has {local_rows} rows, expected {size} from placements")
    return start, start + size
