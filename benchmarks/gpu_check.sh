#!/usr/bin/env bash
# The one command to run on a lent GPU machine (torch + triton preinstalled, no network):
#
#     OUT=/some/dir bash benchmarks/gpu_check.sh
#
# 1. installs this package (pip -e, no deps, no build isolation) and, if carried, the inf-cl
#    wheel from .wheels/ (fill it here, where PyPI is reachable: inf-cl is pure Python,
#        python3 -m pip download inf-cl==1.2.1 --no-deps --only-binary=:all: -d .wheels
#    and keep .wheels/ git-ignored; the device tool then needs carry=[".wheels"]);
# 2. runs the test suite on CUDA (TRITON_INTERPRET unset): $OUT/junit.xml;
# 3. runs the benchmarks, one file at a time: $OUT/bench.json (pytest-benchmark JSON, merged);
# 4. renders $OUT/results.md and $OUT/speedup.png.
# Every phase runs under `timeout` (SIGINT first, so pytest still writes what it has), and the
# limits add up to under 8 minutes; override with GPU_CHECK_<PHASE>_S. The exit status is 0 only
# if every phase passed; without a CUDA device it stops at once with status 2.
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: >"$LOG"
unset TRITON_INTERPRET MVCL_FAST_BACKEND
export PYTHONUNBUFFERED=1 MVCL_BENCH_SECONDS=${MVCL_BENCH_SECONDS:-0.2}

INSTALL_S=${GPU_CHECK_INSTALL_S:-40}
TESTS_S=${GPU_CHECK_TESTS_S:-100}
BENCH_PROTOTYPES_S=${GPU_CHECK_BENCH_PROTOTYPES_S:-120}
BENCH_MULTIVIEW_S=${GPU_CHECK_BENCH_MULTIVIEW_S:-50}
BENCH_DAF_S=${GPU_CHECK_BENCH_DAF_S:-50}
BENCH_TRAIN_STEP_S=${GPU_CHECK_BENCH_TRAIN_STEP_S:-90}
RENDER_S=${GPU_CHECK_RENDER_S:-20}

say() { echo "[gpu_check $(date +%H:%M:%S)] $*" | tee -a "$LOG"; }
FAILED=()
phase() {  # phase NAME SECONDS command...
    local name=$1 seconds=$2 start=$SECONDS rc
    shift 2
    say "$name: start (limit ${seconds}s)"
    timeout -s INT -k 20 "$seconds" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    case $rc in
        0) say "$name: ok in $((SECONDS - start))s" ;;
        124|137) say "$name: TIMED OUT after ${seconds}s"; FAILED+=("$name (timeout)") ;;
        *) say "$name: FAILED with status $rc after $((SECONDS - start))s"; FAILED+=("$name (status $rc)") ;;
    esac
    return 0
}

# GPU_CHECK_ALLOW_CPU=1 walks the same phases on a CPU machine: a check of this script only.
if [ "${GPU_CHECK_ALLOW_CPU:-0}" != 1 ] &&
    ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>>"$LOG"; then
    say "no CUDA device visible to torch ($PYTHON): gpu_check.sh is for the lent GPU machine;" \
        "on CPU run 'pytest tests/' and 'pytest benchmarks/ --benchmark-only' instead"
    exit 2
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv 2>&1 | tee -a "$LOG"
"$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__,
      'device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" 2>&1 | tee -a "$LOG"

install_package() {
    "$PYTHON" -m pip install --quiet --no-deps --no-build-isolation -e . || return 1
    if compgen -G ".wheels/inf_cl-*.whl" >/dev/null; then
        "$PYTHON" -m pip install --quiet --no-deps --no-index .wheels/inf_cl-*.whl || return 1
    else
        echo "no .wheels/inf_cl-*.whl carried: the inf-cl baseline will be skipped"
    fi
    "$PYTHON" -c "import mvcl_fast, mvcl_fast.kernels; print('mvcl_fast', mvcl_fast.__version__)"
}
export PYTHON
export -f install_package
phase install "$INSTALL_S" bash -c install_package

# The compile report's test needs no GPU (it runs in CI): left out to keep the phase short.
phase tests "$TESTS_S" "$PYTHON" -m pytest tests/ -x -q -p no:cacheprovider \
    --ignore=tests/test_compile_report.py --junitxml="$OUT/junit.xml"

PARTS=$(mktemp -d)
for suite in prototypes multiview daf train_step; do
    file="benchmarks/bench_$suite.py"
    [ -f "$file" ] || { say "bench_$suite: $file not present, skipped"; continue; }
    limit_var="BENCH_${suite^^}_S"
    phase "bench_$suite" "${!limit_var}" "$PYTHON" -m pytest "$file" --benchmark-only -q -rs \
        -p no:cacheprovider --benchmark-json="$PARTS/$suite.json"
done

if compgen -G "$PARTS/*.json" >/dev/null; then
    phase render "$RENDER_S" "$PYTHON" benchmarks/render.py "$PARTS"/*.json --merged "$OUT/bench.json" \
        --md "$OUT/results.md" --png "$OUT/speedup.png"
    cat "$OUT/results.md" 2>/dev/null
else
    FAILED+=("render (no benchmark JSON)")
fi
rm -rf "$PARTS"

if [ ${#FAILED[@]} -eq 0 ]; then
    say "all phases passed; results in $OUT"
    exit 0
fi
say "FAILED: ${FAILED[*]}"
exit 1
