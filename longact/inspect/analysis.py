"""Run a model over prompts, capture per-channel |Q| / |K| statistics, measure concentration.

``inspect_model(model_dir, data, ...)`` loads an HF causal LM (or a verl checkpoint
folder: ``global_step_N``, its ``actor/`` or ``actor/huggingface/``; resolved by
``longact.eval.runner.resolve_model_dir``) or a LoRA adapter on its base model, runs
the first ``n`` prompts of ``data`` (a parquet path or rows with a chat ``prompt``)
through it with the chat template and the generation prompt, right-padded so real
tokens see exactly what they would see alone, and captures statistics from real tokens
only (``longact.core.capture_qk_stats``, ``during_no_grad=True``). Only the decoder runs
(no LM head: no vocab-sized logits).

For every (layer, "q"|"k") the result holds, over ``C`` output channels with per-channel
mean |x| ``m`` (the magnitude the paper and AWQ use, whatever ``score`` selects with):

* ``top10_share`` / ``top30_share``: sum of the largest ``n_keep(0.1, C)`` /
  ``n_keep(0.3, C)`` values of ``m`` over ``sum(m)`` (uniform: ~0.1 / ~0.3);
* ``max_over_mean``: ``max(m) / mean(m)`` (uniform: ~1);
* ``kept_mass``: share of ``sum(m)`` on the rows the mask (ratio/policy/score/
  granularity) keeps (``MaskSet.mass_kept``);
* ``low_freq_top30``: fraction of the top-30% channels by ``m`` in the low-frequency
  half of RoPE. Rotate-half RoPE (every adapter here) over R rotated channels of a head
  turns channel ``d < R`` at frequency index ``i = d mod R/2``, angle
  ``theta ** (-2i/R)``: ``i >= R/4`` is the low-frequency half. (The two halves
  ``d < R/2`` / ``d >= R/2`` are rotation partners with the same frequencies, not
  frequency bands.) Channels that never turn (partial rotary's pass-through channels,
  pairs at frequency 0, layers without RoPE) have frequency 0 and count as low
  frequency (``ProjGeom.freq_index``). Full rotation, uniform: ~0.5;
* ``kept_low_freq``: the same fraction for the channels the mask keeps.

Calibration/evaluation split (``calib_n``): the mask can be chosen on calibration
prompts kept apart from the measured ones, so ``kept_mass`` is out of sample (see
:func:`inspect_model`); ``longact ablate`` uses the same split.

``compare_results(a, b)`` adds the per-key Jaccard overlap of the two models' masks.
Results are plain JSON-able dicts; per-channel values live under ``"channels"`` so
``longact.inspect.plot`` can redraw them from a saved ``inspect.json``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from longact.core import (
    POLICIES,
    SCORES,
    MaskSet,
    QKLayout,
    build_masks,
    capture_qk_stats,
    get_adapter,
    n_keep,
    validate_ratio,
)
from longact.core.arch import ProjGeom, Rope, key_str, parse_key
from longact.core.lora import ADAPTER_DIR

FORMAT = 1


class InspectError(ValueError):
    """Bad input for an inspection (model, data or settings)."""


def model_name(path: str | Path) -> str:
    """Display name: ``.../run1/global_step_20/actor/huggingface`` -> ``run1/global_step_20``."""
    skip = ("huggingface", "actor", ADAPTER_DIR)
    parts = [p for p in Path(path).resolve().parts if p not in skip]
    name = parts[-1] if parts else str(path)
    if name.startswith("global_step_") and len(parts) > 1:
        name = f"{parts[-2]}/{name}"
    return name


def _messages(prompt: Any) -> Any:
    """A parquet round trip gives an array of dicts: back to a list of plain dicts."""
    if hasattr(prompt, "tolist") and not isinstance(prompt, str):
        prompt = prompt.tolist()
    if isinstance(prompt, list):
        return [dict(m) if isinstance(m, dict) else m for m in prompt]
    return prompt


def load_prompts(data: str | Path | list[dict], n: int, offset: int = 0) -> list[list[dict]]:
    """The chat ``prompt`` of ``n`` rows of a parquet file (or of given rows), from row
    ``offset`` on."""
    if isinstance(data, (str, Path)):
        path = Path(data)
        if not path.is_file():
            raise InspectError(f"data file {path} does not exist")
        import pandas as pd

        try:
            frame = pd.read_parquet(path)
        except Exception as e:  # noqa: BLE001 - pyarrow raises many types for non-parquet
            raise InspectError(f"cannot read {path} as parquet: {e}") from None
        if "prompt" not in frame.columns:
            raise InspectError(
                f"{path} has no 'prompt' column (columns: {', '.join(map(str, frame.columns))})"
            )
        prompts = [_messages(p) for p in frame["prompt"].iloc[offset : offset + n]]
    else:
        rows = data[offset : offset + n]
        if any("prompt" not in r for r in rows):
            raise InspectError("every data row needs a 'prompt' (a list of chat messages)")
        prompts = [r["prompt"] for r in rows]
    if not prompts:
        raise InspectError(f"no prompts in the data from row {offset} on")
    for p in prompts:
        if not isinstance(p, list) or not all(isinstance(m, dict) and "content" in m for m in p):
            raise InspectError("'prompt' must be a list of chat messages with role/content")
    return prompts


def _check_settings(
    n: int, ratio: float, policy: str, score: str, granularity: str, point: str, batch_size: int
) -> None:
    from longact.core import GRANULARITIES
    from longact.core.capture import POINTS

    if n < 1:
        raise InspectError(f"n must be at least 1, got {n}")
    if batch_size < 1:
        raise InspectError(f"batch size must be at least 1, got {batch_size}")
    if point not in POINTS:
        raise InspectError(f"unknown capture point {point!r}; valid: {', '.join(POINTS)}")
    try:
        validate_ratio(ratio)
        POLICIES.get(policy), SCORES.get(score), GRANULARITIES.get(granularity)
    except ValueError as e:
        raise InspectError(str(e)) from None


def _load(model_dir: str | Path, base: str | Path | None = None):
    """(resolved path, tokenizer, base decoder, adapter, layout, model_type); errors before
    weights load. A LoRA adapter (``longact.core.lora.find_adapter``) is loaded onto its
    base model unmerged, so the statistics pass through its LoRA layers, as in training."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from longact.core.lora import LoRAError, adapter_base, find_adapter, load_with_adapter
    from longact.eval.runner import EvalError, load_tokenizer, resolve_model_dir

    try:
        lora = find_adapter(model_dir)
        path = adapter_base(lora, base) if lora is not None else resolve_model_dir(model_dir)
        config = AutoConfig.from_pretrained(path)
        adapter = get_adapter(config)  # unsupported model_type: lists the supported ones
        tok = load_tokenizer(path)  # chat template required, pad token set
    except (EvalError, LoRAError) as e:
        raise InspectError(str(e)) from None
    tok.padding_side = "right"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if lora is not None:
        lm = load_with_adapter(lora, path, dtype=dtype).to(device).eval().get_base_model()
        path = lora
    else:
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    return path, tok, lm.base_model, adapter, adapter.layout(lm.config), config.model_type


def _key_metrics(m: torch.Tensor, mask: torch.Tensor, geom: ProjGeom) -> dict[str, Any]:
    """Concentration numbers of one (layer, proj) from mean |x| per channel m (C,)."""
    c = m.numel()
    total = float(m.sum())
    order = torch.sort(m, descending=True, stable=True).indices
    top10, top30 = order[: n_keep(0.1, c)], order[: n_keep(0.3, c)]
    freq = geom.freq_index()[top30]  # (n,) in [0, 1]; 1 = never turns
    return {
        "channels": c,
        "top10_share": float(m[top10].sum()) / total if total else 0.0,
        "top30_share": float(m[top30].sum()) / total if total else 0.0,
        "max_over_mean": float(m.max() / m.mean()) if total else 0.0,
        "kept_fraction": float(mask.double().mean()),
        "kept_mass": float(m[mask].sum()) / total if total else 0.0,
        "low_freq_top30": float((freq >= 0.5).double().mean()),
        "kept_low_freq": float((geom.freq_index()[mask] >= 0.5).double().mean()),
        "top_channels": order[:8].tolist(),
    }


METRICS = (
    "top10_share",
    "top30_share",
    "max_over_mean",
    "kept_mass",
    "low_freq_top30",
    "kept_low_freq",
)


def _by_proj(rows: list[dict], reduce: Callable[[list[dict]], Any]) -> dict[str, Any]:
    """``reduce`` over the q rows, the k rows and all rows (each row has a "proj")."""
    return {
        "q": reduce([r for r in rows if r["proj"] == "q"]),
        "k": reduce([r for r in rows if r["proj"] == "k"]),
        "all": reduce(rows),
    }


def _means(rows: list[dict]) -> dict[str, float]:
    return {k: sum(r[k] for r in rows) / len(rows) for k in METRICS} if rows else {}


@torch.no_grad()
def run_prompts(model, tok, texts: list[str], capture, batch_size: int) -> None:
    """Feed ``texts`` to ``model`` in right-padded batches (real tokens see exactly what
    they would see alone), each batch's real tokens set as ``capture``'s token mask."""
    device = next(model.parameters()).device
    side, tok.padding_side = tok.padding_side, "right"
    try:
        for i in range(0, len(texts), batch_size):
            enc = tok(
                texts[i : i + batch_size],
                return_tensors="pt",
                padding=True,
                add_special_tokens=False,
            )
            ids, attn = enc["input_ids"].to(device), enc["attention_mask"].to(device)
            capture.set_token_mask(attn.bool())  # real tokens only
            model(input_ids=ids, attention_mask=attn, use_cache=False)
    finally:
        tok.padding_side = side


def _capture(model, tok, adapter, texts: list[str], point: str, batch_size: int):
    """QKStats of ``texts`` (real tokens only)."""
    try:
        capture = capture_qk_stats(model, adapter, point=point, during_no_grad=True)
    except ValueError as e:  # point="norm" on a model without q_norm/k_norm
        raise InspectError(str(e)) from None
    with capture as cap:
        run_prompts(model, tok, texts, cap, batch_size)
        return cap.take()


@torch.no_grad()
def inspect_model(
    model_dir: str | Path,
    data: str | Path | list[dict],
    *,
    n: int = 16,
    ratio: float = 0.3,
    policy: str = "topk",
    score: str = "mean_abs",
    granularity: str = "channel",
    point: str = "proj",
    batch_size: int = 4,
    seed: int = 0,
    calib_n: int = 0,
    calib_data: str | Path | list[dict] | None = None,
    base: str | Path | None = None,
) -> dict[str, Any]:
    """Capture q/k statistics of ``model_dir`` over the first ``n`` prompts of ``data``
    (``model_dir`` may be a LoRA adapter: ``base`` is then its base model, by default the
    path the adapter records).

    With ``calib_n > 0`` the mask is chosen on ``calib_n`` calibration prompts - the
    first rows of ``calib_data``, or the rows after the first ``n`` of ``data`` - and every
    number is measured on the ``n`` evaluation prompts: ``kept_mass`` is then the share of
    held-out |x| mass on channels chosen without seeing it. A calibration prompt equal to
    an evaluation prompt is dropped. With ``calib_n=0`` the mask is chosen on the
    evaluation prompts themselves (in-sample)."""
    _check_settings(n, ratio, policy, score, granularity, point, batch_size)
    if calib_n < 0:
        raise InspectError(f"calib_n must be >= 0, got {calib_n}")
    prompts = load_prompts(data, n)
    calib = []
    if calib_n:
        calib = load_prompts(calib_data if calib_data is not None else data, calib_n,
                             offset=0 if calib_data is not None else n)  # fmt: skip
    path, tok, model, adapter, layout, model_type = _load(model_dir, base)
    texts = [
        tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts
    ]
    stats = _capture(model, tok, adapter, texts, point, batch_size)
    mask_stats, calibration = stats, {"source": "the evaluation prompts (in-sample)"}
    if calib:
        ctexts = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
                  for p in calib]  # fmt: skip
        kept = [t for t in ctexts if t not in set(texts)]
        if not kept:
            raise InspectError("every calibration prompt is also an evaluation prompt")
        mask_stats = _capture(model, tok, adapter, kept, point, batch_size)
        calibration = {
            "source": str(calib_data) if isinstance(calib_data, (str, Path))
            else "<rows>" if calib_data is not None else f"rows {n}.. of the data",
            "n": len(kept), "dropped_overlap": len(ctexts) - len(kept),
            "tokens": int(mask_stats.token_count(layout.keys()[0])),
        }  # fmt: skip
    masks = build_masks(
        mask_stats, layout, ratio=ratio, policy=policy, score=score, granularity=granularity,
        seed=seed,
    )  # fmt: skip
    keys, channels = [], {}
    for key in layout:
        m = stats.score(key, "mean_abs").double().cpu()  # (C,)
        mask = masks[key]
        keys.append({"layer": key[0], "proj": key[1], **_key_metrics(m, mask, layout.geom(key))})
        channels[key_str(key)] = {
            "mean_abs": [float(f"{v:.6g}") for v in m.tolist()],
            "kept": torch.nonzero(mask).flatten().tolist(),
        }
    return {
        "format": FORMAT,
        "model": str(path),
        "model_name": model_name(path),
        "model_type": model_type,
        "layout": layout_dict(layout),
        "data": str(data) if isinstance(data, (str, Path)) else "<rows>",
        "n": len(prompts),
        "tokens": int(stats.token_count(layout.keys()[0])),
        "calibration": calibration,
        "settings": {
            "ratio": ratio,
            "policy": policy,
            "score": score,
            "granularity": granularity,
            "point": point,
            "seed": seed,
        },
        "keys": keys,
        "overall": _by_proj(keys, _means),
        "channels": channels,
    }


def layout_dict(layout: QKLayout) -> dict[str, Any]:
    """JSON form: the first layer's q/k geometry as a summary, and every key's own."""
    q = next(layout.geom(k) for k in layout if k[1] == "q")
    k = next((layout.geom(k) for k in layout if k[1] == "k"), q)
    return {
        "num_layers": layout.num_layers,
        "head_dim": q.head_dim,
        "num_attention_heads": q.heads,
        "num_key_value_heads": k.heads,
        "keys": {
            key_str(key): {
                "heads": g.heads,
                "head_dim": g.head_dim,
                "rope": {"style": g.rope.style, "rotary_dim": g.rope.rotary_dim,
                         "n_freqs": g.rope.n_freqs},
            }
            for key, g in ((key, layout.geom(key)) for key in layout)
        },
    }  # fmt: skip


def layout_of(result: dict) -> QKLayout:
    """The QKLayout of a result (results written before per-key geometry: uniform)."""
    lo = result["layout"]
    if "keys" not in lo:
        return QKLayout(
            lo["num_layers"], lo["head_dim"], lo["num_attention_heads"], lo["num_key_value_heads"]
        )
    keys = {
        parse_key(k): ProjGeom(v["heads"], v["head_dim"], Rope(**v["rope"]))
        for k, v in lo["keys"].items()
    }
    return QKLayout(lo["num_layers"], keys=keys)


def mask_set(result: dict) -> MaskSet:
    """The MaskSet stored (as kept indices) in a result."""
    layout = layout_of(result)
    masks = {}
    for key in layout:
        m = torch.zeros(layout.rows(key), dtype=torch.bool)
        m[result["channels"][key_str(key)]["kept"]] = True
        masks[key] = m
    return MaskSet(masks, meta=dict(result["settings"]))


def compare_results(a: dict, b: dict) -> dict[str, Any]:
    """Jaccard overlap of the two results' masks per (layer, proj); stored as ``a["compare"]``."""
    if layout_of(a) != layout_of(b):
        raise InspectError(f"cannot compare: q/k layouts differ ({a['layout']} vs {b['layout']})")
    jac = mask_set(a).jaccard(mask_set(b), per_key=True)
    per_key = [{"layer": k[0], "proj": k[1], "jaccard": v} for k, v in sorted(jac.items())]

    def mean(rows: list[dict]) -> float:
        return sum(r["jaccard"] for r in rows) / len(rows)

    out = {
        "model": b["model"],
        "model_name": b["model_name"],
        "jaccard": per_key,
        "jaccard_mean": _by_proj(per_key, mean),
        "other": b,
    }
    a["compare"] = out
    return out
