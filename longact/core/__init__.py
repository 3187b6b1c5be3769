"""LongAct core: pure-torch q/k channel statistics, row masks and exact sparse updates.

No ray or verl imports here: the verl integration wires these pieces into its workers.

- ``arch`` (re-exported by ``adapters``): per-family adapters: which layers have Q/K,
  which weight rows hold them, RoPE pairing, capture points; ``QKLayout`` geometry.
- ``scores``: the registries of statistics (accumulation, reduction) and the scores
  over them: a new score is declared there, or registered from user code, in one place.
- ``stats``: per-channel |x| statistics with exact merges and an EMA.
- ``capture``: forward hooks that gather statistics from real tokens.
- ``masks``: scores, policies and granularities that turn statistics into row masks.
- ``sparse_update``: keeps rows outside the mask bit-identical through optimizer steps.
- ``exact_update``: its snapshot-free path for torch's AdamW / Adam / SGD, and the rule.
- ``sharding``: FSDP2 (DTensor ``Shard(0)``) local row ranges.
- ``lora``: LongAct over a peft LoRA adapter: the q/k ``lora_B`` rows it freezes, what it
  refuses, the adapter written with each checkpoint.
"""

from longact.core.arch import (
    ADAPTERS,
    ArchAdapter,
    LayerQK,
    ParamRef,
    ProjGeom,
    QKLayout,
    Rope,
    get_adapter,
    normalize_param_name,
)
from longact.core.capture import QKCapture, capture_qk_stats
from longact.core.exact_update import exact_path_for
from longact.core.masks import (
    GRANULARITIES,
    POLICIES,
    SCORES,
    MaskSet,
    build_masks,
    mask_memory_bytes,
    n_keep,
    select_rows,
    validate_ratio,
)
from longact.core.scores import STATISTICS, fields_for, register_score, register_statistic
from longact.core.sharding import local_row_range, local_tensor
from longact.core.sparse_update import RowMaskGuard
from longact.core.stats import ChannelStats, QKStats, ema, merge

__all__ = [
    "ADAPTERS",
    "GRANULARITIES",
    "POLICIES",
    "SCORES",
    "STATISTICS",
    "ArchAdapter",
    "ChannelStats",
    "LayerQK",
    "MaskSet",
    "ParamRef",
    "ProjGeom",
    "QKCapture",
    "QKLayout",
    "QKStats",
    "Rope",
    "RowMaskGuard",
    "build_masks",
    "capture_qk_stats",
    "ema",
    "exact_path_for",
    "fields_for",
    "get_adapter",
    "local_row_range",
    "local_tensor",
    "mask_memory_bytes",
    "merge",
    "n_keep",
    "normalize_param_name",
    "register_score",
    "register_statistic",
    "select_rows",
    "validate_ratio",
]
