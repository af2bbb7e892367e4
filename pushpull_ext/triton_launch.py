"""Host-side launchers of the Triton push-pull kernels (the only place that launches them).

`forward` and `backward` are called from the body of the `torch.library.triton_op` registered in
ops.py; every kernel is launched through `wrap_triton` so that torch.compile can trace them.
Arguments arrive normalized (options.normalize); see README.md ("The formula", "How it is fast") and kernels/*.py for the
kernels' design. What runs, and what goes through memory:

forward
  - no pooling: ONE kernel (implicit-GEMM conv + whole epilogue): reads x (gathered, cache-served
    halo) and the [K, C_out] weight matrix, writes y once and the packed masks once. Upsample's pull
    response is the same weights against the input prefiltered in registers (kernels/forward.py), from
    the tables of U's and V's nonzeros built here (_prefilter_tables, device work, no host sync); the
    pull kernel's own matrix is read only by tiles whose input is not finite.
  - upsample at stride 1, where _tap_path_pays (the 16- and 64-channel first blocks): pp_fwd_tap_kernel
    (kernels/forward_taps.py) on 2-D frames of one image, one product per (push tap, channel chunk) shared
    by push and pull, the shifts and separable filters on chip; pooling on chip too; y and the masks
    written once. Extra cost: the frames' halo (tap_halo) recomputed, 53 shift-adds per tile element.
  - avg_kernel > 1, fused (the pooled paper shapes): the same ONE kernel, on 2-D pixel tiles of one
    image with the pooling halo (_pool_tile picks the tile): it recomputes P and Q on the halo, pools
    Q on chip (count_include_pad=False) and writes y and the masks once, as without pooling; no scratch
    field. Extra cost: the halo's products (the cost model's note: x1.3-2.0 of the output pixels' for
    the pooled paper shapes) and the box sum's 2a on-chip gathers per tile element.
  - avg_kernel > 1, scratch, where _fused_pooling_pays finds the halo's products dearer than the
    traffic they save (a roofline at an H100's balance: wide layers in float32 without TF32 or float64,
    upsample with large windows): the conv kernel writes P and Q (fp32 / fp64) to two scratch fields, a
    second kernel pools Q and applies the epilogue. Extra cost: 2 field writes and ~2 field reads (the
    a x a pooling reads hit cache) of [N, C_out, Ho, Wo] in the accumulator dtype.
backward (no masked gradient field is ever written: every kernel forms gP = g * [P > 0] and
gQ = pool_adjoint(c * g * [Q' > 0]) (c = -alpha, or 1 with g's second half for the dual output) from
grad_output and the packed masks as it loads them; see kernels/backward.py)
  - reads: grad_output g, the packed masks (1 bit per channel and pixel, each of masks[0] / masks[1]),
    x (weight gradient), the weight matrices (input gradient), alpha and pull_shift.
  - input-gradient kernel, only if output_mask[0]: writes grad_input once. Invert's box-sum term
    sum_{tap, o in group} shift[o] * gQ[o] is a row sum of the gQ tile the MMA consumes (no
    per-group field). With pooling each gQ element gathers the a x a window of g and mask bits
    (cache-served re-reads of g and the masks, nothing written).
  - weight-gradient kernel, if weight or pull_shift is asked: deterministic split-K, writes only
    the partial buffers [split, C_out, kh*kw*Cg] (accumulator dtype; upsample's pull part goes into
    the same buffer through the prefilter) and, for invert, [split, r_tiles, C_out] for pull_shift;
    torch sums them (split is 1 unless the GPU needs more programs).
  - upsample's weight gradient has two routes (LaunchConfig.weight_grad_path forces one):
    "prefilter" (pp_bwd_weight_kernel: dk = gP x_taps + gQ z, two MMAs over the output pixels) and
    "adjoint" (pp_bwd_weight_adjoint_kernel: x against the input gradient's operand G, one MMA over the
    input pixels, one push tap a program; same partial buffers). The rule, _weight_adjoint_pays: the
    cost model's counts of each route for the layer's tiles (MACs with tiles padded to whole blocks, plus
    the CUDA-core FMAs forming z or G, priced at FMA_COST_IN_MACS tensor-core MACs each for the dtype);
    the adjoint where it is no dearer. It takes the 16- and 64-channel stride-1 layers (1x one
    convolution's products instead of 2-2.7x) and leaves the 3-channel stem (its c side padded to 16)
    and strided layers (s^2 the pixels) on the prefilter route.
  - the backward tiles' channel side (input channels of the input gradient, output channels of the
    weight gradient) is no wider than the group's channels need (16 for 16-channel layers).
  - bias_in gradient, if asked: one reduction kernel over g and the masks (sum_p gP - sum_p gQ;
    the pooling adjoint keeps sums, so no window), writes partials [split, C_out].
  - torch, small: bias_out gradient = per-channel sum of g (one read of g; none when alpha trains: see
    below), the weight-matrix layouts, upsample's prefilter tables, the sums of the partial buffers.
  - grad_alpha needs relu(Q'), which is not saved: one forward pass recomputes it (same path as
    forward's, fused or scratch) and, instead of writing y, reads g and reduces g * relu(Q') and g (the
    bias_out gradient, so that g is read once) per channel in its epilogue: partials [pixel tiles, 2,
    C_out] (accumulator dtype) that torch sums. No field is written. The same pass recomputes the masks
    when forward did not save them (the only other case in which backward runs a forward, then writing
    the masks alone).
Everything here besides the kernel launches is small work on the weights (a few KB) or per-channel
reductions; no atomics, so results are bitwise reproducible run to run.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch
import triton
from torch import Tensor
from torch.library import wrap_triton

from . import kernels as _k  # kernels/, installed as pushpull_ext.kernels (setup.py package_dir)
from ._ext import TRITON_INTERPRET
from .kernels import backward as _kb
from .kernels import common as _kc
from .op_checks import check_backward, check_forward
from .options import conv_output_size, mask_bytes
from .reference import pull_kernel_from_operands

# The pull modes of the kernels (kernels/common.py), as the ints passed to their MODE argument.
MODE_SCALE1, MODE_INVERT, MODE_UPSAMPLE = (mode.value for mode in (_kc.MODE_SCALE1, _kc.MODE_INVERT, _kc.MODE_UPSAMPLE))


def _patch_interpreter_index() -> None:
    """COMPAT SHIM (TRITON_INTERPRET=1 only): loop bounds that are kernel arguments reach __index__ as
    1-element arrays, which NumPy >= 2.3 refuses (benchmarks/tuning.md); take the single element. A no-op
    where the interpreter module layout differs."""
    try:
        import numpy as np
        from triton.runtime import interpreter as _interp
    except ImportError:  # pragma: no cover
        return
    orig = getattr(_interp, "_patch_lang_tensor", None)
    if orig is None or getattr(orig, "_pushpull_fixed", False):
        return

    def patched(tensor, scope, _orig=orig):
        _orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    patched._pushpull_fixed = True
    _interp._patch_lang_tensor = patched


if TRITON_INTERPRET:
    _patch_interpreter_index()


# ----------------------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------------------
class _Geom:
    """Shapes, the push kernel's window and, for upsample, the pull kernel's.

    Every GEMM kernel reduces over the push kernel's taps (`push_window`); upsample's forward and weight
    gradient prefilter the input, and its input gradient gathers the pull gradient, over the pull
    kernel's window (`pull_window`: kernels/common.py `pull_prefilter` and its adjoint).
    """

    def __init__(self, x, w, args):
        """x, w: the input and weight (or placeholders of their shapes); args: the op's arguments (an
        ops.ForwardArgs or ops.BackwardArgs)."""
        pull_rows, pull_cols, pull_padding, groups = args.pull_rows, args.pull_cols, args.pull_padding, args.groups
        stride, padding, dilation = args.stride, args.padding, args.dilation
        self.N, self.C_in, self.H, self.W = x.shape
        self.C_out, self.Cg, self.kh, self.kw = w.shape
        self.G = int(groups)
        self.Cgo = self.C_out // self.G
        self.stride = tuple(int(s) for s in stride)
        self.dilation = tuple(int(d) for d in dilation)
        padding = tuple(int(p) for p in padding)
        self.push_pad = padding
        self.pull_pad, self.q_size = (0, 0), (1, 1)  # no pull window but upsample's
        self.Ho = conv_output_size(self.H, self.kh, self.stride[0], padding[0], self.dilation[0])
        self.Wo = conv_output_size(self.W, self.kw, self.stride[1], padding[1], self.dilation[1])
        if args.pull_shift is not None:
            self.mode = MODE_INVERT
        elif pull_rows is not None:
            self.mode = MODE_UPSAMPLE
            self.q_size = (int(pull_rows.shape[0]), int(pull_cols.shape[0]))
            self.pull_pad = tuple(int(p) for p in pull_padding)
        else:
            self.mode = MODE_SCALE1

    def sizes(self) -> tuple:
        """The kernels' size arguments N, C_in, H, W, C_out, Ho, Wo."""
        return self.N, self.C_in, self.H, self.W, self.C_out, self.Ho, self.Wo

    def push_window(self) -> tuple:
        """The GEMM kernels' push-window arguments: stride, padding, dilation (each as h, w) and the push
        kernel's size."""
        return (*self.stride, *self.push_pad, *self.dilation, self.kh, self.kw)

    def pull_window(self) -> tuple:
        """The upsample kernels' pull-window arguments: the pull kernel's padding and size (its stride and
        dilation are the push kernel's)."""
        return (*self.pull_pad, *self.q_size)


def _fwd_matrix(kwin: Tensor) -> Tensor:
    """[C_out, Cg, TH, TW] -> [TH*TW*Cg, C_out], row r = (i*TW + j)*Cg + c (tap-major)."""
    c_out = kwin.shape[0]
    return kwin.permute(2, 3, 1, 0).reshape(-1, c_out).contiguous()


def _bwd_matrix(kwin: Tensor, groups: int) -> Tensor:
    """[C_out, Cg, TH, TW] -> [G, TH*TW*Cgo, Cg], row r = (i*TW + j)*Cgo + o_local (tap-major)."""
    c_out, cg, th, tw = kwin.shape
    cgo = c_out // groups
    return kwin.reshape(groups, cgo, cg, th, tw).permute(0, 3, 4, 1, 2).reshape(groups, th * tw * cgo, cg).contiguous()


def _nonzeros_by_column(m: Tensor, sign: float, acc_dtype) -> tuple[Tensor, Tensor, Tensor]:
    """For m [rows, cols]: the row indices of each column's nonzeros first (int32 [rows, cols], entry
    (e, i) = row of column i's e-th nonzero, then its zero rows), their entries times sign (acc_dtype,
    0 past the nonzeros) and each column's count of nonzeros ([cols]). Device work: no host sync."""
    nonzero = m != 0
    order = torch.sort((~nonzero).to(torch.uint8), dim=0, stable=True).indices  # nonzero rows first
    return order.to(torch.int32), (sign * m.to(acc_dtype)).gather(0, order), nonzero.sum(0)


def _prefilter_tables(rows: Tensor, cols: Tensor, acc_dtype) -> tuple[Tensor, Tensor]:
    """The tables of kernels/common.py prefilter_tables for q = -rows @ k @ cols^T: (idx int32 [2 + kh + kw
    + rows.numel() + cols.numel()] = [most nonzeros of a column of U, of V, nonzeros of each of U's columns,
    of each of V's, U's rows (e, i), V's (e, j)], coef [rows.numel() + cols.numel()] = the matching
    -U[a, i] and V[b, j])."""
    u_idx, u_coef, u_nnz = _nonzeros_by_column(rows, -1.0, acc_dtype)
    v_idx, v_coef, v_nnz = _nonzeros_by_column(cols, 1.0, acc_dtype)
    counts = [torch.stack([u_nnz.amax(), v_nnz.amax()]), u_nnz, v_nnz]
    idx = torch.cat([*(n.to(torch.int32) for n in counts), u_idx.reshape(-1), v_idx.reshape(-1)])
    return idx, torch.cat([u_coef.reshape(-1), v_coef.reshape(-1)])


def _prefilter_operands(geo: _Geom, args, like: Tensor, acc_dtype) -> tuple[Tensor, Tensor]:
    """The upsample kernels' prefilter tables (_prefilter_tables), or for other modes stand-ins they do not read."""
    if geo.mode == MODE_UPSAMPLE:
        return _prefilter_tables(args.pull_rows, args.pull_cols, acc_dtype)
    return like.new_empty(1, dtype=torch.int32), like.new_empty(1, dtype=acc_dtype)


# ----------------------------------------------------------------------------------------------
# Configs (bucketed shapes; no per-batch retuning)
# ----------------------------------------------------------------------------------------------
def _interpreted() -> bool:
    return (
        isinstance(_k.pp_fwd_conv_kernel, triton.runtime.interpreter.InterpretedFunction)
        if hasattr(triton.runtime, "interpreter")
        else False
    )


@dataclass(frozen=True)
class LaunchConfig:
    """How forward() and backward() tile and launch their kernels. The ops use DEFAULT_LAUNCH; the tests
    and compile_check pass their own."""

    # GPU tiles for CPU tensors too: compile_check compiles, on a machine without a GPU, exactly what a
    # GPU would launch (CUDA tensors always take the GPU tiles; the interpreter has its own otherwise).
    gpu_tiles_on_cpu: bool = False
    # Fixed split factors of the deterministic pixel reductions (None: as many as the GPU needs).
    weight_split: Optional[int] = None
    bias_split: Optional[int] = None
    # kernel -> launcher: wrap_triton (traceable by torch.compile), or compile_check's compile-only one.
    launch: Callable = wrap_triton
    # The pooled forward's path: "fused" or "scratch" (the tests force each), None: _fused_pooling_pays.
    pool_path: Optional[str] = None
    # Upsample's weight-gradient route: "prefilter" (pp_bwd_weight_kernel) or "adjoint"
    # (pp_bwd_weight_adjoint_kernel) (the tests force each), None: _weight_adjoint_pays.
    weight_grad_path: Optional[str] = None
    # Upsample's forward at stride 1: "taps" (pp_fwd_tap_kernel) or "prefilter" (pp_fwd_conv_kernel) (the
    # tests force each), None: _tap_path_pays.
    upsample_path: Optional[str] = None

    def gpu_tuned(self, t: Tensor) -> bool:
        """Whether launches on t use the GPU configs (the interpreter has its own, see _fwd_config)."""
        return t.is_cuda or self.gpu_tiles_on_cpu

    def allow_tf32(self, t: Tensor) -> bool:
        return t.dtype == torch.float32 and self.gpu_tuned(t) and bool(torch.backends.cudnn.allow_tf32)


DEFAULT_LAUNCH = LaunchConfig()


# GPU tiles: the largest that compile_check.py finds free of register spills (history: benchmarks/tuning.md).
def _block_k(dtype, pooled: bool = False) -> int:
    # float32 (three TF32 products each) and pooled gradients (gathered windows) spill with 32.
    return 16 if (dtype == torch.float32 or pooled) else 32


def _fwd_config(dtype, gpu: bool, c_out: int, c_out_per_group: int, upsample: bool = False, avg: int = 1, tf32=True):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for the forward kernel (and, BLOCK_M / BLOCK_N, the
    backward's bias kernel). Upsample keeps two accumulators and builds its prefilter operand in registers,
    once per channel tile: 32 x 64 tiles where 64 channels share the weights (one channel tile, so z is built
    once per pixel), else 64 x 32 / 64 x 16 (128 x 64 and 64 x 64 spill on sm_80 in float32; float64 32 x 32).
    Pooled (fused, avg > 1): taller pixel tiles (a 2-D tile with its halo: the taller, the less halo is
    recomputed; _pool_tile may take fewer rows) and narrower channel tiles, for the box sum's copies of Q
    (benchmarks/tuning.md). `tf32`: whether float32 runs as TF32 (otherwise three products an MMA, which
    some tiles need narrower)."""
    if not gpu:  # interpreter: each K step is a few NumPy calls, so fewer, larger steps
        return 64, 16, 32, 4, 1
    bn = 16 if c_out <= 16 else (32 if c_out <= 32 else 64)
    # No wider than a group where groups allow: a tile straddling groups keeps a second set of accumulators.
    bn = min(bn, max(16, triton.next_power_of_2(c_out_per_group)))
    if avg > 1:
        if dtype == torch.float64:  # 128 x 16 with 4 warps spilled 56 B on sm_90 (64 channels, 5x5 pooling)
            return (64, 16, 16, 4, 1) if (upsample or avg >= 5) else (128, 16, 16, 8, 1)
        if upsample:
            return 128, 16, _block_k(dtype), 8, 3
        return 256, min(bn, 32), _block_k(dtype), 8, 3
    if dtype == torch.float64:
        return (32 if upsample else 64), min(bn, 32), 16, 4, 1
    if upsample:
        if bn == 64:  # every channel of a 64-wide group in one tile: z is built once per pixel, not twice
            # (float32 without TF32, "tf32x3": three products an MMA, 16-deep chunks on 4 warps)
            return (32, 64, 16, 4, 3) if (dtype == torch.float32 and not tf32) else (32, 64, 32, 8, 3)
        # 16-wide tiles reduce 16 at a time in every dtype: 64 x 16 x 32 spilled 24-56 B in bfloat16 (sm_80)
        return 64, bn, (16 if bn == 16 else _block_k(dtype)), 8, 3
    return 128, bn, _block_k(dtype), 8, 3


def _bwd_config(
    dtype, gpu: bool, channels: int, weight_kernel: bool = False, pooled: bool = False, reduction=None, upsample=False
):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for the backward GEMM kernels. `channels`: the
    extent of the tile's channel side, input channels per group (input gradient: BLOCK_N) or output
    channels per group (weight gradient: BLOCK_M); the tile is no wider there than they need (a power
    of two, at least the MMA's 16), so that 16-channel layers do not run 64-wide tiles. `reduction`: the
    input gradient's (push tap, output channel) reduction length (kh * kw * Cgo, 144 for a 3x3 kernel on
    16 channels), which BLOCK_K then pads least (16 rather than 32 for 144: 9 chunks, not 4.5); with
    `upsample`, its 16-wide tiles take 4 warps and 16-deep chunks."""
    if not gpu:  # interpreter: cost is per NumPy call, so few programs and few, long K steps
        return (16, 128, 64, 4, 1) if weight_kernel else (64, 16, 64, 4, 1)
    if dtype == torch.float64:  # float64 products on the CUDA cores here (kernels/common.py: mma_grad_operand)
        rows, cols, block_k, warps, stages = 32, 32, 8, 4, 1
    else:  # fewer warps or more stages spill the gradient operands
        rows, cols, block_k, warps, stages = 64, 64, _block_k(dtype, pooled), 8, 2
    if weight_kernel:
        rows = min(rows, max(16, triton.next_power_of_2(channels)))
    else:
        cols = min(cols, max(16, triton.next_power_of_2(channels)))
    if reduction is not None and block_k > 16 and reduction % block_k:
        block_k = -min((triton.cdiv(reduction, bk) * bk, -bk) for bk in (block_k, block_k // 2))[1]
    if upsample and not weight_kernel and cols == 16 and dtype != torch.float64:
        # The adjoint's 64 x 16 tiles: 4 warps (8 spilled 24-48 B: sm_80, tf32x3, Triton 3.9), 16-deep chunks
        # (bfloat16's 32 spilled 248-304 B at the 255-register cap on sm_90, for 6 output channels: 54 long)
        warps, block_k = 4, 16
    return rows, cols, block_k, warps, stages


def _bwd_weight_adjoint_config(dtype, gpu: bool, cgo: int, cg: int, pooled: bool = False):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of upsample's weight gradient on the adjoint:
    BLOCK_M output channels x BLOCK_N input channels of a group (each no wider than the group's channels
    need, at least the MMA's 16), BLOCK_K input pixels. The G^T tile [BLOCK_K, BLOCK_M] it forms is the
    input gradient's [BLOCK_M, BLOCK_K] transposed: the same sizes (benchmarks/tuning.md)."""
    if not gpu:  # interpreter: cost is per NumPy call, so one long pixel chunk for the tests' small maps
        return 16, 16, 128, 4, 1
    fp64 = dtype == torch.float64  # products on the CUDA cores (mma_grad_operand)
    rows = min(32 if fp64 else 64, max(16, triton.next_power_of_2(cgo)))
    cols = min(32 if fp64 else 64, max(16, triton.next_power_of_2(cg)))
    narrow = rows * cols <= 16 * 32
    # warps and BLOCK_K where compile_check found no spill on sm_80 / sm_90, Triton 3.9 and 3.6 (ptxas spilled
    # 8-48 B of other choices: benchmarks/tuning.md)
    if fp64 and pooled:  # G sums an a x a window per visit
        return rows, cols, 8, 2 if rows * cols <= 16 * 16 else 4, 1
    if fp64:
        return rows, cols, 16 if narrow else 8, 2 if narrow else 8, 1
    if pooled:
        return rows, cols, 16, 8, 2
    if narrow:
        return rows, cols, 16, 4, 2
    return rows, cols, _block_k(dtype, pooled), 4 if dtype == torch.float32 else 8, 2


def _padded(size: int, block: int) -> int:
    """size rounded up to whole blocks (what a tiled loop or grid executes)."""
    return triton.cdiv(size, block) * block


def _column_rows(size: int, new_size: int) -> list[list[int]]:
    """The rows of each column's nonzeros of the bilinear matrix (align_corners=True, as
    options.interpolation_matrix) taking `size` points to `new_size`, ascending."""
    rows = [[] for _ in range(size)]
    for a in range(new_size):
        src = a * (size - 1) / (new_size - 1) if new_size > 1 else 0.0
        lo = min(int(src), size - 1)
        rows[lo].append(a)
        if src > lo:  # a nonzero weight on the next column too
            rows[lo + 1].append(a)
    return rows


def _column_nonzeros(size: int, new_size: int) -> list[int]:
    """Nonzeros of each column of the bilinear matrix taking `size` points to `new_size`."""
    return [len(rows) for rows in _column_rows(size, new_size)]


@functools.lru_cache(maxsize=256)
def prefilter_visits(th: int, tw: int, qh: int, qw: int, per_tap: int, block: Optional[int]) -> float:
    """U[a, i] V[b, j] pairs the prefilter's (and its adjoint's) loops visit per element of z (or G), on
    average over the tiles of its (push tap, channel) side: per_tap channels a tap, `block` columns a tile
    (kernels/common.py prefilter_tables with TILE_BOUNDS: a tile visits the most nonzeros of its taps'
    columns of U times those of V; one tap a tile, 9 to 25 at scale 2); block None: without TILE_BOUNDS,
    the widest column pair's for every tile. For a th x tw push and qh x qw pull kernel; counted in plain
    Python (the launcher prices routes with it; no device work, nothing for the cost model's recording)."""
    u, v = _column_nonzeros(th, qh), _column_nonzeros(tw, qw)
    if block is None:
        return max(u) * max(v)
    columns = th * tw * per_tap
    tiles = []
    for first in range(0, columns, block):
        taps = {r // per_tap for r in range(first, min(first + block, columns))}
        tiles.append(max(u[t // tw] for t in taps) * max(v[t % tw] for t in taps))
    return sum(tiles) / len(tiles)


def _weight_route_costs(geo: _Geom, pooled_window: int, prefilter: tuple, adjoint: tuple) -> tuple:
    """((MACs, CUDA-core FMAs) of the prefilter route, the same of the adjoint route) for upsample's
    weight gradient, counted as they execute (cost_model's counting: tiles padded to whole blocks, pixel
    chunks to whole BLOCK_K; split factors left out). Prefilter (tiles: o x (tap, c) x output pixels): two
    MMAs a chunk, z built once per o tile (visits FMAs an element) and gQ's pooling window once per
    (tap, c) tile. Adjoint (tiles: o x c x input pixels, one tap a program): one MMA, G built once per
    c tile (visits x pooling window FMAs an element)."""
    taps = geo.kh * geo.kw
    bm, bn, bk = prefilter[:3]
    visits = prefilter_visits(geo.kh, geo.kw, *geo.q_size, 1, None)  # both routes: the widest pair's bounds
    o_rows = geo.G * _padded(geo.Cgo, bm)
    r_cols = _padded(taps * geo.Cg, bn)
    out_pix = _padded(geo.N * geo.Ho * geo.Wo, bk)
    pre_macs = 2 * o_rows * r_cols * out_pix
    pre_fmas = (o_rows // bm) * r_cols * out_pix * visits
    if pooled_window > 1:
        pre_fmas += o_rows * (r_cols // bn) * out_pix * pooled_window
    bm, bn, bk = adjoint[:3]
    o_rows = geo.G * _padded(geo.Cgo, bm)
    c_cols = _padded(geo.Cg, bn)
    in_pix = _padded(geo.N * geo.H * geo.W, bk)
    adj_macs = o_rows * taps * c_cols * in_pix
    adj_fmas = o_rows * taps * (c_cols // bn) * in_pix * visits * pooled_window
    return (pre_macs, pre_fmas), (adj_macs, adj_fmas)


def _precision(dtype, tf32: bool) -> str:
    """The key of a launch's product precision in the model's tables (FMA_COST_IN_MACS, MACS_PER_BYTE)."""
    if dtype == torch.float64:
        return "float64"
    if dtype == torch.float32:
        return "tf32" if tf32 else "tf32x3"
    return "16-bit"


# CUDA-core float32 FMAs priced in tensor-core multiply-adds, at an H100 SXM's dense peaks (33.5 T FMA/s on
# the CUDA cores; tensor-core MACs: 16-bit 495 T/s, TF32 247 T/s, TF32 off: tf32x3, a third of that;
# float64: the backward's products run on the CUDA cores too, mma_grad_operand). Model figures.
FMA_COST_IN_MACS = {"16-bit": 14.8, "tf32": 7.4, "tf32x3": 2.5, "float64": 1.0}


def _weight_adjoint_pays(geo: _Geom, dtype, tf32: bool, pooled_window: int, prefilter: tuple, adjoint: tuple) -> bool:
    """Whether upsample's weight gradient takes the adjoint route (pp_bwd_weight_adjoint_kernel): its
    time by model, MACs + CUDA-core FMAs x FMA_COST_IN_MACS[dtype] (_weight_route_costs), is no more
    than the prefilter route's. The adjoint runs one convolution's products at stride 1 (s^2 at stride s:
    its reduction runs over the input pixels) against the prefilter's two, but its c side is padded to
    16 and it builds G per c tile: it loses on few input channels a group (the 3-channel stems: 16 / 3
    of the products, and G's FMAs over 3 channels) and on strided layers."""
    fma_cost = FMA_COST_IN_MACS[_precision(dtype, tf32)]
    (pre_macs, pre_fmas), (adj_macs, adj_fmas) = _weight_route_costs(geo, pooled_window, prefilter, adjoint)
    return adj_macs + fma_cost * adj_fmas <= pre_macs + fma_cost * pre_fmas


def _num_sms(device) -> int:
    try:
        return torch.cuda.get_device_properties(device).multi_processor_count
    except Exception:  # pragma: no cover
        return 108


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------
def _tiles(block_m, block_n, block_k, num_warps, num_stages) -> dict:
    """A GEMM kernel's tile and launch keywords, from a (_fwd_config / _bwd_config) tuple."""
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages)


def _tensor_or(t: Optional[Tensor], stand_in: Tensor) -> Tensor:
    """t made contiguous, or for an absent t a tensor the kernel does not read (its flag is off)."""
    return stand_in if t is None else t.contiguous()


def _groups_per_tile(c_out: int, c_out_per_group: int, block_n: int) -> int:
    """The most groups one tile of block_n output channels touches (a tile may straddle groups)."""
    return max(
        min(n0 + block_n, c_out) // c_out_per_group
        - n0 // c_out_per_group
        + (min(n0 + block_n, c_out) % c_out_per_group != 0)
        for n0 in range(0, c_out, block_n)
    )


def forward(args, config: LaunchConfig = DEFAULT_LAUNCH) -> tuple[Tensor, Tensor]:
    """The forward op (args: an ops.ForwardArgs): (output, packed masks), as ops.forward_fake describes."""
    check_forward(args)
    y, masks, _ = _forward(args, config)
    return y, masks


def _forward(args, config: LaunchConfig, write_y: bool = True, grad_output: Optional[Tensor] = None):
    """(y, masks, gradient sums). The backward's recompute passes write_y=False (y is then a placeholder)
    and, for the alpha gradient, grad_output: the sums [2, C_out] (accumulator dtype) are then alpha's and
    b_out's gradients but for the sign of the first, sum g * relu(Q') and sum g per channel (None otherwise)."""
    x = args.input.contiguous()
    w = args.weight.contiguous()
    geo = _Geom(x, w, args)
    N, C_out, Ho, Wo = geo.N, geo.C_out, geo.Ho, geo.Wo
    dtype, dev = x.dtype, x.device
    is_fp64 = dtype == torch.float64
    acc_dtype = torch.float64 if is_fp64 else torch.float32
    dual_output, save_masks = bool(args.dual_output), bool(args.save_masks)

    wp = _fwd_matrix(w)
    # upsample: the pull kernel's own matrix, for tiles whose input is not finite (kernels/forward.py)
    wq = (
        _fwd_matrix(pull_kernel_from_operands(w, None, args.pull_rows, args.pull_cols))
        if geo.mode == MODE_UPSAMPLE
        else wp
    )
    pull_idx, pull_coef = _prefilter_operands(geo, args, x, acc_dtype)
    shift, b_in, b_out, alpha_v = (
        _tensor_or(t, wp) for t in (args.pull_shift, args.bias_in, args.bias_out, args.alpha)
    )

    if write_y:
        y = torch.empty((N, (2 if dual_output else 1) * C_out, Ho, Wo), dtype=dtype, device=dev)
    else:  # unused outputs get their own placeholders: no written argument aliases another one
        y = x.new_empty(1)
    if save_masks:
        masks = torch.empty(mask_bytes(N, C_out, Ho, Wo), dtype=torch.uint8, device=dev)
    else:
        masks = torch.empty(0, dtype=torch.uint8, device=dev)
    mask_arg = masks if save_masks else torch.empty(1, dtype=torch.uint8, device=dev)

    avg = int(args.avg_kernel) if args.avg_kernel > 1 else 1
    gpu, upsample, tf32 = config.gpu_tuned(x), geo.mode == MODE_UPSAMPLE, config.allow_tf32(x)
    tiles = _fwd_config(dtype, gpu, C_out, geo.Cgo, upsample=upsample, tf32=tf32)
    eh = ew = 1
    scratch = False
    taps = _tap_plan(geo, dtype, gpu, avg) if upsample else None
    if taps is not None and not _tap_route(geo, dtype, gpu, tf32, avg, taps, config):
        taps = None
    if taps is not None:
        tiles, (eh, ew), halo = taps[0], taps[1][1:], taps[2]
    elif avg > 1:
        fused = _fwd_config(dtype, gpu, C_out, geo.Cgo, upsample=upsample, avg=avg, tf32=tf32)
        block_m, eh, ew = _frame_tile(fused[0], _frame_halo((0, 0), avg), Ho, Wo)
        fused = (block_m, *fused[1:])
        scratch = config.pool_path == "scratch" or (
            config.pool_path is None and not _fused_pooling_pays(geo, dtype, tf32, fused, eh, ew, avg, tiles)
        )
        if not scratch:
            tiles = fused
    BM, BN = tiles[:2]
    if taps is not None:  # one program per frame of one image, the taps' and the pooling's halos included
        pixel_tiles = N * _frame_tiles(eh, ew, _frame_halo(halo, avg), Ho, Wo)
    elif avg > 1 and not scratch:  # one program per 2-D tile of one image, its pooling halo included
        pixel_tiles = N * _frame_tiles(eh, ew, _frame_halo((0, 0), avg), Ho, Wo)
    else:
        pixel_tiles = triton.cdiv(N * Ho * Wo, BM)
    if scratch:
        pbuf = torch.empty((N, C_out, Ho, Wo), dtype=acc_dtype, device=dev)
        qbuf = torch.empty_like(pbuf)
    else:  # unused outputs get their own placeholders: no written argument aliases another one
        pbuf, qbuf = x.new_empty(1, dtype=acc_dtype), x.new_empty(1, dtype=acc_dtype)
    grid = (pixel_tiles, triton.cdiv(C_out, BN))
    # Scratch path: the pooling epilogue's programs, half the conv tile's pixels (a [128, 64] tile of window
    # offsets spills, benchmarks/tuning.md).
    pool_bm = BM // 2 if gpu else BM
    epilogue_tiles = triton.cdiv(N * Ho * Wo, pool_bm) if scratch else pixel_tiles
    grad_sums = grad_output is not None
    if grad_sums:  # each epilogue tile's partial sums, [pixel tiles, 2, C_out]
        sums = torch.empty((epilogue_tiles, 2, C_out), dtype=acc_dtype, device=dev)
        g = grad_output.contiguous()
    else:
        sums, g = x.new_empty(1, dtype=acc_dtype), x
    ng_tile = _groups_per_tile(C_out, geo.Cgo, BN)
    epilogue = dict(
        HAS_BOUT=args.bias_out is not None,
        DUAL=dual_output,
        SAVE_MASKS=save_masks,
        WRITE_Y=write_y,
        GRAD_SUMS=grad_sums,
    )
    if taps is not None:
        config.launch(_k.pp_fwd_tap_kernel)[grid](
            *(x, wp, wq, pull_idx, pull_coef, b_in, b_out, alpha_v, y, mask_arg, g, sums),
            *geo.sizes(),
            *(geo.Cg, geo.Cgo, *geo.push_pad, *geo.dilation, geo.kh, geo.kw, ng_tile, *geo.pull_window()),
            **epilogue,
            HAS_BIN=args.bias_in is not None,
            AVG=avg,
            EH=eh,
            EW=ew,
            HALO_H=halo[0],
            HALO_W=halo[1],
            IS_FP64=is_fp64,
            ALLOW_TF32=tf32,
            STRADDLE=ng_tile > 1,
            **_tiles(*tiles),
        )
        return y, masks, (sums.sum(0) if grad_sums else None)
    config.launch(_k.pp_fwd_conv_kernel)[grid](
        *(x, wp, wq, pull_idx, pull_coef, shift, b_in, b_out, alpha_v, y, mask_arg, pbuf, qbuf, g, sums),
        *geo.sizes(),
        *(geo.Cg, geo.Cgo, *geo.push_window(), ng_tile, *geo.pull_window()),
        **epilogue,
        MODE=geo.mode,
        HAS_BIN=args.bias_in is not None,
        AVG=avg,
        POOL_EH=eh,
        POOL_EW=ew,
        POOL_SCRATCH=scratch,
        IS_FP64=is_fp64,
        ALLOW_TF32=tf32,
        STRADDLE=ng_tile > 1,
        **_tiles(*tiles),
    )
    if scratch:
        config.launch(_k.pp_fwd_pool_epilogue_kernel)[(epilogue_tiles, grid[1])](
            *(pbuf, qbuf, b_in, b_out, alpha_v, y, mask_arg, g, sums),
            *(N, C_out, Ho, Wo, *_pool_window(avg)),
            **epilogue,
            BLOCK_M=pool_bm,
            BLOCK_N=BN,
            num_warps=tiles[3],
        )
    return y, masks, (sums.sum(0) if grad_sums else None)


# Machine balance, tensor-core multiply-adds per byte of DRAM traffic, at which _fused_pooling_pays prices
# the two pooled paths: an H100 SXM's dense peaks over its 3.35 TB/s (bfloat16 / float16 989 TFLOPS, TF32
# 494, TF32 off: tf32x3, a third of that, float64 67). Model figures, not measurements.
MACS_PER_BYTE = {"16-bit": 148.0, "tf32": 74.0, "tf32x3": 25.0, "float64": 10.0}


def _pooled_path_costs(geo: _Geom, dtype, tiles: tuple, rows: int, scratch: bool) -> tuple[int, int]:
    """(tensor-core MACs, compulsory bytes) of a pooled forward computing `rows` tile rows with `tiles`
    (cost_model's counting, without straddling groups and the weights): through the scratch fields, 2 writes
    and 2 reads of an accumulator-dtype field more; upsample, 2 products per chunk."""
    block_n, block_k = tiles[1], tiles[2]
    k_pad = triton.cdiv(geo.Cg * geo.kh * geo.kw, block_k) * block_k
    products = 2 if geo.mode == MODE_UPSAMPLE else 1
    macs = rows * triton.cdiv(geo.C_out, block_n) * block_n * k_pad * products
    es = dtype.itemsize
    field = geo.N * geo.C_out * geo.Ho * geo.Wo
    nbytes = geo.N * geo.C_in * geo.H * geo.W * es + field * es + field // 4
    if scratch:
        nbytes += 4 * field * (8 if dtype == torch.float64 else 4)
    return macs, nbytes


def _fused_pooling_pays(geo: _Geom, dtype, tf32: bool, fused: tuple, eh: int, ew: int, avg: int, flat: tuple) -> bool:
    """Whether the fused pooled forward (halo recomputed, y written once) is modeled no slower than the
    scratch path (flat tiles `flat`, P / Q through two fields, a second launch): by a roofline, each path's
    time max(MACs / MACS_PER_BYTE[dtype], bytes). The fused path's halo products cost more than the scratch
    fields' 16 (float64: 32) bytes an output element where the products dominate: wide layers (e.g. 64
    channels x 3 x 3) in float32 with TF32 off or float64, and upsample (two products) with large windows."""
    balance = MACS_PER_BYTE[_precision(dtype, tf32)]
    rows_fused = geo.N * _frame_tiles(eh, ew, _frame_halo((0, 0), avg), geo.Ho, geo.Wo) * fused[0]
    rows_flat = triton.cdiv(geo.N * geo.Ho * geo.Wo, flat[0]) * flat[0]
    t_fused, t_scratch = (
        max(macs / balance, nbytes)
        for macs, nbytes in (
            _pooled_path_costs(geo, dtype, fused, rows_fused, False),
            _pooled_path_costs(geo, dtype, flat, rows_flat, True),
        )
    )
    return t_fused <= t_scratch


def _pool_window(avg_kernel: int) -> tuple[int, int]:
    """The pooling backward kernels' arguments: the window and its half width."""
    return int(avg_kernel), (int(avg_kernel) - 1) // 2


def _frame_halo(tap_halo: tuple[int, int], avg: int) -> tuple[int, int]:
    """The rows and columns a frame computes beyond its outputs: the tap path's one-sided halo
    (kernels/forward_taps.py; (0, 0) on the prefilter route) and the pooling halo on both sides."""
    return tap_halo[0] + avg - 1, tap_halo[1] + avg - 1


def _frame_tiles(eh: int, ew: int, halo: tuple[int, int], ho: int, wo: int) -> int:
    """Frames of eh x ew pixels (halo included) per Ho x Wo image: (eh - halo[0]) x (ew - halo[1]) outputs each."""
    return triton.cdiv(ho, eh - halo[0]) * triton.cdiv(wo, ew - halo[1])


@functools.lru_cache(maxsize=256)
def _frame_tile(max_block_m: int, halo: tuple[int, int], ho: int, wo: int) -> tuple[int, int, int]:
    """The pixel tile of the forward's 2-D frames (the fused pooled forward, the tap path): (BLOCK_M, EH, EW),
    EH x EW pixels of one image (halo included, EH * EW <= BLOCK_M, BLOCK_M a power of two from max_block_m
    down to 32, or the least that holds one output and its halo) such that the rows computed per image
    (frames x BLOCK_M: outputs, recomputed halo, padding rows and rows past the image's edge) are fewest;
    then the fewer frames (the larger BLOCK_M), then the squarest."""
    hh, hw = halo
    max_block_m = max(max_block_m, triton.next_power_of_2((hh + 1) * (hw + 1)))
    best = None
    block_m = max_block_m
    while block_m >= min(32, max_block_m) and block_m >= (hh + 1) * (hw + 1):
        for ew in range(hw + 1, block_m // (hh + 1) + 1):
            # no taller or wider than the image and its halo need
            eh, ew_ = min(block_m // ew, ho + hh), min(ew, wo + hw)
            tiles = _frame_tiles(eh, ew_, halo, ho, wo)
            key = (tiles * block_m, tiles, abs(eh - ew_))
            if best is None or key < best[0]:
                best = (key, (block_m, eh, ew_))
        block_m //= 2
    return best[1]


# ----------------------------------------------------------------------------------------------
# The tap path (upsample at stride 1, kernels/forward_taps.py)
# ----------------------------------------------------------------------------------------------
def _tap_shifts(taps: int, pull_size: int, dilation: int, pad: int, pull_pad: int) -> list[list[int]]:
    """Per push tap along one axis, the shifts its tap response is read at (the push shift, then the pull
    shifts of its column of U's (V's) nonzeros), for the bilinear pull matrix of these sizes."""
    return [
        [t * dilation - pad] + [a * dilation - pull_pad for a in rows]
        for t, rows in enumerate(_column_rows(taps, pull_size))
    ]


def tap_axes(geo: _Geom) -> tuple[tuple, tuple]:
    """The tap path's geometry along the rows and along the columns: (push taps, pull size, dilation,
    push padding, pull padding) each, the arguments of _tap_shifts."""
    return tuple(
        (t, q, d, p, qp)
        for t, q, d, p, qp in zip((geo.kh, geo.kw), geo.q_size, geo.dilation, geo.push_pad, geo.pull_pad)
    )


def tap_halo(axes: tuple) -> tuple[int, int]:
    """The tap path's one-sided halo (rows, columns): the largest span of a push tap's shifts, for the
    bilinear pull matrices (wider spans of other matrices run in several frames). axes: tap_axes."""
    return tuple(max(max(s) - min(s) for s in _tap_shifts(*axis)) for axis in axes)


def tap_shift_adds(axes: tuple) -> int:
    """Shift-adds (a gather of a tile row and an FMA) per element of the tap path's tile, for the bilinear
    pull matrices: the push shift per tap, V's nonzeros along the row per tap, U's down the column per push
    row (kernels/forward_taps.py). axes: tap_axes."""
    (kh, *_), (kw, *_) = axes
    pull_rows, pull_cols = ([len(s) - 1 for s in _tap_shifts(*axis)] for axis in axes)
    return kh * kw + kh * sum(pull_cols) + sum(pull_rows)


def _tap_config(dtype, gpu: bool) -> tuple:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of the tap path: frames as tall as the registers
    allow (the halo is recomputed per frame) and 16 channels: P, Q, Z and R live in registers at once, with
    the gathers' index and result tiles (benchmarks/tuning.md)."""
    if not gpu:  # interpreter: one frame holds the tests' small maps
        return 128, 16, 32, 4, 1
    if dtype == torch.float64:  # taken only where forced (_tap_route): spills 16-24 B on sm_80
        return 256, 16, 8, 8, 1
    # 512-row frames (1.63x the products on 56 x 56, not 1.96x) spilled 32-96 B at the 255-register cap
    return 256, 16, _block_k(dtype), 8, 2


# The largest frame the tap path takes (larger halos, e.g. dilated kernels, take the prefilter route).
MAX_TAP_FRAME = 1024


def _tap_plan(geo: _Geom, dtype, gpu: bool, avg: int):
    """(tiles, (BLOCK_M, EH, EW), halo) of the tap path for this layer, or None where it does not apply
    (stride > 1, or a frame larger than MAX_TAP_FRAME)."""
    if geo.stride != (1, 1):
        return None
    halo = tap_halo(tap_axes(geo))
    tiles = _tap_config(dtype, gpu)
    frame = _frame_tile(tiles[0], _frame_halo(halo, avg), geo.Ho, geo.Wo)
    if frame[0] > MAX_TAP_FRAME:
        return None
    return (frame[0], *tiles[1:]), frame, halo


def _tap_route(geo: _Geom, dtype, gpu: bool, tf32: bool, avg: int, plan: tuple, config: LaunchConfig) -> bool:
    """Whether the forward takes the tap path: as forced by config.upsample_path, else by _tap_path_pays."""
    if config.upsample_path is not None:
        return config.upsample_path == "taps"
    if gpu and dtype == torch.float64:  # its float64 frames spill on sm_80 (16-136 B: benchmarks/tuning.md)
        return False
    return _tap_path_pays(geo, dtype, gpu, tf32, avg, plan)


def _tap_route_costs(geo: _Geom, dtype, gpu: bool, tf32: bool, avg: int, plan: tuple) -> tuple:
    """((MACs, CUDA-core operations) of the tap path, the same of the prefilter route), counted as they
    execute (cost_model's counting: frames and tiles padded to whole blocks). Tap path: one MMA per
    (tap, channel chunk) on every frame row, tap_shift_adds per tile element; prefilter: two MMAs per
    chunk of the (tap, channel) reduction, z built once per channel tile (prefilter_visits FMAs an element;
    without pooling, flat tiles)."""
    tiles, (block_m, eh, ew), halo = plan
    taps = geo.kh * geo.kw
    cols = geo.G * _padded(geo.Cgo, tiles[1])  # channel tiles, about one group each
    rows = geo.N * _frame_tiles(eh, ew, _frame_halo(halo, avg), geo.Ho, geo.Wo) * block_m
    tap_costs = (rows * cols * taps * _padded(geo.Cg, tiles[2]), rows * cols * tap_shift_adds(tap_axes(geo)))
    bm, bn, bk = _fwd_config(dtype, gpu, geo.C_out, geo.Cgo, upsample=True, avg=avg, tf32=tf32)[:3]
    reduction = _padded(taps * geo.Cg, bk)
    if avg > 1:
        _, peh, pew = _frame_tile(bm, _frame_halo((0, 0), avg), geo.Ho, geo.Wo)
        rows = geo.N * _frame_tiles(peh, pew, _frame_halo((0, 0), avg), geo.Ho, geo.Wo) * bm
    else:
        rows = _padded(geo.N * geo.Ho * geo.Wo, bm)
    cols = geo.G * _padded(geo.Cgo, bn)
    visits = prefilter_visits(geo.kh, geo.kw, *geo.q_size, geo.Cg, bk)
    pre_costs = (2 * rows * cols * reduction, rows * reduction * (cols // bn) * visits)
    return tap_costs, pre_costs


def _tap_path_pays(geo: _Geom, dtype, gpu: bool, tf32: bool, avg: int, plan: tuple) -> bool:
    """Whether the tap path is modeled no slower than the prefilter route: MACs + CUDA-core operations x
    FMA_COST_IN_MACS[dtype] (_tap_route_costs), a shift-add priced as one FMA (its gather stays on chip, as
    the pooled forward's box sum). A model, to be set from the first GPU timings of both (LaunchConfig's
    upsample_path forces either): the tap path saves the second MMA of every chunk but adds ~53 shift-adds
    per tile element (3 x 3 at scale 2) and recomputes its frames' halo; the 3-channel stem pads its
    per-tap channel chunk (3 of 16) and keeps the prefilter route."""
    fma_cost = FMA_COST_IN_MACS[_precision(dtype, tf32)]
    (tap_macs, tap_ops), (pre_macs, pre_ops) = _tap_route_costs(geo, dtype, gpu, tf32, avg, plan)
    return tap_macs + fma_cost * tap_ops <= pre_macs + fma_cost * pre_ops


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------
def _channel_sum(t: Tensor, acc_dtype) -> Tensor:
    """Sum over (n, h, w) per channel, accumulated in acc_dtype (deterministic torch reduction)."""
    return t.sum(dim=(0, 2, 3), dtype=acc_dtype)


def _pixel_split(n_tiles: int, k_pix: int, block_k: int, gpu: bool, device, override: Optional[int]) -> tuple[int, int]:
    """(split, pixels per split) of a deterministic reduction over k_pix pixels (weight gradient, bias
    gradient): enough programs to fill the GPU, each writing its own partial buffer, each split a whole
    number of block_k chunks (so the split count may shrink to cover k_pix exactly)."""
    if override is not None:
        split = max(1, min(int(override), triton.cdiv(k_pix, block_k)))
    elif not gpu:
        split = 1
    else:
        target = 2 * _num_sms(device)
        # keep at least 8 K-steps per program, at most 256 partial buffers
        split = max(1, min(triton.cdiv(target, max(n_tiles, 1)), triton.cdiv(k_pix, 8 * block_k), 256))
    per_split = _padded(triton.cdiv(k_pix, split), block_k)
    return triton.cdiv(k_pix, per_split), per_split


def backward(args, config: LaunchConfig = DEFAULT_LAUNCH) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The backward op (args: an ops.BackwardArgs): the gradients of ops.GRADIENTS, empty where not asked."""
    check_backward(args)
    # input / weight may be shape-only placeholders (expanded 0-d tensors) when the gradients asked
    # for do not read them: make them contiguous only where they are read.
    x, w = args.input, args.weight
    g = args.grad_output.contiguous()
    geo = _Geom(x, w, args)
    N, C_out, Ho, Wo, G, Cg, Cgo = geo.N, geo.C_out, geo.Ho, geo.Wo, geo.G, geo.Cg, geo.Cgo
    dtype, dev = x.dtype, x.device
    is_fp64 = dtype == torch.float64
    acc_dtype = torch.float64 if is_fp64 else torch.float32
    tf32 = config.allow_tf32(x)
    mode = geo.mode
    dual_output, masks, pull_shift = bool(args.dual_output), args.masks, args.pull_shift
    pooled = args.avg_kernel > 1
    output_mask = args.output_mask
    want = [bool(b) for b in output_mask] + [False] * (6 - len(output_mask))
    if pull_shift is None:
        want[2] = False
    out = [x.new_empty(0) for _ in range(6)]
    if output_mask[2] and pull_shift is None:  # asked for but absent: zeros, shaped as the fake kernel says
        out[2] = torch.zeros(C_out, dtype=dtype, device=dev)
    alpha_v = args.alpha.contiguous()

    # Recompute what forward did not keep, in one forward pass that writes no output: the masks when not
    # saved, and for the alpha gradient (d y / d alpha[o] = -relu(Q')[o]) the sums of g * relu(Q') and,
    # while it reads g, of g (b_out's gradient).
    need_fields = any(want[:4])
    need_alpha = want[5] and not dual_output
    sums = None
    if (need_fields and masks.numel() == 0) or need_alpha:
        recompute = args.forward_args(save_masks=need_fields and masks.numel() == 0)
        recompute = recompute._replace(input=x.contiguous(), weight=w.contiguous(), alpha=alpha_v)
        _, m2, sums = _forward(recompute, config, write_y=False, grad_output=g if need_alpha else None)
        if masks.numel() == 0:
            masks = m2
        if need_alpha:
            out[5] = (-sums[0]).to(dtype)
    if want[5] and dual_output:
        out[5] = torch.zeros(C_out, dtype=dtype, device=dev)  # alpha is unused by the dual output
    if want[4]:  # (bias_out cannot come with the dual output; zeros there, shaped as the fake kernel says)
        if dual_output:
            out[4] = torch.zeros(C_out, dtype=dtype, device=dev)
        else:
            # (a copy: a view into the sums would be an output with a storage offset, unlike the fake kernel's)
            out[4] = sums[1].to(dtype, copy=True) if sums is not None else _channel_sum(g, acc_dtype).to(dtype)
    if not need_fields:
        return tuple(out)
    masks = masks.contiguous()
    flags = dict(MODE=mode, DUAL=dual_output, POOLED=pooled, IS_FP64=is_fp64)

    # 1. bias_in gradient: sum_p gP - sum_p gQ per channel, one reduction over g and the masks.
    if want[3]:
        BM, BN, _, nw, _ = _fwd_config(dtype, config.gpu_tuned(x), C_out, C_out)
        if config.gpu_tuned(x):  # half the rows: a [128, 64] tile spills (benchmarks/tuning.md)
            BM //= 2
        p_total = N * Ho * Wo
        n_c_tiles = triton.cdiv(C_out, BN)
        split, pix_per_split = _pixel_split(n_c_tiles, p_total, BM, config.gpu_tuned(x), dev, config.bias_split)
        part = torch.empty((split, C_out), dtype=acc_dtype, device=dev)
        config.launch(_kb.pp_bwd_bias_kernel)[(n_c_tiles, split)](
            *(g, masks, alpha_v, part, N, C_out, Ho, Wo, pix_per_split),
            DUAL=dual_output,
            IS_FP64=is_fp64,
            BLOCK_M=BM,
            BLOCK_N=BN,
            num_warps=nw,
        )
        out[3] = part.sum(0).to(dtype)

    pool_window = _pool_window(args.avg_kernel)
    pull_tables = _prefilter_operands(geo, args, x, acc_dtype)  # both GEMM kernels' (upsample)
    tiles = _bwd_config(
        dtype, config.gpu_tuned(x), Cg, pooled=pooled, reduction=geo.kh * geo.kw * Cgo, upsample=mode == MODE_UPSAMPLE
    )
    BM, BN = tiles[:2]

    # 2. Input gradient (gP / gQ formed from g and the masks as the A operand is loaded).
    if want[0]:
        # upsample too runs against the push kernel alone: its pull gradient goes through the
        # prefilter's adjoint (kernels/backward.py pull_prefilter_adjoint), from the same tables
        wpt = _bwd_matrix(w.contiguous(), G)
        shift = pull_shift.contiguous() if mode == MODE_INVERT else alpha_v
        gx = torch.empty(x.shape, dtype=dtype, device=dev)
        grid = (triton.cdiv(N * geo.H * geo.W, BM), triton.cdiv(Cg, BN), G)
        config.launch(_kb.pp_bwd_input_kernel)[grid](
            *(g, masks, alpha_v, shift, wpt, *pull_tables, gx),
            *(*geo.sizes(), G, Cg, Cgo, *geo.push_window(), *geo.pull_window(), *pool_window),
            **flags,
            ALLOW_TF32=tf32,
            **_tiles(*tiles),
        )
        out[0] = gx

    # 3. Weight gradient (and, for invert, the pull_shift gradient).
    if want[1] and mode == MODE_UPSAMPLE and _weight_route(geo, args, config, x) == "adjoint":
        out[1] = _weight_gradient_adjoint(geo, args, config, x.contiguous(), g, masks, alpha_v, pull_tables)
    elif want[1] or want[2]:
        tiles = _bwd_config(dtype, config.gpu_tuned(x), Cgo, weight_kernel=True, pooled=pooled)
        BM, BN, BK = tiles[:3]
        x = x.contiguous()
        k_total = geo.kh * geo.kw * Cg
        n_o_tiles = triton.cdiv(Cgo, BM)
        n_r_tiles = triton.cdiv(k_total, BN)
        p_total = N * Ho * Wo
        split, pix_per_split = _pixel_split(
            G * n_o_tiles * n_r_tiles, p_total, BK, config.gpu_tuned(x), dev, config.weight_split
        )
        need_w = bool(want[1])

        def buf(*shape):  # written outputs, each its own tensor (placeholders of size 1 when unused)
            return torch.empty(shape, dtype=acc_dtype, device=dev)

        gw = buf(split, C_out, k_total) if need_w else buf(1)
        gs = buf(split, n_r_tiles, C_out) if mode == MODE_INVERT else buf(1)
        grid = (G * n_o_tiles, n_r_tiles, split)
        config.launch(_kb.pp_bwd_weight_kernel)[grid](
            *(x, g, masks, alpha_v, *pull_tables, gw, gs),
            *(*geo.sizes(), Cg, Cgo, *geo.push_window(), *geo.pull_window(), *pool_window),
            *(pix_per_split, n_o_tiles, n_r_tiles),
            **flags,
            NEED_W=need_w,
            ALLOW_TF32=tf32,
            **_tiles(*tiles),
        )
        if need_w:
            out[1] = _weight_from_partials(gw, geo, dtype)
        if want[2]:
            out[2] = gs.sum(dim=(0, 1)).to(dtype)
    return tuple(out)


def _weight_route(geo: _Geom, args, config: LaunchConfig, x: Tensor) -> str:
    """Upsample's weight-gradient route: config.weight_grad_path, or by _weight_adjoint_pays."""
    if config.weight_grad_path is not None:
        return config.weight_grad_path
    gpu, pooled = config.gpu_tuned(x), args.avg_kernel > 1
    prefilter = _bwd_config(x.dtype, gpu, geo.Cgo, weight_kernel=True, pooled=pooled)
    adjoint = _bwd_weight_adjoint_config(x.dtype, gpu, geo.Cgo, geo.Cg, pooled)
    window = int(args.avg_kernel) ** 2 if pooled else 1
    pays = _weight_adjoint_pays(geo, x.dtype, config.allow_tf32(x), window, prefilter, adjoint)
    return "adjoint" if pays else "prefilter"


def _weight_gradient_adjoint(geo: _Geom, args, config: LaunchConfig, x, g, masks, alpha_v, pull_tables) -> Tensor:
    """Upsample's weight gradient on the prefilter's adjoint (kernels/backward.py
    pp_bwd_weight_adjoint_kernel): one program per (group, o tile) x (push tap, c tile) x split, the
    split-K over the input pixels deterministic (partials [split, C_out, (tap, c)] summed here)."""
    dtype, dev, pooled = x.dtype, x.device, args.avg_kernel > 1
    acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    tiles = _bwd_weight_adjoint_config(dtype, config.gpu_tuned(x), geo.Cgo, geo.Cg, pooled)
    BM, BN, BK = tiles[:3]
    taps, k_total = geo.kh * geo.kw, geo.kh * geo.kw * geo.Cg
    n_o_tiles, n_c_tiles = triton.cdiv(geo.Cgo, BM), triton.cdiv(geo.Cg, BN)
    p_total = geo.N * geo.H * geo.W  # the reduction runs over the input pixels
    programs = geo.G * n_o_tiles * taps * n_c_tiles
    split, pix_per_split = _pixel_split(programs, p_total, BK, config.gpu_tuned(x), dev, config.weight_split)
    gw = torch.empty((split, geo.C_out, k_total), dtype=acc_dtype, device=dev)
    config.launch(_kb.pp_bwd_weight_adjoint_kernel)[(geo.G * n_o_tiles, taps * n_c_tiles, split)](
        *(x, g, masks, alpha_v, *pull_tables, gw),
        *(*geo.sizes(), geo.Cg, geo.Cgo, *geo.push_window(), *geo.pull_window(), *_pool_window(args.avg_kernel)),
        *(pix_per_split, n_o_tiles, n_c_tiles),
        DUAL=bool(args.dual_output),
        POOLED=pooled,
        IS_FP64=dtype == torch.float64,
        ALLOW_TF32=config.allow_tf32(x),
        **_tiles(*tiles),
    )
    return _weight_from_partials(gw, geo, dtype)


def _weight_from_partials(gw: Tensor, geo: _Geom, dtype) -> Tensor:
    """The weight gradient [C_out, Cg, kh, kw] in `dtype` from both routes' partials [split, C_out, (tap, c)]."""
    gk = gw.sum(0).view(geo.C_out, geo.kh, geo.kw, geo.Cg).permute(0, 3, 1, 2)
    return gk.to(dtype).contiguous()
