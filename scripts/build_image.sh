#!/usr/bin/env bash
# Build LongAct's CPU or GPU image from docker/Dockerfile[.cpu], with docker where an
# engine answers and with buildah (chroot isolation, as root) where none does.
#
#   scripts/build_image.sh cpu|gpu [--tag NAME] [--base IMAGE | --debian-base]
#       [--wheels DIR] [--ca-bundle FILE] [--engine docker|buildah] [--build-arg K=V]...
#       [--dry-run]
#
# --tag NAME       image name (default longact:cpu, longact:gpu)
# --base IMAGE     the Dockerfile's BASE_IMAGE (default: its own, python:3.11.7-slim-bookworm
#                  or nvidia/cuda:13.0.1-cudnn-devel-ubuntu24.04)
# --debian-base    make the base from distribution packages with debootstrap, for hosts
#                  that cannot pull from Docker Hub: cpu -> Debian bookworm + python3
#                  (longact-base:bookworm); gpu -> Ubuntu 24.04, no CUDA toolkit
#                  (longact-base:noble; add --build-arg SKIP_FLASH_ATTN=1). Made once per
#                  engine, then reused. Mirrors: DEBIAN_MIRROR, UBUNTU_MIRROR; Ubuntu's
#                  archive key: UBUNTU_KEYRING (default: ubuntu-keyring's file).
# --wheels DIR     wheels pip may take during the build (a local torch CPU wheel, a
#                  prebuilt flash-attn), mounted, never copied into a layer (default:
#                  docker/wheels where it holds a wheel)
# --ca-bundle FILE a CA bundle for TLS inside the build (behind a TLS-inspecting proxy),
#                  passed as a build secret, never copied into a layer
# --engine         docker or buildah (default: docker if its daemon answers, else buildah)
# --build-arg K=V  passed on (e.g. UID=$(id -u), SKIP_FLASH_ATTN=1, TORCH_INDEX_URL=...)
# --dry-run        print the build command (and whether a base would be made); run nothing
#
# The Dockerfiles stay the one description of each image: this script only chooses the
# engine and the base and passes the mounts (BuildKit's --build-context and --secret,
# which buildah takes too). Prints the build time and the image's size.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
usage() { sed -n '5,7p' "${BASH_SOURCE[0]}" | sed 's/^# //' >&2; }
die() { echo "build_image.sh: $*" >&2; exit 2; }

TIER="${1:-}"
case "$TIER" in
  cpu) DOCKERFILE="$ROOT/docker/Dockerfile.cpu" ;;
  gpu) DOCKERFILE="$ROOT/docker/Dockerfile" ;;
  *) usage; die "first argument must be 'cpu' or 'gpu', got '${TIER}'" ;;
esac
shift
TAG="longact:$TIER"
BASE=""
DEBIAN_BASE=0
WHEELS=""
CA=""
ENGINE=""
DRY=0
ARGS=()
need() { [[ $# -ge 2 && -n "$2" && "$2" != --* ]] || die "$1 needs a value"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tag) need "$@"; TAG="$2"; shift ;;
    --base) need "$@"; BASE="$2"; shift ;;
    --debian-base) DEBIAN_BASE=1 ;;
    --wheels) need "$@"; WHEELS="$2"; shift ;;
    --ca-bundle) need "$@"; CA="$2"; shift ;;
    --engine) need "$@"; ENGINE="$2"; shift ;;
    --build-arg) need "$@"; ARGS+=(--build-arg "$2"); shift ;;
    --dry-run) DRY=1 ;;
    -h|--help) usage; exit 0 ;;
    *) usage; die "unknown option '$1' (allowed: --tag, --base, --debian-base, --wheels, --ca-bundle, --engine, --build-arg, --dry-run)" ;;
  esac
  shift
done
[[ -n "$BASE" && $DEBIAN_BASE == 1 ]] && die "--base and --debian-base exclude each other"
if [[ -n "$WHEELS" && ! -d "$WHEELS" ]]; then die "--wheels $WHEELS is not a folder"; fi
if [[ -n "$CA" && ! -s "$CA" ]]; then die "--ca-bundle $CA is not a readable, non-empty file"; fi
if [[ -z "$WHEELS" ]] && compgen -G "$ROOT/docker/wheels/*.whl" > /dev/null; then
  WHEELS="$ROOT/docker/wheels"
fi

if [[ -z "$ENGINE" ]]; then
  if command -v docker > /dev/null && docker info > /dev/null 2>&1; then
    ENGINE=docker
  elif command -v buildah > /dev/null; then
    ENGINE=buildah
  else
    die "neither a docker engine (docker info fails) nor buildah is here; install one (Debian: apt-get install buildah)"
  fi
fi
case "$ENGINE" in
  docker) ;;
  buildah)
    command -v buildah > /dev/null || die "--engine buildah: buildah is not installed (Debian: apt-get install buildah)"
    [[ $(id -u) == 0 ]] || die "--engine buildah with chroot isolation runs as root (this is uid $(id -u))"
    ;;
  *) die "--engine must be 'docker' or 'buildah', got '$ENGINE'" ;;
esac

has_image() {
  if [[ $ENGINE == docker ]]; then docker image inspect "$1" > /dev/null 2>&1
  else buildah inspect --type image "$1" > /dev/null 2>&1; fi
}

# A base from distribution packages: debootstrap's minimal root file system, imported as
# a one-layer image.
make_base() {
  local name="$1" dir
  command -v debootstrap > /dev/null || die "--debian-base needs debootstrap (Debian: apt-get install debootstrap)"
  [[ $(id -u) == 0 ]] || die "--debian-base runs debootstrap, which needs root"
  dir="$(mktemp -d)"
  # shellcheck disable=SC2064
  trap "rm -rf '$dir'" EXIT
  echo "[build_image] making $name with debootstrap"
  if [[ $TIER == cpu ]]; then
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
      bookworm "$dir/root" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" > "$dir/log" \
      || { tail -20 "$dir/log" >&2; die "debootstrap failed"; }
  else
    local keyring="${UBUNTU_KEYRING:-/usr/share/keyrings/ubuntu-archive-keyring.gpg}"
    [[ -f $keyring ]] || die "--debian-base for gpu checks Ubuntu's archive signature with $keyring, which is missing: install Ubuntu's ubuntu-keyring package (on Ubuntu, or its .deb from the archive's pool/main/u/ubuntu-keyring/ on Debian), or set UBUNTU_KEYRING=FILE"
    debootstrap --variant=minbase --include=ca-certificates --components=main,universe \
      --keyring="$keyring" noble "$dir/root" "${UBUNTU_MIRROR:-http://archive.ubuntu.com/ubuntu}" \
      /usr/share/debootstrap/scripts/gutsy > "$dir/log" \
      || { tail -20 "$dir/log" >&2; die "debootstrap failed"; }
  fi
  rm -rf "$dir"/root/var/cache/apt/archives/*.deb "$dir"/root/var/lib/apt/lists/*
  local env=(PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8)
  if [[ $ENGINE == docker ]]; then
    tar -C "$dir/root" -c . | docker import --change "ENV ${env[0]}" --change "ENV ${env[1]}" \
      --change 'CMD ["/bin/bash"]' - "$name" > /dev/null
  else
    local ctr
    ctr="$(buildah from scratch)"
    tar -C "$dir/root" -cf "$dir/root.tar" .
    buildah add --quiet "$ctr" "$dir/root.tar" / > /dev/null  # a local tar is unpacked
    buildah config --env "${env[0]}" --env "${env[1]}" --cmd /bin/bash "$ctr"
    buildah commit --quiet "$ctr" "$name" > /dev/null
    buildah rm "$ctr" > /dev/null
  fi
  rm -rf "$dir"
  trap - EXIT
}

if [[ $DEBIAN_BASE == 1 ]]; then
  BASE="localhost/longact-base:$([[ $TIER == cpu ]] && echo bookworm || echo noble)"
  if ! has_image "$BASE"; then
    if [[ $DRY == 1 ]]; then echo "[build_image] would make $BASE with debootstrap"
    else make_base "$BASE"; fi
  fi
fi
[[ -n "$BASE" ]] && ARGS+=(--build-arg "BASE_IMAGE=$BASE")
[[ -n "$WHEELS" ]] && ARGS+=(--build-context "wheels=$(cd "$WHEELS" && pwd)")
[[ -n "$CA" ]] && ARGS+=(--secret "id=ca_bundle,src=$(cd "$(dirname "$CA")" && pwd)/$(basename "$CA")")

echo "[build_image] $ENGINE: $TAG from ${DOCKERFILE#"$ROOT"/}${BASE:+ on $BASE}${WHEELS:+, wheels from $WHEELS}${CA:+, CA bundle $CA}"
if [[ $ENGINE == docker ]]; then
  BUILD=(env DOCKER_BUILDKIT=1 docker build)
else
  # docker format keeps SHELL (OCI images have no field for it); --layers caches each
  # step; --force-rm removes the working container of a failed step (GBs, otherwise kept)
  BUILD=(buildah bud --isolation chroot --layers --force-rm --format docker)
fi
BUILD+=(-f "$DOCKERFILE" -t "$TAG" "${ARGS[@]}" "$ROOT")
if [[ $DRY == 1 ]]; then
  printf '%q ' "${BUILD[@]}"
  echo
  exit 0
fi
START=$SECONDS
"${BUILD[@]}"
if [[ $ENGINE == docker ]]; then
  SIZE="$(docker image ls --format '{{.Size}}' "$TAG" | head -1)"
else
  SIZE="$(buildah images --format '{{.Size}}' "$TAG" | head -1)"
fi
echo "[build_image] built $TAG in $((SECONDS - START)) s, $SIZE"
