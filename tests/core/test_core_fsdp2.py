"""FSDP2 (fully_shard, 2 gloo processes on CPU): sharded == unsharded, frozen rows exact,
the masked exact path bitwise equal to the snapshot path on the shards."""

from pathlib import Path

import fsdp2_worker  # found through conftest's sys.path entry
import pytest
import torch
import torch.distributed as dist
from gloo_ranks import run_ranks
from longact_tiny import tiny_model

from longact.core import get_adapter

HERE = Path(__file__).parent


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_fsdp2_two_ranks_match_unsharded(tmp_path):
    run_ranks(HERE / "fsdp2_worker.py", tmp_path)

    sharded = torch.load(tmp_path / "sharded.pt")
    assert sharded.keys() == fsdp2_worker.VARIANTS.keys()
    ref = fsdp2_worker.train(sharded=False)  # unsharded, snapshot path
    init = dict(tiny_model("qwen3", seed=0).named_parameters())
    model = tiny_model("qwen3", seed=0)
    ad = get_adapter(model)
    first, second = fsdp2_worker.masks_for(ad.layout(model))
    ref_uneven = fsdp2_worker.train_uneven(sharded=False)
    torch.manual_seed(0)
    init_uneven = dict(fsdp2_worker._Uneven().named_parameters())
    for variant, got in sharded.items():
        assert got["weights"].keys() == ref.keys()
        for name, value in ref.items():
            torch.testing.assert_close(got["weights"][name], value, atol=1e-6, rtol=0)
            # both exact paths do the same arithmetic on the same shards: bitwise equal
            assert torch.equal(got["weights"][name], sharded["snapshot"]["weights"][name])
            ref_p = ad.match_param(name)
            if ref_p is not None:
                frozen = ~first[ref_p.key] & ~second[ref_p.key]  # frozen in every step
                assert frozen.any()
                assert torch.equal(got["weights"][name][frozen], init[name].detach()[frozen])
                assert torch.equal(value[frozen], init[name].detach()[frozen])
        for name, value in ref_uneven.items():
            torch.testing.assert_close(got["uneven"][name], value, atol=1e-6, rtol=0)
        q = got["uneven"]["layers.0.self_attn.q_proj.weight"]
        q0 = init_uneven["layers.0.self_attn.q_proj.weight"].detach()
        assert torch.equal(q[[1, 2, 4]], q0[[1, 2, 4]]) and not torch.equal(q[[0, 3]], q0[[0, 3]])
        k = got["uneven"]["layers.0.self_attn.k_proj.weight"]
        assert torch.equal(k, init_uneven["layers.0.self_attn.k_proj.weight"].detach()), variant
