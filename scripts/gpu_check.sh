#!/usr/bin/env bash
# The GPU check, in one command for a GPU machine lent for a few minutes with no network:
# versions, the pinned wheels from .whl/ (if carried), the CUDA tests, and a short GPU benchmark.
#
#   scripts/gpu_check.sh OUT_DIR [--dry-run]
#
# Run from anywhere; it works in the repository that holds it. pylomin is imported from the checkout
# (never installed); the wheels go to a target folder put first on PYTHONPATH. Each phase has a hard
# time limit and its failure does not stop the next; the exit codes go to OUT_DIR/summary.txt and
# the script exits non-zero if any phase failed. OUT_DIR stays flat, 7 files:
#   gpu_check.log  everything printed      pytest.log, pytest.xml  the CUDA tests
#   bench.log      the benchmark's output  bench.json, bench.txt   its figures    summary.txt  exit codes
# --dry-run (no GPU needed, ~30 s): the same phases with the wheels installed to a temporary folder,
# the CUDA tests only collected, and the benchmark's --dry-run (a tiny model on the CPU).
# PYTHON picks the interpreter (default: /opt/torch/.venv/bin/python3 where it exists, else python3).
set -u -o pipefail

usage() { echo "usage: scripts/gpu_check.sh OUT_DIR [--dry-run]" >&2; exit 2; }
[ $# -ge 1 ] && [ $# -le 2 ] || usage
OUT=$1
DRY=0
if [ $# -eq 2 ]; then [ "$2" = "--dry-run" ] || usage; DRY=1; fi
case "$OUT" in -*) usage ;; esac

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
if [ -z "${PYTHON:-}" ]; then
    if [ -x /opt/torch/.venv/bin/python3 ]; then PYTHON=/opt/torch/.venv/bin/python3; else PYTHON=python3; fi
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export TOKENIZERS_PARALLELISM=false
# Hard limits per phase (seconds): together about five minutes; the benchmark stops itself earlier.
T_VERSIONS=30 T_WHEELS=30 T_PYTEST=100 T_BENCH=130 BENCH_SECONDS=100
if [ $DRY = 1 ]; then T_PYTEST=60 T_BENCH=90 BENCH_SECONDS=60; fi

declare -A RC=()
phase() { echo; echo "=== $1 ($(date +%T), $((SECONDS))s in)"; }
# timeout's own codes: 124 (time limit), 137 (killed after the grace period).
run() { local limit=$1; shift; timeout -k 10 "$limit" "$@"; }

versions() {
    run "$T_VERSIONS" "$PYTHON" - <<'EOF'
import importlib, platform, sys
print("python", platform.python_version(), sys.executable)
import torch
print("torch", torch.__version__, "CUDA", torch.version.cuda, "cuDNN", torch.backends.cudnn.version())
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"GPU {i}", p.name, f"{p.total_memory / 2**30:.0f} GiB", f"capability {p.major}.{p.minor}")
else:
    print("GPU none (torch.cuda.is_available() is False)")
for name in ("transformers", "safetensors", "huggingface_hub", "tokenizers", "accelerate", "numpy", "pytest"):
    try:
        m = importlib.import_module(name)
        print(name, getattr(m, "__version__", "?"), m.__file__)
    except Exception as e:
        print(name, "NOT IMPORTABLE:", type(e).__name__, e)
import pylomin
print("pylomin", pylomin.__version__, pylomin.__file__)
EOF
}

main() {
    echo "gpu_check: repo $REPO, out $OUT, python $PYTHON, dry run $DRY, $(nproc) cores, $(date -u +%FT%TZ)"
    cd "$REPO" || return 2
    echo "checkout: $(git rev-parse --short HEAD 2>/dev/null || echo '?') $(git status --porcelain 2>/dev/null | wc -l) files changed"
    command -v nvidia-smi >/dev/null && timeout 15 nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

    phase "versions (as the machine has them)"
    versions
    RC[versions]=$?

    phase "wheels (.whl/ -> a target folder first on PYTHONPATH)"
    if compgen -G "$REPO/.whl/*.whl" >/dev/null; then
        SITE=/tmp/site
        if [ $DRY = 1 ]; then SITE=$(mktemp -d) && trap 'rm -rf "$SITE"' EXIT; fi
        ls -l "$REPO"/.whl/*.whl
        run "$T_WHEELS" "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$SITE" "$REPO"/.whl/*.whl
        RC[wheels]=$?
        if [ "${RC[wheels]}" != 0 ]; then
            # No pip (or it failed): these are pure-Python wheels, so unpacking them is an install.
            echo "pip install failed (${RC[wheels]}); unpacking the wheels instead"
            rm -rf "$SITE" && mkdir -p "$SITE"
            RC[wheels]=0
            for w in "$REPO"/.whl/*.whl; do run "$T_WHEELS" "$PYTHON" -m zipfile -e "$w" "$SITE" || RC[wheels]=$?; done
        fi
        export PYTHONPATH="$SITE:$PYTHONPATH"
        run "$T_VERSIONS" "$PYTHON" -c "
import huggingface_hub, transformers
print('with the wheels: transformers', transformers.__version__, transformers.__file__)
print('with the wheels: huggingface_hub', huggingface_hub.__version__, huggingface_hub.__file__)
import transformers.models.llama.modeling_llama
" || RC[wheels]=$?
    else
        echo "no .whl/*.whl: the machine's own transformers and huggingface_hub are used"
        RC[wheels]=0
    fi
    echo "PYTHONPATH=$PYTHONPATH"

    phase "CUDA tests (pytest -m cuda)"
    local tests=(tests/test_cuda*.py)
    if [ $DRY = 1 ]; then
        run "$T_PYTEST" "$PYTHON" -m pytest -m cuda "${tests[@]}" -p no:cacheprovider --collect-only -q \
            --junitxml="$OUT/pytest.xml" 2>&1 | tee "$OUT/pytest.log"
    else
        run "$T_PYTEST" "$PYTHON" -m pytest -m cuda "${tests[@]}" -p no:cacheprovider -v -rA --durations=10 \
            --timeout=60 --junitxml="$OUT/pytest.xml" 2>&1 | tee "$OUT/pytest.log"
    fi
    RC[pytest]=${PIPESTATUS[0]}

    phase "GPU benchmark (scripts/bench_gpu.py, at most ${BENCH_SECONDS}s)"
    local bench=(--out "$OUT" --max-seconds "$BENCH_SECONDS")
    [ $DRY = 1 ] && bench+=(--dry-run)
    run "$T_BENCH" "$PYTHON" scripts/bench_gpu.py "${bench[@]}" 2>&1 | tee "$OUT/bench.log"
    RC[bench]=${PIPESTATUS[0]}

    phase "summary"
    local worst=0
    {
        for p in versions wheels pytest bench; do
            echo "$p ${RC[$p]:-not run}"
        done
        echo "wall_s $SECONDS"
        echo "dry_run $DRY"
    } | tee "$OUT/summary.txt"
    for p in versions wheels pytest bench; do [ "${RC[$p]:-1}" = 0 ] || worst=1; done
    echo "files in $OUT:" && ls -l "$OUT"
    return $worst
}

main 2>&1 | tee "$OUT/gpu_check.log"
rc=${PIPESTATUS[0]}
# Each file under 16 MiB: a runaway log keeps its first and last 7 MiB.
for f in "$OUT"/*; do
    if [ -f "$f" ] && [ "$(stat -c %s "$f")" -gt $((15 * 1024 * 1024)) ]; then
        { head -c $((7 * 1024 * 1024)) "$f"; printf '\n[... cut ...]\n'; tail -c $((7 * 1024 * 1024)) "$f"; } >"$f.cut"
        mv "$f.cut" "$f"
    fi
done
exit "$rc"
