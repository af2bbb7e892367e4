"""Timers, memory figures, the roofline's peaks and the process settings shared by the benchmarks
(`python -m pushpull_ext.bench`, per layer and `--models`)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Optional

import torch

QUANTILES = [0.5, 0.2, 0.8]
CPU_ROUNDS = 3  # interleaved timing rounds per mode on CPU


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


def set_precision(tf32: bool, threads: int) -> None:
    """The same for every provider: TF32 on/off for matmuls and cuDNN convolutions, CPU threads."""
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    torch.set_num_threads(threads)


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
