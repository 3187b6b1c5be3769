"""Figure 1 on a GPU: LongAct's cost on an actor-update step of an FSDP2 Qwen3.

verl's whole GRPO step (figure 1 in ``step_time.py``) needs Ray, verl and a rollout
engine. This figure times the part of that step LongAct changes, the actor's policy
update, with the calls verl's engine makes (``workers/fsdp_engine.py``):

- forwards and backwards over ``micro`` micro-batches of one ``seq``-token sequence,
  with the ``LongActRuntime`` capture hooks counting every training forward (gradient
  checkpointing on, so the replays in backward are skipped as in verl);
- ``runtime.before_step()``: a mask refresh (every step here, the most expensive
  setting) through an in-process coordinator for one rank, then zeroing the frozen rows'
  gradients;
- ``with runtime.protect():`` gradient clipping and ``AdamW.step()`` (AdamW takes the
  masked exact path: nothing is copied, its weight decay is applied in a step hook).

The LongAct-off arm runs the same forwards, backwards, clipping and step with no hooks.
The model is wrapped per decoder layer with FSDP2 ``fully_shard`` (bf16 compute, fp32
master weights and gradient reduction, as verl's FSDP engine), on one rank. Arms
alternate step by step (ABBA) on the same model; each part is timed between device
synchronizes. The loss is next-token cross-entropy on random tokens: a PPO loss is
elementwise on the same log-probs, so forward and backward cost the same.

Left out: rollout, log-prob and reference passes, which LongAct does not touch (no
statistics are counted there), so the on/off ratio here is an upper bound on the ratio
of a whole verl step.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from bench.common import abba, device_label, figure, fmt_s, goal, human_bytes, summarize, sync

SHAPES = {  # Qwen3 configs by name (random init: only the shapes matter for timing)
    "1.7B": dict(
        hidden_size=2048,
        intermediate_size=6144,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=256,
        tie_word_embeddings=True,
    ),
}
PARTS = ("fwd_bwd", "before_step", "snapshot", "clip_step", "restore", "total")


def _init_dist(device: str) -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        return
    port = os.environ.get("LONGACT_BENCH_PORT", "29531")
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def build(shape: str, device: str):
    """FSDP2-wrapped Qwen3 (fp32 master weights, bf16 compute on CUDA) and its AdamW."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(max_position_embeddings=131072, **SHAPES[shape])
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3ForCausalLM(cfg)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    cuda = device.startswith("cuda")
    mp = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if cuda else None,
        reduce_dtype=torch.float32 if cuda else None,
    )
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.01)
    return model, opt


def one_step(model, opt, rt, batches: list[torch.Tensor], on: bool, device: str) -> dict:
    """One actor update; seconds per part (between synchronizes)."""
    t = [time.perf_counter()]

    def mark() -> None:
        sync(device)
        t.append(time.perf_counter())

    for ids in batches:  # (1, seq)
        loss = model(input_ids=ids, labels=ids).loss / len(batches)
        loss.backward()
        del loss
    mark()
    if on:
        rt.before_step()
    mark()
    guard = rt.protect() if on else None
    if guard is not None:
        guard.__enter__()
    mark()
    try:
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        mark()
    finally:
        if guard is not None:
            guard.__exit__(None, None, None)
    mark()
    opt.zero_grad(set_to_none=True)
    dts = [b - a for a, b in zip(t, t[1:])]
    return dict(zip(PARTS, [*dts, t[-1] - t[0]]))


def run(
    shape: str = "1.7B",
    seq: int = 8192,
    micro: int = 2,
    reps: int = 6,
    ratio: float = 0.3,
    device: str = "cuda",
    log=print,
) -> dict[str, Any]:
    from longact.core.arch import get_adapter
    from longact.distributed.coordinator import SaliencyCoordinator
    from longact.train.runtime import LongActRuntime

    _init_dist(device)
    model, opt = build(shape, device)
    n_params = sum(p.numel() for p in model.parameters())
    layout = get_adapter(model).layout(model)
    runtimes = {}
    for arm, is_async in (("on", False), ("async", True)):
        cfg = {"ratio": ratio, "policy": "topk", "score": "mean_abs", "refresh_interval": 1}
        cfg["refresh_async"] = is_async
        runtimes[arm] = LongActRuntime(
            model, opt, cfg, coordinator=SaliencyCoordinator(cfg, layout, 1)
        )
        runtimes[arm].capture.detach()
    vocab = SHAPES[shape]["vocab_size"]
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, vocab, (1, seq), generator=g).to(device) for _ in range(micro)]
    cuda = device.startswith("cuda")
    arms = ["off", "on", "async"]

    def step(arm: str) -> dict[str, float]:
        rt = runtimes.get(arm)
        if rt is not None:
            rt.capture.attach()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        try:
            out = one_step(model, opt, rt, batches, rt is not None, device)
        finally:
            if rt is not None:
                rt.capture.detach()
        if cuda:
            out["peak_bytes"] = torch.cuda.max_memory_allocated(device)
        return out

    samples: dict[str, dict[str, list[float]]] = {arm: {} for arm in arms}
    warm = {arm: step(arm)["total"] for arm in arms}  # allocator warm-up, dropped
    log("  warm-up: " + ", ".join(f"{a} {t:.2f} s" for a, t in warm.items()))
    for i, arm in enumerate(abba(arms, reps)):
        got = step(arm)
        for k, v in got.items():
            samples[arm].setdefault(k, []).append(v)
        log(
            f"  [{i + 1}/{len(arms) * reps}] {arm}: {got['total']:.3f} s "
            f"(fwd+bwd {got['fwd_bwd']:.3f})"
        )
    s = {arm: {k: summarize(v) for k, v in d.items()} for arm, d in samples.items()}
    t = {arm: s[arm]["total"]["median"] for arm in arms}
    tokens = seq * micro
    fig = figure(
        "train_step",
        f"1 (GPU). Actor update of a Qwen3-{shape}-shaped model, FSDP2 on "
        f"{device_label(device)}, {micro} x {seq} tokens per step, LongAct on vs off",
        [
            "part",
            "LongAct off",
            f"LongAct on (ratio {ratio}, refresh every step)",
            "on - off",
            "on, refresh_async",
            "async - off",
        ],
    )
    labels = {
        "fwd_bwd": "forward + backward (capture hooks when on)",
        "before_step": "refresh (coordinator round trip) + mask_grads",
        "snapshot": "protect: enter (snapshot path: copy frozen rows)",
        "clip_step": "clip + AdamW step",
        "restore": "protect: exit (snapshot path: restore frozen rows)",
        "total": "whole update step",
    }

    def diff(arm: str, part: str) -> str:
        return f"{1e3 * (s[arm][part]['median'] - s['off'][part]['median']):+.1f} ms"

    for part in PARTS:
        fig["rows"].append(
            [labels[part], fmt_s(s["off"][part]), fmt_s(s["on"][part]), diff("on", part),
             fmt_s(s["async"][part]), diff("async", part)]
        )  # fmt: skip
    fig["rows"].append(
        ["tokens / s", f"{tokens / t['off']:,.0f}", f"{tokens / t['on']:,.0f}",
         f"{t['on'] / t['off']:.3f}x", f"{tokens / t['async']:,.0f}",
         f"{t['async'] / t['off']:.3f}x"]
    )  # fmt: skip
    if cuda:
        pk = {arm: max(samples[arm]["peak_bytes"]) for arm in arms}
        fig["rows"].append(
            ["peak GPU memory", human_bytes(pk["off"]), human_bytes(pk["on"]),
             human_bytes(pk["on"] - pk["off"]), human_bytes(pk["async"]),
             human_bytes(pk["async"] - pk["off"])]
        )  # fmt: skip
    fig["goals"].append(goal("update step time on/off (median)", t["on"] / t["off"], 1.05))
    fig["goals"].append(
        goal("update step time on/off, refresh_async (median)", t["async"] / t["off"], 1.05)
    )
    fig["notes"] += [
        f"{n_params / 1e9:.2f}B parameters, gradient checkpointing, sdpa attention; "
        f"{reps} steps per arm in ABBA order ({', '.join(arms)}) after one warm-up step "
        "each; medians [min-max]. A refresh on every LongAct step, through an in-process "
        "coordinator (one rank); with refresh_async it runs in a thread during the next "
        "step and is installed at that step.",
        f"Final mask versions: on {runtimes['on'].version}, async "
        f"{runtimes['async'].version}; frozen share of W_Q/W_K rows "
        f"{runtimes['on'].guard.frozen_fraction():.2f}.",
    ]
    fig["raw"] = {"device": device_label(device), "shape": shape, "seq": seq, "micro": micro}
    fig["raw"].update(n_params=n_params, samples=samples, summary=s)
    return fig
