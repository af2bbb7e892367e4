"""Bad or unusual input on every backend, beyond test_inputs.py: tensors on two GPUs, inference mode
(matching torch.nn.functional.conv2d), and a stale compiled extension."""

import os
import shutil
import subprocess
import sys
import textwrap

import hardening_results
import pytest
import torch
import torch.nn.functional as F

from pushpull_ext import push_pull_conv2d

OPTIONS = dict(pull="invert", padding=1, avg_kernel=3)


def _tensors(device, requires_grad=True):
    x = torch.randn(2, 4, 8, 8, device=device, dtype=torch.float64, requires_grad=requires_grad)
    w = torch.randn(6, 4, 3, 3, device=device, dtype=torch.float64, requires_grad=requires_grad)
    return x, w


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_tensors_on_two_gpus_are_refused(backend_device):
    backend, device = backend_device
    if device != "cuda":
        pytest.skip("a CUDA backend case")
    x, w = _tensors("cuda:0")
    with pytest.raises(ValueError, match=r"weight is on cuda:1 but input is on cuda:0"):
        push_pull_conv2d(x, w.detach().to("cuda:1"), backend=backend, **OPTIONS)
    hardening_results.count("bad_inputs", f"{backend}-{device}")


def _inference_scenario(name, device):
    """(input, weight, whether to call inside inference_mode) of a scenario."""
    if name == "inside inference_mode":
        return (*_tensors(device), True)
    with torch.inference_mode():
        x_inf, w_inf = _tensors(device, requires_grad=False)
    x, w = _tensors(device)
    if name == "inference input, trainable weight":
        return x_inf, w, False
    return x, w_inf, False  # "inference weight, input requiring grad"


def _outcome(fn, x, w, inside):
    """What a call does: ("ok", requires_grad, is_inference, output) or ("error", type, message)."""
    try:
        if inside:
            with torch.inference_mode():
                out = fn(x, w)
        else:
            out = fn(x, w)
    except RuntimeError as error:
        return ("error", type(error), str(error).split(".")[0])
    return ("ok", out.requires_grad, out.is_inference(), out)


INFERENCE_SCENARIOS = [
    "inside inference_mode",
    "inference input, trainable weight",
    "inference weight, input requiring grad",
]


@pytest.mark.parametrize("scenario", INFERENCE_SCENARIOS)
def test_inference_mode_behaves_like_conv2d(backend_device, scenario):
    """Inside inference_mode: a plain inference output even when tensors require grad. Outside, with
    inference tensors autograd must save: the error torch.nn.functional.conv2d raises."""
    backend, device = backend_device
    x, w, inside = _inference_scenario(scenario, device)
    ours = _outcome(lambda a, b: push_pull_conv2d(a, b, backend=backend, **OPTIONS), x, w, inside)
    conv = _outcome(lambda a, b: F.conv2d(a, b, padding=1), x, w, inside)
    assert ours[:3] == conv[:3], f"push_pull_conv2d: {ours[:3]}; conv2d: {conv[:3]}"
    if ours[0] == "ok":
        with torch.inference_mode():
            expected = push_pull_conv2d(x, w, backend="reference", **OPTIONS)
        torch.testing.assert_close(ours[3], expected, rtol=1e-9, atol=1e-9)
    hardening_results.count("bad_inputs", f"{backend}-{device}")


# A shared library that loads like an extension built against another torch: the dynamic loader
# fails on a symbol this torch does not have (as `undefined symbol: _ZN3c10...` does).
STALE_EXTENSION_SOURCE = """
void _ZN3c1019symbol_of_another_torchEv(void);
void *PyInit__C(void) { _ZN3c1019symbol_of_another_torchEv(); return 0; }
"""

STALE_CHECK = textwrap.dedent("""
    import importlib.util, sys, warnings

    class StaleBuild:  # the installed package, with the stale library found as pushpull_ext._C
        def find_spec(self, name, path=None, target=None):
            return importlib.util.spec_from_file_location(name, {library!r}) if name == "pushpull_ext._C" else None

    sys.meta_path.insert(0, StaleBuild())
    import torch
    import pushpull_ext
    from pushpull_ext import CPP_ERROR, push_pull_conv2d
    print("CPP_ERROR:", CPP_ERROR)
    x, w = torch.randn(1, 2, 6, 6, dtype=torch.float64), torch.randn(3, 2, 3, 3, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = push_pull_conv2d(x, w, padding=1)
    print("WARNINGS:", [str(c.message) for c in caught])
    expected = push_pull_conv2d(x, w, padding=1, backend="reference")
    print("FALLBACK_EQUAL:", torch.equal(out, expected))
    try:
        push_pull_conv2d(x, w, padding=1, backend="cpu")
    except RuntimeError as error:
        print("CPU_ERROR:", error)
""")


def _stale_library(tmp_path) -> str:
    """Build the stale stand-in of pushpull_ext._C; return its path."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to build the stale stand-in extension")
    source = tmp_path / "stale.c"
    source.write_text(STALE_EXTENSION_SOURCE)
    library = tmp_path / "_C.cpython-stale.so"
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    return str(library)


def test_stale_compiled_extension_is_reported_and_falls_back(tmp_path):
    """The package imports, says what is wrong and how to fix it, and "auto" falls back with a warning."""
    env = {k: v for k, v in os.environ.items() if k != "PUSHPULL_BACKEND"}
    result = subprocess.run(
        [sys.executable, "-c", STALE_CHECK.format(library=_stale_library(tmp_path))],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    report = result.stdout
    assert "undefined symbol: _ZN3c1019symbol_of_another_torchEv" in report  # what is wrong
    assert "built against another torch" in report and "pip install --no-build-isolation" in report  # why; the fix
    assert "falls back to the eager reference" in report and "FALLBACK_EQUAL: True" in report
    assert "CPU_ERROR: backend='cpu' cannot run here" in report
    hardening_results.count("bad_inputs", "stale-extension")
