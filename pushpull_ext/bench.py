"""Benchmark of push_pull_conv2d against plain PyTorch: `python -m pushpull_ext.bench --help`.

For every case of pushpull_ext/shapes.py (or --shapes / --shape), dtype and provider it
1. checks the forward output and every gradient against a float64 evaluation of the reference
   formula (max abs error, and whether the relative error is within the tolerance (shapes.tolerance));
2. times forward / backward / forward+backward / inference (CPU: torch.utils.benchmark.Timer,
   GPU: triton.testing.do_bench, CUDA graphs for the small CIFAR shapes): median, 20th and 80th
   percentile, speedup against the eager reference, and time over the plain convolution + ReLU;
3. derives GFLOP/s and GB/s from one FLOPs/bytes model (`work`), the percentage of a roofline whose
   peaks (copy bandwidth, large matmul) are measured in the same run, and the memory the forward
   keeps for backward (saved tensors, deduplicated by storage; on GPU also the peak allocation).
Providers (bench_providers.py): "reference" (eager formula, the baseline), "conv+relu" (nn.Conv2d + ReLU of
the same geometry), "stacked+compile" (the best plain PyTorch: the convolutions stacked where the kernels
have one size, a torch.compile'd epilogue), "compiled-reference" (torch.compile of the reference), and our
backends (cpu; cuda, triton on GPU).
`--models`: whole networks instead (bench_models.py): ResNet-20 and ResNet-50 training steps and
inference, plain against push-pull layers in the papers' placements.
See benchmarks/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

from .bench_providers import (  # noqa: F401  (re-exported: the benchmark's names, as before the split)
    BASELINE,
    COMPILED,
    CONV_RELU,
    DEFAULT_PROVIDERS,
    OUR_BACKENDS,
    PROVIDERS,
    Skip,
    away_from_kinks,
    build_provider,
    forward_backward,
    grad_names,
    mode_callable,
    roofline_percent,
    work,
)
from .bench_report import (  # noqa: F401
    TOLERANCE_LEGEND,
    _dtype_name,
    environment,
    format_figures,
    format_table,
    write_outputs,
)
from .bench_timing import (  # noqa: F401
    CPU_ROUNDS,
    gpu_peak_bytes,
    measure_peaks,
    saved_bytes,
    set_precision,
    steady_cpu_allocator,
    summarize_cpu,
    time_cpu,
    time_gpu,
)
from .shapes import (
    CASE_FORMAT,
    CASES,
    Case,
    CaseInputs,
    case_by_name,
    make_inputs,
    parse_case,
    relative_error,
    tolerance,
)

MODES = ("fwd", "bwd", "fwdbwd", "inference")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
CPU_FLOP_BUDGET = 4e9  # CPU batch: the largest power of two whose reference forward stays under this
QUICK_BATCH = 2
MIN_RUN_TIME = {"quick": 0.05, "default": 1.0, "full": 2.0}  # CPU seconds per provider and mode
# The progress bar's weights (expected seconds of each step, `expected_seconds`): a torch.compile'd
# provider's (or Triton's) first calls on a cold cache, a GPU timing, and the share of the measured
# matmul peak that a call's FLOPs run at.
FIRST_COMPILE_S = {"cpu": 25.0, "cuda": 10.0}
GPU_TIMING_S = 0.5
PEAK_SHARE = 0.25


# ---------------------------------------------------------------- one case


@dataclass
class Settings:
    device: str
    dtypes: list
    providers: list
    modes: list
    threads: int
    batch: Optional[int]
    quick: bool
    tf32: bool
    min_run_time: float
    notes: list = field(default_factory=list)


def case_batch(case: Case, settings: Settings) -> int:
    """--batch, the tiny --quick batch, the paper's N on GPU, or on CPU `cpu_batch`."""
    if settings.batch:
        return settings.batch
    if settings.quick:
        return min(case.n, QUICK_BATCH)
    return case.n if settings.device == "cuda" else cpu_batch(case)


def cpu_batch(case: Case, flop_budget: float = CPU_FLOP_BUDGET) -> int:
    """The largest power of two (at most the paper's N) whose reference forward stays within
    `flop_budget` FLOPs, so that each case runs in seconds on a few cores."""
    per_image = work(case, 1, 4, "fwd")[0]
    return max(1, min(case.n, 2 ** int(math.log2(max(1.0, flop_budget / per_image)))))


def _errors(out, grads, exact_out, exact_grads, names) -> dict:
    tensors = {"output": (out, exact_out)}
    tensors.update({f"grad_{n}": pair for n, pair in zip(names, zip(grads, exact_grads))})
    return {
        k: {"abs": (v.double() - e.double()).abs().max().item(), "rel": relative_error(v, e)}
        for k, (v, e) in tensors.items()
    }


def verdict(errors: dict, dtype, eager: Optional[dict], tf32: bool) -> str:
    """ "ok": every tensor within the tolerance (shapes.tolerance) (float32 / float64: the fixed figure; low precision
    and TF32: relative to the eager reference's own error). "as eager": some tensor exceeds the fixed
    figure but by no more than the low-precision rule allows against eager PyTorch's own error in
    the same dtype (e.g. a ReLU whose input lies within rounding of 0 flips: eager float32 does too).
    "FAIL": anything else. `eager` is None only for the reference itself in low precision."""
    fixed = dtype in (torch.float64, torch.float32) and not (tf32 and dtype == torch.float32)
    if not fixed and eager is None:
        return "ok"  # this is eager itself
    if fixed and all(e["rel"] <= tolerance(dtype) for e in errors.values()):
        return "ok"
    if eager is not None and all(e["rel"] <= tolerance(dtype, eager[k]["rel"]) for k, e in errors.items()):
        return "as eager" if fixed else "ok"
    return "FAIL"


def check_provider(name, inputs, exact, grad_out, settings, eager_errors):
    """(row, fn): errors and memory of one provider on one case and dtype, and its callable for timing."""
    row = {"provider": name}
    fn = build_provider(name, inputs)
    start = time.perf_counter()
    out, grads = forward_backward(fn, inputs, grad_out)  # compiles, if it does
    forward_backward(fn, inputs, grad_out)
    row["first_calls_s"] = time.perf_counter() - start
    exact_out, exact_grads = exact[CONV_RELU if name == CONV_RELU else BASELINE]
    row["errors"] = _errors(out, grads, exact_out, exact_grads, grad_names(fn, inputs))
    own = row["errors"] if name == BASELINE else eager_errors
    row["tolerance"] = verdict(row["errors"], inputs.input.dtype, own, settings.tf32)
    row["within_tolerance"] = row["tolerance"] == "ok"
    row["saved_for_backward_bytes"] = saved_bytes(fn)
    if settings.device == "cuda":
        row["gpu_peak_fwdbwd_bytes"] = gpu_peak_bytes(mode_callable(fn, inputs, "fwdbwd", grad_out))
    return row, fn


def time_providers(fns: dict, inputs, mode, grad_out, settings) -> dict:
    """Timing of each provider in one mode. CPU: CPU_ROUNDS rounds, each timing every provider in
    turn for min_run_time / CPU_ROUNDS (a shared machine's load then weighs on all alike); the samples
    of all rounds are pooled. GPU: one do_bench per provider."""
    if settings.device == "cuda":
        timings = {}
        for name, fn in fns.items():
            try:
                timings[name] = _time_gpu_mode(fn, inputs, mode, grad_out, settings)
            except Exception as error:  # one provider's failure (e.g. out of memory) costs only its figure
                _sync_quietly()
                timings[name] = {"failed": _failure(error)}
        return timings
    calls = {name: mode_callable(fn, inputs, mode, grad_out) for name, fn in fns.items()}
    for call in calls.values():
        for _ in range(2):  # warm-up (and, for inference, compilation of the no-grad graph)
            call()
    samples = {name: [] for name in calls}
    for _ in range(CPU_ROUNDS):
        for name, call in calls.items():
            samples[name] += time_cpu(call, settings.threads, settings.min_run_time / CPU_ROUNDS)
    return {name: summarize_cpu(times) for name, times in samples.items()}


def _time_gpu_mode(fn, inputs, mode, grad_out, settings) -> dict:
    call = mode_callable(fn, inputs, mode, grad_out)
    for _ in range(2):
        call()
    torch.cuda.synchronize()
    return time_gpu(call, inputs.case.h * inputs.case.w <= 32 * 32, settings.quick)


def add_figures(timing: dict, inputs: CaseInputs, mode: str, peaks: dict) -> dict:
    flops, nbytes = work(inputs.case, inputs.batch, inputs.input.element_size(), mode)
    seconds = timing["ms"] / 1e3
    timing.update(
        gflops_per_s=flops / seconds / 1e9,
        gb_per_s=nbytes / seconds / 1e9,
        flops=flops,
        bytes=nbytes,
        roofline_pct=roofline_percent(flops, nbytes, seconds, peaks),
    )
    return timing


def run_case(case: Case, dtype, settings: Settings, peaks: dict, progress) -> list:
    """Every provider on one case and dtype: accuracy and memory, then timing; the reference first."""
    if hasattr(torch, "_dynamo"):
        torch._dynamo.reset()  # each case compiles afresh; earlier graphs do not count against cache limits
    batch = case_batch(case, settings)
    inputs = make_inputs(case, settings.device, dtype, batch)
    grad_out = _grad_output(inputs)
    exact = exact_results(inputs, grad_out, settings.providers)
    rows, fns, eager_errors = {}, {}, None
    for name in settings.providers:
        progress.set_postfix_str(f"{case.name} {_dtype_name(dtype)} {name} (check)")
        rows[name] = {"shape": case.name, "dtype": _dtype_name(dtype), "batch": batch, "spec_batch": case.n}
        try:
            row, fns[name] = check_provider(name, inputs, exact, grad_out, settings, eager_errors)
            rows[name].update(row)
        except Skip as reason:
            rows[name].update(provider=name, skipped=str(reason))
        except Exception as error:  # e.g. torch.compile without a working C++ compiler
            rows[name].update(provider=name, skipped=_failure(error))
        eager_errors = eager_errors or rows[name].get("errors")
        progress.update(expected_seconds(case, batch, settings, peaks, check=name))
    for name in fns:
        rows[name]["modes"] = {}
    for mode in settings.modes:
        progress.set_postfix_str(f"{case.name} {_dtype_name(dtype)} timing {mode}")
        for name, timing in time_providers(fns, inputs, mode, grad_out, settings).items():
            if "failed" in timing:
                rows[name].setdefault("timing_failed", {})[mode] = timing["failed"]
                continue
            rows[name]["modes"][mode] = add_figures(timing, inputs, mode, peaks)
        progress.update(expected_seconds(case, batch, settings, peaks, mode=mode))
    rows = list(rows.values())
    _add_speedups(rows)
    return rows


def exact_results(inputs: CaseInputs, grad_out: torch.Tensor, providers: list) -> dict:
    """The float64 evaluation each provider is judged against: the reference formula's output and
    gradients, and for conv+relu (a different function) its own."""
    exact64 = inputs.cast(torch.float64)
    names = [BASELINE] + ([CONV_RELU] if CONV_RELU in providers else [])
    return {name: forward_backward(build_provider(name, exact64), exact64, grad_out.double()) for name in names}


def expected_seconds(case: Case, batch: int, settings: Settings, peaks: dict, check=None, mode=None) -> float:
    """What one step of run_case is expected to take, the progress bar's weight: checking provider `check`
    (the reference's check includes the float64 evaluation), or timing every provider in `mode`."""
    fwdbwd = work(case, batch, 4, "fwdbwd")[0] / (PEAK_SHARE * peaks["flops_per_s"])
    if check is not None:
        first = FIRST_COMPILE_S[settings.device] if check in COMPILED + ("triton",) else 0.0
        return first + (4 if check == BASELINE else 2) * fwdbwd
    per_provider = GPU_TIMING_S if settings.device == "cuda" else settings.min_run_time + 2 * fwdbwd
    return len(settings.providers) * per_provider


def total_expected_seconds(cases: list, settings: Settings, peaks: dict) -> float:
    return sum(
        expected_seconds(case, case_batch(case, settings), settings, peaks[_dtype_name(dtype)], **step)
        for case in cases
        for dtype in settings.dtypes
        for step in [{"check": p} for p in settings.providers] + [{"mode": m} for m in settings.modes]
    )


def _sync_quietly() -> None:
    """Waits for the GPU after a failure; a broken context (e.g. an illegal address) raises again here,
    and then every later case fails alike and says so."""
    try:
        torch.cuda.synchronize()
    except Exception:  # noqa: BLE001
        pass


def _failure(error: Exception) -> str:
    text = str(error).splitlines()[0][:200] if str(error) else ""
    return f"failed: {type(error).__name__}: {text}"


def failed_case_rows(case: Case, dtype, settings: Settings, error: Exception) -> list:
    """One skipped row per provider, for a case that failed as a whole (e.g. the reference ran out of
    memory): the run goes on with the next case."""
    return [
        {
            "shape": case.name,
            "dtype": _dtype_name(dtype),
            "batch": case_batch(case, settings),
            "spec_batch": case.n,
            "provider": name,
            "skipped": "case " + _failure(error),
        }
        for name in settings.providers
    ]


def _grad_output(inputs: CaseInputs) -> torch.Tensor:
    """N(0, 1), but 0 at the outputs whose ReLU input lies within rounding of 0 (away_from_kinks): the
    gradients are then judged where the formula decides them (in float32 a single flipped ReLU at the
    paper shapes moves a weight gradient by about 1e-4 of its scale, the tolerance itself)."""
    keep = away_from_kinks(inputs).cpu()  # the output's shape: no forward of its own for it
    gen = torch.Generator().manual_seed(1)
    grad = torch.randn(keep.shape, generator=gen, dtype=torch.float64) * keep
    return grad.to(inputs.input.device, inputs.input.dtype)


def _add_speedups(rows: list) -> None:
    """speedup = reference / this provider; conv_ratio = this provider / conv+relu (x the plain convolution)."""
    base = _timed_row(rows, BASELINE)
    conv = _timed_row(rows, CONV_RELU)
    for row in rows:
        for mode, timing in row.get("modes", {}).items():
            ref = base["modes"].get(mode) if base else None
            timing["speedup"] = ref["ms"] / timing["ms"] if ref else None
            timing["ref_ms"] = ref["ms"] if ref else None
            plain = conv["modes"].get(mode) if conv else None
            timing["conv_ratio"] = timing["ms"] / plain["ms"] if plain else None
            timing["conv_relu_ms"] = plain["ms"] if plain else None


def _timed_row(rows: list, provider: str) -> Optional[dict]:
    return next((r for r in rows if r["provider"] == provider and "modes" in r), None)


# ---------------------------------------------------------------- command line

_EPILOG = (
    "shapes (--shapes): " + ", ".join(c.name for c in CASES) + "\n"
    f"--shape {CASE_FORMAT}:\n"
    "  upsample: the 2020 layer (b_in, alpha 1); optional 10th field = scale (default 2)\n"
    "  invert:   the 2024 layer (b_out, trainable [C_out] alpha); optional 10th field = avg kernel (default 0)\n"
    "  the input needs a gradient. e.g. --shape 32,64,64,56,56,3,1,1,upsample,2 --shape 8,3,64,224,224,7,2,3,invert,3\n"
    "providers: reference (eager formula, the baseline), conv+relu (nn.Conv2d + ReLU of the same geometry), "
    "stacked+compile (stacked convolutions + torch.compile'd "
    "epilogue), compiled-reference (torch.compile of the reference), ours = cpu (CPU) / cuda, triton (GPU)"
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m pushpull_ext.bench",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_EPILOG,
    )
    p.add_argument("--shapes", nargs="+", default=None, help="the papers' shapes by name (default: all)")
    p.add_argument("--shape", action="append", default=[], help=f"an extra case: {CASE_FORMAT}; repeatable")
    p.add_argument(
        "--dtype", nargs="+", choices=list(DTYPES), default=None, help="default: float32 (and bfloat16 on GPU)"
    )
    p.add_argument(
        "--batch",
        type=int,
        default=None,
        help="batch for every case (default: the paper's N on GPU, "
        f"scaled on CPU so the reference forward stays under {CPU_FLOP_BUDGET / 1e9:g} GFLOP)",
    )
    p.add_argument(
        "--backends",
        nargs="+",
        choices=OUR_BACKENDS,
        default=None,
        help="our backends (default: those available on the device)",
    )
    p.add_argument(
        "--providers",
        nargs="+",
        default=None,
        help=f"any of {', '.join(PROVIDERS)} or a backend name (default: {' '.join(DEFAULT_PROVIDERS)}; "
        "all with --full); "
        "the reference always runs (the baseline)",
    )
    p.add_argument("--modes", default="fwd,fwdbwd", help=f"comma-separated, of {','.join(MODES)} (default fwd,fwdbwd)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--tf32", action="store_true", help="allow TF32 (default off, as the float32 tolerance)")
    p.add_argument(
        "--min-run-time",
        type=float,
        default=None,
        help=f"CPU seconds per provider and mode, split over {CPU_ROUNDS} interleaved rounds (default "
        f"{MIN_RUN_TIME['default']:g}, {MIN_RUN_TIME['full']:g} with --full)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for results.json, results.csv, speedup_<mode>.png (--models: models.png) "
        "(default: bench_out/<date-time>/)",
    )
    p.add_argument(
        "--full",
        action="store_true",
        help="the whole sweep: every provider (also the torch.compile "
        f"ones), {MIN_RUN_TIME['full']:g} s per measurement; without it: reference, conv+relu and ours, "
        f"{MIN_RUN_TIME['default']:g} s",
    )
    p.add_argument("--quick", action="store_true", help=f"batch {QUICK_BATCH}, short measurements: a smoke run")
    _model_arguments(p)
    return p.parse_args(argv)


def _model_arguments(p: argparse.ArgumentParser) -> None:
    from .bench_models import CALLS, ROUNDS

    p.add_argument(
        "--models",
        nargs="*",
        default=None,
        metavar="MODEL",
        help="whole networks instead of single layers: resnet20 (CIFAR, 32 px, batch 128 on CPU) and/or resnet50 "
        "(112 px, batch 8 on CPU), plain against push-pull in the placements pp, b1 and b1 on the eager "
        "reference; training step and inference (default: both models). --batch, --quick, --full, --threads, "
        "--device and --out apply",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=None,
        help=f"--models: interleaved timing rounds per mode (default {ROUNDS['default']}, {ROUNDS['full']} with "
        "--full)",
    )
    p.add_argument(
        "--calls",
        type=int,
        default=None,
        help=f"--models: timed calls per variant and round (default {CALLS['default']}, {CALLS['full']} with --full)",
    )


def _cases(ns) -> list:
    cases = [case_by_name(n) for n in ns.shapes] if ns.shapes else ([] if ns.shape else list(CASES))
    return cases + [parse_case(text) for text in ns.shape]


def _providers(ns, device: str) -> list:
    wanted = ns.providers or list(PROVIDERS if ns.full else DEFAULT_PROVIDERS)
    unknown = [p for p in wanted if p not in PROVIDERS + OUR_BACKENDS]
    if unknown:
        raise SystemExit(f"unknown provider(s) {unknown}; choose from {PROVIDERS + OUR_BACKENDS}")
    backends = ns.backends or (["cuda", "triton"] if device == "cuda" else ["cpu"])
    names = [BASELINE]
    for p in wanted:
        names += [b for b in backends if b not in names] if p == "ours" else ([p] if p not in names else [])
    return names


def settings_from(ns) -> Settings:
    device = ns.device or ("cuda" if torch.cuda.is_available() else "cpu")
    modes = [m.strip() for m in ns.modes.split(",") if m.strip()]
    if any(m not in MODES for m in modes):
        raise SystemExit(f"--modes takes a comma-separated list of {MODES}, got {ns.modes!r}")
    dtypes = (
        [DTYPES[d] for d in ns.dtype]
        if ns.dtype
        else ([torch.float32, torch.bfloat16] if device == "cuda" else [torch.float32])
    )
    threads = ns.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    min_run = ns.min_run_time or MIN_RUN_TIME["quick" if ns.quick else "full" if ns.full else "default"]
    return Settings(device, dtypes, _providers(ns, device), modes, threads, ns.batch, ns.quick, ns.tf32, min_run)


def _header(settings: Settings, env: dict, cases: list) -> list:
    lines = [
        f"device: {env['device_name']} ({settings.device}); torch {env['torch']}, triton {env['triton']}, "
        f"CUDA {env['cuda']}; commit {env['git_commit'][:12]}",
        f"precision: TF32 {'on' if settings.tf32 else 'off'} (matmul and cuDNN) for every provider; "
        f"dtypes {', '.join(_dtype_name(d) for d in settings.dtypes)}",
    ]
    if settings.device == "cpu":
        lines.append(
            f"threads: {settings.threads} (torch.set_num_threads and Timer num_threads, every provider); "
            f"load average at start {tuple(round(x, 2) for x in env.get('load_average_at_start') or ())}"
        )
        lines.append(f"allocator: {env.get('cpu_allocator') or 'as the process found it'}")
    for case in cases:
        batch = case_batch(case, settings)
        if batch != case.n:
            lines.append(
                f"{case.name}: batch scaled from {case.n} to {batch} on {settings.device.upper()}"
                + (" (--quick)" if settings.quick else " (--batch)" if settings.batch else "")
            )
    return lines


def main(argv=None) -> dict:
    """Runs the benchmark; prints the tables; writes every figure to --out (default bench_out/<date-time>/)
    and returns it."""
    from tqdm import tqdm

    ns = parse_args(argv)
    settings, cases = settings_from(ns), _cases(ns)
    out = ns.out or Path("bench_out") / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    if ns.models is not None:
        from .bench_models import run_models

        return run_models(ns, settings.device, settings.threads, out)
    set_precision(settings.tf32, settings.threads)
    if hasattr(torch, "_dynamo"):
        torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
    env = environment(settings.device)
    env["cpu_allocator"] = steady_cpu_allocator()
    header = _header(settings, env, cases)
    print("\n".join(header), flush=True)
    start = time.perf_counter()
    peaks = {
        _dtype_name(d): measure_peaks(settings.device, d, settings.threads, settings.quick) for d in settings.dtypes
    }
    rows = []

    def result_so_far() -> dict:
        return {
            "environment": env,
            "header": header,
            "elapsed_s": time.perf_counter() - start,
            "peaks": peaks,
            "rows": rows,
            "cases": [asdict(c) for c in cases],
            "settings": {**asdict(settings), "dtypes": [_dtype_name(d) for d in settings.dtypes]},
        }

    # Weighted by each step's expected seconds, so that the time left is that of the steps left.
    total = total_expected_seconds(cases, settings, peaks)
    bar = "{l_bar}{bar}| {elapsed}<{remaining} {postfix}"
    with tqdm(total=total, desc="push-pull bench", file=sys.stderr, dynamic_ncols=True, bar_format=bar) as progress:
        for case in cases:
            for dtype in settings.dtypes:
                try:
                    rows += run_case(case, dtype, settings, peaks[_dtype_name(dtype)], progress)
                except Exception as error:
                    if settings.device == "cuda":
                        _sync_quietly()
                    rows += failed_case_rows(case, dtype, settings, error)
                write_outputs(out, result_so_far())  # after every case: a run stopped early keeps what it measured
    elapsed = time.perf_counter() - start
    print("\n" + format_table(rows, settings.modes))
    print(TOLERANCE_LEGEND)
    print("\n" + format_figures(rows, settings.modes))
    print(
        "\npeaks measured in this run: "
        + "; ".join(
            f"{k}: copy {v['bytes_per_s'] / 1e9:.1f} GB/s, matmul {v['flops_per_s'] / 1e9:.1f} GFLOP/s"
            for k, v in peaks.items()
        )
    )
    if settings.device == "cpu" and hasattr(os, "getloadavg"):
        env["load_average_at_end"] = os.getloadavg()  # a shared machine's load during the run, as at its start
    load = tuple(round(v, 2) for v in env.get("load_average_at_end") or ())
    print(f"total time {elapsed:.1f} s" + (f"; load average at end {load}" if load else ""))
    result = result_so_far()
    write_outputs(out, result)
    print(f"results (results.json, results.csv, speedup_<mode>.png): {out}/")
    return result


if __name__ == "__main__":
    main()
