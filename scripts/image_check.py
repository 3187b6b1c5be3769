"""What an image build checks before it is tagged (both Dockerfiles run this; the CPU
tier is also tested in `make test` on the project's own environment).

    python scripts/image_check.py --tier cpu|gpu

- torch imports, and is the tier's build: no CUDA for ``cpu``; CUDA 13 for ``gpu``;
- ``gpu``: flash_attn (unless the image was built with ``SKIP_FLASH_ATTN=1``) and vllm
  import;
- verl imports with LongAct's plugin loaded: LongAct's engine is verl's FSDP2 engine
  for the tier's device, and the ``hf`` rollout is registered;
- ``longact --help`` and ``longact-train --help`` run;
- ``pip check`` finds no broken requirement beyond the CPU tier's known one
  (``longact.workers.vllm_cpu.unexpected_pip_check_lines``).

Exits 1 with one line per failed check.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path


def checks(tier: str) -> list[str]:
    problems = []
    import torch

    cuda = torch.version.cuda
    if tier == "cpu" and cuda is not None:
        problems.append(
            f"torch {torch.__version__} is a CUDA {cuda} build; the CPU tier wants the CPU one"
        )
    if tier == "gpu" and not (cuda or "").startswith("13"):
        problems.append(f"torch {torch.__version__} has CUDA {cuda!r}; the GPU image wants CUDA 13")
    if tier == "gpu":
        skip_fa = os.environ.get("LONGACT_SKIP_FLASH_ATTN") == "1"  # the sdpa-only fallback
        for mod in ("vllm",) if skip_fa else ("flash_attn", "vllm"):
            try:
                importlib.import_module(mod)
            except Exception as e:  # noqa: BLE001 - reported, not raised
                problems.append(f"import {mod} failed: {type(e).__name__}: {e}")
    from verl.workers.rollout import base as rollout_base

    from longact.train.plugin_check import plugin_problem

    problem = plugin_problem("cpu" if tier == "cpu" else "cuda")
    if problem:
        problems.append(f"LongAct's verl plugin is not loaded: {problem}")
    if ("hf", "async") not in rollout_base._ROLLOUT_REGISTRY:
        problems.append("the hf rollout is not registered in verl")
    for script in ("longact", "longact-train"):
        exe = shutil.which(script) or str(Path(sys.executable).parent / script)
        proc = subprocess.run([exe, "--help"], capture_output=True, text=True)
        if proc.returncode != 0:
            problems.append(
                f"{script} --help exited {proc.returncode}: {proc.stderr.strip()[-300:]}"
            )
    from longact.workers.vllm_cpu import unexpected_pip_check_lines

    proc = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    broken = unexpected_pip_check_lines(proc.stdout)  # the CPU tier's known lines aside
    if broken:
        problems.append("pip check: " + "; ".join(broken))
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description="check an installed LongAct image")
    ap.add_argument("--tier", choices=("cpu", "gpu"), required=True)
    problems = checks(ap.parse_args().tier)
    for p in problems:
        print(f"image_check: {p}", file=sys.stderr)
    if not problems:
        print("image_check: ok")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
