"""Packaging: one version, what available_backends() says on this machine, and the install without a
C++ compiler (setup.py's build_ext records the failure instead of failing the install)."""

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

import pushpull_ext
from pushpull_ext import _ext

ROOT = Path(__file__).resolve().parents[1]


def test_version_has_one_home():
    namespace = {}
    exec((ROOT / "pushpull_ext" / "_version.py").read_text(), namespace)
    assert pushpull_ext.__version__ == namespace["__version__"]
    assert "version=" not in (ROOT / "setup.py").read_text()  # pyproject.toml reads _version.py


def _backends_in_subprocess(env_update: dict) -> dict:
    env = {**os.environ, **env_update}
    code = "import pushpull_ext; print(repr(pushpull_ext.available_backends()))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, cwd=ROOT)
    return eval(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only machine's answers")
def test_available_backends_say_why_on_a_cpu_only_machine():
    plain = _backends_in_subprocess({"TRITON_INTERPRET": "0"})
    assert plain["reference"] is None and plain["cpu"] == _ext.CPP_ERROR
    assert plain["cuda"].startswith("no CUDA GPU here")
    if _ext.TRITON_ERROR is None:  # installed, but it cannot run here: say what it needs
        assert "compute capability >= 8.0" in plain["triton"] and "TRITON_INTERPRET=1" in plain["triton"]
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):  # the same reason as calling it
            code = (
                "import torch, pushpull_ext as p; p.push_pull_conv2d(torch.ones(1, 1, 3, 3), "
                "torch.ones(1, 1, 3, 3), backend='triton')"
            )
            run = subprocess.run(
                [sys.executable, "-c", code],
                env={**os.environ, "TRITON_INTERPRET": "0"},
                capture_output=True,
                text=True,
                cwd=ROOT,
            )
            raise RuntimeError(run.stderr)
        assert _backends_in_subprocess({"TRITON_INTERPRET": "1"})["triton"] is None
    else:
        assert "Triton is not installed" in plain["triton"]


@pytest.mark.skipif(not os.environ.get("CI"), reason="only CI promises a C++ compiler")
def test_ci_built_the_cpp_extension():
    assert _ext.CPP_ERROR is None


def _copy_sources(tmp_path: Path) -> Path:
    """What the sdist holds (MANIFEST.in), copied without any build output."""
    tmp_path.mkdir(exist_ok=True)
    for name in ("setup.py", "pyproject.toml", "MANIFEST.in", "LICENSE", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    for folder in ("csrc", "kernels", "pushpull_ext"):
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("*.so", "__pycache__", "*.txt"))
    return tmp_path


def _build_with_a_broken_compiler(src: Path, require: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CC": "false", "CXX": "false", "PUSHPULL_REQUIRE_CPP": require}
    return subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--inplace"],
        cwd=src,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_failed_compile_installs_without_the_extension_and_says_why(tmp_path):
    src = _copy_sources(tmp_path)
    run = _build_with_a_broken_compiler(src, require="0")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "pushpull_ext._C could not be built" in run.stderr and "pip install -v" in run.stderr
    assert not list((src / "pushpull_ext").glob("_C*.so"))
    assert "false" in (src / "pushpull_ext" / "_C_BUILD_ERROR.txt").read_text()  # the failing compiler

    # the copy, not an editable install of the checkout (whose import hook comes before sys.path)
    code = (
        "import sys; sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in f.__module__]; "
        "import torch, pushpull_ext as p; assert p.__file__.startswith(sys.argv[1]), p.__file__; "
        "print(p.available_backends()['cpu']); "
        "x = torch.randn(1, 2, 6, 6); w = torch.randn(3, 2, 3, 3, requires_grad=True); "
        "p.push_pull_conv2d(x, w, padding=1).sum().backward(); print('ran', tuple(w.grad.shape))"
    )
    used = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code, str(src)],
        cwd=src,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(src)},
    )
    assert used.returncode == 0, used.stderr[-2000:]
    assert "the install could not compile the C++ extension" in used.stdout and "ran (3, 2, 3, 3)" in used.stdout


def test_a_failed_compile_fails_the_install_when_the_extension_is_required(tmp_path):
    run = _build_with_a_broken_compiler(_copy_sources(tmp_path), require="1")
    assert run.returncode != 0 and "could not be built" not in run.stderr


def test_the_sdist_takes_every_build_input(tmp_path):
    """MANIFEST.in: every tracked file under csrc/ and kernels/ (headers and CUDA sources too), LICENSE."""
    src = _copy_sources(tmp_path / "src")
    run = subprocess.run(
        [sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(tmp_path)],
        cwd=src,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    (sdist,) = tmp_path.glob("pushpull_ext-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {Path(*Path(n).parts[1:]).as_posix() for n in tar.getnames() if len(Path(n).parts) > 1}
    tracked = subprocess.run(
        ["git", "ls-files", "csrc", "kernels"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    assert tracked and set(tracked) <= names
    assert {"LICENSE", "README.md", "pyproject.toml", "setup.py", "pushpull_ext/_version.py"} <= names
