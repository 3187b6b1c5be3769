"""Masks: rounding, policies, scores, granularities (GQA, rope pairs, heads), MaskSet."""

import pytest
import torch

from longact.core.arch import QKLayout
from longact.core.masks import (
    GRANULARITIES,
    POLICIES,
    SCORES,
    MaskSet,
    build_masks,
    mask_memory_bytes,
    n_keep,
    select_rows,
)
from longact.core.stats import QKStats


def _rows(scores, ratio, policy="topk", granularity="channel", head_dim=None):
    s = torch.tensor(scores, dtype=torch.float64)
    head_dim = head_dim or s.numel()
    return select_rows(
        s, s.numel(), head_dim, ratio=ratio, policy=policy, granularity=granularity
    ).tolist()


@pytest.mark.parametrize(
    ("ratio", "units", "kept"),
    [
        (0.3, 32, 10),  # 9.6
        (0.3, 16, 5),  # 4.8 (Qwen3-like K rows)
        (0.3, 5, 2),  # 1.5 -> round half up
        (0.5, 5, 3),  # 2.5 -> 3 (not banker's 2)
        (0.35, 10, 4),  # 3.5 despite float error
        (0.3, 4, 1),  # 1.2
        (0.3, 8, 2),  # 2.4
        (0.01, 8, 1),  # at least one unit
        (1.0, 7, 7),
    ],
)
def test_n_keep_rounding(ratio, units, kept):
    assert n_keep(ratio, units) == kept


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan")])
def test_ratio_out_of_range(bad):
    with pytest.raises(ValueError, match=r"\(0, 1\], got") as err:
        build_masks(None, QKLayout(1, 4, 2, 1), ratio=bad, policy="random")
    assert repr(bad) in str(err.value)


def test_topk_bottomk_by_hand_with_ties():
    scores = [1, 5, 3, 5, 0, 2]
    assert _rows(scores, 0.5) == [False, True, True, True, False, False]
    assert _rows(scores, 1 / 3) == [False, True, False, True, False, False]
    assert _rows(scores, 0.5, "bottomk") == [True, False, False, False, True, True]
    assert _rows([2, 2, 2, 2], 0.5) == [True, True, False, False]  # ties: lower index
    assert _rows([2, 2, 2, 2], 0.5, "bottomk") == [True, True, False, False]
    assert _rows(scores, 0.3, "full") == [True] * 6


def test_rope_pair_granularity_by_hand():
    # head_dim 4, 2 heads: pairs (0,2) (1,3) (4,6) (5,7); pair scores 5, 0, 0, 4
    scores = [1, 0, 9, 0, 0, 4, 0, 4]
    got = _rows(scores, 0.5, granularity="rope_pair", head_dim=4)
    assert got == [True, False, True, False, False, True, False, True]
    # 0.3 of 4 pairs = 1.2 -> 1 pair: the best one, (0, 2)
    got = _rows(scores, 0.3, granularity="rope_pair", head_dim=4)
    assert got == [True, False, True, False, False, False, False, False]
    with pytest.raises(ValueError, match="even head_dim"):
        _rows([1.0] * 6, 0.5, granularity="rope_pair", head_dim=3)


def test_head_granularity_by_hand():
    # 3 heads of 2: head means 1.5, 3.5, 2.0 -> 0.3 * 3 = 0.9 -> 1 head
    scores = [1, 2, 3, 4, 0, 4]
    f, t = False, True
    assert _rows(scores, 0.3, granularity="head", head_dim=2) == [f, f, t, t, f, f]
    assert _rows(scores, 0.5, granularity="head", head_dim=2) == [f, f, t, t, t, t]  # 1.5 -> 2
    assert _rows(scores, 0.5, "bottomk", granularity="head", head_dim=2) == [t, t, f, f, t, t]


def _stats(layout, fill):
    st = QKStats.empty(layout.row_counts())
    for key in layout:
        st.update(key, fill(key).reshape(1, -1))
    return st


def test_gqa_k_mask_over_k_channels():
    layout = QKLayout(num_layers=2, head_dim=4, num_attention_heads=4, num_key_value_heads=2)

    def fill(key):  # q: channel c scores c; k: reversed, so K cannot be copied from Q
        n = layout.rows(key[1])
        return torch.arange(n, dtype=torch.float32) * (1 if key[1] == "q" else -1) + n

    masks = build_masks(_stats(layout, fill), layout, ratio=0.3)
    assert masks[(0, "q")].shape == (16,) and masks[(0, "k")].shape == (8,)
    assert masks[(0, "q")].nonzero().flatten().tolist() == [11, 12, 13, 14, 15]  # 4.8 -> 5
    assert masks[(1, "k")].nonzero().flatten().tolist() == [0, 1]  # 2.4 -> 2
    heads = build_masks(_stats(layout, fill), layout, ratio=0.3, granularity="head")
    assert heads[(0, "q")].nonzero().flatten().tolist() == [12, 13, 14, 15]  # 1.2 -> 1 head
    assert heads[(0, "k")].nonzero().flatten().tolist() == [0, 1, 2, 3]  # 0.6 -> 1 head
    assert masks.meta["policy"] == "topk" and masks.version == 0


def test_scores_pick_differently():
    layout = QKLayout(1, 2, 1, 1)
    st = QKStats()
    x = torch.tensor([[10.0, 3.0], [0, 3.0], [0, 3.0], [0, 3.0]])  # mean |x| 2.5 vs 3
    for key in layout:
        st.update(key, x)
    pick = {
        name: build_masks(st, layout, ratio=0.5, score=name)[(0, "q")].tolist()
        for name in ("mean_abs", "rms", "max_abs")
    }
    assert pick == {"mean_abs": [False, True], "rms": [True, False], "max_abs": [True, False]}


def test_random_is_seeded_and_exact_in_count():
    layout = QKLayout(2, 8, 4, 2)
    a = build_masks(None, layout, ratio=0.3, policy="random", seed=3)
    b = build_masks(None, layout, ratio=0.3, policy="random", seed=3)
    c = build_masks(None, layout, ratio=0.3, policy="random", seed=4)
    assert all(torch.equal(a[k], b[k]) for k in layout)
    assert any(not torch.equal(a[k], c[k]) for k in layout)
    assert not torch.equal(a[(0, "q")], a[(1, "q")])
    assert all(int(a[(i, "q")].sum()) == 10 and int(a[(i, "k")].sum()) == 5 for i in range(2))
    pairs = build_masks(None, layout, ratio=0.5, policy="random", granularity="rope_pair")
    q = pairs[(0, "q")].reshape(4, 2, 4)
    assert torch.equal(q[:, 0], q[:, 1])  # partners move together


def test_unknown_names_list_valid():
    layout = QKLayout(1, 4, 2, 1)
    for kw, valid in (
        ({"policy": "top"}, POLICIES),
        ({"score": "l2"}, SCORES),
        ({"granularity": "block"}, GRANULARITIES),
    ):
        with pytest.raises(ValueError, match="valid: ") as err:
            build_masks(None, layout, **kw)
        assert all(name in str(err.value) for name in valid.names())
    with pytest.raises(ValueError, match="needs activation statistics"):
        build_masks(None, layout, policy="topk")
    with pytest.raises(ValueError, match="needs activation statistics"):
        build_masks(QKStats.empty(layout.row_counts()), layout, policy="bottomk")
    with pytest.raises(ValueError, match="non-finite"):
        _rows([1.0, float("nan")], 0.5)


def test_maskset_metrics_by_hand():
    a = MaskSet({(0, "q"): [True, True, False, False], (0, "k"): [True, False]}, version=2)
    b = MaskSet({(0, "q"): [False, True, True, False], (0, "k"): [True, False]})
    assert a.kept_fraction() == pytest.approx(3 / 6)
    assert a.kept_fraction(per_key=True) == {(0, "k"): 0.5, (0, "q"): 0.5}
    assert a.jaccard(b) == pytest.approx((1 + 1) / (3 + 1))
    assert a.jaccard(b, per_key=True) == {(0, "k"): 1.0, (0, "q"): pytest.approx(1 / 3)}
    st = QKStats()
    st.update((0, "q"), torch.tensor([[4.0, -3.0, 2.0, 1.0]]))
    st.update((0, "k"), torch.tensor([[1.0, 3.0]]))
    assert a.mass_kept(st) == pytest.approx((7 + 1) / (10 + 4))
    assert a.mass_kept(st, per_key=True)[(0, "q")] == pytest.approx(0.7)
    back = MaskSet.from_state_dict(a.state_dict())
    assert back.version == 2 and all(torch.equal(back[k], a[k]) for k in a)
    with pytest.raises(ValueError, match="different"):
        a.jaccard(MaskSet({(0, "q"): [True] * 4}))
    with pytest.raises(ValueError, match="1-D"):
        MaskSet({(0, "q"): torch.ones(2, 2, dtype=torch.bool)})
    full = MaskSet.full(QKLayout(1, 2, 2, 1))
    assert full.kept_fraction() == 1.0 and full[(0, "k")].shape == (2,)


def test_qwen3_8b_mask_memory():
    layout = QKLayout(num_layers=36, head_dim=128, num_attention_heads=32, num_key_value_heads=8)
    n_bytes = mask_memory_bytes(layout)
    assert n_bytes == 36 * (32 * 128 + 8 * 128) == 184_320
    assert n_bytes == MaskSet.full(layout).memory_bytes() == mask_memory_bytes([4096, 1024] * 36)
    fraction = n_bytes / (8.2e9 * 2)  # bf16 parameters
    assert fraction == pytest.approx(1.124e-5, rel=1e-3)


@pytest.mark.parametrize("policy", ["topk", "bottomk"])
@pytest.mark.parametrize("granularity", ["channel", "rope_pair", "head"])
def test_one_sort_per_projection_matches_key_by_key(policy, granularity):
    """build_masks sorts all layers of a projection at once; each mask is the one
    select_rows picks for its key alone, ties (to the lower index) included."""
    from longact.core.masks import select_rows
    from longact.core.stats import ChannelStats

    layout = QKLayout(num_layers=3, head_dim=8, num_attention_heads=4, num_key_value_heads=2)
    g = torch.Generator().manual_seed(1)
    entries = {}
    for key, c in layout.row_counts().items():
        mean = torch.randint(0, 4, (c,), generator=g).double()  # many ties
        entries[key] = ChannelStats(torch.tensor(10.0, dtype=torch.float64), sum_abs=mean * 10)
    stats = QKStats(entries)
    got = build_masks(stats, layout, ratio=0.3, policy=policy, granularity=granularity)
    for key in layout:
        want = select_rows(
            stats[key].score("mean_abs"),
            layout.rows(key[1]),
            layout.head_dim,
            ratio=0.3,
            policy=policy,
            granularity=granularity,
            key=key,
        )
        assert torch.equal(got[key], want), key
