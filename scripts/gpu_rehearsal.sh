#!/usr/bin/env bash
# `make gpu-rehearsal`: the GPU check run on this CPU machine as the GPU machine runs it,
# so the one check we ship for a rarely lent GPU works the first time it meets one.
#
#   scripts/gpu_rehearsal.sh [--dir DIR] [--budget S]     (defaults: .rehearsal, 900)
#
# 1. A fresh virtualenv holding only what the GPU machine carries: the packages of
#    scripts/gpu_machine_packages.txt (installed --no-deps: that set is its own closure),
#    less the ones the file leaves out and says why, with this machine's CPU torch 2.13.0
#    standing in for the CUDA torch. No verl, Ray or Hydra.
# 2. scripts/gpu_wheels.sh for this Python, the wheels a GPU machine is given.
# 3. From the checkout's root, exactly as on the GPU machine:
#    PYTHON=<venv python> scripts/gpu_check.sh --wheels DIR/wheels --device cpu
#    (--target install into /tmp/longact-site, PYTHONPATH, the console scripts from its
#    bin/). The budget is wider than the GPU's 480 s: 2 CPU cores run the same training.
# 4. A summary: the time of each phase, and gpu_check's JSON report (DIR/check).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="$ROOT/.rehearsal"
BUDGET=900
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dir) DIR="${2:?--dir needs a folder}"; shift ;;
    --budget) BUDGET="${2:?--budget needs seconds}"; shift ;;
    *) echo "gpu_rehearsal.sh: unknown option '$1' (allowed: --dir DIR, --budget S)" >&2; exit 2 ;;
  esac
  shift
done
BASE_PY="${PYTHON:-python3}"
LIST="$ROOT/scripts/gpu_machine_packages.txt"
now() { date +%s; }
T0=$(now)

rm -rf "$DIR" /tmp/longact-site
mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd)"
"$BASE_PY" -m venv "$DIR/venv"
VPY="$DIR/venv/bin/python"
PIP=("$VPY" -m pip install --disable-pip-version-check -q)
PYVER="$("$VPY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"

echo "[rehearsal] 1/3 a Python $PYVER virtualenv with the GPU machine's packages ($DIR/venv)"
mapfile -t TORCH < <("$VPY" "$ROOT/scripts/torch_source.py" "$VPY")
"${PIP[@]}" "${TORCH[@]}"
grep -v '^[#-]' "$LIST" | awk 'NF { print $1 }' > "$DIR/packages.txt"
"${PIP[@]}" --no-deps -r "$DIR/packages.txt"
echo "[rehearsal] $(wc -l < "$DIR/packages.txt") packages installed; left out (scripts/gpu_machine_packages.txt says why):"
grep '^-' "$LIST" | awk '{ printf "  %s", substr($1, 2) } END { print "" }'
if "$VPY" -c "import verl" 2>/dev/null || "$VPY" -c "import ray" 2>/dev/null || "$VPY" -c "import hydra" 2>/dev/null; then
  echo "gpu_rehearsal.sh: the GPU machine's set must not hold verl, Ray or Hydra" >&2
  exit 1
fi
T1=$(now)

echo "[rehearsal] 2/3 scripts/gpu_wheels.sh --python $PYVER"
PYTHON="$VPY" bash "$ROOT/scripts/gpu_wheels.sh" --python "$PYVER" "$DIR/wheels"
T2=$(now)

echo "[rehearsal] 3/3 scripts/gpu_check.sh --device cpu, from $ROOT"
cd "$ROOT"
set +e
PYTHON="$VPY" bash scripts/gpu_check.sh --wheels "$DIR/wheels" --device cpu \
  --out "$DIR/check" --budget "$BUDGET" 2>&1 | tee "$DIR/gpu_check.log"
RC=${PIPESTATUS[0]}
set -e
T3=$(now)

echo "[rehearsal] machine set $((T1 - T0)) s, wheels $((T2 - T1)) s ($(ls "$DIR"/wheels/*.whl | wc -l) wheels, $(du -sm "$DIR/wheels" | cut -f1) MiB), gpu_check.sh $((T3 - T2)) s (exit $RC)"
[[ -f "$DIR/check/gpu_check.json" ]] && echo "[rehearsal] report: $DIR/check/gpu_check.json"
exit "$RC"
