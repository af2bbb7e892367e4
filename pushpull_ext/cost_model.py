"""What the Triton path of a layer costs, by model: multiply-adds and bytes of every launch, next to one
convolution's.

    python -m pushpull_ext.cost_model [--shapes NAME|N,Cin,Cout,H,W,k,stride,pad,pull[,scale|avg] ...]
                                      [--dtype float32 bfloat16 ...] [--markdown]

No GPU and no kernel runs. The launcher itself (triton_launch.forward / backward, with the GPU tiles)
runs a training step of the layer on meta tensors, with a launch wrapper that records each kernel's grid
and arguments instead of launching it, and a dispatch mode that records the torch operations between
the launches: so the launches, tiles, split factors and scratch buffers are the launcher's own
decisions, at the paper's batch. Each recorded launch is then priced:

- multiply-adds (MACs): the tensor-core products the kernel executes, counted as it executes them: every
  program of the grid, every K-chunk of its reduction loop at its BLOCK_K (a partial last chunk costs a
  whole one), one MMA per chunk. With pooling the forward's programs are 2-D tiles of one image with the
  pooling halo: their rows (halo recomputed by the neighbouring tiles, padding rows to BLOCK_M, tiles past
  the image's edge) are all counted, and the note gives them per output pixel (where the launcher's
  roofline rule, triton_launch._fused_pooling_pays, takes the scratch path instead, its two launches are
  priced as they are: flat tiles, P / Q fields written and read). Upsample's forward and its weight gradient
  on the prefilter route (the prefilter algebra, kernels/common.py `pull_prefilter`) run two MMAs per chunk
  of the push kernel's reduction: the push operand and the prefiltered z against the same weights; its
  input gradient one MMA per chunk of the same reduction (push taps x output channels: the prefilter's
  adjoint, kernels/backward.py `pull_prefilter_adjoint`, forms gP + the pulled gQ as one operand G), and
  upsample's forward on the tap path (pp_fwd_tap_kernel, where the launcher's rule
  triton_launch._tap_path_pays takes it) one MMA per (push tap, channel chunk) on every row of its 2-D
  frames (the halo recomputed: the note gives the frames' rows per output pixel; its shift-adds on the
  CUDA cores, gathers of the accumulator tile's rows each with an FMA, in the note too), and
  its weight gradient on the adjoint route (pp_bwd_weight_adjoint_kernel, where the launcher's rule
  triton_launch._weight_adjoint_pays takes it) one MMA per chunk of the input pixels for each push tap's
  output x input channel tile, against the same G. The prefilter's own
  multiply-adds on the CUDA cores (every element of z or G: one per nonzero U[a, i] V[b, j] pair its loops
  visit, for the bilinear pull matrices of the case; with pooling each visit of G also sums an a x a
  window of g) are in the launch's note, as a fraction of its MACs. The forward's exact fallback for tiles with a non-finite input is not counted. A
  float32 product with TF32 off is three tensor-core MMAs (tf32x3); it is counted once here. Torch's
  weight-sized work (the pull kernel, the prefilter tables) is not counted.
- bytes: compulsory global-memory traffic of each launch: every tensor it reads, read once, and every
  tensor it writes, written once (the conv halo, the pooled forward's halo tiles and re-reads of the same
  tensor by other programs assumed served by cache; the pooled forward keeps Q's halo on chip, so it writes
  y and the masks once, as without pooling; `note` says where a tensor is swept by several tile columns).
  Placeholder arguments (the launcher's size-1 tensors for unused outputs) cost their size, i.e. nothing.
  For torch operations: their tensor arguments read, their outputs written (views and empty allocations
  free).

The lower bound of a phase (`lower_bound`): one convolution's products N*Ho*Wo*C_out*C_in/groups*kh*kw
for the forward, and that once per gradient of input and weight for the backward; bytes: the forward
reads x once and writes y once and the two masks at 1 bit per channel and pixel; the backward reads
grad_output, the masks and (weight gradient) x once and writes grad_input once (if asked).
"""

from __future__ import annotations

import argparse
import inspect
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import triton_launch
from .compile_check import launch_backward
from .functional import forward_args
from .options import conv_output_size
from .shapes import CASES, Case, case_from_text, make_inputs

MASK_BITS = 2  # masks[0] = [P > 0] and masks[1] = [Q' > 0]: 1 bit each per channel and pixel


@dataclass(frozen=True)
class LaunchCost:
    """One kernel launch (or torch's operations between launches) of a phase."""

    phase: str  # "forward" or "backward"
    launch: str  # the kernel's name, or "torch"
    grid: tuple
    macs: int
    bytes_read: int
    bytes_written: int
    note: str = ""

    @property
    def bytes(self) -> int:
        return self.bytes_read + self.bytes_written


@dataclass(frozen=True)
class LowerBound:
    macs: int
    bytes: int


@dataclass
class PhaseCost:
    """The launches of one phase of a layer, its lower bound, and its output elements (N*C_out*Ho*Wo)."""

    case: Case
    dtype: torch.dtype
    phase: str
    launches: list[LaunchCost]
    lower: LowerBound
    outputs: int

    @property
    def macs(self) -> int:
        return sum(launch.macs for launch in self.launches)

    @property
    def bytes(self) -> int:
        return sum(launch.bytes for launch in self.launches)

    @property
    def convolution_macs(self) -> int:
        return convolution_macs(self.case)


# ---------------------------------------------------------------------------------------- recording
@dataclass
class _Recording:
    """What the launcher did, in order: ("kernel", name, grid, {argument: value}) and ("torch", read, written)."""

    phase: str = ""
    events: list = field(default_factory=list)


class _RecordLaunch:
    """Stands in for wrap_triton(kernel): kernel[grid](...) records the launch by argument name."""

    def __init__(self, kernel, recording: _Recording):
        self.kernel, self.recording = kernel, recording

    def __getitem__(self, grid):
        names = list(inspect.signature(self.kernel.fn).parameters)

        def record(*args, **kwargs):
            named = {**dict(zip(names, args)), **kwargs}
            self.recording.events.append((self.recording.phase, "kernel", self.kernel.fn.__name__, tuple(grid), named))

        return record


_FREE_OPS = {"empty", "new_empty", "empty_like", "empty_strided", "promote_types"}


def _tensors(values) -> list[torch.Tensor]:
    flat = []
    for v in values:
        if isinstance(v, torch.Tensor):
            flat.append(v)
        elif isinstance(v, (list, tuple)):
            flat.extend(_tensors(v))
    return flat


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class _RecordTorch(TorchDispatchMode):
    """Records each torch operation's traffic: tensor arguments read (those it writes in place excluded),
    outputs written; views and allocations move nothing."""

    def __init__(self, recording: _Recording):
        super().__init__()
        self.recording = recording

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view and func.overloadpacket.__name__ not in _FREE_OPS:
            written_in_place = {
                a.name for a in func._schema.arguments if a.alias_info is not None and a.alias_info.is_write
            }
            bound = dict(zip((a.name for a in func._schema.arguments), args), **(kwargs or {}))
            read = sum(_nbytes(t) for name, v in bound.items() if name not in written_in_place for t in _tensors([v]))
            written = sum(_nbytes(t) for t in _tensors([out]))
            self.recording.events.append((self.recording.phase, "torch", read, written))
        return out


def _meta_inputs(case: Case, dtype: torch.dtype) -> dict:
    """The case's tensors on the meta device (shapes, dtypes and requires_grad; no memory), at its batch."""
    small = make_inputs(case, batch=1, dtype=dtype).tensors
    tensors = {
        k: v.detach().to("meta").requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v
        for k, v in small.items()
    }
    x = small["input"]
    tensors["input"] = torch.empty((case.n, *x.shape[1:]), dtype=dtype, device="meta").requires_grad_(x.requires_grad)
    return tensors


def record_training_step(case: Case, dtype: torch.dtype, **config) -> list:
    """The launcher's events of a training step of `case` (forward with masks, then the backward of
    every tensor the layer trains), with the GPU tiles, on meta tensors. `config`: further LaunchConfig
    fields (e.g. a forced weight_grad_path)."""
    recording = _Recording()
    config = triton_launch.LaunchConfig(
        gpu_tiles_on_cpu=True, launch=lambda kernel: _RecordLaunch(kernel, recording), **config
    )
    t = _meta_inputs(case, dtype)
    args = forward_args(
        t["input"], t["weight"], t["bias"], save_masks=True, bias_out=t["bias_out"], alpha=t["alpha"], **case.options()
    )
    with _RecordTorch(recording):
        recording.phase = "forward"
        out, masks = triton_launch.forward(args, config=config)
        recording.phase = "backward"
        launch_backward(config, args, out, masks)
    return recording.events


# ---------------------------------------------------------------------------------------- pricing
def _tile(a: dict) -> int:
    return a["BLOCK_M"] * a["BLOCK_N"] * a["BLOCK_K"]


def _upsample(a: dict) -> bool:
    return a["MODE"] == triton_launch.MODE_UPSAMPLE


def _groups_per_channel_tile(a: dict, n_tiles: int) -> int:
    """Sum over the forward's channel tiles of the groups each one loops over (g_lo .. g_hi)."""
    bn, c_out, cgo = a["BLOCK_N"], a["C_OUT"], a["CGO"]
    return sum((min(n0 + bn, c_out) - 1) // cgo - n0 // cgo + 1 for n0 in range(0, n_tiles * bn, bn))


def _products_per_chunk(a: dict) -> int:
    """MMAs per K-chunk of the forward / weight-gradient kernels: push and prefiltered pull for upsample."""
    return 2 if _upsample(a) else 1


def _fwd_conv_macs(grid: tuple, a: dict) -> int:
    m_tiles, n_tiles = grid
    chunks = len(range(0, a["CG"] * a["TH"] * a["TW"], a["BLOCK_K"]))
    return m_tiles * _groups_per_channel_tile(a, n_tiles) * chunks * _products_per_chunk(a) * _tile(a)


def _padded_k(size: int, block_k: int) -> int:
    """A reduction of `size` as its loop executes it: whole chunks of block_k."""
    return len(range(0, size, block_k)) * block_k


def _fwd_tap_macs(grid: tuple, a: dict) -> int:
    """The tap path: per frame and group of its channel tile, one MMA per (push tap, channel chunk) (one
    frame a tap: the bilinear matrices' spans fit the launcher's halo)."""
    m_tiles, n_tiles = grid
    k = _padded_k(a["CG"], a["BLOCK_K"])
    return m_tiles * _groups_per_channel_tile(a, n_tiles) * a["TH"] * a["TW"] * k * a["BLOCK_M"] * a["BLOCK_N"]


def _bwd_input_macs(grid: tuple, a: dict) -> int:
    """One MMA per chunk of the (push tap, output channel) reduction, in every mode."""
    chunks = len(range(0, a["TH"] * a["TW"] * a["CGO"], a["BLOCK_K"]))
    return math.prod(grid) * chunks * _tile(a)


def _bwd_weight_macs(grid: tuple, a: dict) -> int:
    """Per program: per pixel chunk, the products of its r tile (upsample: push and prefiltered pull;
    otherwise the weight product if asked)."""
    go_tiles, r_tiles, split = grid
    products = _products_per_chunk(a) if (_upsample(a) or a["NEED_W"]) else 0
    chunks = len(range(0, a["PIX_PER_SPLIT"], a["BLOCK_K"]))
    return go_tiles * r_tiles * split * chunks * products * _tile(a)


def _bwd_weight_adjoint_macs(grid: tuple, a: dict) -> int:
    """Upsample's weight gradient on the adjoint: per program (one push tap, an o x c tile), one MMA per
    chunk of its split's INPUT pixels."""
    chunks = len(range(0, a["PIX_PER_SPLIT"], a["BLOCK_K"]))
    return math.prod(grid) * chunks * _tile(a)


# Where each kernel's z (or G) tiles lie on the (push tap, channel) side: (channels a tap, tile width), as
# argument names; "widest": loops bounded by the widest column pair for every tile (TILE_BOUNDS off: both
# weight-gradient routes).
_Z_TILES = {
    "pp_fwd_conv_kernel": ("CG", "BLOCK_K"),  # the reduction's chunks
    "pp_bwd_weight_kernel": "widest",
    "pp_bwd_input_kernel": ("CGO", "BLOCK_K"),  # the (tap, o) reduction's chunks
    "pp_bwd_weight_adjoint_kernel": "widest",
}


def prefilter_visits(kernel: str, a: dict) -> float:
    """U[a, i] V[b, j] pairs the loops of pull_prefilter (or its adjoint) visit for each element of z (or
    G), on average over the launch's tiles: the most nonzeros of their taps' columns of U times those of V,
    for the bilinear matrices (options.interpolation_matrix) of the launch's sizes (the launcher's count,
    triton_launch.prefilter_visits, which its weight-gradient rule prices with)."""
    tiles = _Z_TILES[kernel]
    per_tap, block = (1, None) if tiles == "widest" else (a[tiles[0]], a[tiles[1]])
    return triton_launch.prefilter_visits(a["TH"], a["TW"], a["QH"], a["QW"], per_tap, block)


def _prefilter_note(
    kernel: str, z_elements: int, a: dict, macs: int, what: str = "prefilter", per_visit: int = 1
) -> str:
    """The prefilter's (or its adjoint's) CUDA-core multiply-adds for z_elements elements of z (or G),
    per_visit each per U[a, i] V[b, j] pair, against the launch's MACs."""
    visits = prefilter_visits(kernel, a)
    fmas = round(z_elements * visits * per_visit)
    return f"{what}: {_si(fmas)} CUDA-core FMAs ({fmas / macs:.2f}x the MACs; {visits:.1f} U V pairs an element)"


def _gemm_note(kernel: str, grid: tuple, a: dict, swept: str, macs_of, z_tile_width: str) -> str:
    """What a GEMM launch sweeps more than once and, for upsample, its prefilter's work: one z tile (one
    column of the MMA's other side, z_tile_width wide) per push MMA."""
    notes = [_swept(swept, grid[1])]
    if _upsample(a):
        macs = macs_of(grid, a)
        notes.append(_prefilter_note(kernel, macs // (2 * a[z_tile_width]), a, macs))
    return "; ".join(n for n in notes if n)


def pooled_tile_overhead(grid: tuple, a: dict) -> float:
    """The pooled forward's rows computed (programs x BLOCK_M: halo recomputed by neighbouring tiles,
    padding rows, tiles past the image's edge) per output pixel: its products over an unpadded GEMM's."""
    return grid[0] * a["BLOCK_M"] / (a["N"] * a["HO"] * a["WO"])


def _fwd_conv_note(grid: tuple, a: dict) -> str:
    note = _gemm_note("pp_fwd_conv_kernel", grid, a, "x", _fwd_conv_macs, "BLOCK_N")
    if a["AVG"] > 1 and not a["POOL_SCRATCH"]:
        eh, ew, halo = a["POOL_EH"], a["POOL_EW"], a["AVG"] - 1
        pooled = (
            f"Q pooled {a['AVG']}x{a['AVG']} on chip: {eh}x{ew} tiles ({eh - halo}x{ew - halo} outputs, "
            f"BLOCK_M {a['BLOCK_M']}), products x{pooled_tile_overhead(grid, a):.2f} the output pixels' (halo recomputed), "
            f"box sum {2 * a['AVG']} on-chip gathers a tile element"
        )
        note = "; ".join(n for n in (pooled, note) if n)
    return note


def _fwd_tap_note(grid: tuple, a: dict) -> str:
    """The tap path's frames (halo recomputed) and its shift-adds on the CUDA cores (gathers of the
    accumulator tile's rows, each with an FMA), per element of its [BLOCK_M, BLOCK_N] tiles."""
    eh, ew, pool = a["EH"], a["EW"], a["AVG"] - 1
    out_h, out_w = eh - a["HALO_H"] - pool, ew - a["HALO_W"] - pool
    macs = _fwd_tap_macs(grid, a)
    per_element = triton_launch.tap_shift_adds(
        tuple(tuple(a[k + axis] for k in ("T", "Q", "D", "P", "QP")) for axis in "HW")
    )
    shift_adds = macs // (a["TH"] * a["TW"] * _padded_k(a["CG"], a["BLOCK_K"])) * per_element
    pooled = f", Q pooled {a['AVG']}x{a['AVG']} on chip" if pool else ""
    return (
        f"tap path: {eh}x{ew} frames ({out_h}x{out_w} outputs{pooled}, BLOCK_M {a['BLOCK_M']}), products "
        f"x{pooled_tile_overhead(grid, a):.2f} the output pixels' (halo recomputed); {per_element} shift-adds "
        f"a tile element: {_si(shift_adds)} CUDA-core gathers + FMAs ({shift_adds / macs:.2f}x the MACs)"
    )


def _bwd_weight_note(grid: tuple, a: dict) -> str:
    return _gemm_note("pp_bwd_weight_kernel", grid, a, "g, masks", _bwd_weight_macs, "BLOCK_M")


def _bwd_input_note(grid: tuple, a: dict) -> str:
    """g and the masks swept per channel tile; upsample: the adjoint's G, one [BLOCK_M, BLOCK_K] tile per
    MMA (built again by every channel tile), each element one FMA per visited U V pair, and with pooling
    the a x a window sum of each visit's gQ besides."""
    notes = [_swept("g, masks", grid[1])]
    if _upsample(a):
        macs = _bwd_input_macs(grid, a)
        window = a["AVG"] ** 2 if a["POOLED"] else 1
        notes.append(
            _prefilter_note("pp_bwd_input_kernel", macs // a["BLOCK_N"], a, macs, "adjoint prefilter (G)", window)
        )
    return "; ".join(n for n in notes if n)


def _bwd_weight_adjoint_note(grid: tuple, a: dict) -> str:
    """g and the masks swept once per (tap, c tile) column, x once per (o tile, tap); the adjoint's G, one
    [BLOCK_K, BLOCK_M] tile per MMA (built again by every c tile), each element one FMA per visited U V
    pair, times the a x a window sum of each visit's gQ with pooling."""
    macs = _bwd_weight_adjoint_macs(grid, a)
    window = a["AVG"] ** 2 if a["POOLED"] else 1
    taps = a["TH"] * a["TW"]
    notes = [
        _swept("g, masks", grid[1]),
        _swept("x", grid[0] * taps).replace("tile column", "o tile and tap"),
        _prefilter_note("pp_bwd_weight_adjoint_kernel", macs // a["BLOCK_N"], a, macs, "adjoint prefilter (G)", window),
    ]
    return "; ".join(n for n in notes if n)


@dataclass(frozen=True)
class _KernelModel:
    """How to price one kernel: its MACs ((grid, arguments) -> int; None: no products), the arguments it
    reads, those it writes ((arguments) -> names) and a note ((grid, arguments) -> str)."""

    macs: object
    reads: tuple
    writes: object
    note: object = None


def _swept(name: str, times: int) -> str:
    return f"{name} swept {times}x (once per tile column)" if times > 1 else ""


_EPILOGUE_READS = ("bin_ptr", "bout_ptr", "alpha_ptr", "g_ptr")


def _epilogue_writes(a: dict) -> tuple:
    """The epilogue's outputs, by its flags: y, the masks, and (the backward's recompute) the gradient sums
    (the launcher passes placeholders for the others; g_ptr, read for the sums only, is else a stand-in
    the kernel also reads)."""
    flags = ("WRITE_Y", "SAVE_MASKS", "GRAD_SUMS")
    return tuple(name for name, flag in zip(("y_ptr", "mask_ptr", "sums_ptr"), flags) if a[flag])


def _conv_writes(a: dict) -> tuple:
    """On the scratch path the conv kernel writes the P / Q scratch fields, and the pooling epilogue the rest."""
    return ("pbuf_ptr", "qbuf_ptr") if a["POOL_SCRATCH"] else _epilogue_writes(a)


KERNELS = {
    "pp_fwd_conv_kernel": _KernelModel(
        _fwd_conv_macs,
        ("x_ptr", "wp_ptr", "pull_idx_ptr", "pull_coef_ptr", "shift_ptr", *_EPILOGUE_READS),
        _conv_writes,
        _fwd_conv_note,
    ),
    "pp_fwd_tap_kernel": _KernelModel(
        _fwd_tap_macs,
        ("x_ptr", "wp_ptr", "pull_idx_ptr", "pull_coef_ptr", *_EPILOGUE_READS),
        _epilogue_writes,
        _fwd_tap_note,
    ),
    "pp_fwd_pool_epilogue_kernel": _KernelModel(
        None,
        ("pbuf_ptr", "qbuf_ptr", *_EPILOGUE_READS),
        _epilogue_writes,
        lambda grid, a: f"P, Q scratch read; Q pooled {a['AVG']}x{a['AVG']} (window re-reads cache-served)",
    ),
    "pp_bwd_bias_kernel": _KernelModel(None, ("g_ptr", "mask_ptr", "alpha_ptr"), lambda a: ("part_ptr",)),
    "pp_bwd_input_kernel": _KernelModel(
        _bwd_input_macs,
        ("g_ptr", "mask_ptr", "alpha_ptr", "shift_ptr", "wp_ptr", "pull_idx_ptr", "pull_coef_ptr"),
        lambda a: ("gx_ptr",),
        _bwd_input_note,
    ),
    "pp_bwd_weight_kernel": _KernelModel(
        _bwd_weight_macs,
        ("x_ptr", "g_ptr", "mask_ptr", "alpha_ptr", "pull_idx_ptr", "pull_coef_ptr"),
        lambda a: ("gw_ptr", "gs_ptr"),
        _bwd_weight_note,
    ),
    "pp_bwd_weight_adjoint_kernel": _KernelModel(
        _bwd_weight_adjoint_macs,
        ("x_ptr", "g_ptr", "mask_ptr", "alpha_ptr", "pull_idx_ptr", "pull_coef_ptr"),
        lambda a: ("gw_ptr",),
        _bwd_weight_adjoint_note,
    ),
}


def _unique_bytes(a: dict, names: Iterable[str], exclude: set) -> tuple[int, set]:
    """Bytes of the distinct tensors among arguments `names` (the launcher passes one tensor as several
    placeholders), not counting those in `exclude` (ids); and the ids counted."""
    seen = set(exclude)
    total = 0
    for name in names:
        t = a[name]
        if id(t) not in seen:
            seen.add(id(t))
            total += _nbytes(t)
    return total, seen


def price_kernel(phase: str, name: str, grid: tuple, a: dict) -> LaunchCost:
    model = KERNELS[name]
    written, out_ids = _unique_bytes(a, model.writes(a), set())
    read, _ = _unique_bytes(a, model.reads, out_ids)
    macs = model.macs(grid, a) if model.macs else 0
    note = model.note(grid, a) if model.note else ""
    return LaunchCost(phase, name, grid, macs, read, written, note)


def price_events(events: list) -> list[LaunchCost]:
    """Kernel events priced one by one; the torch operations between two launches summed as one entry."""
    costs: list[LaunchCost] = []
    for event in events:
        phase, kind = event[:2]
        if kind == "kernel":
            costs.append(price_kernel(phase, *event[2:]))
        elif costs and costs[-1].launch == "torch" and costs[-1].phase == phase:
            last = costs.pop()
            costs.append(LaunchCost(phase, "torch", (), 0, last.bytes_read + event[2], last.bytes_written + event[3]))
        else:
            costs.append(LaunchCost(phase, "torch", (), 0, event[2], event[3]))
    return [c for c in costs if c.launch != "torch" or c.bytes]


# ---------------------------------------------------------------------------------------- lower bound
def output_size(case: Case) -> tuple[int, int]:
    return (
        conv_output_size(case.h, case.kernel, case.stride, case.padding, 1),
        conv_output_size(case.w, case.kernel, case.stride, case.padding, 1),
    )


def convolution_macs(case: Case) -> int:
    """One convolution's products: every output element times the filter's fan-in (groups 1)."""
    ho, wo = output_size(case)
    return case.n * ho * wo * case.c_out * case.c_in * case.kernel * case.kernel


def lower_bound(case: Case, dtype: torch.dtype, phase: str) -> LowerBound:
    es = torch.empty((), dtype=dtype).element_size()
    ho, wo = output_size(case)
    x = case.n * case.c_in * case.h * case.w * es
    field = case.n * case.c_out * ho * wo
    masks = field * MASK_BITS // 8
    if phase == "forward":
        return LowerBound(convolution_macs(case), x + field * es + masks)
    grads = 1 + int(case.input_grad)  # the weight gradient always (every case trains its weight)
    return LowerBound(grads * convolution_macs(case), field * es + masks + x + (x if case.input_grad else 0))


def layer_cost(case: Case, dtype: torch.dtype, **config) -> list[PhaseCost]:
    """Forward and backward of a training step of `case`, priced launch by launch (`config`: further
    LaunchConfig fields, e.g. weight_grad_path="prefilter" to price the route the launcher does not take)."""
    costs = price_events(record_training_step(case, dtype, **config))
    ho, wo = output_size(case)
    return [
        PhaseCost(
            case,
            dtype,
            phase,
            [c for c in costs if c.phase == phase],
            lower_bound(case, dtype, phase),
            case.n * case.c_out * ho * wo,
        )
        for phase in ("forward", "backward")
    ]


# ---------------------------------------------------------------------------------------- table
def _si(value: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:.0f}"


# x conv: MACs in multiples of one convolution's; x min: bytes in multiples of the phase's lower bound.
COLUMNS = ("phase", "launch", "grid", "MACs/output", "MACs", "x conv", "bytes", "x min", "note")


def _row(phase: PhaseCost, launch: str, grid: str, macs: int, nbytes: int, note: str) -> tuple:
    return (
        phase.phase,
        launch,
        grid,
        f"{macs / phase.outputs:.1f}",
        _si(macs),
        f"{macs / phase.convolution_macs:.2f}",
        _si(nbytes) + "B",
        f"{nbytes / phase.lower.bytes:.2f}",
        note,
    )


def table_rows(phases: list[PhaseCost]) -> list[tuple]:
    rows = []
    for phase in phases:
        for c in phase.launches:
            rows.append(_row(phase, c.launch, "x".join(map(str, c.grid)) or "-", c.macs, c.bytes, c.note))
        rows.append(_row(phase, "TOTAL", "", phase.macs, phase.bytes, ""))
        rows.append(
            _row(
                phase,
                "lower bound",
                "",
                phase.lower.macs,
                phase.lower.bytes,
                "one convolution; x, y, masks"
                if phase.phase == "forward"
                else "conv per gradient; g, masks, x, grad_input",
            )
        )
    return rows


SUMMARY_COLUMNS = (
    "shape",
    "dtype",
    "forward MACs x conv",
    "forward bytes x min",
    "backward MACs x conv",
    "backward bytes x min",
    "backward lower bound x conv",
)


def summary_row(phases: list[PhaseCost]) -> tuple:
    """One layer's totals: forward and backward MACs (x one convolution) and bytes (x the lower bound)."""
    forward, backward = phases
    ratios = [
        f"{p.macs / p.convolution_macs:.2f}" if i % 2 == 0 else f"{p.bytes / p.lower.bytes:.2f}"
        for p in (forward, backward)
        for i in range(2)
    ]
    dtype = str(forward.dtype).replace("torch.", "")
    return (forward.case.name, dtype, *ratios, f"{backward.lower.macs / backward.convolution_macs:.0f}")


def format_table(rows: list[tuple], markdown: bool, columns: tuple = COLUMNS) -> str:
    if markdown:
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    widths = [max(len(str(r[i])) for r in (columns, *rows)) for i in range(len(columns))]
    return "\n".join("  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip() for r in (columns, *rows))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--shapes",
        nargs="+",
        help="paper shapes by name (default: all), or cases as N,Cin,Cout,H,W,k,stride,pad,pull[,scale|avg]",
    )
    parser.add_argument("--dtype", nargs="+", default=["float32"], help="float32 (default), bfloat16, float16")
    parser.add_argument("--markdown", action="store_true", help="markdown tables")
    args = parser.parse_args(argv)
    cases = [case_from_text(name) for name in args.shapes] if args.shapes else CASES
    summary = []
    for case in cases:
        for dtype_name in args.dtype:
            phases = layer_cost(case, getattr(torch, dtype_name))
            summary.append(summary_row(phases))
            print(f"\n{case.name} ({case.describe()}), N={case.n}, {dtype_name}\n")
            print(format_table(table_rows(phases), args.markdown))
    print("\nSummary (x conv: MACs / one convolution's; x min: bytes / the phase's lower bound)\n")
    print(format_table(summary, args.markdown, SUMMARY_COLUMNS))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
