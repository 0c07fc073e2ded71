#!/usr/bin/env bash
# Fills .device-wheels/ (git-ignored) with exactly the wheels of scripts/device_wheels.txt for
# the GPU machine (CPython 3.12, manylinux x86-64, no network), then prints their sizes and
# total. DeepSpeed ships only an sdist: it is built here as a pure-Python wheel (DS_BUILD_OPS=0;
# its ops JIT-compile on the GPU machine). Needs the network and the project's environment.
#
#   scripts/device_wheels.sh [DEST]
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.device-wheels}
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
LIST=scripts/device_wheels.txt

mapfile -t pins < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' "$LIST" | grep -v '^$')
binary=()
for pin in "${pins[@]}"; do
    case "$pin" in deepspeed==*) deepspeed=$pin ;; *) binary+=("$pin") ;; esac
done
platforms=()
for tag in $("$PYTHON" scripts/device_wheels.py platforms); do platforms+=(--platform "$tag"); done

rm -rf "$DEST"
mkdir -p "$DEST"
echo "device_wheels: downloading ${#binary[@]} wheels for CPython 3.12 manylinux x86-64"
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --abi cp312 "${platforms[@]}" --dest "$DEST" "${binary[@]}"
echo "device_wheels: building $deepspeed as a pure-Python wheel (DS_BUILD_OPS=0)"
DS_BUILD_OPS=0 "$PYTHON" -m pip wheel --quiet --no-deps --no-cache-dir --no-binary deepspeed \
    --wheel-dir "$DEST" "$deepspeed"
"$PYTHON" scripts/device_wheels.py check-folder "$DEST"
