#!/usr/bin/env bash
# The GPU check of LongAct's cluster path, on one GPU machine with no internet:
#
#   scripts/gpu_check.sh [--wheels DIR] [--out DIR] [--device cuda|cpu] [--budget S]
#
# 1. Installs what the machine lacks from the wheels in DIR (default: .whl, made by
#    scripts/gpu_wheels.sh on a machine with the package registry) into /tmp/longact-site,
#    without touching the machine's own packages (skipped where verl and Ray already
#    import), and LongAct itself from this checkout, always, with its console scripts in
#    /tmp/longact-site/bin and its verl.plugins entry point.
# 2. Prints the machine (GPU, driver, torch and its CUDA, verl, Ray, transformers),
#    imports the trainer, the rollout servers and the plugin, and stops if verl's engine
#    is not LongAct's (verl hides a plugin's import error).
# 3. Runs scripts/gpu_check.py (its docstring lists the checks), which writes one JSON
#    report, OUT/gpu_check.json (default OUT: runs/gpu_check), with the install's time.
#
# The whole check, install included, is bounded by --budget seconds (default 480). On a
# timeout, a failure or Ctrl-C every process it started is killed, the training runs'
# own process groups included, so nothing is left on the GPU.
set -euo pipefail

START=$(date +%s)
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHEELS="$ROOT/.whl"
BUDGET=480
ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --wheels) WHEELS="${2:?--wheels needs a folder}"; shift ;;
    --budget) BUDGET="${2:?--budget needs seconds}"; shift ;;
    --out|--device) ARGS+=("$1" "${2:?$1 needs a value}"); shift ;;
    *) echo "gpu_check.sh: unknown option '$1' (allowed: --wheels DIR, --out DIR, --device cuda|cpu, --budget S)" >&2; exit 2 ;;
  esac
  shift
done
[[ "$BUDGET" =~ ^[0-9]+$ ]] || { echo "gpu_check.sh: --budget '$BUDGET' is not a whole number of seconds" >&2; exit 2; }
PY="${PYTHON:-python3}"
SITE=/tmp/longact-site
PIP=("$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE")

if ! "$PY" -c "import verl, ray, hydra" 2>/dev/null; then
  ls "$WHEELS"/*.whl >/dev/null 2>&1 || {
    echo "gpu_check.sh: verl/ray are missing and $WHEELS holds no wheels (make them with scripts/gpu_wheels.sh)" >&2
    exit 2
  }
  echo "[gpu_check] installing $(ls "$WHEELS"/*.whl | wc -l) wheels into $SITE"
  "${PIP[@]}" "$WHEELS"/*.whl
fi
echo "[gpu_check] installing longact from $ROOT into $SITE"
"${PIP[@]}" --no-build-isolation "$ROOT"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$SITE/bin:$PATH"
[[ -x "$SITE/bin/longact-train" ]] || { echo "gpu_check.sh: $SITE/bin/longact-train was not installed" >&2; exit 3; }
INSTALL_S=$(( $(date +%s) - START ))

cd "$ROOT"  # as a user in a checkout: the source folder comes first on sys.path
DEVICE=cuda
for ((i = 0; i < ${#ARGS[@]}; i++)); do [[ "${ARGS[$i]}" == --device ]] && DEVICE="${ARGS[$((i + 1))]}"; done
"$PY" - "$DEVICE" <<'PYEOF'
import importlib
import importlib.metadata as md
import sys

import torch

from longact.train.plugin_check import plugin_problem

print(f"[gpu_check] torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"GPUs: {[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}")
for name in ("verl", "ray", "transformers", "hydra-core", "longact"):
    print(f"[gpu_check] {name} {md.version(name)}")
# what a run imports: verl's trainer and its v1 loop, the rollout servers and replicas
# LongAct's recipes use, LongAct's task runner, coordinator and plugin
for mod in ("verl.trainer.main_ppo", "verl.trainer.ppo.v1", "verl.workers.rollout.replica",
            "verl.workers.rollout.llm_server", "verl.workers.engine.fsdp.transformer_impl",
            "longact.train.entry", "longact.train.task_runner", "longact.distributed.coordinator",
            "longact.workers.plugin", "longact.workers.hf_rollout", "longact.workers.fsdp_engine"):
    importlib.import_module(mod)
print("[gpu_check] trainer, rollout servers and plugin import")
problem = plugin_problem(sys.argv[1])
if problem:
    sys.exit(f"gpu_check: LongAct's verl plugin is not loaded: {problem}")
print(f"[gpu_check] verl's FSDP2 engine for {sys.argv[1]} is LongAct's")
PYEOF
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true

LEFT=$(( BUDGET - ($(date +%s) - START) ))
(( LEFT > 60 )) || { echo "gpu_check.sh: the install took the budget (${BUDGET} s)" >&2; exit 124; }
# gpu_check.py kills its training runs' process groups on SIGTERM; -k: SIGKILL 20 s later
timeout -k 20 "$LEFT" "$PY" scripts/gpu_check.py "${ARGS[@]}" --install-s "$INSTALL_S" --budget-s "$BUDGET"
