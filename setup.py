"""Builds pushpull_ext._C with torch.utils.cpp_extension (metadata and extras: pyproject.toml).

- CPU only (default without CUDA): a CppExtension from csrc/*.cpp, csrc/common/*.cpp and csrc/cpu/*.cpp.
- With CUDA torch and a CUDA toolkit, or FORCE_CUDA=1: a CUDAExtension that adds csrc/cuda/*.cu and
  csrc/cuda/*.cpp, for the architectures in TORCH_CUDA_ARCH_LIST (read by torch's CUDAExtension; a
  V100 needs a CUDA 12.x toolkit and "7.0", since CUDA 13 dropped sm_70).
- If the extension cannot be built (no C++ compiler, a compile error), the install still succeeds
  without it, says so, and records why (pushpull_ext/_C_BUILD_ERROR.txt, read by pushpull_ext._ext):
  the package then runs on the reference and Triton backends. PUSHPULL_REQUIRE_CPP=1 makes it fail.
No network access and no pip calls here: `pip install --no-build-isolation .` uses the torch you have.
"""

import glob
import os
import subprocess
import sys

import setuptools
from setuptools import setup
from setuptools.errors import CCompilerError, ExecError, PlatformError

if int(setuptools.__version__.split(".")[0]) < 77:  # pyproject.toml's license field (PEP 639) needs 77
    sys.exit(
        f"pushpull_ext needs setuptools>=77 and wheel (found setuptools {setuptools.__version__}): "
        "pip install -U 'setuptools>=77' wheel"
    )

import torch  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

BUILD_ERROR_FILE = "_C_BUILD_ERROR.txt"
BUILD_ERRORS = (CCompilerError, ExecError, PlatformError, OSError, RuntimeError, subprocess.CalledProcessError)


def _sources(*patterns):
    return sorted(p for pattern in patterns for p in glob.glob(os.path.join("csrc", pattern)))


def _want_cuda():
    if os.environ.get("FORCE_CUDA", "0") == "1":
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None and bool(_sources("cuda/*.cu"))


def _extension():
    # -fopenmp: at::parallel_for is a header template that parallelizes only when compiled with OpenMP.
    # -ffp-contract=fast: fused multiply-adds in the vector loops (csrc/cpu/dense_kernels.h).
    cxx = ["-O3", "-fopenmp", "-ffp-contract=fast"]
    sources = _sources("*.cpp", "common/*.cpp", "cpu/*.cpp")
    if _want_cuda():
        return CUDAExtension(
            "pushpull_ext._C",
            sources + _sources("cuda/*.cpp", "cuda/*.cu"),
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},
            extra_link_args=["-fopenmp"],
        )
    return CppExtension("pushpull_ext._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])


class OptionalBuildExtension(BuildExtension):
    """torch's BuildExtension, except that a failed build leaves the package installable without _C."""

    failure = None  # why the build failed, if it did

    def build_extensions(self):  # the compiler checks happen here, before any build_extension
        try:
            super().build_extensions()
        except BUILD_ERRORS as error:
            if os.environ.get("PUSHPULL_REQUIRE_CPP", "0") == "1":
                raise
            self.failure = f"{type(error).__name__}: {_last_line(error)}"
            _announce_failure(self.failure)
        _write_record(os.path.dirname(self.get_ext_fullpath(self.extensions[0].name)), self.failure)

    def copy_extensions_to_source(self):  # --inplace and editable installs
        if self.failure is None:
            super().copy_extensions_to_source()
        package_dir = self.get_finalized_command("build_py").get_package_dir("pushpull_ext")
        _write_record(package_dir, self.failure)


def _write_record(folder: str, failure) -> None:
    """pushpull_ext/_C_BUILD_ERROR.txt says why the build failed; removed after a successful build."""
    path = os.path.join(folder, BUILD_ERROR_FILE)
    if failure is None:
        if os.path.exists(path):
            os.remove(path)
        return
    os.makedirs(folder, exist_ok=True)
    with open(path, "w") as f:
        f.write(failure + "\n")


def _last_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[-1] if lines else ""


def _announce_failure(reason: str) -> None:
    bar = "=" * 100
    print(
        f"\n{bar}\npushpull_ext: the C++ extension pushpull_ext._C could not be built ({reason}).\n"
        "Installing without it: the 'reference' backend (and 'triton' on a GPU) still run; the fused CPU and\n"
        "CUDA kernels need a C++ compiler (g++ or clang++, with OpenMP). Install one and reinstall with\n"
        "`pip install -v --no-build-isolation .` to see the compiler's output.\n"
        f"{bar}\n",
        file=sys.stderr,
        flush=True,
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": OptionalBuildExtension.with_options(use_ninja=os.environ.get("USE_NINJA", "1") == "1")},
)
