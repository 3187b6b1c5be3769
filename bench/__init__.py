"""LongAct benchmarks: ``python -m bench.run --out docs/bench`` (``make bench``).

One module per figure, each with a ``run(...) -> dict`` that measures its arms side by
side (alternating A and B, several repetitions, median and spread) and returns a
``Figure`` dict (see ``bench.common``):

- ``step_time``: verl's GRPO training step on the CPU (tiny model), LongAct on vs off;
- ``capture``: forward-hook statistics capture on a larger Qwen3 shape, hooks on vs off;
- ``mask_apply``: ``mask_grads`` + ``protect`` against the AdamW step at Qwen3-8B q/k sizes;
- ``coordinator``: refresh latency and memory of the saliency coordinator at 2-32 ranks;
- ``memory``: mask and statistics memory as a fraction of model bytes (computed).

Heavy runs (Ray, verl, GBs of tensors) belong under ``flock /tmp/longact-heavy.lock``;
``--quick`` uses tiny sizes for development.
"""
