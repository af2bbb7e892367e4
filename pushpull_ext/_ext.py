"""Guarded import of the compiled extension and of Triton: the package imports without either.

`CPP_ERROR` / `TRITON_ERROR` say why a backend is missing (None when it is there), so that a user who
asks for it gets an error that names the cause and the fix.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

_BUILD_HINT = "build it with `pip install --no-build-isolation .` (or `-e .`) in the pushpull_ext checkout"
# Written by setup.py when the install could not compile the extension (no C++ compiler, a compile error).
_BUILD_RECORD = Path(__file__).with_name("_C_BUILD_ERROR.txt")


def _cpp_error(error: Exception) -> str:
    """Why pushpull_ext._C cannot be loaded, and how to get it."""
    if _BUILD_RECORD.exists():  # setup.py removes it after a successful build
        return (
            f"the install could not compile the C++ extension pushpull_ext._C ({_BUILD_RECORD.read_text().strip()});"
            " install a C++ compiler with OpenMP (g++ or clang++), then rebuild: `pip install -v "
            "--no-build-isolation .` (or `-e .`) in the pushpull_ext checkout"
        )
    if importlib.util.find_spec(f"{__package__}._C") is None:
        return f"the C++ extension pushpull_ext._C is not built; {_BUILD_HINT}"
    message = f"the compiled extension pushpull_ext._C could not be loaded ({error}); "
    if "undefined symbol" in str(error):  # a stale build: tell why, then the same command rebuilds it
        message += f"it was built against another torch than this one ({torch.__version__}), so re"
    return message + _BUILD_HINT


try:
    from . import _C  # noqa: F401  (loading the library registers torch.ops.pushpull.forward/backward)

    CPP_ERROR = None
except (ImportError, OSError) as error:  # missing, or built for another torch (undefined symbols)
    CPP_ERROR = _cpp_error(error)

# Under the Triton interpreter the kernels run on CPU tensors (tests without a GPU).
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
try:
    import triton  # noqa: F401

    TRITON_ERROR = None
except ImportError as error:
    TRITON_ERROR = f"Triton is not installed ({error}); `pip install triton` (GPUs of compute capability >= 8.0)"


def _cpp_kernels() -> frozenset:
    if CPP_ERROR is not None:
        return frozenset()
    return frozenset(
        device
        for device, key in (("cpu", "CPU"), ("cuda", "CUDA"))
        if torch._C._dispatch_has_kernel_for_dispatch_key("pushpull::forward", key)
    )


# Read once at import (the kernels register when _C loads), so torch.compile traces a constant.
_CPP_KERNELS = _cpp_kernels()


def has_cpp_kernel(device_type: str) -> bool:
    """Whether the compiled op has a kernel for this device type ("cpu" or "cuda")."""
    return device_type in _CPP_KERNELS
