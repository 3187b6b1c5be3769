"""Read what a LongAct run saved, for the checks that audit it (gpu_check, e2e tests).

A step's folder ``global_step_N/actor`` holds verl's shards (``model_world_size_W_rank_R``,
``optim_world_size_W_rank_R``), the Hugging Face weights (``huggingface/``) when
``save_contents`` includes ``hf_model``, and LongAct's ``longact_state_rank{R}.pt``; in a
LoRA run, also the adapter LongAct writes (``lora_adapter/``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from longact.core.masks import MaskSet
from longact.train.runtime import state_path

QK_SUFFIXES = ("q_proj.weight", "k_proj.weight")


def step_dir(ckpt: Path, step: int) -> Path:
    return Path(ckpt) / f"global_step_{step}" / "actor"


def saved_masks(ckpt: Path, step: int, rank: int = 0) -> tuple[MaskSet, dict]:
    """The masks (with their version) a step's checkpoint saved, and rank's whole state."""
    state = torch.load(state_path(step_dir(ckpt, step), rank), weights_only=False)
    return MaskSet.from_state_dict(state["coordinator"]["masks"]), state


def hf_weights(ckpt: Path, step: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(step_dir(ckpt, step) / "huggingface" / "model.safetensors"))


def qk_optimizer_state(ckpt: Path, step: int, model_dir: Path, world: int) -> dict:
    """{(param name, state key): (rows, ...) tensor} of every row-shaped optimizer state
    (Adam's moments, RMSprop's square average, momentum) of every W_Q/W_K weight in the
    step's verl optimizer shards, each rank's ``Shard(0)`` rows put back in place.
    verl keys optimizer state by parameter index, in ``named_parameters`` order."""
    from transformers import AutoModelForCausalLM

    names = [n for n, _ in AutoModelForCausalLM.from_pretrained(model_dir).named_parameters()]
    parts: dict = {}
    for rank in range(world):
        path = step_dir(ckpt, step) / f"optim_world_size_{world}_rank_{rank}.pt"
        sd = torch.load(path, weights_only=False)
        for idx, state in sd["state"].items():
            name = names[int(idx)]
            if not name.endswith(QK_SUFFIXES):
                continue
            for key, value in state.items():
                local = value.to_local() if hasattr(value, "to_local") else value
                if torch.is_tensor(local) and local.dim() >= 1:
                    parts.setdefault((name, key), []).append(local)
    return {k: torch.cat(v) for k, v in parts.items()}


def qk_slot(name: str) -> tuple[int, str]:
    """``model.layers.3.self_attn.k_proj.weight`` -> (3, "k")."""
    return int(name.split(".layers.")[1].split(".")[0]), "q" if ".q_proj." in name else "k"


def lora_weights(ckpt: Path, step: int) -> dict[str, torch.Tensor]:
    """The adapter LongAct saved at a step of a LoRA run (peft's names, ``lora_B.weight``)."""
    from safetensors.torch import load_file

    from longact.core.lora import ADAPTER_DIR

    return load_file(str(step_dir(ckpt, step) / ADAPTER_DIR / "adapter_model.safetensors"))


def lora_qk_rows(weights: dict, config) -> dict[str, list]:
    """{name: [(key, rows)]} of every q/k ``lora_B`` in a saved adapter: which of its rows
    hold the channels of which (layer, q|k), through the model family's adapter."""
    from longact.core.arch import get_adapter

    adapter = get_adapter(config)
    layout = adapter.layout(config)
    out = {}
    for name, w in weights.items():
        # peft saves ``...q_proj.lora_B.weight``; the live parameter carries the adapter name
        ref = adapter.match_param(name.replace(".lora_B.weight", ".lora_B.default.weight"))
        if ref is not None:
            out[name] = adapter.param_rows(ref, layout, w.shape[0])
    return out
