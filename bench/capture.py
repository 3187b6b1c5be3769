"""Figure 2: overhead of LongAct's statistics capture on a training forward.

A Qwen3 of a larger shape than the tiny models (hidden 1024, 8 layers, 16 heads, 8 kv
heads, head_dim 64, intermediate 2816; random init, fp32, sdpa attention), batch 1, in
train mode with grad enabled (capture counts training forwards), forward only (the graph
is dropped, no backward). Arms, alternating ABBA, each after an untimed warm-up:

- ``hooks_on``: a ``QKCapture`` attached as ``LongActRuntime`` attaches it for the
  default score (``mean_abs``: token count and float64 sum of |x| per channel of the
  q_proj / k_proj outputs), with the attention mask as the token mask, like verl's
  padded batches (on the GPU: no mask, like verl's remove-padding batches);
- ``hooks_off``: the same model with no hooks.

The vocabulary is small (``vocab`` = 8192) so the LM head does not dilute the overhead:
the ratio is conservative against a 152k-vocabulary Qwen3. The time spent inside the hooks
is also measured directly (a ``QKCapture`` subclass timing ``_record``), a figure that is
far less noisy than the difference of two forwards on a shared 2-core machine.

On CUDA (``device="cuda"``, bf16) every forward ends with a device synchronize, and the
time in hooks is kernel-launch time only (the kernels run asynchronously), so the
forward-time ratio is the figure there.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from bench.common import (
    abba,
    device_label,
    figure,
    fmt_s,
    goal,
    human_bytes,
    paired_ratios,
    ratio,
    rss_bytes,
    summarize,
    sync,
)
from longact.core.capture import QKCapture
from longact.distributed.coordinator import payload_fields

SHAPE = {
    "hidden_size": 1024,
    "num_hidden_layers": 8,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "intermediate_size": 2816,
}
SHAPE_8B = {  # 4 of Qwen3-8B's 36 decoder layers
    "hidden_size": 4096,
    "num_hidden_layers": 4,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "intermediate_size": 12288,
}


def build_model(
    vocab: int = 8192,
    shape: dict | None = None,
    seed: int = 0,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(
        vocab_size=vocab,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        **(shape or SHAPE),
    )
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen3ForCausalLM(cfg).to(dtype)
    model.train()
    return model


def forward(model, ids: torch.Tensor, mask: torch.Tensor | None) -> float:
    sync(ids.device)
    t0 = time.perf_counter()
    with torch.enable_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=False)
        out.logits.sum()  # the graph is built, then dropped: no backward
    sync(ids.device)
    dt = time.perf_counter() - t0
    del out
    return dt


def run(
    seq_lens: tuple[int, ...] = (2048,),
    reps: int = 5,
    vocab: int = 8192,
    shape: dict | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    padding_mask: bool = True,
    name: str = "capture",
    log=print,
) -> dict[str, Any]:
    rss0 = rss_bytes()
    model = build_model(vocab, shape, device=device, dtype=dtype)
    n_params = sum(p.numel() for p in model.parameters())
    shp = shape or SHAPE
    fields = payload_fields("mean_abs")  # what LongActRuntime accumulates by default
    cap = QKCapture(model, fields=fields)
    fig = figure(
        name,
        f"2. Capture overhead on a training forward (Qwen3 hidden {shp['hidden_size']}, "
        f"{shp['num_hidden_layers']} layers, {str(dtype).removeprefix('torch.')}, sdpa, "
        f"{device_label(device)}, batch 1)",
        [
            "seq len",
            "hooks off",
            "hooks on",
            "on/off, median of paired ratios [min-max]",
            "on/off, ratio of medians",
            "time in hooks / fwd (off)",
        ],
    )
    fig["raw"] = {"n_params": n_params, "shape": shp, "vocab": vocab, "by_len": {}}
    fig["raw"].update(device=device_label(device), dtype=str(dtype), padding_mask=padding_mask)
    for T in seq_lens:
        g = torch.Generator().manual_seed(T)
        ids = torch.randint(0, vocab, (1, T), generator=g).to(device)
        # a padded batch's attention mask doubles as the token mask (verl without
        # remove-padding); None: every token counts (packed / remove-padding inputs)
        mask = torch.ones(1, T, dtype=torch.long, device=device) if padding_mask else None

        def on(ids=ids, mask=mask) -> float:
            cap.attach()
            try:
                return forward(model, ids, mask)
            finally:
                cap.detach()
                cap.take()

        def off(ids=ids, mask=mask) -> float:
            return forward(model, ids, mask)

        on(), off()  # warm-up
        cap.record_s = 0.0
        times: dict[str, list[float]] = {"hooks_on": [], "hooks_off": []}
        hook_s: list[float] = []
        for i, arm in enumerate(abba(["hooks_on", "hooks_off"], reps)):
            before = cap.record_s
            times[arm].append(on() if arm == "hooks_on" else off())
            if arm == "hooks_on":
                hook_s.append(cap.record_s - before)
            log(f"  T={T} [{i + 1}/{2 * reps}] {arm}: {times[arm][-1]:.3f} s")
        s_on, s_off = summarize(times["hooks_on"]), summarize(times["hooks_off"])
        s_hook = summarize(hook_s)
        r = ratio(s_on, s_off)
        pairs = paired_ratios(times["hooks_on"], times["hooks_off"])
        s_pair = summarize(pairs)
        hook_share = s_hook["median"] / s_off["median"]
        fig["rows"].append(
            [
                T,
                fmt_s(s_off),
                fmt_s(s_on),
                f"{s_pair['median']:.3f} [{s_pair['min']:.3f}-{s_pair['max']:.3f}]",
                f"{r:.3f}",
                f"{100 * hook_share:.2f} %",
            ]
        )
        fig["goals"].append(
            goal(
                f"capture on/off forward time, T={T} (median paired ratio)", s_pair["median"], 1.03
            )
        )
        fig["raw"]["by_len"][T] = {
            "hooks_on": times["hooks_on"],
            "hooks_off": times["hooks_off"],
            "hook_s": hook_s,
            "paired_ratios": pairs,
            "ratio_of_medians": r,
            "hook_share": hook_share,
        }
    fig["notes"] += [
        f"{n_params / 1e6:.1f}M parameters (vocab {vocab}, tied embeddings); the process "
        f"grew by {human_bytes(rss_bytes() - rss0)} RSS.",
        f"{reps} timed forwards per arm in ABBA order after one warm-up each; ranges are "
        "min-max. Paired ratio k = k-th hooks-on / k-th hooks-off forward (run back to back). "
        "'time in hooks' is timed inside the hooks of the hooks-on forwards (median), over the "
        "median hooks-off forward: the direct cost, free of the machine's run-to-run noise.",
    ]
    return fig
