"""FSDP2 on Phi-3's fused qkv_proj (2 gloo processes on CPU): each rank's shard mixes q, k
and v rows; the sharded run equals the unsharded one, frozen q/k rows stay bit-identical,
v rows train, and the masked and snapshot exact paths agree bitwise."""

from pathlib import Path

import fsdp2_phi3_worker as worker  # found through conftest's sys.path entry
import pytest
import torch
import torch.distributed as dist
from gloo_ranks import run_ranks

from longact.core import get_adapter
from longact.core.arch import param_mask

HERE = Path(__file__).parent


@pytest.mark.filterwarnings("ignore")
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_phi3_fused_qkv_two_ranks_match_unsharded(tmp_path):
    run_ranks(HERE / "fsdp2_phi3_worker.py", tmp_path)

    sharded = torch.load(tmp_path / "phi3_sharded.pt")
    ref = worker.train(sharded=False)
    init, first, second = worker.model_and_masks()
    ad = get_adapter(init)
    layout = ad.layout(init)
    init = dict(init.named_parameters())
    checked = 0
    for path, got in sharded.items():
        for name, value in ref.items():
            torch.testing.assert_close(got[name], value, atol=1e-6, rtol=0)
            assert torch.equal(got[name], sharded["snapshot"][name]), (path, name)
            ref_p = ad.match_param(name)
            if ref_p is None:
                continue
            sources = ad.param_rows(ref_p, layout, value.shape[0])
            frozen = ~param_mask(sources, first, value.shape[0])
            frozen &= ~param_mask(sources, second, value.shape[0])  # frozen in every step
            assert frozen[:32].any() and not frozen[32:].any()  # q/k rows only; v never
            start = init[name].detach()
            assert torch.equal(got[name][frozen], start[frozen]), (path, name)
            assert (got[name][32:] != start[32:]).any(1).all(), (path, name)  # v rows train
            checked += 1
    assert checked == 2 * len(layout.layers())
