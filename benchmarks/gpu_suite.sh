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
#   5. runs the pytest-benchmark suite (OUT_DIR/pytest-benchmark.json, OUT_DIR/pytest-benchmark.log).
# A failing step is recorded in OUT_DIR/summary.txt and the later steps still run. Exit status: the
# number of failed steps (0 = all passed).
set -u
OUT="${1:?usage: benchmarks/gpu_suite.sh OUT_DIR}"
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"
cd "$(dirname "$0")/.." || exit 1
PY="${PYTHON:-python}"
FAILED=0
: > "$OUT/summary.txt"

step() {  # step NAME LOGFILE COMMAND...: run, log, record the exit status
    local name="$1" log="$2"; shift 2
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
step tests "$OUT/tests.log" "$PY" -m pytest tests/ -q
step tests-auto-cuda "$OUT/tests-auto-cuda.log" env PUSHPULL_BACKEND=cuda "$PY" -m pytest \
    tests/test_module.py tests/test_ops.py tests/test_cuda_backend.py -q
SANITIZER="$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")"
if [ -x "$SANITIZER" ]; then
    for tool in memcheck racecheck; do
        step "sanitizer-$tool" "$OUT/sanitizer-$tool.log" "$SANITIZER" --tool "$tool" --error-exitcode 1 \
            "$PY" -m pytest tests/test_agreement.py tests/test_cuda_backend.py -q -x -k "(cuda-cuda and (float64_matches or one_input_only)) or test_cuda_backend"
    done
else
    echo "== sanitizer: skipped, no compute-sanitizer" | tee -a "$OUT/summary.txt"
fi
step bench "$OUT/bench.log" "$PY" -m pushpull_ext.bench --out "$OUT"
step bench-bfloat16 "$OUT/bench-bfloat16.log" "$PY" -m pushpull_ext.bench --dtype bfloat16 \
    --modes fwd,bwd,fwdbwd,inference --out "$OUT/bfloat16"
step pytest-benchmark "$OUT/pytest-benchmark.log" "$PY" -m pytest benchmarks/ --benchmark-only -q \
    --benchmark-json "$OUT/pytest-benchmark.json"
echo "failed steps: $FAILED" | tee -a "$OUT/summary.txt"
exit $FAILED
