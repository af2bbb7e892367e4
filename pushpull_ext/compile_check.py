"""Compile the Triton kernels for GPUs that are not here, and read what each compiled kernel uses.

    python -m pushpull_ext.compile_check [--arch 80 86 90] [--dtypes float32 ...] [--json FILE]

No GPU is needed: Triton compiles for a named target (sm_80, sm_86, sm_90) down to machine code with
the ptxas it ships, and `cuobjdump` (also shipped with Triton) reads the machine code back. The
kernels compiled are exactly those the launcher (triton_launch.py) would launch on a GPU: every paper
shape (pushpull_ext/shapes.py; batch 16, see spec_launches) runs through `push_pull_conv2d(..., backend="triton")` on
CPU tensors, training (forward, then every gradient the layer needs) and inference, with the GPU
configs, and each launch compiles its kernel instead of running it (`JITFunction.warmup`).
`--shapes` adds any layer (e.g. 2,64,64,14,14,3,1,1,invert,5: Ho * Wo not a multiple of 16 compiles
other code). What it found so far: benchmarks/tuning.md.

Checked per compiled kernel, against the smallest GPU of each target:
- problems (a launch would fail): it does not compile (what the interpreter, which the CPU tests
  use, cannot tell); its shared memory exceeds one block's on that GPU: 99 KB for sm_86 / sm_89
  (RTX 30xx / 40xx, L4), 163 KB for sm_80 (A100), 227 KB for sm_90 (H100 / H200), where a launch
  raises OutOfResources;
- warnings (it runs, slowly): register spills (`cuobjdump -res-usage`: STACK + LOCAL) at the 255
  register cap or of more than 64 B (ptxas spills a few bytes by choice, for occupancy); matrix
  products off the tensor cores (no HGMMA (Hopper), HMMA or DMMA (float64, sm_80 / sm_90 only):
  counted in the PTX, as the wgmma.mma_async and mma.sync instructions ptxas turns into them).
Registers per thread are reported, not judged. Exit status: the number of kernels with a problem,
or with a warning on the targets the benchmarks are for (TARGET_ARCHS: A100 and H100).

Under TRITON_INTERPRET=1 the kernels are not compiled at all, so this refuses to run there.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Optional

from ._ext import TRITON_INTERPRET

# Largest shared memory one block may use (cudaDevAttrMaxSharedMemoryPerBlockOptin), per target.
SHARED_LIMIT = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448}
# The tensor-core instructions, read in the PTX: ptxas turns wgmma.mma_async into HGMMA and mma.sync into HMMA
# (DMMA for float64) and never a product back onto the CUDA cores. Disassembling the cubin to find them in the
# SASS costs half a second a kernel, a quarter of CI's compile time; the PTX is at hand.
PTX_MMA = re.compile(r"\b(wgmma\.mma_async|mma\.sync)\.\S*")
TARGET_ARCHS = (80, 90)  # warnings count as failures here


@dataclass
class CompiledKernel:
    """One specialization of one kernel, compiled for one target, and what its machine code uses."""

    arch: int
    kernel: str
    launch: str  # the first launch that compiled it (paper shape, dtype)
    constexprs: dict
    dtypes: str
    num_warps: int
    num_stages: int
    shared: int
    binary_hash: str
    registers: Optional[int] = None
    spill_bytes: Optional[int] = None  # STACK + LOCAL of cuobjdump -res-usage
    mma: dict = field(default_factory=dict)
    problems: list = field(default_factory=list)  # a launch would fail
    warnings: list = field(default_factory=list)  # it runs, slower than it should

    def judge(self) -> None:
        limit = SHARED_LIMIT.get(self.arch)
        if limit is not None and self.shared > limit:
            self.problems.append(
                f"shared memory {self.shared} B > {limit} B, the most one block gets on sm_{self.arch}"
            )
        # ptxas itself trades a few spilled bytes for occupancy (e.g. 128 registers and 8 B of spills);
        # spills at the 255-register cap, or many, mean the tile does not fit the registers.
        if self.spill_bytes and (self.spill_bytes > 64 or (self.registers or 0) >= 255):
            self.warnings.append(f"spills {self.spill_bytes} B to local memory at {self.registers} registers")
        if self.expects_tensor_cores and not any(self.mma.values()):
            self.warnings.append("no tensor-core instruction (wgmma / mma.sync: HGMMA / HMMA / DMMA) in the PTX")

    @property
    def expects_tensor_cores(self) -> bool:
        """The GEMM kernels (the pooling epilogue and the bias reduction have no tl.dot). In float64 only
        the forward, and only on the GPUs with float64 tensor cores (sm_80, sm_90): the backward's
        float64 products run on the CUDA cores (kernels/common.py: mma_grad_operand)."""
        if self.constexprs.get("IS_FP64"):
            return self.kernel in ("pp_fwd_conv_kernel", "pp_fwd_tap_kernel") and self.arch in (80, 90)
        return self.kernel in (
            "pp_fwd_conv_kernel",
            "pp_fwd_tap_kernel",
            "pp_bwd_input_kernel",
            "pp_bwd_weight_kernel",
            "pp_bwd_weight_adjoint_kernel",
        )


class _TargetDriver:
    """Stands in for Triton's CUDA driver: names the target, owns no device. Compiling needs only this."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        # The key of the JIT's per-device caches: one of its own per target, apart from any real GPU's.
        return f"compile_check-sm_{self.target.arch}"

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


def cuobjdump() -> Optional[str]:
    """The cuobjdump Triton ships (or one on PATH); None if there is neither."""
    try:
        import triton

        bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    except ImportError:
        bundled = ""
    return bundled if os.path.exists(bundled) else shutil.which("cuobjdump")


def _dump(cubin: bytes, tool: str, flag: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, flag, f.name], capture_output=True, text=True, check=True).stdout


def resource_usage(cubin: bytes, tool: str) -> dict:
    """{function name: {"REG": registers per thread, "STACK": bytes, "LOCAL": bytes, ...}} of a cubin."""
    usage = _dump(cubin, tool, "-res-usage")
    return {
        name: {k: int(v) for k, v in re.findall(r"\b([A-Z]+(?:\[\d+\])?):(\d+)", fields)}
        for name, fields in re.findall(r"Function (\S+):\s*\n\s*(REG:[^\n]*)", usage)
    }


def tensor_core_instructions(ptx: str) -> dict:
    """{"HGMMA", "HMMA", "DMMA": how many PTX instructions of a kernel become that tensor-core instruction}."""
    counts = {"HGMMA": 0, "HMMA": 0, "DMMA": 0}
    for match in PTX_MMA.finditer(ptx):
        family = "HGMMA" if match.group(1) == "wgmma.mma_async" else "DMMA" if ".f64" in match.group(0) else "HMMA"
        counts[family] += 1
    return counts


def _machine_code_figures(binary, tool: Optional[str]) -> tuple:
    """(registers, spill bytes, {tensor-core instruction: count}) of a compiled kernel; registers and spills
    are None without cuobjdump."""
    mma = tensor_core_instructions(binary.asm["ptx"])
    if tool is None:
        return None, None, mma
    (fields,) = resource_usage(binary.asm["cubin"], tool).values()
    return fields.get("REG"), fields.get("STACK", 0) + fields.get("LOCAL", 0), mma


class _CompileOnly:
    """What `wrap_triton(kernel)` returns while compiling: kernel[grid](...) compiles, runs nothing."""

    label = ""  # the launch being run (set by compile_all)

    def __init__(self, kernel, compiled: list):
        self.kernel, self.compiled = kernel, compiled

    def __getitem__(self, grid):
        def compile_launch(*args, **kwargs):
            binary = self.kernel.warmup(*args, grid=grid, **kwargs)
            constexprs = {k: v for k, v in kwargs.items() if k.isupper()}
            dtypes = ",".join(sorted({str(a.dtype).replace("torch.", "") for a in args if hasattr(a, "dtype")}))
            self.compiled.append((self.kernel.__name__, _CompileOnly.label, constexprs, dtypes, binary))

        return compile_launch


@contextlib.contextmanager
def compiling_for(arch: int, **config):
    """Within: Triton targets sm_<arch>. Yields (the launch configuration under which the launchers compile,
    on CPU tensors, what a GPU would launch (its tiles), without running it; the list of (name, label,
    constexprs, dtypes, binary) compiled so far). `config`: further LaunchConfig fields (e.g. a forced
    weight_grad_path)."""
    if TRITON_INTERPRET:
        raise RuntimeError("compile_check compiles the kernels: run it without TRITON_INTERPRET=1")
    from triton.runtime import driver

    from .triton_launch import LaunchConfig

    compiled: list = []
    previous = getattr(driver, "_active", None)  # None until a driver was asked for (reset_active needs a GPU)
    driver.set_active(_TargetDriver(arch))
    try:
        yield (
            LaunchConfig(gpu_tiles_on_cpu=True, launch=lambda kernel: _CompileOnly(kernel, compiled), **config),
            compiled,
        )
    finally:
        driver.set_active(previous) if previous is not None else setattr(driver, "_active", None)


def launch_step(config, input, weight, bias=None, **options) -> None:
    """What a training step and an inference forward of the layer launch: the forward with masks, the
    backward of every gradient autograd would ask for (the tensors that require grad), and the forward
    without masks, each under `config` (compiling_for's)."""
    from . import triton_launch
    from .functional import forward_args

    args = forward_args(input, weight, bias, save_masks=True, **options)
    out, masks = triton_launch.forward(args, config=config)
    launch_backward(config, args, out, masks)
    triton_launch.forward(args._replace(save_masks=False), config=config)


def launch_backward(config, args, out, masks) -> None:
    """The backward launches of every gradient autograd would ask for (the op arguments `args` that
    require grad), after the forward that gave `out` and `masks`; nothing if none does."""
    from . import triton_launch
    from .ops import GRADIENTS, BackwardArgs

    needed = [getattr(args, name) is not None and getattr(args, name).requires_grad for name in GRADIENTS]
    if any(needed):
        triton_launch.backward(BackwardArgs.after(args, out, masks, needed), config=config)


def spec_launches(
    dtypes: Iterable, shapes: Optional[Iterable[str]] = None, batch: int = 16
) -> list[tuple[str, Callable[[object], None]]]:
    """(label, call(config)) per paper shape (or `shapes`: names, or cases for shapes.parse_case) and dtype:
    launch_step of a training step (forward, the backward of every tensor the layer trains) and an
    inference forward. Tensors are empty (nothing runs).

    The batch (default 16) enters the kernels only as the integer N, and Triton specializes integer
    arguments only on divisibility by 16 and equality to 1: a batch of 16 compiles exactly what the
    papers' 128 and 256 do, in a fraction of the memory; a batch of 1 compiles other code."""
    import torch

    from .shapes import CASES, case_from_text, make_inputs

    def step(case, dtype):
        def run(config):
            inputs = make_inputs(case, batch=1, dtype=dtype)
            t = {
                k: (
                    torch.empty((batch, *v.shape[1:]), dtype=dtype).requires_grad_(v.requires_grad)
                    if k == "input"
                    else v
                )
                for k, v in inputs.tensors.items()
            }
            launch_step(
                config, t["input"], t["weight"], t["bias"], bias_out=t["bias_out"], alpha=t["alpha"], **case.options()
            )

        return run

    cases = CASES if shapes is None else [case_from_text(name) for name in shapes]
    return [
        (f"{case.name} N={batch} {str(dtype).replace('torch.', '')}", step(case, dtype))
        for case in cases
        for dtype in dtypes
    ]


def compile_all(
    archs: Iterable[int], launches: list, tf32: bool = True, progress=None, **config
) -> list[CompiledKernel]:
    """Run every launch for every arch; one CompiledKernel per distinct compiled specialization. `config`:
    further LaunchConfig fields for every launch."""
    import torch

    tool = cuobjdump()
    results = []
    old_tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = tf32
    try:
        for arch in archs:
            seen = set()
            with compiling_for(arch, **config) as (launch_config, compiled):
                for label, run in launches:
                    if progress:
                        progress(f"sm_{arch}: {label}")
                    _CompileOnly.label = label
                    run(launch_config)
            for name, label, constexprs, dtypes, binary in compiled:
                if binary.hash in seen:
                    continue
                seen.add(binary.hash)
                registers, spills, mma = _machine_code_figures(binary, tool)
                meta = binary.metadata
                kernel = CompiledKernel(
                    arch,
                    name,
                    label,
                    constexprs,
                    dtypes,
                    meta.num_warps,
                    meta.num_stages,
                    meta.shared,
                    binary.hash,
                    registers,
                    spills,
                    mma,
                )
                kernel.judge()
                results.append(kernel)
    finally:
        torch.backends.cudnn.allow_tf32 = old_tf32
    return results


def failures(results: list[CompiledKernel]) -> list[CompiledKernel]:
    """The kernels with a problem, or with a warning on a target architecture."""
    return [r for r in results if r.problems or (r.warnings and r.arch in TARGET_ARCHS)]


def _flags(constexprs: dict) -> str:
    mode = {0: "scale1", 1: "invert", 2: "upsample"}.get(constexprs.get("MODE"), "-")
    on = [k.lower() for k, v in constexprs.items() if v is True and k not in ("IS_FP64",)]
    tile = "x".join(str(constexprs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if k in constexprs)
    return f"{mode} {tile} {' '.join(on)}"


def format_table(results: list[CompiledKernel]) -> str:
    lines = [
        f"{'arch':5} {'kernel':28} {'first launched by':36} {'warps':>5} {'stages':>6} {'regs':>4} {'spill':>5} "
        f"{'smem KB':>7} {'mma':12} flags / problems"
    ]
    for r in results:
        mma = ",".join(f"{k}:{v}" for k, v in (r.mma or {}).items() if v) or "-"
        lines.append(
            f"sm_{r.arch:<2} {r.kernel:28} {r.launch[:36]:36} {r.num_warps:5} {r.num_stages:6} "
            f"{r.registers if r.registers is not None else '?':>4} "
            f"{r.spill_bytes if r.spill_bytes is not None else '?':>5} {r.shared / 1024:7.1f} {mma:12} "
            f"{_flags(r.constexprs)}{'  PROBLEM: ' + '; '.join(r.problems) if r.problems else ''}"
            f"{'  WARNING: ' + '; '.join(r.warnings) if r.warnings else ''}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 86, 90], help="compute capabilities x10")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "float16", "float64"])
    parser.add_argument(
        "--shapes",
        nargs="+",
        help="paper shapes by name (default: all), or cases as "
        "N,Cin,Cout,H,W,k,stride,pad,pull[,scale|avg] (python -m pushpull_ext.bench --help)",
    )
    parser.add_argument(
        "--batch",
        type=int,
        default=16,
        help="batch of every shape (default 16: compiles what the papers' batches do, see spec_launches)",
    )
    parser.add_argument("--no-tf32", action="store_true", help="float32 without TF32 (the benchmark's setting)")
    parser.add_argument(
        "--weight-grad-path",
        choices=["prefilter", "adjoint"],
        help="force upsample's weight-gradient route (default: the launcher's rule, _weight_adjoint_pays)",
    )
    parser.add_argument(
        "--upsample-path",
        choices=["prefilter", "taps"],
        help="force upsample's forward route at stride 1 (default: the launcher's rule, _tap_path_pays)",
    )
    parser.add_argument("--json", help="write every compiled kernel's figures here")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    import torch

    launches = spec_launches([getattr(torch, d) for d in args.dtypes], args.shapes, args.batch)
    progress = None if args.quiet else (lambda text: print(f"compiling: {text}", file=sys.stderr, flush=True))
    routes = dict(weight_grad_path=args.weight_grad_path, upsample_path=args.upsample_path)
    results = compile_all(args.arch, launches, tf32=not args.no_tf32, progress=progress, **routes)
    print(format_table(results))
    bad = failures(results)
    print(
        f"{len(results)} kernels compiled for {', '.join(f'sm_{a}' for a in args.arch)}; "
        f"{sum(bool(r.problems) for r in results)} with a problem, {sum(bool(r.warnings) for r in results)} with a "
        f"warning; {len(bad)} failed (a problem, or a warning on {', '.join(f'sm_{a}' for a in TARGET_ARCHS)})"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=1, default=str)
    return len(bad)


if __name__ == "__main__":
    sys.exit(main())
