"""What the benchmarks report: the printed tables, results.json / results.csv, the plots, and the
environment every result records (device and CPU name, versions, git commit, load average)."""

from __future__ import annotations

import csv
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

from .bench_providers import CONV_RELU


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _fmt(value, spec=".2f", missing="-") -> str:
    return missing if value is None else format(value, spec)


def format_table(rows: list, modes: list) -> str:
    with_conv = any(r["provider"] == CONV_RELU and "modes" in r for r in rows)
    head = ["shape", "batch", "dtype", "provider", "err fwd", "err grad", "tol"]
    for mode in modes:
        head += [f"ms {mode} ours/ref", f"x {mode}"] + ([f"{mode} /conv+relu"] if with_conv else [])
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
            line += [_fmt(t and t.get("conv_ratio"), ".2f")] if with_conv else []
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
    "error in this dtype (e.g. a ReLU input within rounding of 0); FAIL = neither. conv+relu: the plain "
    "convolution of the same geometry and a ReLU (judged against its own float64 evaluation); /conv+relu: "
    "this provider's median time over conv+relu's (1.00 = as fast as nn.Conv2d + ReLU)."
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
    write_csv(out_dir / "results.csv", csv_rows(result["rows"]))
    write_plots(out_dir, result["rows"], result["settings"]["modes"])


def write_csv(path: Path, records: list) -> None:
    """One line per record; the columns are every key of any record, in first-seen order."""
    keys = list(dict.fromkeys(k for rec in records for k in rec))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(records)


def pyplot_or_none(what: str):
    """matplotlib.pyplot on the Agg backend, or None (and a note that `what` is not written)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"note: matplotlib is not installed; no {what} written (pip install matplotlib)")
        return None
    return plt


def write_plots(out_dir: Path, rows: list, modes: list) -> None:
    plt = pyplot_or_none("speedup plots")
    if plt is None:
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
    """The CPU's model name and its widest vector instructions, e.g. "AMD EPYC (AVX-512)": the same model
    name covers machines with and without AVX-512, and the CPU loops (and oneDNN) differ between them."""
    name, flags = None, set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and name is None:
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else None
    name = name or platform.processor() or "cpu"
    return f"{name} ({isa})" if isa else name
