"""Benchmark of push_pull_conv2d against plain PyTorch: `python -m pushpull_ext.bench --help`.

For every case of pushpull_ext/shapes.py (or --shapes / --shape), dtype and provider it
1. checks the forward output and every gradient against a float64 evaluation of the reference
   formula (max abs error, and whether the relative error is within the tolerance (shapes.tolerance));
2. times forward / backward / forward+backward / inference (CPU: torch.utils.benchmark.Timer,
   GPU: triton.testing.do_bench, CUDA graphs for the small CIFAR shapes): median, 20th and 80th
   percentile, speedup against the eager reference;
3. derives GFLOP/s and GB/s from one FLOPs/bytes model (`work`), the percentage of a roofline whose
   peaks (copy bandwidth, large matmul) are measured in the same run, and the memory the forward
   keeps for backward (saved tensors, deduplicated by storage; on GPU also the peak allocation).
Providers: "reference" (eager formula, the baseline), "stacked+compile" (the best plain PyTorch:
the convolutions stacked where the kernels have one size, a torch.compile'd epilogue),
"compiled-reference" (torch.compile of the reference), and our backends (cpu; cuda, triton on GPU).
See benchmarks/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import functools
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from .functional import push_pull_conv2d, resolve_backend
from .options import conv_output_size, normalize, upsampled_size
from .reference import pull_kernel, push_pull_reference
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

BASELINE = "reference"
COMPILED = ("stacked+compile", "compiled-reference")
OUR_BACKENDS = ("cpu", "cuda", "triton")
PROVIDERS = (BASELINE,) + COMPILED + ("ours",)
DEFAULT_PROVIDERS = (BASELINE, "ours")  # without --full: the torch.compile providers cost most of the time
MODES = ("fwd", "bwd", "fwdbwd", "inference")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
CPU_FLOP_BUDGET = 4e9  # CPU batch: the largest power of two whose reference forward stays under this
QUICK_BATCH = 2
QUANTILES = [0.5, 0.2, 0.8]
CPU_ROUNDS = 3  # interleaved timing rounds per mode on CPU
MIN_RUN_TIME = {"quick": 0.05, "default": 1.0, "full": 2.0}  # CPU seconds per provider and mode
# The progress bar's weights (expected seconds of each step, `expected_seconds`): a torch.compile'd
# provider's (or Triton's) first calls on a cold cache, a GPU timing, and the share of the measured
# matmul peak that a call's FLOPs run at.
FIRST_COMPILE_S = {"cpu": 25.0, "cuda": 10.0}
GPU_TIMING_S = 0.5
PEAK_SHARE = 0.25


class Skip(Exception):
    """A provider that cannot run here; the message says why."""


# ---------------------------------------------------------------- the FLOPs / bytes model (written once)


def _geometry(case: Case):
    ho = conv_output_size(case.h, case.kernel, case.stride, case.padding, 1)
    wo = conv_output_size(case.w, case.kernel, case.stride, case.padding, 1)
    pull = upsampled_size(case.kernel, case.scale) if case.pull == "upsample" and case.scale != 1 else case.kernel
    return ho, wo, pull


def work(case: Case, batch: int, itemsize: int, mode: str) -> tuple[float, float]:
    """(FLOPs, bytes) of one call in `mode`, for the formula as the reference computes it.

    FLOPs: forward = 2 MACs of the push conv (k x k) and of the pull conv (q x q), a*a per output for
    the average, 5 per output for bias / ReLUs / combination; backward = the weight gradient of both
    convolutions (2 MACs each), their input gradient when the input needs one, the same pooling and
    elementwise work. Bytes: forward = input + weights (+ biases, alpha) + output; backward =
    grad_output + input + weights + every gradient written. fwdbwd = both; inference = forward.
    """
    ho, wo, q = _geometry(case)
    outputs = batch * case.c_out * ho * wo
    macs = outputs * case.c_in * (case.kernel**2 + q**2)
    pointwise = outputs * (5 + (case.avg_kernel**2 if case.avg_kernel > 1 else 0))
    fwd_flops = 2 * macs + pointwise
    bwd_flops = 2 * macs * (2 if case.input_grad else 1) + pointwise
    x = batch * case.c_in * case.h * case.w
    params = case.c_out * case.c_in * case.kernel**2 + case.c_out * (case.bias_in + case.bias_out + 1)
    fwd_bytes = (x + params + outputs) * itemsize
    bwd_bytes = (outputs + x + 2 * params + (x if case.input_grad else 0)) * itemsize
    flops = {"fwd": fwd_flops, "inference": fwd_flops, "bwd": bwd_flops, "fwdbwd": fwd_flops + bwd_flops}[mode]
    nbytes = {"fwd": fwd_bytes, "inference": fwd_bytes, "bwd": bwd_bytes, "fwdbwd": fwd_bytes + bwd_bytes}[mode]
    return float(flops), float(nbytes)


def roofline_percent(flops: float, nbytes: float, seconds: float, peaks: dict) -> Optional[float]:
    """Achieved FLOP/s as a percentage of min(peak FLOP/s, intensity x peak bandwidth)."""
    if not peaks or seconds <= 0:
        return None
    attainable = min(peaks["flops_per_s"], flops / nbytes * peaks["bytes_per_s"])
    return 100.0 * flops / seconds / attainable


# ---------------------------------------------------------------- providers


def _epilogue(push, pull, alpha, bias_out, avg_kernel: int):
    if avg_kernel > 1:
        pull = F.avg_pool2d(pull, avg_kernel, stride=1, padding=(avg_kernel - 1) // 2, count_include_pad=False)
    out = F.relu(push) - alpha.view(1, -1, 1, 1) * F.relu(pull)
    return out if bias_out is None else out + bias_out.view(1, -1, 1, 1)


def _stacked(x, w, b_in, b_out, alpha, args, epilogue):
    """Plain PyTorch at its best: invert stacks [k; q] into one convolution (same size); upsample, whose
    pull kernel is larger, runs two convolutions; then the compiled epilogue."""
    conv = dict(stride=args.stride, dilation=args.dilation, groups=args.groups)
    q = pull_kernel(w, args.pull, args.scale)
    if q.shape == w.shape and args.groups == 1:
        bias = None if b_in is None else torch.cat([b_in, -b_in])
        push, pull = F.conv2d(x, torch.cat([w, q]), bias, padding=args.padding, **conv).split(w.shape[0], dim=1)
    else:
        push = F.conv2d(x, w, b_in, padding=args.padding, **conv)
        pull = F.conv2d(x, q, None if b_in is None else -b_in, padding=args.pull_padding(tuple(w.shape[2:])), **conv)
    return epilogue(push, pull, alpha, b_out)


def _normalized(inputs: CaseInputs):
    t = inputs.tensors
    return normalize(
        t["input"],
        t["weight"],
        t["bias"],
        t["bias_out"],
        t["alpha"],
        dilation=1,
        groups=1,
        dual_output=False,
        **inputs.case.options(),
    )


def build_provider(name: str, inputs: CaseInputs) -> Callable[[], torch.Tensor]:
    """A no-argument callable computing the layer's output on `inputs` with provider `name`."""
    t = inputs.tensors
    if name in (BASELINE,) + OUR_BACKENDS:
        if name != BASELINE:
            _check_backend(name, inputs.input)
        return functools.partial(inputs.call, push_pull_conv2d, backend=name)
    args, alpha = _normalized(inputs)
    tensors = (t["input"], t["weight"], t["bias"], t["bias_out"])
    if name == "compiled-reference":
        compiled = torch.compile(functools.partial(push_pull_reference, args=args), fullgraph=True, dynamic=False)
        return lambda: compiled(*tensors, alpha)
    if name == "stacked+compile":
        epilogue = torch.compile(
            functools.partial(_epilogue, avg_kernel=args.avg_kernel), fullgraph=True, dynamic=False
        )
        return lambda: _stacked(*tensors, alpha, args, epilogue)
    raise ValueError(f"unknown provider {name!r}")


def _check_backend(name: str, input: torch.Tensor) -> None:
    if name == "triton" and input.device.type != "cuda":
        raise Skip("triton runs on CPU only under the TRITON_INTERPRET debugger; not benchmarked")
    try:
        resolve_backend(name, input)
    except RuntimeError as error:
        raise Skip(str(error)) from None


# ---------------------------------------------------------------- what a mode runs


def mode_callable(fn: Callable, inputs: CaseInputs, mode: str, grad_out: torch.Tensor) -> Callable[[], object]:
    grads = inputs.grad_tensors()
    if mode == "fwd":
        return fn
    if mode == "inference":

        def inference():
            with torch.no_grad():
                return fn()

        return inference
    if mode == "fwdbwd":
        return lambda: torch.autograd.grad(fn(), grads, grad_out)
    if mode == "bwd":
        out = fn()  # one graph, kept alive: only the backward is timed
        return lambda: torch.autograd.grad(out, grads, grad_out, retain_graph=True)
    raise ValueError(f"unknown mode {mode!r}")


def forward_backward(fn: Callable, inputs: CaseInputs, grad_out: torch.Tensor):
    out = fn()
    return out.detach(), [g.detach() for g in torch.autograd.grad(out, inputs.grad_tensors(), grad_out)]


# ---------------------------------------------------------------- timing


def time_cpu(fn: Callable, threads: int, min_run_time: float) -> list:
    """Seconds per call: the per-block means of torch.utils.benchmark.Timer.blocked_autorange."""
    from torch.utils.benchmark import Timer

    m = Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads).blocked_autorange(min_run_time=min_run_time)
    return list(m.times)


def summarize_cpu(times: list) -> dict:
    import numpy as np

    p50, p20, p80 = np.percentile(times, [50, 20, 80])
    return {
        "ms": p50 * 1e3,
        "ms_p20": p20 * 1e3,
        "ms_p80": p80 * 1e3,
        "samples": len(times),
        "timer": f"torch.utils.benchmark.Timer.blocked_autorange, {CPU_ROUNDS} interleaved rounds",
    }


def time_gpu(fn: Callable, cudagraph: bool, quick: bool) -> dict:
    import triton.testing

    note = "triton.testing.do_bench"
    if cudagraph:
        try:
            ms = triton.testing.do_bench_cudagraph(fn, rep=5 if quick else 20, quantiles=QUANTILES)
            return {"ms": ms[0], "ms_p20": ms[1], "ms_p80": ms[2], "timer": "triton.testing.do_bench_cudagraph"}
        except Exception as error:  # capture not possible (e.g. a host sync): plain do_bench instead
            torch.cuda.synchronize()
            note += f" (CUDA graph capture failed: {type(error).__name__}: {str(error)[:120]})"
    ms = triton.testing.do_bench(fn, warmup=5 if quick else 25, rep=20 if quick else 100, quantiles=QUANTILES)
    return {"ms": ms[0], "ms_p20": ms[1], "ms_p80": ms[2], "timer": note}


# ---------------------------------------------------------------- memory


def saved_bytes(fn: Callable) -> int:
    """Bytes the forward keeps for backward: saved tensors' storages, each counted once."""
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[(storage.device, storage.data_ptr())] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(storages.values())


def gpu_peak_bytes(fn: Callable) -> int:
    """Peak allocation of one forward+backward above what was allocated before it."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


# ---------------------------------------------------------------- peaks for the roofline


def measure_peaks(device: str, dtype: torch.dtype, threads: int, quick: bool) -> dict:
    """Copy bandwidth (read + write of a large tensor) and a large matmul's FLOP/s, in `dtype`."""
    copy_elems = (1 << 22 if quick else 1 << 25) if device == "cpu" else 1 << 28
    n = (512 if quick else 2048) if device == "cpu" else 8192
    src = torch.empty(copy_elems, dtype=dtype, device=device).normal_()
    dst = torch.empty_like(src)
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    timed = (
        (lambda f: summarize_cpu(time_cpu(f, threads, 0.1 if quick else 0.5)))
        if device == "cpu"
        else (lambda f: time_gpu(f, False, quick))
    )
    copy_s = timed(lambda: dst.copy_(src))["ms"] / 1e3
    mm_s = timed(lambda: torch.mm(a, b))["ms"] / 1e3
    return {
        "bytes_per_s": 2 * src.numel() * src.element_size() / copy_s,
        "flops_per_s": 2 * n**3 / mm_s,
        "copy_bytes": src.numel() * src.element_size(),
        "matmul_n": n,
    }


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
    row["errors"] = _errors(out, grads, exact[0], exact[1], inputs.grad_names)
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
    exact64 = inputs.cast(torch.float64)
    exact = forward_backward(build_provider(BASELINE, exact64), exact64, grad_out.double())
    del exact64
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
    with torch.no_grad():
        shape = inputs.call(push_pull_conv2d, backend="reference").shape
    gen = torch.Generator().manual_seed(1)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(inputs.input.device, inputs.input.dtype)


def _add_speedups(rows: list) -> None:
    base = next((r for r in rows if r["provider"] == BASELINE and "modes" in r), None)
    for row in rows:
        for mode, timing in row.get("modes", {}).items():
            ref = base["modes"].get(mode) if base else None
            timing["speedup"] = ref["ms"] / timing["ms"] if ref else None
            timing["ref_ms"] = ref["ms"] if ref else None


# ---------------------------------------------------------------- reporting


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _fmt(value, spec=".2f", missing="-") -> str:
    return missing if value is None else format(value, spec)


def format_table(rows: list, modes: list) -> str:
    head = ["shape", "batch", "dtype", "provider", "err fwd", "err grad", "tol"]
    for mode in modes:
        head += [f"ms {mode} ours/ref", f"x {mode}"]
    lines = [head]
    for r in rows:
        if "skipped" in r:
            lines.append([r["shape"], str(r["batch"]), r["dtype"], r["provider"], "skipped"])
            continue
        grad_errors = [e["abs"] for k, e in r["errors"].items() if k != "output"]
        line = [
            r["shape"],
            str(r["batch"]),
            r["dtype"],
            r["provider"],
            f"{r['errors']['output']['abs']:.1e}",
            f"{max(grad_errors):.1e}" if grad_errors else "-",
            r["tolerance"],
        ]
        for mode in modes:
            t = r["modes"].get(mode)
            line += [f"{t['ms']:.2f}/{_fmt(t['ref_ms'])}", _fmt(t["speedup"], ".2f")] if t else ["failed", "-"]
        lines.append(line)
    skipped = dict.fromkeys(f"{r['provider']} skipped: {r['skipped']}" for r in rows if "skipped" in r)
    failed = [
        f"{r['shape']} {r['dtype']} {r['provider']} timing of {mode} {why}"
        for r in rows
        for mode, why in r.get("timing_failed", {}).items()
    ]
    return "\n".join([_columns(lines)] + list(skipped) + failed)


TOLERANCE_LEGEND = (
    "err: max abs error vs float64 (output; worst gradient). tol: ok = every tensor within the "
    "tolerance; as eager = beyond the fixed figure but within 2x the eager reference's own "
    "error in this dtype (e.g. a ReLU input within rounding of 0); FAIL = neither."
)


def format_figures(rows: list, modes: list) -> str:
    head = ["shape", "dtype", "provider"]
    for mode in modes:
        head += [f"{mode} ms p20-p80", f"{mode} GFLOP/s", f"{mode} GB/s", f"{mode} %roof"]
    head += ["saved MB", "GPU peak MB"]
    lines = [head]
    for r in rows:
        if "skipped" in r:
            continue
        line = [r["shape"], r["dtype"], r["provider"]]
        for mode in modes:
            t = r["modes"].get(mode)
            line += (
                [
                    f"{t['ms_p20']:.2f}-{t['ms_p80']:.2f}",
                    f"{t['gflops_per_s']:.1f}",
                    f"{t['gb_per_s']:.2f}",
                    _fmt(t["roofline_pct"], ".1f"),
                ]
                if t
                else ["failed", "-", "-", "-"]
            )
        line += [
            f"{r['saved_for_backward_bytes'] / 2**20:.1f}",
            _fmt(r.get("gpu_peak_fwdbwd_bytes") and r["gpu_peak_fwdbwd_bytes"] / 2**20, ".1f"),
        ]
        lines.append(line)
    return _columns(lines)


def _columns(lines: list) -> str:
    widths = [max(len(line[i]) for line in lines if i < len(line)) for i in range(len(lines[0]))]
    fmt = lambda line: "  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip()
    return "\n".join([fmt(lines[0]), "  ".join("-" * w for w in widths)] + [fmt(line) for line in lines[1:]])


def csv_rows(rows: list) -> list:
    """One flat record per (shape, dtype, provider, mode)."""
    records = []
    for r in rows:
        base = {
            k: r.get(k)
            for k in (
                "shape",
                "dtype",
                "batch",
                "spec_batch",
                "provider",
                "skipped",
                "tolerance",
                "within_tolerance",
                "saved_for_backward_bytes",
                "gpu_peak_fwdbwd_bytes",
            )
        }
        for name, e in r.get("errors", {}).items():
            base[f"abs_err_{name}"], base[f"rel_err_{name}"] = e["abs"], e["rel"]
        for mode, t in (r.get("modes") or {"": {}}).items():
            records.append(
                {**base, "mode": mode, **{k: v for k, v in t.items() if k != "timer"}, "timer": t.get("timer")}
            )
    return records


def write_outputs(out_dir: Path, result: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(result, indent=1, default=str))
    records = csv_rows(result["rows"])
    keys = list(dict.fromkeys(k for rec in records for k in rec))
    with open(out_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(records)
    write_plots(out_dir, result["rows"], result["settings"]["modes"])


def write_plots(out_dir: Path, rows: list, modes: list) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed; no speedup plots written (pip install matplotlib)")
        return
    timed = [r for r in rows if "modes" in r]
    groups = list(dict.fromkeys(f"{r['shape']}\n{r['dtype']}" for r in timed))
    providers = list(dict.fromkeys(r["provider"] for r in timed))
    for mode in modes:
        fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups)), 4))
        width = 0.8 / max(1, len(providers))
        for i, provider in enumerate(providers):
            values = {
                f"{r['shape']}\n{r['dtype']}": r["modes"].get(mode, {}).get("speedup") or 0
                for r in timed
                if r["provider"] == provider
            }
            ax.bar(
                [g + i * width for g in range(len(groups))], [values.get(g, 0) for g in groups], width, label=provider
            )
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([g + width * (len(providers) - 1) / 2 for g in range(len(groups))], groups, fontsize=7)
        ax.set_ylabel(f"speedup vs reference ({mode})")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / f"speedup_{mode}.png", dpi=120)
        plt.close(fig)


# ---------------------------------------------------------------- environment


def git_commit() -> str:
    """HEAD of the checkout; else $PUSHPULL_GIT_COMMIT (a copy of the tree without .git, e.g. on a lent
    GPU machine, names its commit so); else "unknown"."""
    try:
        root = Path(__file__).resolve().parent.parent
        return (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
            or "unknown"
        )
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("PUSHPULL_GIT_COMMIT", "unknown")


def environment(device: str) -> dict:
    info = {
        "device": device,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": sys.version.split()[0],
        "git_commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device == "cuda":
        info["device_name"] = torch.cuda.get_device_name()
    else:
        info["device_name"] = _cpu_name()
        info["load_average_at_start"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    return info


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


# ---------------------------------------------------------------- command line

_EPILOG = (
    "shapes (--shapes): " + ", ".join(c.name for c in CASES) + "\n"
    f"--shape {CASE_FORMAT}:\n"
    "  upsample: the 2020 layer (b_in, alpha 1); optional 10th field = scale (default 2)\n"
    "  invert:   the 2024 layer (b_out, trainable [C_out] alpha); optional 10th field = avg kernel (default 0)\n"
    "  the input needs a gradient. e.g. --shape 32,64,64,56,56,3,1,1,upsample,2 --shape 8,3,64,224,224,7,2,3,invert,3\n"
    "providers: reference (eager formula, the baseline), stacked+compile (stacked convolutions + torch.compile'd "
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
        help="folder for results.json, results.csv, speedup_<mode>.png (default: bench_out/<date-time>/)",
    )
    p.add_argument(
        "--full",
        action="store_true",
        help="the whole sweep: every provider (also the torch.compile "
        f"ones), {MIN_RUN_TIME['full']:g} s per measurement; without it: reference and ours, "
        f"{MIN_RUN_TIME['default']:g} s",
    )
    p.add_argument("--quick", action="store_true", help=f"batch {QUICK_BATCH}, short measurements: a smoke run")
    return p.parse_args(argv)


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


def set_precision(tf32: bool, threads: int) -> None:
    """The same for every provider: TF32 on/off for matmuls and cuDNN convolutions, CPU threads."""
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    torch.set_num_threads(threads)


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


def steady_cpu_allocator() -> Optional[str]:
    """Fixes glibc's malloc thresholds (mmap at 1 GiB, no trimming), where glibc is the C library.

    Left alone, glibc serves a large tensor by mmap and returns it on free, so every call of every provider
    faults its temporaries in afresh, and how often depends on what ran before in the process (the
    dynamic threshold): the same provider measured 45 or 80 ms. Fixed thresholds reuse freed memory, as a
    training loop's steady state does, for every provider alike. Returns what was set, or None."""
    import ctypes
    import ctypes.util

    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        if libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, 1 << 30):
            return "glibc mallopt: M_MMAP_THRESHOLD = M_TRIM_THRESHOLD = 1 GiB"
    except (OSError, AttributeError):
        pass
    return None


def main(argv=None) -> dict:
    """Runs the benchmark; prints the tables; writes every figure to --out (default bench_out/<date-time>/)
    and returns it."""
    from tqdm import tqdm

    ns = parse_args(argv)
    settings, cases = settings_from(ns), _cases(ns)
    out = ns.out or Path("bench_out") / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
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
    print(f"total time {elapsed:.1f} s")
    result = result_so_far()
    write_outputs(out, result)
    print(f"results (results.json, results.csv, speedup_<mode>.png): {out}/")
    return result


if __name__ == "__main__":
    main()
