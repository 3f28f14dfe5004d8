#!/usr/bin/env bash
# The one command to run on a lent GPU machine (torch + triton preinstalled, no network):
#
#     OUT=/some/dir bash benchmarks/gpu_check.sh [--quick] [--tune]
#
# Phases, in this order, each under `timeout` (SIGINT first, so pytest still ends cleanly) with
# its limit printed at the start; the limits add up to under 8 minutes (--quick: under 4), and
# no phase runs past that deadline:
#   install   this package (pip -e, no deps) and, if carried, the inf-cl wheel from .wheels/
#             (`make wheels` fills it where PyPI is reachable; .wheels/ is git-ignored, so the
#             device tool's run needs carry=[".wheels"])
#   warm      every benchmark case once, untimed, in 16 pytest-xdist processes: the Triton and
#             inductor caches on disk then hold every kernel the timed runs launch
#   headline  the issue's headline cases (`-m headline`), each appended to $OUT/results.jsonl
#             the moment it is measured, so a timeout keeps everything before it
#   render    $OUT/bench.json (merged), results.md and speedup.png, from results.jsonl
#   bench_*   the other cases, one suite per process (not with --quick)
#   tests     the CUDA test suite under xdist (-n 8), nothing timed meanwhile (not with --quick);
#             it gets whatever time the phases before it left
#   render    again, with everything
# --tune sets MVCL_FAST_AUTOTUNE=1: the kernels search their whole config space (in the warm-up,
# whose cases' printed output, the configs they choose, goes to $OUT/autotune.log) and the
# timed runs reuse those choices; without it the kernels launch their pinned configs.
# Files in $OUT (7 at most: the device tool brings back 8): gpu_check.log, results.jsonl,
# bench.json, results.md, speedup.png, junit.xml, autotune.log (--tune). Override a limit with
# GPU_CHECK_<PHASE>_S (GPU_CHECK_TOTAL_S for the deadline). The exit status is 0 only if every
# phase passed; without a CUDA device it stops at once with status 2, unless
# GPU_CHECK_ALLOW_CPU=1: the dry run that tests/test_gpu_check_dry_run.py runs (tiny shapes,
# the fused kernels through Triton's interpreter, one round each, the other suites in one
# process, one small test file).
set -uo pipefail
cd "$(dirname "$0")/.."

QUICK=0 TUNE=0
for arg in "$@"; do
    case $arg in
        --quick) QUICK=1 ;;
        --tune) TUNE=1 ;;
        *) echo "gpu_check.sh: unknown argument '$arg' (expected --quick and/or --tune)" >&2; exit 2 ;;
    esac
done

set_limit() {  # set_limit NAME DEFAULT: NAME_S, in whole seconds, from GPU_CHECK_NAME_S or DEFAULT
    local var="GPU_CHECK_$1_S" value
    value=${!var:-$2}
    [[ $value =~ ^[0-9]+$ ]] || { echo "gpu_check.sh: $var='$value': expected whole seconds" >&2; exit 2; }
    printf -v "$1_S" %s "$value"
}
set_limit TOTAL "$([ "$QUICK" = 1 ] && echo 230 || echo 470)"
set_limit INSTALL 30
set_limit WARM "$([ "$QUICK" = 1 ] && echo 50 || echo 90)"
set_limit HEADLINE 120
set_limit RENDER 15
set_limit BENCH_PROTOTYPES 30
set_limit BENCH_MULTIVIEW 20
set_limit BENCH_DAF 20
set_limit BENCH_TRAIN_STEP 60   # 5 providers x batch 16 and 64, bert-base; the captured one warms up 3 steps
set_limit BENCH_STRUCTURE 15
GRACE=10   # timeout's SIGKILL follows its SIGINT after this long

PYTHON=${PYTHON:-python3}
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log" RESULTS="$OUT/results.jsonl"
: >"$LOG"
: >"$RESULTS"
rm -f "$OUT/autotune.log"
unset TRITON_INTERPRET MVCL_FAST_BACKEND MVCL_FAST_AUTOTUNE MVCL_BENCH_DRY_RUN
export PYTHONUNBUFFERED=1 MVCL_BENCH_SECONDS=${MVCL_BENCH_SECONDS:-0.2}
# The warm phase's processes leave their compiled kernels here for the later ones.
export TORCHINDUCTOR_FX_GRAPH_CACHE=1 TORCHINDUCTOR_AUTOGRAD_CACHE=1

say() { echo "[gpu_check $(date +%H:%M:%S)] $*" | tee -a "$LOG"; }

# One interpreter start (each imports torch) for the versions, the device and pytest-xdist.
VERSIONS=$("$PYTHON" -c "
import importlib.util, sys, torch
try:
    import triton
    triton_version = triton.__version__
except ImportError:
    triton_version = 'not installed'
cuda = torch.cuda.is_available()
print('torch', torch.__version__, 'triton', triton_version, 'device',
      torch.cuda.get_device_name() if cuda else 'cpu', 'xdist', bool(importlib.util.find_spec('xdist')))
sys.exit(0 if cuda else 3)" 2>>"$LOG")
CUDA_RC=$?
say "$VERSIONS"
if [ "$CUDA_RC" != 0 ]; then
    if [ "${GPU_CHECK_ALLOW_CPU:-0}" != 1 ]; then
        say "no CUDA device visible to torch ($PYTHON): gpu_check.sh is for the lent GPU machine;" \
            "on CPU run 'pytest tests/' and 'pytest benchmarks/ --benchmark-only' instead" \
            "(GPU_CHECK_ALLOW_CPU=1: a dry run of this script)"
        exit 2
    fi
    say "DRY RUN on CPU (GPU_CHECK_ALLOW_CPU=1): tiny shapes, the fused kernels through Triton's interpreter"
    export MVCL_BENCH_DRY_RUN=1 TRITON_INTERPRET=1
    DRY_RUN=1 WARM_WORKERS=2 TEST_WORKERS=2 TESTS=${GPU_CHECK_TESTS:-tests/test_metrics.py}
else
    DRY_RUN=0 WARM_WORKERS=16 TEST_WORKERS=8 TESTS=${GPU_CHECK_TESTS:-tests/}
fi
if [ "$TUNE" = 1 ]; then
    # TRITON_CACHE_AUTOTUNING: the timed runs reuse the warm-up's choices instead of searching again.
    export MVCL_FAST_AUTOTUNE=1 TRITON_PRINT_AUTOTUNING=1 TRITON_CACHE_AUTOTUNING=1
fi

# ---------------------------------------------------------------- the time budget
RUN_TESTS=$((1 - QUICK))

# The other suites: "name limit file..." per process; the dry run takes them in one process,
# since each start costs a torch import on a 2-core runner.
REST=()
if [ "$QUICK" = 0 ]; then
    for suite in prototypes multiview daf train_step structure; do   # structure: if present
        file="benchmarks/bench_$suite.py" limit_var="BENCH_${suite^^}_S"
        [ -f "$file" ] && REST+=("bench_$suite ${!limit_var} $file")
    done
    if [ "$DRY_RUN" = 1 ]; then
        limit=0 files=""
        for group in "${REST[@]}"; do read -r _ seconds file <<<"$group"; limit=$((limit + seconds)) files+=" $file"; done
        REST=("bench_suites $limit$files")
    fi
fi

PLAN=("install $INSTALL_S" "warm $WARM_S" "headline $HEADLINE_S" "render $RENDER_S")
for group in "${REST[@]}"; do read -r name seconds _ <<<"$group"; PLAN+=("$name $seconds"); done
PLANNED=0 BUDGET=""
for entry in "${PLAN[@]}"; do PLANNED=$((PLANNED + ${entry#* })) BUDGET+=", ${entry% *} ${entry#* }s"; done
if [ "$RUN_TESTS" = 1 ]; then
    PLANNED=$((PLANNED + RENDER_S))
    BUDGET+=", tests what is left (about $((TOTAL_S - PLANNED - GRACE))s), render ${RENDER_S}s"
fi
say "time budget ($([ "$QUICK" = 1 ] && echo quick || echo full)$([ "$TUNE" = 1 ] && echo ", tune")," \
    "limits in order): ${TOTAL_S}s in all${BUDGET}"
if [ "$PLANNED" -gt "$TOTAL_S" ]; then
    say "the phase limits ($PLANNED s) exceed the total ($TOTAL_S s): the later phases are cut at the deadline"
fi
DEADLINE=$TOTAL_S   # bash's SECONDS count from the script's start

FAILED=() SUMMARY=()
phase() {  # phase NAME LIMIT RESERVE command...: RESERVE seconds before the deadline stay for what follows
    local name=$1 own=$2 reserve=$3 start=$SECONDS rc
    shift 3
    local left=$((DEADLINE - SECONDS - reserve - GRACE)) limit=$own
    [ "$limit" -gt "$left" ] && limit=$left
    if [ "$limit" -lt 5 ]; then
        say "$name: SKIPPED (its limit ${own}s, $((left > 0 ? left : 0))s left for it before the deadline)"
        FAILED+=("$name (no time left)") SUMMARY+=("$name skipped")
        return 0
    fi
    say "$name: start (limit ${limit}s)"
    timeout -s INT -k "$GRACE" "$limit" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    local took=$((SECONDS - start))
    case $rc in
        0) say "$name: ok in ${took}s"; SUMMARY+=("$name ok ${took}s/${limit}s") ;;
        124|137) say "$name: TIMED OUT after ${limit}s"; FAILED+=("$name (timeout)")
                 SUMMARY+=("$name TIMED OUT ${took}s/${limit}s") ;;
        *) say "$name: FAILED with status $rc after ${took}s"; FAILED+=("$name (status $rc)")
           SUMMARY+=("$name FAILED ${took}s/${limit}s") ;;
    esac
    return 0
}

command -v nvidia-smi >/dev/null && timeout 30 nvidia-smi \
    --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv 2>&1 | tee -a "$LOG"

installed() {  # which of mvcl_fast.kernels (it resolves after an editable install) and inf_cl import
    "$PYTHON" -c "import importlib.util as u; print(*(m for m in ('mvcl_fast.kernels', 'inf_cl') if u.find_spec(m)))"
}
pip_install() {  # the dry run leaves the environment it was given as it is
    if [ "$DRY_RUN" = 1 ]; then echo "dry run: not running pip install $*"; return 0; fi
    "$PYTHON" -m pip install --quiet --no-deps "$@"
}
install_package() {
    local have changed=0
    have=$(installed) || return 1
    if [[ $have != *mvcl_fast.kernels* ]]; then
        pip_install --no-build-isolation -e . || return 1
        changed=1
    fi
    if [[ $have != *inf_cl* ]] && compgen -G ".wheels/inf_cl-*.whl" >/dev/null; then
        pip_install --no-index .wheels/inf_cl-*.whl || return 1
        changed=1
    fi
    [ "$changed" = 0 ] || have=$(installed) || return 1
    [[ $have == *mvcl_fast.kernels* ]] || { echo "mvcl_fast.kernels does not import after pip install -e ."; return 1; }
    echo "installed: $have"
    [[ $have == *inf_cl* ]] ||
        echo "inf-cl does not import: its baseline is skipped (make wheels, then carry=[\".wheels\"])"
}
export PYTHON DRY_RUN
export -f installed pip_install install_package

PYTEST=("$PYTHON" -m pytest -q -p no:cacheprovider)
WARM_ARGS=(--warm-only --benchmark-disable --durations=5) TEST_ARGS=()
if [[ $VERSIONS == *"xdist True"* ]]; then
    WARM_ARGS+=(-n "$WARM_WORKERS") TEST_ARGS+=(-n "$TEST_WORKERS")
else
    say "pytest-xdist not installed: the warm-up and the tests run in one process each"
fi
[ "$QUICK" = 1 ] && WARM_ARGS+=(-m headline)
[ "$TUNE" = 1 ] && WARM_ARGS+=(--output-log "$OUT/autotune.log")
render() {  # render RESERVE
    phase render "$RENDER_S" "$1" "$PYTHON" benchmarks/render.py "$RESULTS" --merged "$OUT/bench.json" \
        --md "$OUT/results.md" --png "$OUT/speedup.png"
}

# Every phase but the last render keeps RENDER_S for it.
phase install "$INSTALL_S" "$RENDER_S" bash -c install_package
# The longest cases (a bert-base training step, torch.compile of the fusion layers) start first.
# 4 inductor compile workers per process: 16 processes with a pool of 16 each (~300 MB a worker)
# would not fit in the machine's 128 GB beside everything else.
TORCHINDUCTOR_COMPILE_THREADS=4 phase warm "$WARM_S" "$RENDER_S" "${PYTEST[@]}" \
    benchmarks/bench_train_step.py benchmarks/bench_daf.py benchmarks/bench_multiview.py \
    benchmarks/bench_prototypes.py "${WARM_ARGS[@]}"
phase headline "$HEADLINE_S" "$RENDER_S" "${PYTEST[@]}" benchmarks/bench_prototypes.py \
    benchmarks/bench_multiview.py benchmarks/bench_daf.py benchmarks/bench_train_step.py \
    -m headline -rs --results-jsonl "$RESULTS"
render "$RENDER_S"
for group in "${REST[@]}"; do
    read -r name limit files <<<"$group"
    # shellcheck disable=SC2086  # files: a list
    phase "$name" "$limit" "$RENDER_S" "${PYTEST[@]}" $files -m "not headline" -rs --results-jsonl "$RESULTS"
done
if [ "$RUN_TESTS" = 1 ]; then
    # The compile report's test needs no GPU (it runs in CI); the dry-run test runs this script.
    # shellcheck disable=SC2086  # TESTS: a list
    phase tests "$TOTAL_S" "$RENDER_S" "${PYTEST[@]}" $TESTS "${TEST_ARGS[@]}" \
        --ignore=tests/test_compile_report.py --ignore=tests/test_gpu_check_dry_run.py \
        --junitxml="$OUT/junit.xml"
    render 0
fi

# The device tool returns the output's last 12,000 characters: the headline table, the targets
# and the skips end it (results.md has every case).
[ -f "$OUT/results.md" ] && awk '/^Other cases:/ { skip = 1; print "Other cases: see results.md"; next }
    /^(Targets|Not measured)/ { skip = 0 } !skip' "$OUT/results.md"
say "phases: $(printf "%s; " "${SUMMARY[@]}")"
if [ ${#FAILED[@]} -eq 0 ]; then
    say "all phases passed in ${SECONDS}s; results in $OUT"
    exit 0
fi
say "FAILED after ${SECONDS}s: ${FAILED[*]}"
exit 1
