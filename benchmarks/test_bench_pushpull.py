"""pytest-benchmark suite over the papers' shapes: `pytest benchmarks/ --benchmark-only`.

The same cases (pushpull_ext/shapes.py), providers and modes as `python -m pushpull_ext.bench`,
timed by pytest-benchmark instead (no accuracy figures here: the tests and the main job check those).
Batch: the paper's N on GPU; on CPU the largest power of two whose reference forward stays under
CPU_SUITE_FLOPS (small, so the whole suite runs in minutes on two cores). Nothing is asserted on timings.
"""

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from pushpull_ext import bench  # noqa: E402
from pushpull_ext.shapes import CASES, make_inputs  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CPU_SUITE_FLOPS = 1e9
PROVIDERS = (bench.BASELINE,) + bench.COMPILED + bench.OUR_BACKENDS
MODES = ("fwd", "fwdbwd")
_built = {}


def _inputs(case):
    batch = case.n if DEVICE == "cuda" else bench.cpu_batch(case, CPU_SUITE_FLOPS)
    return make_inputs(case, DEVICE, torch.float32, batch)


def _provider(case, name):
    """(inputs, fn), built once per case and provider (compiled providers compile once)."""
    key = (case.name, name)
    if key not in _built:
        inputs = _inputs(case)
        try:
            _built[key] = (inputs, bench.build_provider(name, inputs))
        except bench.Skip as reason:
            _built[key] = str(reason)
    if isinstance(_built[key], str):
        pytest.skip(f"{name} on {DEVICE}: {_built[key]}")
    return _built[key]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_push_pull(benchmark, case, provider, mode):
    if provider in ("cuda", "triton") and DEVICE != "cuda":
        pytest.skip(f"backend {provider!r} needs a CUDA GPU; none here")
    if provider == "cpu" and DEVICE == "cuda":
        pytest.skip("backend 'cpu' is benchmarked on CPU-only machines (here the GPU backends run)")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    inputs, fn = _provider(case, provider)
    with torch.no_grad():
        grad_out = torch.randn_like(fn())
    call = bench.mode_callable(fn, inputs, mode, grad_out)
    for _ in range(2):  # warm-up, compilation included
        call()

    def timed():
        call()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.extra_info.update(batch=inputs.batch, spec_batch=case.n, device=DEVICE, threads=torch.get_num_threads())
    benchmark.group = f"{case.name} {mode}"
    benchmark(timed)
