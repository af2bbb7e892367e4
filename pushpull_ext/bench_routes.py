"""The Triton launcher's routes timed side by side: each forced in turn, on one GPU, in one run.

    python -m pushpull_ext.bench_routes [--shapes NAME|N,Cin,Cout,H,W,k,stride,pad,pull[,scale|avg] ...]
                                        [--dtype float32 bfloat16] [--out routes.json]

Where the launcher chooses between two kernels by model (triton_launch: `_tap_path_pays` for upsample's
forward at stride 1, `_weight_adjoint_pays` for its weight gradient, `_fused_pooling_pays` for the pooled
forward), the model's prices are H100 peak ratios, not measurements. This times both routes of every
choice a paper shape has (LaunchConfig forces each; the forward alone for the forward's routes, the
backward of every gradient the layer trains for the weight gradient's) with triton.testing.do_bench
(median and the 20th / 80th percentiles, ms), and says which route the launcher takes and which was
faster, so that the first GPU run can set the rules (benchmarks/gpu_suite.sh runs it).

Without a GPU (TRITON_INTERPRET=1, CPU tensors) it runs the same calls once each through the interpreter:
a smoke run of the routes, whose times mean nothing.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch

from . import triton_launch
from .compile_check import launch_backward
from .functional import forward_args
from .shapes import CASES, Case, case_from_text, make_inputs

# LaunchConfig field -> (its routes, the kernel whose launch says the launcher took the second route, phase)
ROUTES = {
    "upsample_path": (("prefilter", "taps"), "pp_fwd_tap_kernel", "forward"),
    "weight_grad_path": (("prefilter", "adjoint"), "pp_bwd_weight_adjoint_kernel", "backward"),
    "pool_path": (("fused", "scratch"), "pp_fwd_pool_epilogue_kernel", "forward"),
}


def choices(case: Case) -> list[str]:
    """The LaunchConfig fields whose routes both apply to the case."""
    upsample = case.pull == "upsample" and case.scale != 1
    return [
        field
        for field, applies in (
            ("upsample_path", upsample and case.stride == 1),
            ("weight_grad_path", upsample),
            ("pool_path", case.avg_kernel > 1),
        )
        if applies
    ]


def _calls(case: Case, dtype, device, config: triton_launch.LaunchConfig) -> dict[str, Callable[[], object]]:
    """{"forward": the forward with masks, "backward": the backward of every gradient the layer trains}."""
    t = make_inputs(case, device=device, dtype=dtype).tensors
    args = forward_args(
        t["input"], t["weight"], t["bias"], save_masks=True, bias_out=t["bias_out"], alpha=t["alpha"], **case.options()
    )
    out, masks = triton_launch.forward(args, config=config)
    return {
        "forward": lambda: triton_launch.forward(args, config=config),
        "backward": lambda: launch_backward(config, args, out, masks),
    }


def _time(fn: Callable[[], object], device: str) -> tuple[float, float, float]:
    """(median, 20th, 80th percentile) ms: do_bench on a GPU; one interpreted call on the CPU (all three its time)."""
    if device == "cuda":
        from triton.testing import do_bench

        return tuple(do_bench(fn, quantiles=[0.5, 0.2, 0.8]))
    start = time.perf_counter()
    fn()
    ms = 1e3 * (time.perf_counter() - start)
    return ms, ms, ms


def _taken(case: Case, dtype, device, field: str) -> str:
    """The route the launcher's rule takes for the case: whether the second route's kernel is launched."""
    launched = []

    def launch(kernel):
        launched.append(kernel.fn.__name__)
        return triton_launch.wrap_triton(kernel)

    routes, kernel, phase = ROUTES[field]
    _calls(case, dtype, device, triton_launch.LaunchConfig(launch=launch))[phase]()
    return routes[1] if kernel in launched else routes[0]


def time_routes(cases: list[Case], dtypes: list, device: str) -> list[dict]:
    """One row per case, dtype and choice: both routes' times, the launcher's pick and the faster one."""
    rows = []
    for case in cases:
        for dtype in dtypes:
            for field in choices(case):
                routes, _, phase = ROUTES[field]
                times = {}
                for route in routes:
                    call = _calls(case, dtype, device, triton_launch.LaunchConfig(**{field: route}))[phase]
                    times[route] = _time(call, device)
                fastest = min(routes, key=lambda r: times[r][0])
                rows.append(
                    dict(
                        shape=case.name,
                        dtype=str(dtype).replace("torch.", ""),
                        choice=field,
                        phase=phase,
                        ms={route: list(t) for route, t in times.items()},
                        launcher_takes=_taken(case, dtype, device, field),
                        faster=fastest,
                    )
                )
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", help="paper shapes by name (default: all), or cases as N,Cin,...")
    parser.add_argument("--dtype", nargs="+", default=["float32"], help="float32 (default), bfloat16, float16")
    parser.add_argument("--out", help="write the rows here (JSON), with the device and versions")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not triton_launch.TRITON_INTERPRET:
        raise SystemExit("bench_routes: no GPU here; set TRITON_INTERPRET=1 for a smoke run on the CPU (no timing)")
    cases = [case_from_text(name) for name in args.shapes] if args.shapes else CASES
    rows = time_routes(cases, [getattr(torch, d) for d in args.dtype], device)
    for r in rows:
        times = ", ".join(f"{route} {t[0]:.3f} ms" for route, t in r["ms"].items())
        print(
            f"{r['shape']:20} {r['dtype']:9} {r['choice']:17} {r['phase']:8} {times}; launcher: "
            f"{r['launcher_takes']}, faster: {r['faster']}"
        )
    if args.out:
        import triton

        env = dict(
            device=torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreter: no timing)",
            torch=torch.__version__,
            triton=triton.__version__,
        )
        with open(args.out, "w") as f:
            json.dump(dict(environment=env, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
