"""LongAct inspect: the paper's observation made visible for one model (or two).

A few q/k output channels carry most of the activation magnitude on long contexts.
``inspect_model`` runs a model over prompts and measures how concentrated per-channel
|Q| / |K| is (and which channels a LongAct mask would keep); ``plot_heatmaps`` /
``plot_compare`` draw it; ``compare_results`` gives the Jaccard overlap of two models'
selections; ``write_outputs`` writes ``inspect.json`` and the PNGs. CLI: ``longact inspect``.
"""

from longact.inspect.analysis import (
    InspectError,
    compare_results,
    inspect_model,
    mask_set,
    model_name,
)
from longact.inspect.plot import plot_compare, plot_heatmaps
from longact.inspect.report import summary_table, write_outputs

__all__ = [
    "InspectError",
    "compare_results",
    "inspect_model",
    "mask_set",
    "model_name",
    "plot_compare",
    "plot_heatmaps",
    "summary_table",
    "write_outputs",
]
