"""Shared fixtures: the seed, and the (backend, device) pairs this machine can run.

Without a GPU the Triton kernels run on CPU tensors through the Triton interpreter, which must be
switched on before triton is first imported: hence the environment variable set here, at import.
The tests' own helpers (the option grid, the papers' modules, the hardening figures, the distributed
workers) live in tests/support/, importable by their module names.
"""

import os
import shutil
import sys
import tempfile

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# torch.compile's caches (Inductor's FX graph cache, AOTAutograd's cache) key a compiled graph by its code,
# not by the fake kernels of the custom ops in it: an entry written by another version of this package
# (a warm /tmp/torchinductor_<user>) can carry other output layouts for the ops. Each test session gets
# its own cache, unless the caller chose one.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    _OWN_INDUCTOR_CACHE = os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="pushpull-tests-inductor-")
else:
    _OWN_INDUCTOR_CACHE = None
# Under pytest-xdist (README command 2 runs `-n auto`) each worker gets its share of the cores for torch's
# intra-op threads: two workers of two threads each on two cores would make oneDNN's threads wait on each other.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
SUPPORT = os.path.join(os.path.dirname(__file__), "support")
sys.path.insert(0, SUPPORT)

import hardening_results  # noqa: E402
import pytest  # noqa: E402

import pushpull_ext  # noqa: E402
from pushpull_ext._ext import has_cpp_kernel  # noqa: E402
from pushpull_ext.ops import TRITON_OP_ERROR  # noqa: E402


def _backend_devices():
    pairs = [("reference", "cpu")]
    if has_cpp_kernel("cpu"):
        pairs.append(("cpu", "cpu"))
    if torch.cuda.is_available():
        pairs.append(("reference", "cuda"))
        if has_cpp_kernel("cuda"):
            pairs.append(("cuda", "cuda"))
        if TRITON_OP_ERROR is None and torch.cuda.get_device_capability()[0] >= 8:
            pairs.append(("triton", "cuda"))
    elif TRITON_OP_ERROR is None:
        pairs.append(("triton", "cpu"))  # interpreter
    return pairs


BACKEND_DEVICES = _backend_devices()
FUSED_BACKEND_DEVICES = [p for p in BACKEND_DEVICES if p[0] != "reference"]


def _ids(pairs):
    return [f"{b}-{d}" for b, d in pairs]


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def no_tf32():
    """float32 without TF32 (a GPU's; nothing on the CPU): the float32 tolerances (1e-4 relative,
    pushpull_ext.shapes.RELATIVE_TOLERANCE) hold with TF32 off, and PyTorch lets cuDNN's convolutions use it
    by default (torch.backends.cudnn.allow_tf32 = True): the reference's, the CUDA backend's ATen ones and,
    as it follows that flag (triton_launch.LaunchConfig.allow_tf32), the Triton backend's tl.dot. Restored
    after each test, so that a test may set them its own way."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(params=BACKEND_DEVICES, ids=_ids(BACKEND_DEVICES))
def backend_device(request):
    return request.param


@pytest.fixture(params=FUSED_BACKEND_DEVICES, ids=_ids(FUSED_BACKEND_DEVICES))
def fused_backend_device(request):
    return request.param


# Marked `interpreter` (tests of the Triton kernels run by TRITON_INTERPRET=1 on CPU tensors: slow), so that
# `pytest -m "not slow and not interpreter"` is a fast tier; `slow` modules mark themselves (pytestmark).
INTERPRETER_MODULES = {"test_triton_launch.py"}
# Grids whose interpreter cases take most of the README tier's time: in the slow tier (CI runs both).
SLOW_UNDER_INTERPRETER = {"test_gradgradcheck", "test_padding_mode_is_each_convolution_as_conv2d"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        under_interpreter = "triton-cpu" in item.nodeid
        if under_interpreter or item.path.name in INTERPRETER_MODULES:
            item.add_marker(pytest.mark.interpreter)
        if under_interpreter and item.originalname in SLOW_UNDER_INTERPRETER:
            item.add_marker(pytest.mark.slow)


def pytest_report_header(config):
    return [
        f"pushpull_ext backends here: {_ids(BACKEND_DEVICES)}",
        f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}; available: {pushpull_ext.available_backends()}",
    ]


def pytest_terminal_summary(terminalreporter):
    """The hardening figures (examples fuzzed per backend, bad inputs tried, ...; tests/support/hardening_results.py)."""
    for line in hardening_results.summary_lines():
        terminalreporter.write_line(f"pushpull hardening: {line}")


def pytest_sessionfinish(session, exitstatus):
    hardening_results.write_if_asked(
        {
            "backends": _ids(BACKEND_DEVICES),
            "exit_status": int(exitstatus),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
        }
    )
    if _OWN_INDUCTOR_CACHE is not None:
        shutil.rmtree(_OWN_INDUCTOR_CACHE, ignore_errors=True)
