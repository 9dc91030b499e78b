#!/usr/bin/env bash
# Build, test and benchmark minimind_fast on a GPU machine, and write a results record.
#
#   bench/run_gpu.sh [OUTDIR]        (default: $OUT when set, else bench/out)
#
# Steps (each with its own timeout, all inside RUN_GPU_BUDGET_S, default 450 s, so the whole run
# fits an 8-minute slot on an H200):
#   1. environment: GPU, torch/Triton versions, the Python packages the repo needs; missing ones
#      are installed from a wheel folder when one is given (WHEELS=dir, or ./.whl), never fetched
#   2. build the extension: pip install --no-build-isolation --no-deps -e .   (sm_90 only by
#      default: TORCH_CUDA_ARCH_LIST=9.0; retried without CUDA kernels if the CUDA build fails)
#   3. tests: pytest tests -m cuda, then the op parity tests (tests/ops, test_*moe*, test_model.py:
#      on a GPU machine tests/conftest.py leaves TRITON_INTERPRET unset, so they run the real kernels)
#   4. benchmarks: pytest bench/<file> --benchmark-only --benchmark-json, one file at a time in
#      priority order; past the deadline the remaining cases skip (MINIMIND_BENCH_DEADLINE), so
#      every file still writes its JSON
#   5. summary: bench/summarize.py -> OUTDIR/summary.md (targets + tables) and OUTDIR/bench.json
# Knobs: PYTHON (default python3), RUN_GPU_BUDGET_S, WHEELS, TORCH_CUDA_ARCH_LIST, SKIP_BUILD=1,
# SKIP_TESTS=1 (e.g. a rerun of the benchmarks on a machine where the first run built and tested).
# OUTDIR receives only run_gpu.log, bench.json and summary.md (a small, fixed set of files
# for machines that return only a few); raw per-step logs and JSON go to OUTDIR/raw, or to a temp folder when $OUT is used.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
OUTDIR=${1:-${OUT:-$ROOT/bench/out}}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
if [[ -n "${OUT:-}" && "$OUTDIR" == "$(cd "$OUT" 2>/dev/null && pwd)" ]]; then
    RAW=$(mktemp -d /tmp/minimind_bench.XXXXXX)
else
    RAW="$OUTDIR/raw"
    mkdir -p "$RAW"
fi
PY=${PYTHON:-python3}
BUDGET=${RUN_GPU_BUDGET_S:-450}
START=$(date +%s)
LOG="$OUTDIR/run_gpu.log"
: >"$LOG"
STATUS=()
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export MINIMIND_BENCH_DEADLINE=$((START + BUDGET - 40))  # benchmarks skip after this (epoch s)

elapsed() { echo $(($(date +%s) - START)); }
left() { echo $((BUDGET - $(elapsed))); }
say() { echo "[run_gpu +$(elapsed)s] $*" | tee -a "$LOG"; }

# run_step NAME LIMIT_S RESERVE_S CMD...: run CMD under `timeout`, leaving RESERVE_S seconds of
# the budget for the steps after it; its output goes to $RAW/NAME.log and its tail to the log.
run_step() {
    local name=$1 limit=$2 reserve=$3
    shift 3
    local avail=$(($(left) - reserve))
    ((limit > avail)) && limit=$avail
    if ((limit < 15)); then
        say "$name: SKIPPED (time budget spent)"
        STATUS+=("| $name | skipped: time budget spent | 0 s |")
        return 124
    fi
    say "$name: start (limit ${limit}s): $*"
    local t0 rc
    t0=$(date +%s)
    timeout -k 10 "$limit" "$@" >"$RAW/$name.log" 2>&1
    rc=$?
    local took=$(($(date +%s) - t0))
    local verdict="ok"
    ((rc == 124 || rc == 137)) && verdict="TIMED OUT after ${limit}s"
    ((rc != 0 && rc != 124 && rc != 137)) && verdict="exit $rc"
    say "$name: $verdict (${took}s)"
    STATUS+=("| $name | $verdict | ${took} s |")
    {
        echo "----- $name: last 60 lines -----"
        tail -n 60 "$RAW/$name.log"
    } >>"$LOG"
    return $rc
}

# ------------------------------------------------------------------------------ 1. environment
say "repo $ROOT, output $OUTDIR, budget ${BUDGET}s"
command -v nvidia-smi >/dev/null && nvidia-smi -L 2>&1 | tee -a "$LOG"
WHEELS=${WHEELS:-$ROOT/.whl}
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    say "installing wheels from $WHEELS (no index)"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/minimind_site "$WHEELS"/*.whl >>"$LOG" 2>&1 &&
        export PYTHONPATH=/tmp/minimind_site${PYTHONPATH:+:$PYTHONPATH}
fi
$PY - <<'EOF' 2>&1 | tee -a "$LOG" >"$RAW/packages.txt"
import importlib
for name in ("torch", "triton", "numpy", "tokenizers", "safetensors", "tqdm", "pytest",
             "pytest_benchmark", "liger_kernel", "transformers"):
    try:
        module = importlib.import_module(name)
        print(f"package {name} {getattr(module, '__version__', '?')}")
    except Exception as error:  # noqa: BLE001
        print(f"package {name} MISSING ({type(error).__name__})")
import torch
print(f"cuda available: {torch.cuda.is_available()}",
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF
missing() { grep -q "^package $1 MISSING" "$RAW/packages.txt"; }
if ! $PY -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    say "WARNING: torch sees no CUDA device; the run continues on CPU (small sizes unless MINIMIND_BENCH_SIZE=full)"
fi

# ------------------------------------------------------------------------------ 2. build
export MAX_JOBS=${MAX_JOBS:-$(nproc)} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
if [[ "${SKIP_BUILD:-0}" == 1 ]]; then
    say "build: skipped (SKIP_BUILD=1)"
elif ! run_step build 240 230 $PY -m pip install --no-build-isolation --no-deps --no-cache-dir -e .; then
    say "CUDA build failed; retrying the extension without CUDA kernels (MINIMIND_FAST_NO_CUDA=1)"
    MINIMIND_FAST_NO_CUDA=1 run_step build_cpu_only 120 230 \
        $PY -m pip install --no-build-isolation --no-deps --no-cache-dir -e . ||
        export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
fi
$PY - <<'EOF' 2>&1 | tee -a "$LOG"
import torch
try:
    import minimind_fast._C  # noqa: F401
    cuda = torch._C._dispatch_has_kernel_for_dispatch_key("minimind_fast::moe_route", "CUDA")
    print(f"extension: minimind_fast._C loaded, CUDA kernel registered: {cuda}")
except Exception as error:  # noqa: BLE001
    print(f"extension: NOT loaded ({error})")
try:
    import minimind_fast.kernels  # noqa: F401
    print("kernels: minimind_fast.kernels importable")
except Exception as error:  # noqa: BLE001
    print(f"kernels: NOT importable ({error})")
EOF

# ------------------------------------------------------------------------------ 3. tests
run_tests() {
    run_step tests_cuda 90 240 $PY -m pytest tests -m cuda -q -p no:cacheprovider -rs
    mapfile -t PARITY < <(ls -d tests/test_*rms* tests/test_*rope* tests/test_*rotary* tests/test_*cross_entropy* \
        tests/test_*ops* tests/test_*kernel* tests/test_*moe* tests/ops tests/kernels tests/test_model.py \
        2>/dev/null | sort -u)
    if ((${#PARITY[@]})); then
        run_step tests_op_parity 150 220 $PY -m pytest "${PARITY[@]}" -q -p no:cacheprovider -m "not slow" -rs
    else
        say "no op parity test files found under tests/"
    fi
}

if missing pytest; then
    say "pytest is missing (give WHEELS=dir with its wheel): tests and benchmarks skipped"
    STATUS+=("| tests, benchmarks | skipped: pytest missing | 0 s |")
else
    if [[ "${SKIP_TESTS:-0}" == 1 ]]; then
        say "tests: skipped (SKIP_TESTS=1)"
    else
        run_tests
    fi

    # -------------------------------------------------------------------------- 4. benchmarks
    if missing pytest_benchmark; then
        say "pytest-benchmark is missing (give WHEELS=dir with its wheel): benchmarks skipped"
        STATUS+=("| benchmarks | skipped: pytest-benchmark missing | 0 s |")
    else
        bench() {  # bench NAME LIMIT FILE [pytest args...]
            local name=$1 limit=$2 file=$3
            shift 3
            run_step "bench_$name" "$limit" 20 $PY -m pytest "bench/$file" --benchmark-only -q \
                -p no:cacheprovider -rs --benchmark-columns=median,iqr,rounds,iterations \
                --benchmark-json="$RAW/bench_$name.json" "$@"
        }
        bench baseline 60 bench_baseline.py
        bench norm 120 bench_norm.py
        bench cross_entropy 90 bench_cross_entropy.py
        bench moe 90 bench_moe.py
        bench train_eager 150 bench_train_step.py -k "not compiled"
        bench rope 60 bench_rope.py
        bench train_compiled 150 bench_train_step.py -k compiled
    fi
fi

# ------------------------------------------------------------------------------ 5. summary
shopt -s nullglob
JSONS=("$RAW"/bench_*.json)
if ((${#JSONS[@]})); then
    $PY bench/summarize.py "${JSONS[@]}" --out "$OUTDIR/summary.md" --merged "$OUTDIR/bench.json" 2>>"$LOG"
else
    echo "No benchmark JSON was written; see run_gpu.log." >"$OUTDIR/summary.md"
fi
{
    echo
    echo "## Steps of bench/run_gpu.sh"
    echo
    echo "| step | result | time |"
    echo "|---|---|---|"
    printf '%s\n' "${STATUS[@]}"
    echo
    echo "Total: $(elapsed) s of a ${BUDGET} s budget."
} >>"$OUTDIR/summary.md"
say "done: $OUTDIR/summary.md, $OUTDIR/bench.json"
cat "$OUTDIR/summary.md"
