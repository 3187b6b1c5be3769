#!/usr/bin/env bash
# One install path for a bare machine, the Makefile and both Docker images.
#
#   scripts/install.sh cpu [--dev] [--venv DIR] [--editable]
#   scripts/install.sh gpu [--venv DIR]
#
# cpu: torch 2.13.0 (CPU build) + verl + the CPU set, pinned by requirements/cpu.lock.
# gpu: the versions verl's GPU extras pin (torch 2.11.0, vllm 0.24.0, flash-attn 2.8.3).
# --venv DIR creates/uses a virtualenv (default: install into the current python).
# Idempotent: a stamp records the hash of the requirement files; a rerun with the same
# files and flags does nothing.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SET="${1:-}"
shift || true
DEV=0
VENV=""
EDITABLE=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dev) DEV=1 ;;
    --venv) VENV="$2"; shift ;;
    --editable) EDITABLE=1 ;;
    *) echo "install.sh: unknown option '$1' (allowed: --dev, --venv DIR, --editable)" >&2; exit 2 ;;
  esac
  shift
done
case "$SET" in
  cpu|gpu) ;;
  *) echo "install.sh: first argument must be 'cpu' or 'gpu', got '${SET}'" >&2; exit 2 ;;
esac

PY="${PYTHON:-python3}"
if [[ -n "$VENV" ]]; then
  if [[ ! -x "$VENV/bin/python" ]]; then
    echo "[install] creating virtualenv $VENV"
    "$PY" -m venv "$VENV"
  fi
  PY="$VENV/bin/python"
fi

STAMP_DIR="$("$PY" -c 'import sys; print(sys.prefix)')"
STAMP="$STAMP_DIR/.longact-install-$SET"
HASH="$(cat "$ROOT"/requirements/*.txt "$ROOT"/requirements/*.lock "$ROOT/setup.py" \
  | sha256sum | cut -c1-16)-dev$DEV-ed$EDITABLE"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$HASH" ]]; then
  echo "[install] $SET set already installed in $STAMP_DIR (delete $STAMP to force)"
  exit 0
fi

PIP=("$PY" -m pip install --disable-pip-version-check -q)
if [[ "$SET" == "cpu" ]]; then
  # torch first and alone: pinned, so pip takes the CPU build and never a CUDA one.
  echo "[install] torch (CPU build)"
  "${PIP[@]}" torch==2.13.0
  REQS=(-r "$ROOT/requirements/cpu.txt")
  [[ $DEV == 1 ]] && REQS+=(-r "$ROOT/requirements/dev.txt")
  echo "[install] verl, ray, transformers and the CPU set (pinned by requirements/cpu.lock)"
  "${PIP[@]}" "${REQS[@]}" -c "$ROOT/requirements/cpu.lock"
else
  echo "[install] GPU set (torch 2.11.0, vllm 0.24.0, flash-attn 2.8.3)"
  "${PIP[@]}" torch==2.11.0 torchvision==0.26.0 torchaudio==2.11.0
  # flash-attn 2.8.3 is source-only and imports torch in its setup: no build isolation
  "${PIP[@]}" setuptools wheel packaging psutil ninja einops
  "${PIP[@]}" --no-build-isolation flash-attn==2.8.3
  "${PIP[@]}" -r "$ROOT/requirements/gpu.txt"
  [[ $DEV == 1 ]] && "${PIP[@]}" -r "$ROOT/requirements/dev.txt"
fi

echo "[install] longact"
if [[ $EDITABLE == 1 ]]; then
  "${PIP[@]}" --no-deps -e "$ROOT"
else
  "${PIP[@]}" --no-deps "$ROOT"
fi
echo "$HASH" > "$STAMP"
echo "[install] done ($SET) in $STAMP_DIR"
