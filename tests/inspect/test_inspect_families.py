"""``inspect_model`` on a tiny model of every supported family: heatmaps are written,
hybrid layers are left out, per-key geometry survives the JSON round trip."""

from __future__ import annotations

import json

import pytest

from longact.inspect import inspect_model, write_outputs
from longact.inspect.analysis import layout_of, mask_set
from longact.models.tiny_arch import ARCHS

PNG = b"\x89PNG\r\n\x1a\n"
ROWS = [
    {"prompt": [{"role": "user", "content": "the fox ran to the old house by the river"}]},
    {"prompt": [{"role": "user", "content": "VAR A = 1"}]},
]


@pytest.fixture(scope="module")
def family_models(tmp_path_factory):
    from longact.models.tiny import write_tiny_model

    root = tmp_path_factory.mktemp("families")
    return {arch: write_tiny_model(root / arch, "xxs", 0, arch=arch) for arch in ARCHS.names()}


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("arch", ARCHS.names())
def test_inspect_writes_heatmaps(family_models, arch, tmp_path):
    res = inspect_model(family_models[arch], ROWS, n=2, batch_size=2, granularity="rope_pair")
    files = write_outputs(res, tmp_path / arch)
    assert open(files["heatmaps"], "rb").read(8) == PNG
    saved = json.loads(open(files["json"]).read())
    layout = layout_of(saved)
    assert {(r["layer"], r["proj"]) for r in saved["keys"]} == set(layout.keys())
    for key in layout:
        mask = mask_set(saved)[key]
        assert mask.numel() == layout.geom(key).rows
        pairs = layout.geom(key).pairs()
        assert (mask[pairs[:, 0]] == mask[pairs[:, 1]]).all()  # rope_pair kept pairs whole
    if arch.startswith("qwen3_") or arch == "qwen3_next":
        assert layout.layers() == [1]  # layer 0 is linear attention: not inspected
    assert all(0.0 <= r["low_freq_top30"] <= 1.0 for r in saved["keys"])
