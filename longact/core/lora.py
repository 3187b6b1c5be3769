"""LongAct over a peft LoRA adapter: which rows to freeze, what to refuse, what is saved.

With LoRA the base weights are frozen and a targeted projection computes
``y = W0 x + s * B (A x)`` (``A``: (r, in), ``B``: (out, r), ``s = alpha / r``, or
``alpha / sqrt(r)`` with rsLoRA). Row ``i`` of the update ``dW = s * B @ A`` is
``s * B[i] @ A``, so LongAct freezes the rows of ``lora_B`` that belong to unselected
channels: they stay at their initial zero and those rows of ``dW`` stay exactly zero,
while the selected channels get a rank-r update and every other adapter (v, o, MLP, and
``lora_A`` of q/k) trains as usual. ``lora_B`` rows are output features laid out like
the base weight's rows, so the family adapters' row maps (fused ``qkv_proj``, the gated
``q_proj``) and the ``rope_pair`` granularity carry over unchanged: the adapters match
``<proj>.lora_B.<name>.weight`` as a :class:`~longact.core.arch.ParamRef` of kind
``lora_B`` and :class:`~longact.core.sparse_update.RowMaskGuard` keeps those rows (and their
optimizer state) bit-identical on the masked and the snapshot path, as it does for W_Q.
Statistics come from the projection's output as before: a LoRA layer's forward returns
base plus adapter.

Our choice where the paper (which trains full weights) is silent: when a refresh drops a
channel from the mask, its ``lora_B`` row is frozen where it is (never reset: the policy
does not jump), but ``lora_A`` is shared by all rows and keeps training, so that row of
``dW`` still moves, within the span of its frozen ``B`` row. ``dW`` is exactly zero in
every row whose channel was never selected: that is the guarantee the tests and
``scripts/gpu_check.py`` check.

Refused, with the reason (:func:`check_model`, and :func:`config_problem` before launch):
q/k projections without a LoRA adapter (LongAct would select nothing to train), DoRA
(the magnitude vector rescales whole rows, so a zero ``B`` row does not keep ``W``'s row),
a bias on ``lora_B`` (``lora_bias``), adapter types other than LoRA, more than one
adapter, and a q/k ``lora_B`` that is not zero when LongAct starts (PiSSA/OLoRA-style
initialisation or ``lora_adapter_path``): a frozen non-zero ``B`` row still moves ``W``'s
row through ``A``, so "frozen" would not mean unchanged.

:func:`save_adapter` writes the adapter peft loads (``adapter_config.json`` and
``adapter_model.safetensors``) from a model whose parameters may be FSDP2 DTensors.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from longact.core.arch.base import ArchAdapter
from longact.core.arch.layout import PROJS
from longact.core.arch.report import count_kept
from longact.core.sharding import local_tensor

ADAPTER_DIR = "lora_adapter"  # beside verl's shards in a step's actor folder
REFUSED_TYPES = ("dora",)  # verl's model.lora.type values LongAct refuses


class LoRAError(ValueError):
    """A LoRA setting under which LongAct's frozen rows would not hold."""


def peft_model(model: nn.Module) -> nn.Module | None:
    """The peft model under FSDP1's wrapper, or None for a model without adapters."""
    inner = getattr(model, "_fsdp_wrapped_module", model)
    return inner if getattr(inner, "peft_config", None) else None


def _qk_modules(model: nn.Module, adapter: ArchAdapter) -> list[tuple[str, nn.Module]]:
    """[(``layers.<i>.<attn>.<attr>``, module)] of every module producing q/k channels."""
    out = []
    for layer in adapter.layers(model):
        seen = set()
        for proj, mod in layer.modules.items():
            if id(mod) in seen:
                continue  # a fused qkv_proj produces both q and k
            seen.add(id(mod))
            attr = next(a for a, ps in adapter.proj_modules.items() if proj in ps)
            out.append((f"{adapter.layers_name}.{layer.index}.{adapter.attn_name}.{attr}", mod))
    return out


def check_model(model: nn.Module, adapter: ArchAdapter) -> dict[str, Any] | None:
    """Refuse a peft model LongAct cannot keep exact (:class:`LoRAError`); return
    ``{"rank": r, "alpha": a, "targets": ...}`` of its one LoRA adapter, or None without
    peft. Every rank must call it: the zero-``B`` check agrees across ranks."""
    pm = peft_model(model)
    if pm is None:
        return None
    configs = pm.peft_config
    if len(configs) != 1:
        raise LoRAError(
            f"the model carries {len(configs)} adapters ({', '.join(configs)}); LongAct "
            "masks one LoRA adapter: load only the one being trained"
        )
    ((name, cfg),) = configs.items()
    ptype = str(getattr(cfg.peft_type, "value", cfg.peft_type))
    if ptype != "LORA":
        raise LoRAError(
            f"adapter {name!r} is {ptype}: LongAct freezes rows of LoRA's lora_B, whose rows "
            "are the projection's output channels; other adapter types have no such rows"
        )
    nonzero = []
    for path, mod in _qk_modules(model, adapter):
        lora_b = getattr(mod, "lora_B", None)
        if not isinstance(lora_b, nn.ModuleDict) or name not in lora_b:
            raise LoRAError(
                f"{path} has no LoRA adapter: with LoRA the base W_Q/W_K are frozen, so "
                "LongAct would select nothing to train. Add the q/k projections "
                f"({', '.join(adapter.proj_modules)}) to actor_rollout_ref.model."
                "target_modules (or use all-linear), or set longact.enable=false"
            )
        if mod.use_dora.get(name, False):
            raise LoRAError(
                f"{path} uses DoRA: its magnitude vector rescales every row of W_Q/W_K, so a "
                "zero lora_B row does not keep W's row; use plain LoRA with LongAct"
            )
        if getattr(mod, "lora_bias", {}).get(name, False) or lora_b[name].bias is not None:
            raise LoRAError(
                f"{path} has a bias on lora_B (lora_bias=True): LongAct freezes lora_B's rows "
                "and has no rule for its bias; use lora_bias=False"
            )
        with torch.no_grad():
            if bool(local_tensor(lora_b[name].weight).ne(0).any()):
                nonzero.append(path)
    flag = torch.tensor([len(nonzero)], dtype=torch.float64)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # every rank must raise together (a lone raise would leave the others waiting in
        # a collective); NCCL reduces CUDA tensors, even while FSDP offloads to the CPU
        dev = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
        flag = flag.to(dev)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    if float(flag.max()) > 0:
        where = ", ".join(nonzero[:3]) or "another rank's shard"
        raise LoRAError(
            f"lora_B of the q/k projections is not zero when LongAct starts ({where}): a "
            "frozen non-zero lora_B row still moves W's row through lora_A, so LongAct's "
            "frozen rows would not stay unchanged. Start from lora_B = 0 (peft's default "
            "init_lora_weights=True, no lora_adapter_path; merge a previous adapter into "
            "the base model first), or train this adapter without LongAct"
        )
    return {
        "adapter": name,
        "rank": int(cfg.r),
        "alpha": float(cfg.lora_alpha),
        "targets": cfg.target_modules,
    }


def _matches(targets: Any, key: str) -> bool:
    """peft's rule for one module key: a string is a full regex match (``all-linear``
    matches every linear layer but the output head), a list matches a name or suffix."""
    if targets is None:
        return False
    if isinstance(targets, str):
        return targets == "all-linear" or re.fullmatch(targets, key) is not None
    return any(key == t or key.endswith(f".{t}") for t in targets)


def config_problem(adapter: ArchAdapter, target_modules: Any, exclude_modules: Any) -> str | None:
    """Before launch: why verl's ``target_modules`` / ``exclude_modules`` would leave the
    model's q/k projections without LoRA (None when they are covered)."""
    # a Hydra ListConfig becomes a list; a string stays a pattern
    if target_modules is not None and not isinstance(target_modules, str):
        target_modules = list(target_modules)
    if exclude_modules is not None and not isinstance(exclude_modules, str):
        exclude_modules = list(exclude_modules)
    for attr in adapter.proj_modules:
        key = f"model.{adapter.layers_name}.0.{adapter.attn_name}.{attr}"
        if not _matches(target_modules, key):
            return (
                f"actor_rollout_ref.model.target_modules={target_modules!r} leaves {attr} "
                "without LoRA: with LoRA the base W_Q/W_K are frozen, so LongAct would select "
                f"nothing to train; include {', '.join(adapter.proj_modules)} (or use all-linear)"
            )
        if exclude_modules and _matches(exclude_modules, key):
            return (
                f"actor_rollout_ref.model.exclude_modules={exclude_modules!r} excludes {attr}: "
                "with LoRA the base W_Q/W_K are frozen, so LongAct would select nothing to train"
            )
    return None


def describe(
    cfg: Any, adapter: ArchAdapter, ratio: float, rank: int, granularity: str = "channel"
) -> list[str]:
    """What LoRA + LongAct train per projection, summed over layers, from the config
    alone: lora_B rows kept / all, the rank, lora_B parameters trained / all, and the
    lora_A parameters of the module (trained in full; a fused module's is shared)."""
    layout = adapter.layout(cfg)
    hidden = int(adapter.text_config(cfg).hidden_size)
    acc: dict[str, list[int]] = {}  # proj -> [layers, rows kept, rows]
    for key in layout.keys():
        g = layout.geom(key)
        _, kept = count_kept(ratio, g, granularity)  # rows of the kept units (at most)
        a = acc.setdefault(key[1], [0, 0, 0])
        a[0], a[1], a[2] = a[0] + 1, a[1] + kept, a[2] + g.rows
    head = ("proj", "module", "layers", "lora_B rows kept / all", "lora_B params trained / all",
            "lora_A params")  # fmt: skip
    table, shared = [head], set()
    for proj in PROJS:
        if proj not in acc:
            continue
        layers, kept, total = acc[proj]
        mod = next(a for a, ps in adapter.proj_modules.items() if proj in ps)
        a_params = f"shared with {PROJS[0]}" if mod in shared else f"{layers * rank * hidden:,}"
        shared.add(mod)
        table.append((proj, mod, str(layers), f"{kept:,} / {total:,}",
                      f"{kept * rank:,} / {total * rank:,}", a_params))  # fmt: skip
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    out = [
        f"LoRA r={rank} + LongAct ({granularity}, ratio {ratio}): lora_B rows of the "
        "selected q/k channels train; lora_A and the other adapters train in full"
    ]
    for row in table:
        cells = [c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        out.append("  " + "  ".join(cells))
    return out


@torch.no_grad()
def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under peft's saved names, gathered whole (a collective on
    FSDP2 DTensors: every rank must call it, in the same order)."""
    from peft import get_peft_model_state_dict

    pm = peft_model(model)
    if pm is None:
        raise LoRAError("the model has no peft adapter to save")
    # FSDP2 may keep parameters on the CPU (offload) while NCCL gathers on the GPU
    device = "cuda" if torch.cuda.is_available() else "cpu"
    full = {}
    for name, p in pm.named_parameters():
        if "lora_" in name:
            t = p.to(device).full_tensor() if hasattr(p, "full_tensor") else p
            full[name.replace("_fsdp_wrapped_module.", "")] = t.detach().to("cpu").clone()
    return get_peft_model_state_dict(pm, state_dict=full)


def save_adapter(model: nn.Module, out: str | Path, write: bool = True, base: str | None = None):
    """Write ``out`` as a peft adapter folder (atomic: a temporary folder renamed into
    place). Every rank calls it (the gather is collective); only ``write`` ranks write."""
    from safetensors.torch import save_file

    state = adapter_state(model)
    if not write:
        return None
    pm = peft_model(model)
    ((_, cfg),) = pm.peft_config.items()
    out = Path(out)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    saved = cfg.to_dict()
    if base:
        saved["base_model_name_or_path"] = str(base)
    for key, value in saved.items():
        if isinstance(value, set):
            saved[key] = sorted(value)
    saved["peft_type"] = str(getattr(cfg.peft_type, "value", cfg.peft_type))
    if getattr(cfg, "task_type", None) is not None:
        saved["task_type"] = str(getattr(cfg.task_type, "value", cfg.task_type))
    (tmp / "adapter_config.json").write_text(json.dumps(saved, indent=2, default=str))
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "adapter_model.safetensors"))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def find_adapter(path: str | Path) -> Path | None:
    """The peft adapter folder at ``path``, or in a step's actor folder under it."""
    p = Path(path)
    for cand in (p, p / ADAPTER_DIR, p / "actor" / ADAPTER_DIR):
        if (cand / "adapter_config.json").is_file():
            return cand
    return None


def adapter_base(adapter: Path, base: str | Path | None = None) -> Path:
    """The base model an adapter applies to: ``base``, or its config's base path."""
    if base is None:
        base = json.loads((adapter / "adapter_config.json").read_text()).get(
            "base_model_name_or_path"
        )
    if not base or not (Path(base) / "config.json").is_file():
        raise LoRAError(
            f"the base model of the LoRA adapter {adapter} is not a local model directory "
            f"({base!r}); pass it explicitly (--base DIR)"
        )
    return Path(base)


def load_with_adapter(adapter: Path, base: str | Path | None = None, merge: bool = False, **kw):
    """The base causal LM with the adapter loaded (``merge``: folded into its weights)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(adapter_base(adapter, base), **kw)
    model = PeftModel.from_pretrained(model, str(adapter))
    return model.merge_and_unload() if merge else model


def merge_adapter(adapter: Path, out: Path, base: str | Path | None = None) -> Path:
    """Write base + adapter, merged, as a plain model directory (tokenizer included)."""
    from transformers import AutoTokenizer

    base_dir = adapter_base(adapter, base)
    load_with_adapter(adapter, base_dir, merge=True).save_pretrained(out)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out)
    return out
