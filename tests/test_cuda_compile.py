"""The CUDA backend compiles, without a GPU, for the architectures it promises (V100 = sm_70 included).

- The kernels (csrc/cuda/pushpull_kernels.cu, no torch headers) go through the CUDA 12 compiler for
  sm_70, sm_80 and sm_90 to machine code, whose resource usage cuobjdump reads back: no kernel uses
  local memory or more than MAX_STACK_BYTES of stack. PyPI has no CUDA 12 nvcc driver (nvidia-cuda-nvcc-cu12
  ships ptxas, libnvvm and headers only), so this uses NVRTC 12, the same front end and back end as a
  library: `pip install "pushpull_ext[cuda-check]"` (nvidia-cuda-nvrtc-cu12; nvidia-cuda-runtime-cu12
  and nvidia-cuda-nvcc-cu12 for the headers). CUDA 13 cannot target sm_70, so a CUDA 13 nvcc alone would miss exactly
  the V100 breakages.
- The launchers (host code of the same file) go through a full nvcc, of any version, if one is
  installed (CUDA_HOME or PATH), for those of the three architectures it supports.
- The registration (csrc/cuda/pushpull_cuda.cpp) is checked by the host
  compiler against this torch's headers, c10 CUDA ones included, with the CUDA 12 headers of those
  wheels.

Missing wheels skip these tests, unless PUSHPULL_REQUIRE_CUDA_COMPILE=1 (CI), which makes them fail instead; a
missing system nvcc always skips (it is not on PyPI).
"""

import ctypes
import importlib.util
import os
import shutil
import subprocess

import pytest
import torch.utils.cpp_extension as cpp_extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_DIR = os.path.join(ROOT, "csrc", "cuda")
KERNELS = os.path.join(CUDA_DIR, "pushpull_kernels.cu")
ARCHS = ["sm_70", "sm_80", "sm_90"]
REQUIRED = os.environ.get("PUSHPULL_REQUIRE_CUDA_COMPILE", "0") == "1"
# The macros torch's CUDAExtension builds with (torch.utils.cpp_extension.COMMON_NVCC_FLAGS).
TORCH_NVCC_DEFINES = [f for f in cpp_extension.COMMON_NVCC_FLAGS if f.startswith("-D")]
pytestmark = pytest.mark.slow  # minutes on 2 cores: CI runs it as a step of its own (README, "Testing")


def _missing(what):
    message = f'{what}; `pip install "pushpull_ext[cuda-check]"` in the checkout'
    if REQUIRED:
        pytest.fail(message + " (PUSHPULL_REQUIRE_CUDA_COMPILE=1)")
    pytest.skip(message)


def _nvidia_dir(package):
    """Directory of an nvidia-* wheel's namespace package (nvidia/cuda_nvrtc ...), or None."""
    try:
        spec = importlib.util.find_spec(f"nvidia.{package}")
    except ModuleNotFoundError:
        return None
    return None if spec is None else list(spec.submodule_search_locations)[0]


def _cuda_runtime_include():
    path = _nvidia_dir("cuda_runtime")
    include = None if path is None else os.path.join(path, "include")
    if include is None or not os.path.exists(os.path.join(include, "cuda_fp16.h")):
        _missing("the CUDA 12 runtime headers (nvidia-cuda-runtime-cu12) are not installed")
    return include


def _cuda_compiler_include():
    """crt/host_config.h and friends, which cuda_runtime.h includes: in nvidia-cuda-nvcc-cu12."""
    path = _nvidia_dir("cuda_nvcc")
    include = None if path is None else os.path.join(path, "include")
    if include is None or not os.path.exists(os.path.join(include, "crt", "host_config.h")):
        _missing("the CUDA 12 compiler headers (nvidia-cuda-nvcc-cu12) are not installed")
    return include


def _nvrtc():
    path = _nvidia_dir("cuda_nvrtc")
    library = None if path is None else os.path.join(path, "lib", "libnvrtc.so.12")
    if library is None or not os.path.exists(library):
        _missing("NVRTC 12 (nvidia-cuda-nvrtc-cu12) is not installed")
    return ctypes.CDLL(library)


def _nvrtc_compile(nvrtc, source_path, options):
    """(result code, log, machine code) of compiling one file with NVRTC."""
    program = ctypes.c_void_p()
    with open(source_path, "rb") as f:
        source = f.read()
    assert nvrtc.nvrtcCreateProgram(ctypes.byref(program), source, source_path.encode(), 0, None, None) == 0
    try:
        encoded = [o.encode() for o in options]
        result = nvrtc.nvrtcCompileProgram(program, len(encoded), (ctypes.c_char_p * len(encoded))(*encoded))
        size = ctypes.c_size_t()
        nvrtc.nvrtcGetProgramLogSize(program, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        nvrtc.nvrtcGetProgramLog(program, log)
        cubin = b""
        if result == 0:
            cubin_size = ctypes.c_size_t(0)
            nvrtc.nvrtcGetCUBINSize(program, ctypes.byref(cubin_size))
            buffer = ctypes.create_string_buffer(cubin_size.value)
            nvrtc.nvrtcGetCUBIN(program, buffer)
            cubin = buffer.raw
        return result, log.value.decode(errors="replace"), cubin
    finally:
        nvrtc.nvrtcDestroyProgram(ctypes.byref(program))


@pytest.mark.parametrize("arch", ARCHS)
def test_kernels_compile_with_cuda12_for(arch):
    nvrtc = _nvrtc()
    # --use_fast_math as setup.py builds them, so that the machine code is what a build makes.
    options = [
        "-std=c++20",
        f"--gpu-architecture={arch}",
        "-default-device",
        "--use_fast_math",
        f"-I{_cuda_runtime_include()}",
        f"-I{CUDA_DIR}",
        *TORCH_NVCC_DEFINES,
    ]
    result, log, cubin = _nvrtc_compile(nvrtc, KERNELS, options)
    assert result == 0, f"NVRTC failed for {arch}:\n{log}"
    # The one warning allowed: CUDA 12.9 calls sm_70 deprecated (it still compiles it).
    warnings = [line for line in log.splitlines() if "warning" in line and "deprecated" not in line]
    assert not warnings, f"NVRTC warnings for {arch}:\n{log}"
    assert cubin, f"no machine code for {arch}"
    _check_resources(arch, cubin)


# Stack bytes a kernel may use: those under a __launch_bounds__ register cap keep a few values on the
# stack (8-40 B at 64-80 registers when this was written); more would be a real spill in a hot loop.
MAX_STACK_BYTES = 64


def _check_resources(arch, cubin):
    """Every kernel in the machine code: no local memory, at most MAX_STACK_BYTES of stack (cuobjdump,
    from the Triton wheel; skipped without one)."""
    from pushpull_ext.compile_check import cuobjdump, resource_usage

    tool = cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (it comes with the triton wheel) to read the kernels' resource usage")
    usage = resource_usage(cubin, tool)
    assert len(usage) >= 8, f"expected every kernel instantiation in the {arch} machine code, got {list(usage)}"
    heavy = {
        name: fields
        for name, fields in usage.items()
        if fields.get("LOCAL", 0) or fields.get("STACK", 0) > MAX_STACK_BYTES
    }
    assert not heavy, f"{arch}: kernels using local memory or more than {MAX_STACK_BYTES} B of stack: {heavy}"


def _system_nvcc():
    home = os.environ.get("CUDA_HOME") or cpp_extension.CUDA_HOME
    candidates = [os.path.join(home, "bin", "nvcc")] if home else []
    candidates.append(shutil.which("nvcc"))
    return next((c for c in candidates if c and os.path.exists(c)), None)


def test_kernels_and_launchers_compile_with_nvcc(tmp_path):
    nvcc = _system_nvcc()
    if nvcc is None:  # not on PyPI: a skip even under PUSHPULL_REQUIRE_CUDA_COMPILE=1
        pytest.skip("no nvcc (CUDA_HOME or PATH) to compile the launchers' host code")
    supported = subprocess.run([nvcc, "--list-gpu-code"], capture_output=True, text=True, check=True).stdout.split()
    archs = [a for a in ARCHS if a in supported]
    assert archs, f"{nvcc} supports none of {ARCHS}"
    gencode = [f"-gencode=arch=compute_{a[3:]},code={a}" for a in archs]
    command = [
        nvcc,
        "-std=c++20",
        "-O3",
        "-c",
        KERNELS,
        "-o",
        str(tmp_path / "kernels.o"),
        "-Werror=all-warnings",
        *TORCH_NVCC_DEFINES,
        *gencode,
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout}\n{result.stderr}"


def test_registration_compiles():
    """pushpull_cuda.cpp: CUDA guard, stream, TORCH_LIBRARY_IMPL. (pushpull_cuda_ops.cpp, plain ATen, is
    compiled and run by tests/test_cuda_emulation.py.)"""
    include_dirs = cpp_extension.include_paths() + [_cuda_runtime_include(), _cuda_compiler_include()]
    compiler = os.environ.get("CXX", "c++")
    # The CPU wheel of torch ships the c10/cuda headers but not the one CMake generates for CUDA builds.
    command = [
        compiler,
        "-std=c++20",
        "-fsyntax-only",
        "-Wall",
        "-Werror",
        "-DC10_USING_CUSTOM_GENERATED_MACROS",
        *[f"-I{d}" for d in include_dirs],
        os.path.join(CUDA_DIR, "pushpull_cuda.cpp"),
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stderr[-5000:]}"
