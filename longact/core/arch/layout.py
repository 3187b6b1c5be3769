"""Q/K geometry without a model: which (layer, proj) keys exist, their heads, head_dim, RoPE.

A key ``(layer, "q" | "k")`` names the query or key channels of one decoder layer that
LongAct applies to. Its :class:`ProjGeom` gives ``heads`` x ``head_dim`` channels (C =
heads*head_dim; channel ``h*D + j`` is channel ``j`` of head ``h``) and the :class:`Rope`
of that layer. Channels are ordered as the attention code sees them after splitting the
projection output into heads; where they sit in a weight is the adapter's business
(``ArchAdapter.channel_rows``).

:class:`QKLayout` maps keys to geometries. ``QKLayout(num_layers, head_dim, n_heads,
n_kv_heads)`` is the uniform layout (every layer has q and k with full rotate-half
RoPE); ``QKLayout(num_layers, keys={...})`` any other: hybrid models skip layers
(Qwen3.5's linear attention), some layers have no K (Gemma 4's KV-sharing layers) or a
different head_dim (Gemma 4's global layers).

RoPE pairing (:class:`Rope`), per head of D channels, the first ``rotary_dim`` rotated:

- ``half`` (rotate-half / NeoX; every supported family, checked against each family's
  ``apply_rotary_pos_emb`` in transformers 5.10): channel ``j < R/2`` turns with
  ``j + R/2`` at frequency index ``j``; R = rotary_dim.
- ``none``: the layer applies no RoPE (SmolLM3's NoPE layers); nothing is paired.

Channels ``j >= rotary_dim`` (partial rotary) pass through unrotated. ``n_freqs`` is how
many frequency indices are non-zero: Gemma 4's "proportional" RoPE rotates the whole head
but gives the last pairs frequency 0. A rope_pair *unit* is a rotation pair; an
unrotated channel is a unit of its own.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch

PROJS = ("q", "k")
Key = tuple[int, str]  # (layer index, "q" | "k")
ROPE_STYLES = ("half", "none")


def key_str(key: Key) -> str:
    """(3, "q") -> "3.q" (used in state dicts)."""
    return f"{key[0]}.{key[1]}"


def parse_key(text: str) -> Key:
    layer, proj = text.split(".")
    return int(layer), proj


@dataclass(frozen=True)
class Rope:
    """How RoPE pairs the D channels of one head (see module docstring)."""

    style: str = "half"
    rotary_dim: int | None = None  # channels per head that are rotated; None: all D
    n_freqs: int | None = None  # non-zero frequency indices; None: rotary_dim / 2

    def __post_init__(self) -> None:
        if self.style not in ROPE_STYLES:
            raise ValueError(f"unknown RoPE style {self.style!r}; valid: {', '.join(ROPE_STYLES)}")

    def rotated(self, head_dim: int) -> int:
        """R: channels per head the rotation touches (0 without RoPE)."""
        if self.style == "none":
            return 0
        r = head_dim if self.rotary_dim is None else self.rotary_dim
        if r % 2 or not 0 < r <= head_dim:
            raise ValueError(f"rotary_dim must be even and in (0, {head_dim}], got {r}")
        return r

    def freqs(self, head_dim: int) -> int:
        r = self.rotated(head_dim)
        return r // 2 if self.n_freqs is None else min(self.n_freqs, r // 2)

    def head_units(self, head_dim: int) -> torch.Tensor:
        """(D,) long: the rope_pair unit of each channel of a head (partners share one),
        numbered 0..U-1 in order of first channel; unrotated channels come last."""
        r = self.rotated(head_dim)
        j = torch.arange(head_dim)
        return torch.where(j < r, j % max(1, r // 2), r // 2 + (j - r))

    def pairs(self, head_dim: int) -> torch.Tensor:
        """(R/2, 2) long: the rotation partners within a head, ordered by frequency."""
        i = torch.arange(self.rotated(head_dim) // 2)
        return torch.stack([i, i + i.numel()], dim=1)

    def freq_index(self, head_dim: int) -> torch.Tensor:
        """(D,) float: frequency index of each channel scaled to [0, 1) (0 = the fastest
        turning pair); 1.0 for channels that never turn (unrotated or frequency 0)."""
        r, n = self.rotated(head_dim), self.freqs(head_dim)
        j = torch.arange(head_dim)
        idx = j % max(1, r // 2)
        pos = idx.double() / max(1, n)
        return torch.where((j < r) & (idx < n), pos, torch.ones_like(pos))

    def describe(self, head_dim: int) -> str:
        r = self.rotated(head_dim)
        if r == 0:
            return "no RoPE (rope_pair = channel)"
        text = f"rotate-half pairs (j, j+{r // 2})" + (
            f", first {r} of {head_dim} rotated" if r < head_dim else ""
        )
        n = self.freqs(head_dim)
        if n < r // 2:
            text += f", {r // 2 - n} pairs at frequency 0"
        return text


ROTATE_HALF = Rope()


@dataclass(frozen=True)
class ProjGeom:
    """The channels of one (layer, proj): ``heads`` x ``head_dim`` under ``rope``."""

    heads: int
    head_dim: int
    rope: Rope = ROTATE_HALF

    @property
    def rows(self) -> int:
        """C: channels = rows of W_Q / W_K for this key."""
        return self.heads * self.head_dim

    def units(self, kind: str) -> torch.Tensor:
        """(C,) long unit id per channel for a granularity: channel, rope_pair or head."""
        d = self.head_dim
        if kind == "channel":
            return torch.arange(self.rows)
        if kind == "head":
            return torch.arange(self.rows) // d
        per_head = self.rope.head_units(d)  # (D,)
        n = int(per_head.max()) + 1
        return (torch.arange(self.heads)[:, None] * n + per_head[None, :]).reshape(-1)

    def pairs(self) -> torch.Tensor:
        """(heads*R/2, 2) long: every rotation pair as channel indices of this key."""
        p = self.rope.pairs(self.head_dim)  # (R/2, 2)
        base = torch.arange(self.heads)[:, None, None] * self.head_dim
        return (base + p[None]).reshape(-1, 2)

    def freq_index(self) -> torch.Tensor:
        """(C,) float frequency position of each channel (see ``Rope.freq_index``)."""
        return self.rope.freq_index(self.head_dim).repeat(self.heads)


class QKLayout:
    """Geometry of every (layer, proj) LongAct applies to; enough to size every row mask.

    ``QKLayout(num_layers, head_dim, num_attention_heads, num_key_value_heads)``: every
    layer has q and k with full rotate-half RoPE. ``QKLayout(num_layers, keys=...)``:
    the given keys only. Equal layouts compare equal (the coordinator checks ranks)."""

    def __init__(
        self,
        num_layers: int,
        head_dim: int | None = None,
        num_attention_heads: int | None = None,
        num_key_value_heads: int | None = None,
        *,
        keys: Mapping[Key, ProjGeom] | None = None,
    ):
        self.num_layers = int(num_layers)
        if keys is None:
            if None in (head_dim, num_attention_heads, num_key_value_heads):
                raise ValueError("a uniform QKLayout needs head_dim and both head counts")
            q = ProjGeom(int(num_attention_heads), int(head_dim))
            k = ProjGeom(int(num_key_value_heads), int(head_dim))
            keys = {(i, p): (q if p == "q" else k) for i in range(self.num_layers) for p in PROJS}
        bad = [k for k in keys if k[1] not in PROJS or not 0 <= k[0] < self.num_layers]
        if bad:
            raise ValueError(f"layout keys {bad} are not (layer < {num_layers}, 'q' | 'k')")
        order = sorted(keys.items(), key=lambda kv: (kv[0][0], PROJS.index(kv[0][1])))
        self._geoms: dict[Key, ProjGeom] = dict(order)  # layer by layer, q before k

    # ---- keys and geometry -----------------------------------------------------------
    def keys(self) -> list[Key]:
        return list(self._geoms)

    def __iter__(self) -> Iterator[Key]:
        return iter(self.keys())

    def __contains__(self, key: object) -> bool:
        return key in self._geoms

    def __len__(self) -> int:
        return len(self._geoms)

    def geom(self, key: Key) -> ProjGeom:
        try:
            return self._geoms[key]
        except KeyError:
            raise ValueError(f"{key} is not a key of this layout ({len(self)} keys)") from None

    def layer_geoms(self, layer: int) -> dict[str, ProjGeom]:
        """{proj: geometry} of one layer (empty when LongAct skips it)."""
        return {p: self._geoms[(layer, p)] for p in PROJS if (layer, p) in self._geoms}

    def layers(self) -> list[int]:
        """Layer indices with a q or k key (the layers LongAct applies to)."""
        return sorted({layer for layer, _ in self._geoms})

    def row_counts(self) -> dict[Key, int]:
        return {key: g.rows for key, g in self._geoms.items()}

    def _uniform(self, attr: str, proj: str | None = None) -> int:
        values = {getattr(g, attr) for k, g in self._geoms.items() if proj in (None, k[1])}
        if len(values) != 1:
            raise ValueError(f"{attr} differs between keys of this layout: use geom(key)")
        return values.pop()

    def rows(self, which: str | Key) -> int:
        """Rows of one key ``(layer, proj)``, or of every key of ``proj`` when they agree."""
        if isinstance(which, tuple):
            return self.geom(which).rows
        return self._uniform("rows", which)

    def heads(self, proj: str) -> int:
        return self._uniform("heads", proj)

    @property
    def head_dim(self) -> int:
        return self._uniform("head_dim")

    @property
    def num_attention_heads(self) -> int:
        return self._uniform("heads", "q")

    @property
    def num_key_value_heads(self) -> int:
        return self._uniform("heads", "k")

    def is_uniform(self) -> bool:
        """Every layer has q and k with one head_dim and full rotate-half RoPE."""
        s = self._summary()
        return bool(s) and self == QKLayout(self.num_layers, *s)

    def _summary(self) -> tuple[int, int, int] | tuple[()]:
        q, k = self._geoms.get((0, "q")), self._geoms.get((0, "k"))
        return (q.head_dim, q.heads, k.heads) if q and k and q.head_dim == k.head_dim else ()

    # ---- value semantics ----------------------------------------------------------------
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, QKLayout):
            return NotImplemented
        return self.num_layers == other.num_layers and self._geoms == other._geoms

    def __hash__(self) -> int:
        return hash((self.num_layers, tuple(self._geoms.items())))

    def __repr__(self) -> str:
        if self._summary() and self.is_uniform():
            d, hq, hk = self._summary()
            return f"QKLayout({self.num_layers}, head_dim={d}, q_heads={hq}, kv_heads={hk})"
        return f"QKLayout({self.num_layers} layers, {len(self)} keys: {self._geoms})"
