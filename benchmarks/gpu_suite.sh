#!/usr/bin/env bash
# The whole GPU check in one go:  benchmarks/gpu_suite.sh OUT_DIR
#
# On a GPU machine (torch + CUDA toolkit, Triton; no internet needed), in this order (most wanted first,
# so that a run cut short by DEADLINE still holds the figures that matter):
#   1. OUT_DIR/environment.txt (nvidia-smi, nvcc, versions, git commit),
#   2. build: pip install --no-build-isolation --no-deps -e .  (build.log); cuda-built checks that the
#      CUDA kernels were built,
#   3. bench: python -m pushpull_ext.bench --full --dtype float32 --out OUT_DIR (every paper shape, every provider,
#      fwd and fwdbwd; results.json, results.csv, speedup_<mode>.png, bench.log),
#   3b. routes: python -m pushpull_ext.bench_routes (each route the launcher chooses by model, forced in
#      turn and timed side by side: upsample's forward and weight gradient, the pooled forward; routes.json),
#   4. tests: pytest tests/ (tests.log; with pytest-xdist, TEST_WORKERS processes, default 8), which runs
#      every agreement/gradcheck case with backend="cuda" and "triton" too (tests/conftest.py), the
#      >2^31-element test, the determinism and bad-input tests; their figures in hardening.json,
#   5. sanitizer-memcheck: a subset of the cuda/triton tests under compute-sanitizer memcheck with
#      PyTorch's caching allocator off (sanitizer-memcheck.log, the error count in sanitizers.json),
#   6. tests-auto-triton: the module tests with "auto" resolved to the Triton backend (auto's default on a
#      GPU is the CUDA extension),
#   7. bench-bfloat16: the benchmark in bfloat16, all four modes, into OUT_DIR/bfloat16,
#   8. sanitizer-racecheck, 9. pytest-benchmark (pytest-benchmark.json), 10. fuzz-long (the long
#      hypothesis profile, fuzz-long.json).
# A failing step is recorded in OUT_DIR/summary.txt and the later steps still run. Exit status: the
# number of failed steps (0 = all passed).
#   STEPS="build bench ..."  runs only the named steps.
#   DEADLINE=S               no step starts after S seconds from the start, and a running step is
#                            interrupted up to 30 s before S (pytest then prints its failures so far) and
#                            killed at S (its log says so; summary.txt: "stopped at the deadline"). A lent GPU
#                            machine runs one command for at most 10 minutes: DEADLINE=540 leaves room.
#   PACK=FILE.tar.gz         after every step, OUT_DIR is packed into FILE (the device tool returns at
#                            most 8 files: pack into $OUT, keep OUT_DIR elsewhere).
#   BENCH_FLAGS="..."        the float32 benchmark's flags instead of --full (e.g. "" for the default
#                            providers: no torch.compile providers, whose first compilations take minutes).
#   PYTEST_ADDOPTS="..."     pytest's own variable: narrows every pytest step (e.g. -m "not slow" -v).
set -u
OUT="${1:?usage: benchmarks/gpu_suite.sh OUT_DIR}"
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"
cd "$(dirname "$0")/.." || exit 1
PY="${PYTHON:-python}"
FAILED=0
: > "$OUT/summary.txt"

START=$SECONDS
pack() { [ -z "${PACK:-}" ] || tar -czf "$PACK" -C "$OUT" . 2>/dev/null; }

# within LIMIT COMMAND...: run COMMAND, interrupted (SIGINT) a grace period before LIMIT seconds and killed
# at LIMIT: an interrupted pytest still prints the failures it has seen, with their tracebacks, and the
# benchmark keeps the cases it finished (a plain kill at the first GPU run's deadline lost them all).
within() {
    local limit="$1"; shift
    local grace=$((limit / 3 < 30 ? limit / 3 : 30))
    timeout --signal=INT --kill-after="$grace" "$((limit - grace))" "$@"
}

step() {  # step NAME LOGFILE COMMAND...: run, log, record the exit status (only the STEPS asked for)
    local name="$1" log="$2"; shift 2
    if [ -n "${STEPS:-}" ] && [[ " $STEPS " != *" $name "* ]]; then return 0; fi
    STEP_LIMIT=""  # seconds left before DEADLINE; read by the shell functions run as steps (sanitize)
    if [ -n "${DEADLINE:-}" ]; then
        STEP_LIMIT=$((DEADLINE - (SECONDS - START)))
        if [ "$STEP_LIMIT" -lt 20 ]; then
            echo "== $name: skipped, $((SECONDS - START)) s of the ${DEADLINE} s deadline gone" | tee -a "$OUT/summary.txt"
            FAILED=$((FAILED + 1)); return 0
        fi
    fi
    echo "== $name: $*" | tee -a "$OUT/summary.txt"
    local start=$SECONDS rc
    if [ -n "$STEP_LIMIT" ] && ! declare -F "$1" > /dev/null; then
        within "$STEP_LIMIT" "$@" > "$log" 2>&1; rc=$?
    else
        "$@" > "$log" 2>&1; rc=$?
    fi
    local note=""
    if [ -n "$STEP_LIMIT" ] && { [ $rc -eq 124 ] || [ $rc -eq 137 ]; }; then
        note=", stopped at the deadline"; echo "(stopped at the ${DEADLINE} s deadline)" >> "$log"
    fi
    echo "   exit $rc after $((SECONDS - start)) s$note (log: $log)" | tee -a "$OUT/summary.txt"
    [ $rc -eq 0 ] || FAILED=$((FAILED + 1))
    pack
}

environment() {
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "host: $(hostname)"
    echo "git commit: $(git rev-parse HEAD 2>/dev/null || echo "${PUSHPULL_GIT_COMMIT:-unknown} (PUSHPULL_GIT_COMMIT)")"
    echo "git status:"; git status --short 2>/dev/null | head -50
    echo; echo "== nvidia-smi"; nvidia-smi 2>&1 || echo "nvidia-smi not available"
    echo; echo "== nvcc"; (command -v nvcc >/dev/null && nvcc --version) || echo "nvcc not on PATH (CUDA_HOME=${CUDA_HOME:-unset})"
    echo; echo "== python packages"
    "$PY" - <<'PYEOF'
import platform, sys
import torch
print("python", sys.version.split()[0], platform.platform())
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
print("cuda available", torch.cuda.is_available(),
      [torch.cuda.get_device_name(i) + " cc" + ".".join(map(str, torch.cuda.get_device_capability(i)))
       for i in range(torch.cuda.device_count())])
try:
    import triton; print("triton", triton.__version__)
except ImportError as e:
    print("triton missing:", e)
PYEOF
    echo "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-unset}"
}

# The tests run under compute-sanitizer: the fused GPU backends on the float64 option grid, bad and
# odd inputs (empty batch, non-contiguous, channels_last). Slow (the sanitizer serializes kernels).
SANITIZED_TESTS=(tests/test_agreement.py tests/test_inputs.py tests/test_cuda_backend.py -k
    "((triton-cuda or cuda-cuda) and (float64_matches_reference or empty_batch or non_contiguous)) or test_cuda_backend")
SANITIZER="$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")"

sanitize() {  # sanitize TOOL: run the subset under the tool; its error count goes to sanitizer-TOOL.count
    local tool="$1" log="$OUT/sanitizer-$1.log"
    if [ ! -x "$SANITIZER" ]; then
        echo "compute-sanitizer not found ($SANITIZER)" > "$log"; echo "missing" > "$OUT/sanitizer-$tool.count"
        return 1
    fi
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 within "${STEP_LIMIT:-3600}" "$SANITIZER" --tool "$tool" \
        --target-processes all --print-limit 100 "$PY" -m pytest "${SANITIZED_TESTS[@]}" -q -p no:cacheprovider > "$log" 2>&1
    local rc=$?
    # "========= ERROR SUMMARY: N errors" once per sanitized process; no line means it did not finish.
    local errors
    errors=$(grep -Eo "ERROR SUMMARY: [0-9]+" "$log" | awk '{n += $3} END {print (NR ? n : "none")}')
    echo "$errors" > "$OUT/sanitizer-$tool.count"
    [ "$rc" -eq 0 ] && [ "$errors" = "0" ]
}

sanitizer_summary() {  # sanitizers.json from the *.count files
    "$PY" - "$OUT" <<'PYEOF' || true
import json, os, sys
out = sys.argv[1]
def count(tool):
    path = os.path.join(out, f"sanitizer-{tool}.count")
    text = open(path).read().strip() if os.path.exists(path) else "not run"
    return int(text) if text.isdigit() else text
result = {tool: {"errors": count(tool), "log": f"sanitizer-{tool}.log"} for tool in ("memcheck", "racecheck")}
json.dump(result, open(os.path.join(out, "sanitizers.json"), "w"), indent=2)
print("sanitizers:", result)
PYEOF
}

# pytest-xdist (on the lent GPU machines) spreads the tests over TEST_WORKERS processes sharing the GPU.
XDIST=()
if "$PY" -c "import xdist" 2>/dev/null; then XDIST=(-n "${TEST_WORKERS:-8}"); fi

environment > "$OUT/environment.txt" 2>&1
pack
step build "$OUT/build.log" "$PY" -m pip install --no-build-isolation --no-deps -e .
"$PY" -c "import pushpull_ext; print(pushpull_ext.available_backends())" >> "$OUT/environment.txt" 2>&1
step cuda-built "$OUT/cuda-built.log" "$PY" -c \
    "import pushpull_ext as p; e = p.available_backends()['cuda']; assert e is None, e; print('cuda backend built')"
# shellcheck disable=SC2086  # BENCH_FLAGS is a list of words
step bench "$OUT/bench.log" "$PY" -m pushpull_ext.bench ${BENCH_FLAGS---full} --dtype float32 --out "$OUT"
step routes "$OUT/routes.log" "$PY" -m pushpull_ext.bench_routes --dtype float32 bfloat16 --out "$OUT/routes.json"
# CUBLAS_WORKSPACE_CONFIG: lets cuBLAS run under torch.use_deterministic_algorithms (tests/test_determinism.py).
step tests "$OUT/tests.log" env PUSHPULL_TEST_RESULTS="$OUT/hardening.json" CUBLAS_WORKSPACE_CONFIG=:4096:8 \
    "$PY" -m pytest tests/ -q "${XDIST[@]}"
step sanitizer-memcheck "$OUT/sanitizer-memcheck.step.log" sanitize memcheck
sanitizer_summary > /dev/null
step tests-auto-triton "$OUT/tests-auto-triton.log" env PUSHPULL_BACKEND=triton "$PY" -m pytest \
    tests/test_module.py tests/test_ops.py tests/test_cuda_backend.py -q
step bench-bfloat16 "$OUT/bench-bfloat16.log" "$PY" -m pushpull_ext.bench --full --dtype bfloat16 \
    --modes fwd,bwd,fwdbwd,inference --out "$OUT/bfloat16"
step sanitizer-racecheck "$OUT/sanitizer-racecheck.step.log" sanitize racecheck
sanitizer_summary
step pytest-benchmark "$OUT/pytest-benchmark.log" "$PY" -m pytest benchmarks/ --benchmark-only -q \
    --benchmark-json "$OUT/pytest-benchmark.json"
step fuzz-long "$OUT/fuzz-long.log" env PUSHPULL_FUZZ_PROFILE=long PUSHPULL_TEST_RESULTS="$OUT/fuzz-long.json" \
    "$PY" -m pytest tests/test_fuzz.py -q "${XDIST[@]}"
echo "failed steps: $FAILED" | tee -a "$OUT/summary.txt"
pack
exit $FAILED
