"""Smoke test of an installed pushpull_ext (run from outside the checkout, e.g. by .ci/sdist_smoke.sh):
the fused CPU kernel against the reference formula in float64, forward and every gradient, for both
pull kernels. Exits non-zero on any difference."""

import sys
from pathlib import Path

import torch

import pushpull_ext
from pushpull_ext import push_pull_conv2d

CHECKOUT = Path(__file__).resolve().parents[2]


def outputs(backend: str, pull: str):
    gen = torch.Generator().manual_seed(0)
    x, w, b = (
        torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)
        for shape in ((2, 3, 12, 12), (4, 3, 3, 3), (4,))
    )
    options = dict(pull="upsample", scale=2.0) if pull == "upsample" else dict(pull="invert", avg_kernel=3)
    y = push_pull_conv2d(x, w, b, padding=1, alpha=0.7, backend=backend, **options)
    grads = torch.autograd.grad(y, (x, w, b), torch.randn(y.shape, generator=gen, dtype=torch.float64))
    return (y, *grads)


def main() -> int:
    where = Path(pushpull_ext.__file__).resolve()
    print(f"pushpull_ext {pushpull_ext.__version__} from {where}; backends: {pushpull_ext.available_backends()}")
    if CHECKOUT in where.parents:
        print("FAIL: imported the checkout, not the installed package (run this from outside the checkout)")
        return 1
    failures = 0
    for pull in ("upsample", "invert"):
        for name, ours, ref in zip(
            ("output", "grad_x", "grad_w", "grad_b"), outputs("cpu", pull), outputs("reference", pull)
        ):
            error = (ours - ref).abs().max().item()
            ok = error <= 1e-9 * max(1.0, ref.abs().max().item())
            failures += not ok
            print(f"{pull:8s} {name:7s} max abs error {error:.1e} {'ok' if ok else 'FAIL'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
