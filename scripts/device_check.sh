#!/usr/bin/env bash
# The GPU check (issue #20; scripts/device_check.py says what each step measures).
#
#   scripts/device_check.sh OUTDIR             # GPU machine: ≤ 8 minutes, needs .device-wheels/
#   scripts/device_check.sh --dry-run OUTDIR   # anywhere, no network, no wheels: seconds
#   scripts/device_check.sh [--dry-run] OUTDIR --only learner,weights
#
# Writes OUTDIR/device_check.json and OUTDIR/device_check.log; exits 0 when all it ran passed.
# On the GPU machine the carried wheels (scripts/device_wheels.sh) go into a private folder
# put first on PYTHONPATH, and the project runs from this tree (also on PYTHONPATH: its
# pyproject asks for Python 3.11, the machine has 3.12). PYTHON picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
dry_run=()
if [ "${1:-}" = "--dry-run" ]; then dry_run=(--dry-run); shift; fi
out=${1:?usage: scripts/device_check.sh [--dry-run] OUTDIR [--only STEPS]}
shift
PYTHON=${PYTHON:-python3}
mkdir -p "$out"

install_wheels() {
    local site=$1
    echo "device_check: installing $(ls .device-wheels/*.whl | wc -l) wheels into $site"
    if "$PYTHON" -m pip --version >/dev/null 2>&1; then
        "$PYTHON" -m pip install --quiet --no-index --no-deps --disable-pip-version-check \
            --target "$site" .device-wheels/*.whl
    else  # no pip there: a wheel is a zip laid out for site-packages
        for wheel in .device-wheels/*.whl; do "$PYTHON" -m zipfile -e "$wheel" "$site"; done
        chmod +x "$site"/ninja/data/bin/ninja 2>/dev/null || true
    fi
}

main() {
    local site=""
    if [ ${#dry_run[@]} -eq 0 ]; then
        [ -d .device-wheels ] || { echo "device_check: no .device-wheels/ (run scripts/device_wheels.sh)"; return 1; }
        local tmp
        tmp=$(mktemp -d)
        trap 'rm -rf "$tmp"' EXIT  # main runs in the pipeline's subshell: this is its exit
        site=$tmp/site
        install_wheels "$site"
        export PATH="$site/bin:$site/ninja/data/bin:$PATH"  # ninja, for DeepSpeed's JIT ops
    fi
    export PYTHONPATH="${site:+$site:}$PWD${PYTHONPATH:+:$PYTHONPATH}"
    # torch.distributed's renamed-collective notices, once per DeepSpeed call site: noise here.
    export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore::FutureWarning}
    "$PYTHON" scripts/device_check.py "${dry_run[@]}" "$out" "$@"
}

start=$(date +%s)
set +e
main "$@" 2>&1 | tee "$out/device_check.log"
code=${PIPESTATUS[0]}
set -e
echo "device_check: exit $code after $(( $(date +%s) - start )) s; report in $out/device_check.json" \
    | tee -a "$out/device_check.log"
exit "$code"
