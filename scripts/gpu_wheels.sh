#!/usr/bin/env bash
# Wheels for scripts/gpu_check.sh on a GPU machine that has no internet, made on a
# machine that reaches the package registry:
#
#   scripts/gpu_wheels.sh [--python X.Y] [DIR]     (defaults: 3.12, .whl)
#
# The GPU machine carries Python 3.12 and the packages in scripts/gpu_machine_packages.txt
# (CUDA torch, numpy, pandas, pyarrow, safetensors, huggingface_hub, aiohttp, grpcio,
# psutil, pyyaml, requests, ...). This brings the rest at the versions of
# requirements/cpu.lock (verl, Ray, Hydra, verl's trainer imports, and the transformers
# verl 0.9.1 accepts), manylinux x86_64, for CPython X.Y. `make gpu-rehearsal` builds the
# set for this machine's Python and proves it is enough.
# Ray's Java jars, dashboard front end and libraries verl never imports (rllib, data,
# serve, tune, train, llm) are dropped (45 MB),
# so the set fits the 64 MiB that travels with one device call. Prints the total.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYVER=3.12
if [[ "${1:-}" == --python ]]; then
  PYVER="${2:?--python needs a version, e.g. 3.12}"
  shift 2
fi
[[ "$PYVER" =~ ^3\.[0-9]+$ ]] || { echo "gpu_wheels.sh: --python '$PYVER' is not a version like 3.12" >&2; exit 2; }
DIR="${1:-$ROOT/.whl}"
PY="${PYTHON:-python3}"
mkdir -p "$DIR"

pin() {  # NAME -> NAME==VERSION from requirements/cpu.lock
  local line
  line="$(grep -i "^$1==" "$ROOT/requirements/cpu.lock" || true)"
  [[ -n "$line" ]] || { echo "gpu_wheels.sh: $1 is not in requirements/cpu.lock" >&2; exit 2; }
  echo "$line"
}

BINARY=(verl ray hydra-core omegaconf codetiming datasets dill multiprocess torchdata
  tensordict pyvers TransferQueue pyzmq msgspec cachetools fastapi starlette pydantic
  pydantic_core annotated-types annotated-doc typing-inspection uvicorn jsonschema
  jsonschema-specifications referencing rpds-py transformers tokenizers orjson
  opentelemetry-api)  # fastapi imports opentelemetry; the GPU machine has none
SOURCE_ONLY=(antlr4-python3-runtime pylatexenc)  # pure Python, published as sdists

PINS=()
for name in "${BINARY[@]}"; do PINS+=("$(pin "$name")"); done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$DIR" "${PINS[@]}"
for name in "${SOURCE_ONLY[@]}"; do
  "$PY" -m pip wheel -q --no-deps -w "$DIR" "$(pin "$name")"
done

# Ray without its Java jars, dashboard front end and unused libraries
for whl in "$DIR"/ray-*.whl; do
  [[ -e "$whl" ]] || continue
  "$PY" - "$whl" <<'EOF'
import os
import sys
import zipfile

src = sys.argv[1]
tmp = src + ".tmp"
dropped = ("ray/jars/", "ray/dashboard/client/build/") + tuple(
    f"ray/{lib}/" for lib in ("rllib", "data", "serve", "tune", "train", "llm")
)
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
    for item in zin.infolist():
        if item.filename.startswith(dropped):
            continue
        data = zin.read(item.filename)
        if item.filename.endswith(".dist-info/RECORD"):  # keep RECORD consistent
            data = b"\n".join(
                ln for ln in data.splitlines() if not ln.decode().startswith(dropped)
            ) + b"\n"
        zout.writestr(item, data)
os.replace(tmp, src)
EOF
done

total=$(du -cb "$DIR"/*.whl | tail -1 | cut -f1)
echo "gpu_wheels.sh: $(ls "$DIR"/*.whl | wc -l) wheels, $((total / 1048576)) MiB in $DIR (a device call carries 64 MiB)"
