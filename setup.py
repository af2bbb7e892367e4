"""Builds pushpull_ext._C with torch.utils.cpp_extension.

- CPU only (default without CUDA): a CppExtension from csrc/*.cpp and csrc/cpu/*.cpp.
- With CUDA torch and a CUDA toolkit, or FORCE_CUDA=1: a CUDAExtension that adds csrc/cuda/*.cu and
  csrc/cuda/*.cpp, for the architectures in TORCH_CUDA_ARCH_LIST (read by torch's CUDAExtension; a
  V100 needs a CUDA 12.x toolkit and "7.0", since CUDA 13 dropped sm_70).
No network access and no pip calls here: `pip install --no-build-isolation .` uses the torch you have.
"""
import glob
import os

from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
import torch

ROOT = os.path.dirname(os.path.abspath(__file__))
# tests/test_cuda_compile.py: NVRTC 12 compiles the CUDA kernels for sm_70/80/90 without a GPU (PyPI has
# no CUDA 12 nvcc driver); the other two wheels carry the CUDA 12 headers.
CUDA_CHECK = ["nvidia-cuda-nvrtc-cu12", "nvidia-cuda-runtime-cu12", "nvidia-cuda-nvcc-cu12"]


def _sources(*patterns):
    return sorted(p for pattern in patterns for p in glob.glob(os.path.join("csrc", pattern)))


def _want_cuda():
    if os.environ.get("FORCE_CUDA", "0") == "1":
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None and bool(_sources("cuda/*.cu"))


def _extension():
    # -fopenmp: at::parallel_for is a header template that parallelizes only when compiled with OpenMP.
    cxx = ["-O3", "-fopenmp", "-ffp-contract=fast"]  # fused multiply-adds in the vector loops (csrc/cpu/tap_kernels.h)
    sources = _sources("*.cpp", "cpu/*.cpp")
    if _want_cuda():
        return CUDAExtension(
            "pushpull_ext._C",
            sources + _sources("cuda/*.cpp", "cuda/*.cu"),
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},
            extra_link_args=["-fopenmp"],
        )
    return CppExtension("pushpull_ext._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])


setup(
    name="pushpull_ext",
    version="0.1.0",
    description="Fused push-pull inhibition convolutions for PyTorch (Triton, C++/CUDA, CPU)",
    packages=find_packages(include=["pushpull_ext", "pushpull_ext.*"]) + ["pushpull_ext.kernels"],
    package_dir={"pushpull_ext.kernels": "kernels"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=os.environ.get("USE_NINJA", "1") == "1")},
    python_requires=">=3.10",
    install_requires=["torch>=2.4"],
    extras_require={
        "triton": ["triton>=3.6,<3.10"],
        "bench": ["matplotlib", "tqdm"],
        "demo": ["scikit-image", "matplotlib"],  # python -m pushpull_ext.demo
        # numpy: the Triton interpreter (TRITON_INTERPRET=1, the tests' CPU runs of the kernels) needs it;
        # scikit-image and matplotlib: the demo's test.
        "test": ["pytest", "hypothesis", "numpy", "tqdm", "scikit-image", "matplotlib"] + CUDA_CHECK,
        "cuda-check": CUDA_CHECK,
    },
)
