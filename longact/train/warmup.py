"""Supervised warm-up before RL, with verl's own SFT trainer (plumbing).

RL needs a reward that is not always 0: from an untrained model every DAPO group is
filtered and GRPO's advantages are all zero. The paper starts RL from an SFT model;
``warmup`` trains one on a parquet of chat ``messages`` (``longact data make --sft``)
with ``verl.trainer.sft_trainer`` under torchrun (FSDP2 on gloo on the CPU, config
``hydra_configs/sft_warmup_cpu.yaml``), then copies the final Hugging Face model (the
weights verl writes with ``checkpoint.save_contents`` including ``hf_model``) to a plain
model folder that ``longact-train``, ``longact eval`` and ``longact inspect`` take.
"""

from __future__ import annotations

import shutil
import socket
import sys
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from longact.train.logs import parse_step_metrics

# what `make demo` measured to learn 2-digit retrieval in ~400 steps (docs/demo.md)
DEFAULT_OVERRIDES = (
    "optim.lr=2e-3",
    "optim.lr_scheduler_type=constant",
    "optim.lr_warmup_steps=20",
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def sft_command(
    model_dir: Path, data: Path, ckpt: Path, steps: int, ranks: int, overrides=DEFAULT_OVERRIDES
) -> list[str]:
    """The torchrun command of verl's SFT trainer for the warm-up."""
    cfg_dir = resources.files("longact.hydra_configs")
    return [
        sys.executable, "-m", "torch.distributed.run",
        f"--nproc_per_node={ranks}", "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
        "-m", "verl.trainer.sft_trainer",
        f"--config-path={cfg_dir}", "--config-name=sft_warmup_cpu",
        "hydra.searchpath=[pkg://verl.trainer.config]",
        f"model.path={model_dir}", f"data.train_files={data}",
        f"trainer.default_local_dir={ckpt}", f"trainer.n_gpus_per_node={ranks}",
        f"trainer.total_training_steps={steps}", "trainer.total_epochs=100",
        f"trainer.save_freq={steps}",
        *overrides,
    ]  # fmt: skip


def warmup(
    model_dir: Path,
    data: Path,
    work: Path,
    steps: int,
    ranks: int = 2,
    overrides=DEFAULT_OVERRIDES,
    log: Callable[[str], None] = print,
    every: int = 25,
) -> tuple[Path, dict[int, float]]:
    """Run the warm-up in ``work``; (the Hugging Face model folder, loss per step)."""
    from longact.demo.runner import stream

    losses: dict[int, float] = {}

    def progress(line: str) -> None:
        for step, m in parse_step_metrics(line).items():
            if "train/loss" in m:
                losses[step] = m["train/loss"]
                if step % every == 0 or step == steps:
                    log(f"  sft step {step}/{steps}  loss {m['train/loss']:.3f}")

    work.mkdir(parents=True, exist_ok=True)
    cmd = sft_command(model_dir, data, work / "ckpt", steps, ranks, overrides)
    stream(cmd, work / "sft.log", progress)
    hf = work / "ckpt" / f"global_step_{steps}" / "huggingface"
    if not (hf / "model.safetensors").is_file():
        raise RuntimeError(f"the warm-up wrote no loadable model at {hf}; see {work / 'sft.log'}")
    return hf, losses


def export_model(hf: Path, out: Path) -> Path:
    """Copy a checkpoint's Hugging Face folder to ``out`` (a plain model folder)."""
    out.mkdir(parents=True, exist_ok=True)
    for f in hf.iterdir():
        if f.is_file():
            shutil.copy2(f, out / f.name)
    return out
