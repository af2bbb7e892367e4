#!/usr/bin/env bash
# The whole GPU check in one go:  benchmarks/gpu_suite.sh OUT_DIR
#
# On a GPU machine (torch + CUDA toolkit, Triton; no internet needed) it
#   1. writes OUT_DIR/environment.txt (nvidia-smi, nvcc, versions, git commit),
#   2. builds the extension in place: pip install --no-build-isolation --no-deps -e .  (OUT_DIR/build.log),
#   3. runs the test suite: pytest tests/ -q                                          (OUT_DIR/tests.log),
#      which runs every agreement/gradcheck case with backend="cuda" too (tests/conftest.py); checks that
#      the CUDA kernels were built (cuda-built), runs the module tests with "auto" resolved to the CUDA
#      backend (tests-auto-cuda.log), and compute-sanitizer memcheck / racecheck over the CUDA backend's
#      float64 agreement tests (sanitizer-*.log; skipped without compute-sanitizer),
#   4. runs the benchmark: python -m pushpull_ext.bench --out OUT_DIR (float32 and bfloat16, every SPEC
#      shape, every provider; results.json, results.csv, speedup_<mode>.png, OUT_DIR/bench.log),
#      then once more with --dtype bfloat16 --modes fwd,bwd,fwdbwd,inference into OUT_DIR/bfloat16,
#   5. runs the pytest-benchmark suite (OUT_DIR/pytest-benchmark.json, OUT_DIR/pytest-benchmark.log),
#   6. hardening: the long fuzzing profile (PUSHPULL_FUZZ_PROFILE=long, OUT_DIR/fuzz-long.log and
#      fuzz-long.json), and a subset of the cuda/triton tests under compute-sanitizer memcheck and
#      racecheck with PyTorch's caching allocator off (OUT_DIR/sanitizer-<tool>.log; the error counts
#      in OUT_DIR/sanitizers.json). The step 3 figures (examples fuzzed, bad inputs tried, determinism)
#      are in OUT_DIR/hardening.json.
# A failing step is recorded in OUT_DIR/summary.txt and the later steps still run. Exit status: the
# number of failed steps (0 = all passed). STEPS="build tests ..." runs only the named steps (a device
# session limits each command to 10 minutes: build + tests in one call, benchmarks in the next, ...).
set -u
OUT="${1:?usage: benchmarks/gpu_suite.sh OUT_DIR}"
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"
cd "$(dirname "$0")/.." || exit 1
PY="${PYTHON:-python}"
FAILED=0
: > "$OUT/summary.txt"

step() {  # step NAME LOGFILE COMMAND...: run, log, record the exit status (only the STEPS asked for)
    local name="$1" log="$2"; shift 2
    if [ -n "${STEPS:-}" ] && [[ " $STEPS " != *" $name "* ]]; then return 0; fi
    echo "== $name: $*" | tee -a "$OUT/summary.txt"
    local start=$SECONDS
    "$@" > "$log" 2>&1
    local rc=$?
    echo "   exit $rc after $((SECONDS - start)) s (log: $log)" | tee -a "$OUT/summary.txt"
    [ $rc -eq 0 ] || FAILED=$((FAILED + 1))
}

environment() {
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "host: $(hostname)"
    echo "git commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
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

environment > "$OUT/environment.txt" 2>&1
step build "$OUT/build.log" "$PY" -m pip install --no-build-isolation --no-deps -e .
"$PY" -c "import pushpull_ext; print(pushpull_ext.available_backends())" >> "$OUT/environment.txt" 2>&1
step cuda-built "$OUT/cuda-built.log" "$PY" -c \
    "import pushpull_ext as p; e = p.available_backends()['cuda']; assert e is None, e; print('cuda backend built')"
# CUBLAS_WORKSPACE_CONFIG: lets cuBLAS run under torch.use_deterministic_algorithms (tests/test_determinism.py).
step tests "$OUT/tests.log" env PUSHPULL_TEST_RESULTS="$OUT/hardening.json" CUBLAS_WORKSPACE_CONFIG=:4096:8 \
    "$PY" -m pytest tests/ -q
step tests-auto-cuda "$OUT/tests-auto-cuda.log" env PUSHPULL_BACKEND=cuda "$PY" -m pytest \
    tests/test_module.py tests/test_ops.py tests/test_cuda_backend.py -q
step bench "$OUT/bench.log" "$PY" -m pushpull_ext.bench --out "$OUT"
step bench-bfloat16 "$OUT/bench-bfloat16.log" "$PY" -m pushpull_ext.bench --dtype bfloat16 \
    --modes fwd,bwd,fwdbwd,inference --out "$OUT/bfloat16"
step pytest-benchmark "$OUT/pytest-benchmark.log" "$PY" -m pytest benchmarks/ --benchmark-only -q \
    --benchmark-json "$OUT/pytest-benchmark.json"
step fuzz-long "$OUT/fuzz-long.log" env PUSHPULL_FUZZ_PROFILE=long PUSHPULL_TEST_RESULTS="$OUT/fuzz-long.json" \
    "$PY" -m pytest tests/test_fuzz.py -q

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
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "${SANITIZER_TIMEOUT:-3600}" "$SANITIZER" --tool "$tool" \
        --target-processes all --print-limit 100 "$PY" -m pytest "${SANITIZED_TESTS[@]}" -q -p no:cacheprovider > "$log" 2>&1
    local rc=$?
    # "========= ERROR SUMMARY: N errors" once per sanitized process; no line means it did not finish.
    local errors
    errors=$(grep -Eo "ERROR SUMMARY: [0-9]+" "$log" | awk '{n += $3} END {print (NR ? n : "none")}')
    echo "$errors" > "$OUT/sanitizer-$tool.count"
    [ "$rc" -eq 0 ] && [ "$errors" = "0" ]
}

for tool in memcheck racecheck; do
    step "sanitizer-$tool" "$OUT/sanitizer-$tool.step.log" sanitize "$tool"
done
"$PY" - "$OUT" <<'PYEOF' || true
import json, os, sys
out = sys.argv[1]
def count(tool):
    text = open(os.path.join(out, f"sanitizer-{tool}.count")).read().strip() if os.path.exists(
        os.path.join(out, f"sanitizer-{tool}.count")) else "not run"
    return int(text) if text.isdigit() else text
result = {tool: {"errors": count(tool), "log": f"sanitizer-{tool}.log"} for tool in ("memcheck", "racecheck")}
json.dump(result, open(os.path.join(out, "sanitizers.json"), "w"), indent=2)
print("sanitizers:", result)
PYEOF
echo "failed steps: $FAILED" | tee -a "$OUT/summary.txt"
exit $FAILED
