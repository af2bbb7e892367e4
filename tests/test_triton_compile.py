"""The Triton kernels compile for real GPUs, here without one (pushpull_ext/compile_check.py).

The other CPU tests run the kernels through the Triton interpreter, which never compiles them: a
kernel the interpreter runs can still fail to compile, need more shared memory than a GPU has, spill
registers or miss the tensor cores. Here every kernel the launcher would launch on a GPU is compiled
to machine code (registers and spills read back with cuobjdump, tensor-core instructions from the PTX), for
- the papers' shapes, and a few layers whose sizes compile other code (EXTRA_SHAPES; sm_80 only the one
  with a kernel of its own, SET_SHAPES), in float32, bfloat16 and float64 (and the papers' shapes in float32
  with TF32 off), training and inference, for sm_80 (A100) and sm_90 (H100): no problem, no warning (spills,
  products off the tensor cores); and every sm_80 kernel within the shared memory of one sm_86 block (RTX
  30xx: the least of the targets).
  Triton generates the same code for every compute capability 8.x (mma.sync, cp.async; tiles and stages
  are the launcher's), so sm_80's shared memory figure is sm_86's: CI does not compile a third time for it;
- the agreement tests' option grid (tests/support/cases.py) in float32 and bfloat16, for sm_90: every option
  combination compiles, fits, and neither spills nor misses the tensor cores;
- with PUSHPULL_OTHER_TRITON=DIR (a `pip install --target DIR --no-deps triton==3.6.0`, which .ci/run
  makes), sm_80's set for sm_90 once more with that Triton: the package supports 3.6 to 3.9, and 3.6 is
  what the lent H100/H200 machines run. Not the grid: on an H200, 3.6 compiled and ran its forwards and
  float64 backward for real, and one more compile process took CI past 30 minutes on 2 cores. (3.6 once
  could not lower the float64 backward products, which 3.9 compiled; kernels/common.py: mma_grad_operand.)
Each target compiles in a process of its own without TRITON_INTERPRET (this process has it set);
the processes run side by side.
"""

import functools
import json
import os
import subprocess
import sys

import pytest
import torch

from pushpull_ext._ext import TRITON_ERROR
from pushpull_ext.compile_check import SHARED_LIMIT

# Ho and Wo not multiples of 16 (Triton then cannot assume aligned rows), in both pulls; the first also takes
# the pooled forward's scratch path (pp_fwd_pool_epilogue_kernel), which no paper's shape does. (The batch is
# spec_launches' 16 here; the grid's cases compile their own batches, 1 among them.)
EXTRA_SHAPES = [
    "2,64,64,14,14,3,1,1,invert,5",
    "2,3,64,220,220,7,2,3,invert,3",
    "1,16,16,7,7,3,1,1,upsample",
]
# The sets a target compiles: "spec" (the papers' shapes and EXTRA_SHAPES, every check), "papers" (the papers'
# shapes and the first of EXTRA_SHAPES, for its kernel: alignment is specialized the same way for every
# architecture and Triton 3.x, so the unaligned maps compile once, for sm_90 with the installed Triton),
# "grid" (tests/support/cases.py).
SET_SHAPES = {"spec": EXTRA_SHAPES, "papers": EXTRA_SHAPES[:1]}
KERNELS = {
    "pp_fwd_conv_kernel",
    "pp_fwd_pool_epilogue_kernel",
    "pp_bwd_input_kernel",
    "pp_bwd_weight_kernel",
    "pp_fwd_tap_kernel",  # upsample's forward at stride 1 where _tap_path_pays (cifar-b1, imagenet-b1)
    "pp_bwd_weight_adjoint_kernel",  # upsample's weight gradient where _weight_adjoint_pays (cifar-b1, imagenet-b1)
    "pp_bwd_bias_kernel",
}
# Another Triton to compile with as well: a folder holding a `triton` package (pip install --target DIR
# --no-deps triton==3.6.0, as .ci/run does: the oldest supported, the one the lent GPU machines run).
OTHER_TRITON = os.environ.get("PUSHPULL_OTHER_TRITON")


def _other_triton_version():
    import importlib.metadata

    dists = [d for d in importlib.metadata.distributions(path=[OTHER_TRITON]) if d.metadata["Name"] == "triton"]
    return dists[0].version if dists else None


# (arch, Triton) -> the sets compiled (SET_SHAPES), one process per set.
TARGETS = {(80, "installed"): ("papers",), (90, "installed"): ("spec", "grid")}
if OTHER_TRITON:
    TARGETS[(90, f"triton {_other_triton_version()}")] = ("papers",)
TARGET_IDS = [f"sm_{arch}-{triton.replace(' ', '')}" for arch, triton in TARGETS]

pytestmark = [
    pytest.mark.slow,  # minutes: every kernel compiled to machine code (README, "Testing")
    pytest.mark.skipif(TRITON_ERROR is not None, reason=f"Triton is missing: {TRITON_ERROR}"),
    # There the other tests compile and run the kernels for real; `python -m pushpull_ext.compile_check`
    # still reports the resources of every kernel.
    pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the kernels compile and run for real"),
]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """{(arch, triton): [CompiledKernel as dict, each with its "set" (SET_SHAPES' or "grid")]}, or the failure's output."""
    out = tmp_path_factory.mktemp("compile_check")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    children = {}
    for target, sets in TARGETS.items():  # one process per set, side by side
        child_env = dict(env)
        if target[1] != "installed":
            child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [OTHER_TRITON, env.get("PYTHONPATH")]))
            child_env["TRITON_CACHE_DIR"] = str(out / "triton-cache-other")
        for which in sets:
            path = out / f"{target[0]}-{target[1].replace(' ', '')}-{which}.json"
            children[(target, which, path)] = subprocess.Popen(
                [sys.executable, __file__, str(target[0]), str(path), which],
                env=child_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
    results = {target: [] for target in TARGETS}
    for (target, which, path), child in children.items():
        output, _ = child.communicate(timeout=1800)
        if child.returncode != 0:
            results[target] = f"{which}: exit {child.returncode}:\n{output[-6000:]}"
        elif not isinstance(results[target], str):
            results[target] += json.loads(path.read_text())
    return results


def _kernels(compiled, target):
    result = compiled[target]
    if isinstance(result, str):
        pytest.fail(f"compiling for sm_{target[0]} with Triton {target[1]} failed: {result}")
    return result


@pytest.mark.parametrize("target", list(TARGETS), ids=TARGET_IDS)
def test_every_launched_kernel_compiles_and_fits(compiled, target):
    kernels = _kernels(compiled, target)
    assert {k["kernel"] for k in kernels} == KERNELS
    if target[1] != "installed":
        assert {k["triton"] for k in kernels} == {target[1].split()[1]}
    for which in TARGETS[target]:
        assert len([k for k in kernels if k["set"] == which]) >= 20, f"too few {which} kernels compiled"
    problems = [f"{k['kernel']} ({k['launch']}): {k['problems']}" for k in kernels if k["problems"]]
    assert not problems, "\n".join(problems)


def test_sm80_kernels_fit_an_sm86_block(compiled):
    kernels = _kernels(compiled, (80, "installed"))
    too_big = [f"{k['kernel']} ({k['launch']}): {k['shared']} B" for k in kernels if k["shared"] > SHARED_LIMIT[86]]
    assert not too_big, f"more shared memory than one sm_86 block has ({SHARED_LIMIT[86]} B):\n" + "\n".join(too_big)


@pytest.mark.parametrize("target", list(TARGETS), ids=TARGET_IDS)
def test_kernels_neither_spill_nor_miss_the_tensor_cores(compiled, target):
    # Both sets: the grid's small channel counts choose other tiles (a bfloat16 input gradient spilled 304 B
    # at the register cap there, for 6 output channels, while the papers' shapes compiled clean).
    arch = target[0]
    kernels = _kernels(compiled, target)
    assert all(k["registers"] is not None for k in kernels), "cuobjdump did not report the registers"
    assert any(k["mma"].get("HGMMA" if arch == 90 else "HMMA") for k in kernels)
    warnings = [f"{k['kernel']} ({k['launch']}, {k['constexprs']}): {k['warnings']}" for k in kernels if k["warnings"]]
    assert not warnings, "\n".join(warnings)


# ---------------------------------------------------------------- the child: python this_file ARCH OUT SETS...
def _grid_launches(dtypes):
    """(label, call(config)) per case of tests/support/cases.py and dtype: forward, every gradient, inference
    forward."""
    from cases import CASES, call, make_case

    from pushpull_ext.compile_check import launch_step

    def step(sizes, options, dtype):
        def run(config):
            inputs, opts = make_case(sizes, options, dtype, "cpu")
            call(functools.partial(launch_step, config), inputs, opts)

        return run

    return [
        (f"{name} {str(dtype).replace('torch.', '')}", step(sizes, options, dtype))
        for name, sizes, options in CASES
        for dtype in dtypes
    ]


def _child(arch, out_path, sets):
    from dataclasses import asdict

    import torch
    import triton

    from pushpull_ext import compile_check
    from pushpull_ext.shapes import CASES

    runs = []  # (set, launches, tf32)
    papers = [case.name for case in CASES]
    for which in set(sets) & set(SET_SHAPES):
        dtypes = [torch.float32, torch.bfloat16, torch.float64]
        runs.append((which, compile_check.spec_launches(dtypes, papers + SET_SHAPES[which]), True))
        # TF32 off changes the products' precision only, not the index math EXTRA_SHAPES are there for
        runs.append((which, compile_check.spec_launches([torch.float32], papers), False))
    if "grid" in sets:
        runs.append(("grid", _grid_launches([torch.float32, torch.bfloat16]), True))
    kernels = {}  # by binary: a later run may launch a kernel an earlier one compiled
    for which, launches, tf32 in runs:
        for kernel in compile_check.compile_all([arch], launches, tf32=tf32):
            kernels.setdefault(kernel.binary_hash, dict(asdict(kernel), set=which, triton=triton.__version__))
    with open(out_path, "w") as f:
        json.dump(list(kernels.values()), f, default=str)


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "support"))  # as conftest.py does
    _child(int(sys.argv[1]), sys.argv[2], sys.argv[3:])
