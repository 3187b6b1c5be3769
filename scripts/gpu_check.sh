#!/usr/bin/env bash
# The GPU check of LongAct's cluster path, on one GPU machine with no internet:
#
#   scripts/gpu_check.sh [--wheels DIR] [--out DIR] [--device cuda|cpu]
#
# 1. Installs what the machine lacks from the wheels in DIR (default: .whl, made by
#    scripts/gpu_wheels.sh on a machine with the package registry), and LongAct itself,
#    into /tmp/longact-site, without touching the machine's own packages. Skipped where
#    verl and Ray already import.
# 2. Prints the machine: GPU, driver, torch and its CUDA, verl, Ray, transformers, and
#    whether verl loaded LongAct's plugin.
# 3. Runs scripts/gpu_check.py: the GRPO recipe with a tiny model on CUDA (FSDP2, bf16,
#    gradient checkpointing, param and optimizer offload, the hf rollout), 4 steps with
#    a refresh, save, kill, resume; frozen rows bit-identical; the actor-update time
#    with LongAct on vs off. Bounded at 8 minutes.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHEELS="$ROOT/.whl"
ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --wheels) WHEELS="${2:?--wheels needs a folder}"; shift ;;
    --out|--device) ARGS+=("$1" "${2:?$1 needs a value}"); shift ;;
    *) echo "gpu_check.sh: unknown option '$1' (allowed: --wheels DIR, --out DIR, --device cuda|cpu)" >&2; exit 2 ;;
  esac
  shift
done
PY="${PYTHON:-python3}"
SITE=/tmp/longact-site

if ! "$PY" -c "import verl, ray, hydra" 2>/dev/null; then
  ls "$WHEELS"/*.whl >/dev/null 2>&1 || {
    echo "gpu_check.sh: verl/ray are missing and $WHEELS holds no wheels (make them with scripts/gpu_wheels.sh)" >&2
    exit 2
  }
  echo "[gpu_check] installing $(ls "$WHEELS"/*.whl | wc -l) wheels into $SITE"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "$WHEELS"/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$PY" -c "import longact.workers" 2>/dev/null; then
  echo "[gpu_check] installing longact into $SITE"
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --target "$SITE" "$ROOT"
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PATH="$SITE/bin:$PATH"

"$PY" - <<'PYEOF'
import importlib.metadata as md
import torch
import verl  # loads LongAct's plugin through verl's entry point
from verl.workers.engine.base import EngineRegistry

print(f"[gpu_check] torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"GPUs: {[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}")
for name in ("verl", "ray", "transformers", "hydra-core", "longact"):
    print(f"[gpu_check] {name} {md.version(name)}")
engines = EngineRegistry._engines.get("language_model", {}).get("fsdp2", {})
print(f"[gpu_check] verl FSDP2 engines: { {k: v.__name__ for k, v in engines.items()} }")
PYEOF
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true

cd "$ROOT"
timeout 480 "$PY" scripts/gpu_check.py "${ARGS[@]}"
