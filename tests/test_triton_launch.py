"""The Triton launchers (pushpull_ext.triton_launch.forward / .backward) called directly, against the
formula (pushpull_ext/reference.py) and its autograd. Without a GPU the kernels run on CPU tensors through the Triton
interpreter (TRITON_INTERPRET=1, set below before triton is imported), so the shapes are tiny.

The pull operands (pull_shift / pull_rows / pull_cols, from options.pull_operands) are independent
inputs of the launchers: the reference below builds q from them the same way, so every gradient,
pull_shift's included, is autograd of the same formula.
"""

import dataclasses
import json
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from agreement import gradcheck_jointly  # noqa: E402

triton = pytest.importorskip("triton")

from pushpull_ext import triton_launch as TL  # noqa: E402
from pushpull_ext.ops import BackwardArgs, ForwardArgs, mask_planes  # noqa: E402
from pushpull_ext.options import LAYER_OPTIONS, normalize, pull_operands  # noqa: E402
from pushpull_ext.reference import push_pull_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

if DEVICE == "cpu" and not TL._interpreted():
    pytest.skip(
        "triton was imported before TRITON_INTERPRET=1 was set: the kernels cannot run on CPU", allow_module_level=True
    )

GRAD_NAMES = ("input", "weight", "pull_shift", "bias_in", "bias_out", "alpha")


class Case:
    """Random inputs of one configuration, their normalized options and the launcher arguments."""

    def __init__(
        self,
        pull="invert",
        scale=2.0,
        avg=0,
        bias_in=True,
        bias_out=False,
        dual=False,
        stride=1,
        padding=1,
        dilation=1,
        groups=1,
        kernel=(3, 3),
        n=2,
        c_in=4,
        c_out=6,
        hw=(6, 7),
        dtype=torch.float64,
        device=DEVICE,
    ):
        if dual:
            bias_out = False
        t = dict(dtype=dtype, device=device)
        self.x = torch.randn(n, c_in, *hw, **t)
        self.w = torch.randn(c_out, c_in // groups, *kernel, **t)
        self.b_in = torch.randn(c_out, **t) if bias_in else None
        self.b_out = torch.randn(c_out, **t) if bias_out else None
        alpha = torch.rand(c_out, **t) + 0.5
        self.args, self.alpha = normalize(
            self.x,
            self.w,
            self.b_in,
            self.b_out,
            alpha,
            **dict(zip(LAYER_OPTIONS, (stride, padding, dilation, groups, pull, scale, avg, dual))),
        )
        self.shift, self.rows, self.cols = pull_operands(self.w, self.args)
        a = self.args
        self.opts = (
            list(a.stride),
            list(a.padding),
            list(a.pull_padding(tuple(self.w.shape[2:]))),
            list(a.dilation),
            a.groups,
            a.avg_kernel,
            a.dual_output,
        )

    # --- the formula with the pull operands as independent inputs -------------------------
    def responses(self, x, w, shift, b_in):
        a = self.args
        conv = dict(stride=a.stride, dilation=a.dilation, groups=a.groups)
        push = F.conv2d(x, w, b_in, padding=a.padding, **conv)
        if shift is not None:
            q = -w + shift.view(-1, 1, 1, 1)
        elif self.rows is not None:
            q = -(self.rows @ w @ self.cols.t())
        else:
            q = -w
        pull = F.conv2d(x, q, None if b_in is None else -b_in, padding=self.opts[2], **conv)
        if a.avg_kernel > 1:
            k = a.avg_kernel
            pull = F.avg_pool2d(pull, k, stride=1, padding=(k - 1) // 2, count_include_pad=False)
        return push, pull

    def reference(self, x, w, shift, b_in, b_out, alpha):
        push, pull = self.responses(x, w, shift, b_in)
        if self.args.dual_output:
            return torch.cat([F.relu(push), F.relu(pull)], dim=1)
        out = F.relu(push) - alpha.view(1, -1, 1, 1) * F.relu(pull)
        return out if b_out is None else out + b_out.view(1, -1, 1, 1)

    def leaves(self):
        return [self.x, self.w, self.shift, self.b_in, self.b_out, self.alpha]

    # --- the launchers ----------------------------------------------------------------------------
    def op_args(self, save_masks=True, leaves=None):
        """The forward op's arguments (ops.ForwardArgs) with the case's leaves, or `leaves` in their place."""
        x, w, shift, b_in, b_out, alpha = self.leaves() if leaves is None else leaves
        return ForwardArgs(x, w, shift, self.rows, self.cols, b_in, b_out, alpha, *self.opts, save_masks)

    def _with(self, x, w) -> list:
        """The leaves with x / w in place of the case's input / weight where given."""
        leaves = self.leaves()
        return [self.x if x is None else x, self.w if w is None else w, *leaves[2:]]

    def forward(self, save_masks=True, x=None, w=None, config=TL.DEFAULT_LAUNCH):
        return TL.forward(self.op_args(save_masks, self._with(x, w)), config)

    def backward(self, grad, masks, output_mask, x=None, w=None, config=TL.DEFAULT_LAUNCH):
        forward = self.op_args(leaves=self._with(x, w))
        return TL.backward(BackwardArgs.after(forward, grad, masks, list(output_mask)), config)

    def output_mask(self):
        return [
            True,
            True,
            self.shift is not None,
            self.b_in is not None,
            self.b_out is not None,
            not self.args.dual_output,
        ]


def _tol(dtype):
    return 1e-9 if dtype == torch.float64 else 1e-4


def _close(name, got, want, dtype):
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert got.dtype == want.dtype, f"{name}: dtype {got.dtype} != {want.dtype}"
    scale = max(1.0, want.abs().max().item())
    err = (got.double() - want.double()).abs().max().item() / scale
    assert err <= _tol(dtype), f"{name}: relative error {err:.3e} > {_tol(dtype):.0e}"


def _unpack(masks, c_out):
    """uint8 [2, N, ceil(C/8), H, W] -> bool [2, N, C, H, W] (bit o % 8 of byte o // 8)."""
    bits = torch.arange(8, device=masks.device, dtype=torch.uint8)
    planes = (masks.unsqueeze(3) >> bits.view(1, 1, 1, 8, 1, 1)) & 1
    s = planes.shape
    return planes.reshape(s[0], s[1], s[2] * 8, s[4], s[5])[:, :, :c_out].bool()


def check_case(case: Case, check_backward=True, package_reference=True, config=TL.DEFAULT_LAUNCH, grads=GRAD_NAMES):
    """The launchers against case.reference (autograd of the formula on the case's pull operands); with
    package_reference also against push_pull_reference, whose pull operands are the package's own.
    `grads`: the gradients to ask for (of GRAD_NAMES, those the case has); a test of one route asks for
    those the route computes (the interpreter's time is per kernel launched). Returns (y, masks, grad,
    the backward's six entries), or (y, masks) where no gradient was checked."""
    dtype = case.x.dtype
    y, masks = case.forward(config=config)
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in case.leaves()]
    ref = case.reference(*leaves)
    _close("output", y, ref.detach(), dtype)
    assert y.is_contiguous()

    # Mask layout: bit o % 8 of masks[k, n, o // 8, h, w] is P > 0 (k = 0) / Q' > 0 (k = 1).
    c_out = case.w.shape[0]
    with torch.no_grad():
        push, pull = case.responses(case.x, case.w, case.shift, case.b_in)
    assert masks.dtype == torch.uint8
    assert tuple(masks.shape) == (2 * y.shape[0] * ((c_out + 7) // 8) * y.shape[2] * y.shape[3],)
    planes = mask_planes(masks, y.shape, c_out)
    got = _unpack(planes, c_out)
    want = torch.stack([push > 0, pull > 0])
    scale = max(push.abs().max().item(), pull.abs().max().item())
    sure = torch.stack([push, pull]).abs() > 10 * _tol(dtype) * scale  # ignore rounding-level ties
    assert torch.equal(got[sure], want[sure])
    if c_out % 8:  # the padding bits of the last byte are zero
        assert int((planes[:, :, -1] >> (c_out % 8)).max()) == 0

    if not check_backward:
        return y, masks
    wanted = [has and name in grads for name, has in zip(GRAD_NAMES, case.output_mask())]
    if not any(wanted):  # e.g. alpha's gradient of a dual output, which has no alpha
        return y, masks
    grad = torch.randn_like(ref)
    inputs = [t for t, want_it in zip(leaves, wanted) if want_it]
    ref_grads = iter(torch.autograd.grad(ref, inputs, grad, allow_unused=True))
    got = case.backward(grad, masks, wanted, config=config)
    assert len(got) == 6
    for name, want_it, g in zip(GRAD_NAMES, wanted, got):
        if not want_it:
            assert g.numel() == 0, f"{name} was not asked for"
            continue
        r = next(ref_grads)
        r = torch.zeros_like(g) if r is None else r
        _close(f"grad {name}", g, r, dtype)

    weight_total = wanted[1] and (case.shift is None or wanted[2])  # dk and, for invert, the shift's part
    if not package_reference or not weight_total:
        return y, masks, grad, got
    # End to end against the package reference: the weight gradient plus the pull_shift gradient
    # carried back through options.pull_operands (amax + amin) is autograd of push_pull_reference.
    w = case.w.detach().clone().requires_grad_(True)
    y_pkg = push_pull_reference(case.x, w, case.b_in, case.b_out, case.alpha, case.args)
    _close("output vs push_pull_reference", y, y_pkg.detach(), dtype)
    (want_w,) = torch.autograd.grad(y_pkg, w, grad)
    total = got[1]
    if case.shift is not None:
        shift, _, _ = pull_operands(w, case.args)
        total = total + torch.autograd.grad(shift, w, got[2])[0]
    _close("weight gradient through pull_operands", total, want_w, dtype)
    return y, masks, grad, got


# ------------------------------------------------------------------------------------------------
# The configuration grid (float64, 1e-9)
# ------------------------------------------------------------------------------------------------
PULLS = [("invert", 2.0), ("upsample", 2.0), ("upsample", 1.5), ("upsample", 1.0)]
GEOMETRIES = {
    # name: options (dilation > 1 only for invert / scale 1: normalize refuses it for upsample)
    "s1p1-bias-bout": dict(stride=1, padding=1, bias_in=True, bias_out=True),
    "s2p2-g2-avg3": dict(stride=2, padding=2, groups=2, avg=3, bias_in=True),
    "rect3x5-avg5-dual": dict(kernel=(3, 5), padding=(0, 2), avg=5, bias_in=False, dual=True, hw=(7, 9)),
    "s2p0-dual-bias": dict(stride=2, padding=0, dual=True, bias_in=True, c_out=10, hw=(9, 8)),
    "d2-g2-avg3-bout": dict(dilation=2, padding=2, groups=2, avg=3, bias_in=False, bias_out=True),
    "g2-straddle-avg3": dict(groups=2, c_out=20, c_in=4, avg=3, bias_in=True, bias_out=True, hw=(5, 6)),
}
GRID = [
    (p, s, g)
    for p, s in PULLS
    for g in GEOMETRIES
    if not (GEOMETRIES[g].get("dilation", 1) > 1 and p == "upsample" and s != 1.0)
]


@pytest.mark.parametrize("pull,scale,geometry", GRID, ids=[f"{p}{'' if p == 'invert' else s}-{g}" for p, s, g in GRID])
def test_forward_backward_float64(pull, scale, geometry):
    check_case(Case(pull=pull, scale=scale, **GEOMETRIES[geometry]))


@pytest.mark.parametrize(
    "pull,scale,geometry",
    [
        ("invert", 2.0, "s1p1-bias-bout"),
        ("upsample", 2.0, "s2p2-g2-avg3"),
        ("upsample", 1.5, "rect3x5-avg5-dual"),
        ("upsample", 1.0, "d2-g2-avg3-bout"),
    ],
)
def test_forward_backward_float32(pull, scale, geometry):
    check_case(Case(pull=pull, scale=scale, dtype=torch.float32, **GEOMETRIES[geometry]))


@pytest.mark.parametrize("path", ["fused", "scratch"])
@pytest.mark.parametrize(
    "pull,scale,opts",
    [
        # several 2-D tiles per image, the last ones cut by the image's edge, batch 3, groups, dual output
        ("invert", 2.0, dict(avg=5, n=3, hw=(13, 11), groups=2, c_in=4, c_out=6, dual=True)),
        # a map smaller than the halo (2 x 3 under a 5 x 5 window), bias_out, masks not saved (backward reruns)
        ("upsample", 2.0, dict(avg=5, n=2, hw=(2, 3), bias_out=True)),
    ],
    ids=["invert-13x11-avg5-g2-dual", "upsample-2x3-avg5"],
)
def test_pooled_forward_paths(path, pull, scale, opts):
    # The pooled forward's two paths, forced: fused (2-D tiles with the halo, pooled on chip) and scratch.
    config = TL.LaunchConfig(pool_path=path)
    case = Case(pull=pull, scale=scale, **opts)
    if opts["hw"] == (13, 11):  # the fused path's tiles (the interpreter's 64 rows): several per image
        _, eh, ew = TL._frame_tile(64, (4, 4), 13, 11)
        assert TL._frame_tiles(eh, ew, (4, 4), 13, 11) > 1
    y, _, grad, want = check_case(case, config=config)
    no_masks = y.new_empty(0, dtype=torch.uint8)  # on y's device: the backward refuses masks on another one
    got = case.backward(grad, no_masks, case.output_mask(), config=config)  # the masks recomputed
    for name, a, b in zip(GRAD_NAMES, got, want):
        assert torch.equal(a, b), name


WEIGHT_ROUTE_CASES = {
    # name: (scale, dtype, options): upsample's option grid, small (both routes run in the interpreter; the
    # adjoint route's pooled gQ costs it a minute a case, so two cases pool: the dilated / strided and the
    # straddling ones do not, as pooling only changes gQ, formed by the same helper for every geometry)
    "2-s1p1-bias-bout": (2.0, torch.float64, dict(bias_in=True, bias_out=True, hw=(5, 6))),
    "2-s2p2-g2-avg3": (2.0, torch.float64, dict(stride=2, padding=2, groups=2, avg=3, bias_in=True, n=1)),
    "1.5-rect3x5-avg5-dual": (
        1.5,
        torch.float64,
        dict(kernel=(3, 5), padding=(0, 2), avg=5, dual=True, hw=(5, 9), n=1),
    ),
    "2-s2p0-dual-bias": (2.0, torch.float64, dict(stride=2, padding=0, dual=True, c_out=10, hw=(9, 8))),
    "1.5-g2-straddle": (1.5, torch.float64, dict(groups=2, c_out=20, c_in=4, bias_out=True, hw=(5, 6))),
    "2-d2-s5": (2.0, torch.float64, dict(dilation=2, stride=5, padding=0, hw=(9, 9), c_in=2, c_out=4, n=1)),
    "2-rect1x3-f32": (2.0, torch.float32, dict(kernel=(1, 3), padding=(0, 1), c_out=20, groups=2, hw=(5, 6))),
    "2-g2-f32": (2.0, torch.float32, dict(padding=1, groups=2, n=1, hw=(5, 6))),
}


@pytest.mark.parametrize("path", ["prefilter", "adjoint"])
@pytest.mark.parametrize("name", list(WEIGHT_ROUTE_CASES))
def test_upsample_weight_gradient_routes(path, name):
    # Upsample's two weight-gradient routes, forced: dk = gP x_taps + gQ z (prefilter) and x against the
    # adjoint's G over the input pixels (adjoint), on the option grid (stride, padding, dilation,
    # groups and straddling tiles, rectangular kernels, pooling, dual output, scalar alpha in the dual).
    scale, dtype, opts = WEIGHT_ROUTE_CASES[name]
    config = TL.LaunchConfig(weight_grad_path=path)
    check_case(Case(pull="upsample", scale=scale, dtype=dtype, **opts), config=config, grads=("weight",))


def test_upsample_weight_gradient_routes_agree_split():
    # The adjoint route's split-K over input pixels (3 partial buffers: 3 x 8 x 16 = 384 pixels, 3 chunks
    # of the interpreter's 128) is deterministic and agrees with the prefilter route; irregular pull
    # matrices (nonzeros apart, an empty column).
    case = Case(pull="upsample", scale=2.0, n=3, hw=(8, 16), c_in=2, c_out=4)
    case.rows, case.cols = _irregular(case.rows), _irregular(case.cols)
    y, masks = case.forward()
    grad = torch.randn_like(y)
    only_w = [False, True, False, False, False, False]
    grids = []

    def recording_launch(kernel):
        class Launch:
            def __getitem__(self, grid):
                grids.append(grid)
                return TL.wrap_triton(kernel)[grid]

        return Launch()

    adjoint = TL.LaunchConfig(weight_grad_path="adjoint", weight_split=3, launch=recording_launch)
    got = case.backward(grad, masks, only_w, config=adjoint)[1]
    assert [grid[2] for grid in grids] == [3]  # one launch, split in 3
    assert torch.equal(got, case.backward(grad, masks, only_w, config=adjoint)[1])
    want = case.backward(grad, masks, only_w, config=TL.LaunchConfig(weight_grad_path="prefilter"))[1]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "dilation,stride,hw", [(2, 5, (9, 9)), ((3, 1), (9, 5), (15, 7))], ids=["pull-grid", "sparse-window"]
)
def test_upsample_dilation_equal_shapes(dilation, stride, hw):
    # The rare dilation > 1 upsample cases whose pull and push outputs happen to have one shape:
    # the push taps land on the pull window's grid (dilation 2) or not (3: a sparse tap window).
    check_case(
        Case(
            pull="upsample",
            scale=2.0,
            dilation=dilation,
            stride=stride,
            padding=0,
            hw=hw,
            avg=3,
            bias_out=True,
            c_in=2,
            c_out=4,
        )
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    if DEVICE != "cuda":
        pytest.skip("the Triton interpreter has no bf16/fp16 arithmetic")
    case = Case(pull="invert", avg=3, bias_out=True, dtype=dtype, c_in=16, c_out=16, hw=(12, 12))
    y, masks = case.forward()
    c64 = [t.double() if t is not None else None for t in case.leaves()]
    ref64 = case.reference(*c64)
    eager = case.reference(*case.leaves())
    err, err_eager = (y.double() - ref64).abs().max(), (eager.double() - ref64).abs().max()
    assert err <= 2 * err_eager + 1e-3


# ------------------------------------------------------------------------------------------------
# Upsample's prefilter algebra (kernels/common.py pull_prefilter) with pull matrices of any values
# ------------------------------------------------------------------------------------------------
def _irregular(m: torch.Tensor) -> torch.Tensor:
    """A pull matrix of m's shape whose columns hold nonzeros apart (interior zeros), of both signs and
    in different numbers, one column all zero: what bilinear matrices never have."""
    g = torch.Generator().manual_seed(7)
    out = torch.randn(m.shape, generator=g, dtype=torch.float64).to(m)
    out[1::2] = 0  # every other row: the nonzeros of each column are not contiguous
    out[0, -1] = 0  # column -1: one nonzero fewer than the others
    if m.shape[1] > 2:
        out[:, 1] = 0  # a column of no nonzero: its taps' z is 0
    return out


@pytest.mark.parametrize(
    "geometry",
    [
        dict(stride=2, padding=2, groups=2, avg=3, bias_in=True),
        dict(kernel=(3, 5), padding=(1, 2), dual=True, hw=(7, 9)),
        dict(kernel=(1, 3), padding=(0, 1), c_out=20, groups=2, hw=(5, 6), bias_out=True),
    ],
    ids=["s2-g2-avg3", "rect3x5-dual", "rect1x3-straddle"],
)
def test_upsample_prefilter_with_irregular_pull_matrices(geometry):
    case = Case(pull="upsample", scale=2.0, **geometry)
    case.rows, case.cols = _irregular(case.rows), _irregular(case.cols)
    check_case(case, package_reference=False)


@pytest.mark.parametrize("path", ["taps", "prefilter"])
@pytest.mark.parametrize("value", [float("inf"), -float("inf"), float("nan")])
def test_upsample_non_finite_input_gives_conv2d_of_the_pull_kernel(value, path):
    # Mixed-sign pull weights around an Inf: conv2d(x, q) gives +-Inf per output, the prefilter's z (and the
    # tap path's shifted tap responses) an infinite entry under weights of both signs (NaN): the forward
    # must take its exact fallback there, on either route.
    case = Case(pull="upsample", scale=2.0, c_out=20, groups=2, hw=(6, 7), bias_in=True, dual=True)
    case.rows, case.cols = _irregular(case.rows), _irregular(case.cols)
    case.x[1, 3, 2, 4] = value
    y, _ = case.forward(config=TL.LaunchConfig(upsample_path=path))
    want = case.reference(*case.leaves())
    for kind in (torch.isnan, torch.isposinf, torch.isneginf):
        assert torch.equal(kind(y), kind(want)), kind.__name__
    finite = torch.isfinite(want)
    assert finite.any() and not finite.all()
    _close("finite outputs", y[finite], want[finite], y.dtype)


# ------------------------------------------------------------------------------------------------
# Upsample's forward at stride 1: the tap path (kernels/forward_taps.py) and the prefilter route
# ------------------------------------------------------------------------------------------------
def _launched(config: TL.LaunchConfig, names: list) -> TL.LaunchConfig:
    """config, recording the names of the kernels it launches into `names`."""

    def launch(kernel):
        class Launch:
            def __getitem__(self, grid):
                names.append(kernel.fn.__name__)
                return TL.wrap_triton(kernel)[grid]

        return Launch()

    return dataclasses.replace(config, launch=launch)


UPSAMPLE_PATH_KERNEL = {"taps": "pp_fwd_tap_kernel", "prefilter": "pp_fwd_conv_kernel"}
TAP_CASES = {
    # name: (scale, dtype, options): stride 1, several frames per image (the interpreter's 128 rows)
    "2-13x11-n3-bias-bout": (2.0, torch.float64, dict(bias_in=True, bias_out=True, hw=(13, 11), n=3)),
    "2-g2-straddle-avg3": (2.0, torch.float64, dict(groups=2, c_out=20, c_in=4, avg=3, bias_out=True, hw=(9, 7))),
    "1.5-rect3x5-avg5-dual": (1.5, torch.float64, dict(kernel=(3, 5), padding=(0, 2), avg=5, dual=True, hw=(8, 9))),
    "3-k5-p0": (3.0, torch.float64, dict(kernel=(5, 5), padding=0, hw=(11, 9), n=1, bias_in=False)),
    "2-1x1-map": (2.0, torch.float64, dict(hw=(1, 1), bias_out=True)),
    "2-f32-c20": (2.0, torch.float32, dict(c_out=20, hw=(9, 10))),
}


# The tap path on every case; the prefilter route (the grid's default elsewhere) on the pooled, grouped ones.
ROUTE_PARAMS = [(path, name) for name in TAP_CASES for path in ("taps", "prefilter") if path == "taps" or "avg" in name]


@pytest.mark.parametrize("path,name", ROUTE_PARAMS, ids=[f"{n}-{p}" for p, n in ROUTE_PARAMS])
def test_upsample_forward_routes(path, name):
    # Both forward routes of stride-1 upsample, forced, on the option grid (pooling, dual output, groups
    # and straddling channel tiles, rectangular and 5 x 5 kernels, scale 1.5 / 3, a 1 x 1 map), and the
    # backward's recompute of relu(Q') for alpha, which runs the same route (the other gradients do not
    # depend on the forward's route: the grid above checks them).
    scale, dtype, opts = TAP_CASES[name]
    names = []
    config = _launched(TL.LaunchConfig(upsample_path=path), names)
    check_case(Case(pull="upsample", scale=scale, dtype=dtype, **opts), config=config, grads=("alpha",))
    assert UPSAMPLE_PATH_KERNEL[path] in names


def test_tap_path_with_irregular_pull_matrices():
    # Pull matrices whose columns' nonzeros span more than the tap path's halo (interior zeros), an empty
    # column: taps computed in several frames, still exact; the same output as the prefilter route.
    case = Case(pull="upsample", scale=2.0, c_out=20, groups=2, hw=(6, 5), n=1, avg=3, bias_out=True)
    case.rows, case.cols = _irregular(case.rows), _irregular(case.cols)
    names = []
    taps = _launched(TL.LaunchConfig(upsample_path="taps"), names)
    check_case(case, package_reference=False, config=taps)
    assert "pp_fwd_tap_kernel" in names
    y_taps, _ = case.forward(config=taps)
    y_pre, _ = case.forward(config=TL.LaunchConfig(upsample_path="prefilter"))
    torch.testing.assert_close(y_taps, y_pre, rtol=1e-12, atol=1e-12)


def test_tap_path_frames_cover_wider_spans():
    # The tap path's frame count per push tap, as the kernel derives it from the nonzeros' table: the
    # bilinear matrices of a 3 x 3 kernel at scale 2 fit the launcher's halo (one frame each).
    geo = TL._Geom(torch.empty(1, 4, 9, 9), torch.empty(6, 4, 3, 3), Case(pull="upsample").op_args())
    assert TL.tap_halo(TL.tap_axes(geo)) == (4, 4)
    assert TL.tap_shift_adds(TL.tap_axes(geo)) == 9 + 3 * 11 + 11


def test_gradcheck_tap_path():
    # float64 gradcheck with the tap path forced (groups, both biases; the pooled tap path is in
    # test_upsample_forward_routes: its window sums would cost the interpreter a minute here)
    opts = dict(bias_in=True, bias_out=True, groups=2)
    test_gradcheck("upsample", 2.0, opts, config=TL.LaunchConfig(upsample_path="taps"))


def test_bench_routes_runs_every_route_the_launcher_chooses(tmp_path):
    # benchmarks/gpu_suite.sh's side-by-side timing of the routes, as a smoke run (the interpreter: no
    # timing): a stride-1 upsample layer has two choices, each row says both routes and the launcher's pick.
    from pushpull_ext import bench_routes

    out = tmp_path / "routes.json"
    assert bench_routes.main(["--shapes", "1,2,4,4,4,3,1,1,upsample", "--dtype", "float64", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["choice"] for r in rows] == ["upsample_path", "weight_grad_path"]
    for r in rows:
        assert set(r["ms"]) == set(bench_routes.ROUTES[r["choice"]][0])
        assert r["launcher_takes"] in r["ms"] and r["faster"] in r["ms"]


# ------------------------------------------------------------------------------------------------
# Launcher behaviour
# ------------------------------------------------------------------------------------------------
def test_output_mask_subsets():
    case = Case(pull="invert", avg=3, bias_out=True, n=1, hw=(5, 6))
    y, masks = case.forward()
    grad = torch.randn_like(y)
    full = case.backward(grad, masks, [True] * 6)
    for i in range(6):
        only = [j == i for j in range(6)]
        part = case.backward(grad, masks, only)
        for j, (a, b) in enumerate(zip(part, full)):
            if j == i:
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
            else:
                assert a.numel() == 0, f"entry {GRAD_NAMES[j]} computed though not asked for"
    # Inputs that the asked-for gradients do not read may come as shape-only placeholders.
    x_ph = case.x.new_empty(()).expand(case.x.shape)
    w_ph = case.w.new_empty(()).expand(case.w.shape)
    a = case.backward(grad, masks, [True, False, False, True, True, False], x=x_ph)
    b = case.backward(grad, masks, [False, True, True, True, True, False], w=w_ph)
    for i, got in ((0, a[0]), (3, a[3]), (4, a[4]), (1, b[1]), (2, b[2]), (3, b[3])):
        torch.testing.assert_close(got, full[i], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("pull,scale", [("invert", 2.0), ("upsample", 2.0)])
def test_unsaved_masks_are_recomputed(pull, scale):
    case = Case(pull=pull, scale=scale, avg=3, bias_out=True, n=1, hw=(5, 6))
    y, masks = case.forward()
    y2, none = case.forward(save_masks=False)
    assert none.numel() == 0 and none.dtype == torch.uint8
    assert torch.equal(y, y2)
    grad = torch.randn_like(y)
    want = case.output_mask()
    full = case.backward(grad, masks, want)
    again = case.backward(grad, none, want)
    for a, b in zip(again, full):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_weight_gradient_split_k_deterministic():
    split3 = TL.LaunchConfig(weight_split=3)
    case = Case(pull="upsample", scale=1.5, avg=3, n=3, hw=(5, 5), c_in=2, c_out=4)
    y, masks = case.forward()
    grad = torch.randn_like(y)
    want = case.backward(grad, masks, [False, True, False, False, False, False])[1]
    got = case.backward(grad, masks, [False, True, False, False, False, False], config=split3)[1]
    got2 = case.backward(grad, masks, [False, True, False, False, False, False], config=split3)[1]
    assert torch.equal(got, got2)  # deterministic: same bits run to run
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    case_i = Case(pull="invert", avg=0, n=3, hw=(5, 5))
    y, masks = case_i.forward()
    grad = torch.randn_like(y)
    a = case_i.backward(grad, masks, [False, True, True, False, False, False], config=split3)
    b = case_i.backward(grad, masks, [False, True, True, False, False, False])
    for u, v in zip(a[1:3], b[1:3]):
        torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-12)


def test_non_contiguous_inputs():
    case = Case(pull="invert", avg=3, bias_out=True, n=1, hw=(5, 6))
    x_cl = case.x.to(memory_format=torch.channels_last)
    w_t = case.w.transpose(2, 3).contiguous().transpose(2, 3)
    assert not x_cl.is_contiguous() and not w_t.is_contiguous()
    y, masks = case.forward()
    y2, masks2 = case.forward(x=x_cl, w=w_t)
    assert torch.equal(y, y2) and torch.equal(masks, masks2)
    grad = torch.randn_like(y)
    g1 = case.backward(grad, masks, [True] * 6)
    g2 = case.backward(grad.transpose(2, 3).contiguous().transpose(2, 3), masks, [True] * 6, x=x_cl, w=w_t)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# gradcheck (float64) through a torch.autograd.Function around the two launchers
# ------------------------------------------------------------------------------------------------
class _LaunchFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, case, config, x, w, shift, b_in, b_out, alpha):
        y, masks = TL.forward(case.op_args(True, (x, w, shift, b_in, b_out, alpha)), config)
        ctx.case, ctx.config = case, config
        ctx.save_for_backward(x, w, shift, b_in, alpha, masks)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, w, shift, b_in, alpha, masks = ctx.saved_tensors
        case = ctx.case
        need = list(ctx.needs_input_grad[2:])
        forward = case.op_args(True, (x, w, shift, b_in, None, alpha))
        grads = TL.backward(BackwardArgs.after(forward, grad.contiguous(), masks, need), ctx.config)
        return (None, None) + tuple(g if n else None for g, n in zip(grads, need))


@pytest.mark.parametrize(
    "pull,scale,opts",
    [
        ("invert", 2.0, dict(avg=3, bias_in=True, bias_out=True, groups=2, stride=2, padding=1)),
        ("upsample", 1.5, dict(avg=3, bias_in=True, dual=True, kernel=(3, 3))),
    ],
    ids=["invert-avg3-g2-s2", "upsample1.5-avg3-dual"],
)
def test_gradcheck(pull, scale, opts, config=TL.DEFAULT_LAUNCH):
    case = Case(pull=pull, scale=scale, n=1, c_in=2, c_out=4, hw=(5, 6), **opts)
    # Every leaf at once (gradcheck_jointly): two interpreted forwards in all, not two per leaf.
    assert gradcheck_jointly(
        lambda *a: _LaunchFn.apply(case, config, *a), case.leaves(), eps=1e-6, atol=1e-7, rtol=1e-6
    )


@pytest.mark.parametrize("path", ["prefilter", "adjoint"])
def test_gradcheck_upsample_weight_routes(path):
    # float64 gradcheck of upsample with each weight-gradient route forced (stride 2, groups; pooling is in
    # the grid above: its window sums cost the interpreter minutes here)
    opts = dict(bias_in=True, bias_out=True, groups=2, stride=2, padding=1)
    test_gradcheck("upsample", 2.0, opts, config=TL.LaunchConfig(weight_grad_path=path))


def test_bias_gradient_split_deterministic():
    split3 = TL.LaunchConfig(bias_split=3)
    case = Case(pull="upsample", scale=2.0, avg=3, n=3, hw=(5, 5), c_in=2, c_out=4)
    y, masks = case.forward()
    grad = torch.randn_like(y)
    only_bias = [False, False, False, True, False, False]
    want = case.backward(grad, masks, only_bias)[3]
    got = case.backward(grad, masks, only_bias, config=split3)[3]
    assert torch.equal(got, case.backward(grad, masks, only_bias, config=split3)[3])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("pull,scale", [("invert", 2.0), ("upsample", 2.0), ("upsample", 1.0)])
def test_backward_writes_no_masked_field(monkeypatch, pull, scale):
    # The kernels form gP / gQ from grad_output and the masks as they load them: besides grad_input
    # itself, backward allocates no spatial field at output resolution (the old design wrote
    # [N, C_out, Ho, Wo] masked fields, and for invert an [N, groups, Ho, Wo] one). Alpha, whose
    # gradient recomputes a forward pass, is left out.
    case = Case(pull=pull, scale=scale, avg=3, bias_out=True, groups=2, hw=(7, 9))
    y, masks = case.forward()
    grad = torch.randn_like(y)
    sizes, real_empty = [], torch.empty

    def recording_empty(*shape, **kw):
        t = real_empty(*shape, **kw)
        sizes.append(tuple(t.shape))
        return t

    monkeypatch.setattr(torch, "empty", recording_empty)
    got = case.backward(grad, masks, [True, True, pull == "invert", True, True, False])
    monkeypatch.undo()
    assert got[0].shape == case.x.shape and tuple(case.x.shape) in sizes
    fields = [s for s in sizes if s != tuple(case.x.shape) and s[-2:] == tuple(y.shape[-2:])]
    assert not fields, f"output-resolution fields allocated by backward: {fields}"
