"""Small @triton.jit helpers shared by the forward and backward kernels."""

import triton
import triton.language as tl

# Pull modes, as the `MODE` constexpr of every kernel (the launcher passes `.value`).
MODE_SCALE1 = tl.constexpr(0)  # 2020, scale 1: q = -k, the pull response is -P0
MODE_INVERT = tl.constexpr(1)  # 2024: q = -k + shift[o], pull response = shift[o] * S - P0
MODE_UPSAMPLE = tl.constexpr(2)  # 2020, scale != 1: q = -U k V^T on its own (larger) window


@triton.jit
def flat_tile(pid, BLOCK: tl.constexpr, TOTAL):
    """The indices pid * BLOCK + [0, BLOCK) of a flat range, and which of them are < TOTAL."""
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    return offs, offs < TOTAL


@triton.jit
def split_chunk(split, k0, BLOCK: tl.constexpr, PIX_PER_SPLIT, P_TOTAL):
    """Chunk k0 + [0, BLOCK) of the pixels of split `split` of a deterministic split reduction (each split
    reduces PIX_PER_SPLIT consecutive pixels of N * Ho * Wo = P_TOTAL): the flat pixel indices and which
    are in both the split and the range."""
    kk = k0 + tl.arange(0, BLOCK)
    p = split * PIX_PER_SPLIT + kk
    return p, (p < P_TOTAL) & (kk < PIX_PER_SPLIT)


@triton.jit
def tap_chunk(r0, BLOCK: tl.constexpr, K_TOTAL, INNER, g):
    """Chunk r0 + [0, BLOCK) of a tap-major reduction index r = tap * INNER + i (i: channel i of group g,
    INNER channels a group): r, which r are < K_TOTAL, the tap, and the channel g * INNER + i."""
    r = r0 + tl.arange(0, BLOCK)
    return r, r < K_TOTAL, r // INNER, g * INNER + r % INNER


@triton.jit
def image_and_pixel(offs, PIXELS):
    """Flat (image, pixel) indices split into the image (int64: image offsets exceed 2^31 in big batches)
    and the pixel within the image."""
    return (offs // PIXELS).to(tl.int64), offs % PIXELS


@triton.jit
def mma(a, b, acc, IS_FP64: tl.constexpr, ALLOW_TF32: tl.constexpr):
    """acc + a @ b with the accumulator precision of the tolerances (fp64 for fp64, fp32 otherwise).

    float32 operands: TF32 when allowed (torch.backends.cudnn.allow_tf32, as conv2d); otherwise
    "tf32x3", three TF32 tensor-core products of hi / lo splits (a_hi b_hi + a_hi b_lo + a_lo b_hi),
    whose error is of float32's order (far inside the float32 tolerance of 1e-4), instead of the much slower
    CUDA-core float32 FMA. The Triton interpreter computes every dot in exact float32."""
    if IS_FP64:
        out = tl.dot(a, b, acc, input_precision="ieee", out_dtype=tl.float64)
    elif ALLOW_TF32:
        out = tl.dot(a, b, acc, input_precision="tf32", out_dtype=tl.float32)
    elif a.dtype == tl.float32:
        out = tl.dot(a, b, acc, input_precision="tf32x3", out_dtype=tl.float32)
    else:
        out = tl.dot(a, b, acc, out_dtype=tl.float32)
    return out


@triton.jit
def mma_grad_operand(a, b, acc, IS_FP64: tl.constexpr, ALLOW_TF32: tl.constexpr):
    """mma for the backward kernels, whose `a` is a masked gradient formed by elementwise ops (gP - gQ,
    -alpha[o] * gQ'). float64 runs on the CUDA cores (products broadcast over an [M, K, N] tile, summed
    over K), since Triton cannot lower such an operand to a float64 MMA (benchmarks/tuning.md); keep K
    small for float64."""
    if IS_FP64:
        out = acc + tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    else:
        out = mma(a, b, acc, IS_FP64, ALLOW_TF32)
    return out


@triton.jit
def push_taps(r, K_TOTAL, RED_INNER, TW, PUSH_I0, PUSH_I1, PUSH_J0, PUSH_J1):
    """Which entries of the tap-major reduction index r = tap * RED_INNER + inner are push kernel
    taps (rectangle [PUSH_I0, PUSH_I1] x [PUSH_J0, PUSH_J1] of the tap window)."""
    t = r // RED_INNER
    i = t // TW
    j = t % TW
    return (r < K_TOTAL) & (i >= PUSH_I0) & (i <= PUSH_I1) & (j >= PUSH_J0) & (j <= PUSH_J1)


@triton.jit
def any_push_tap(r, K_TOTAL, RED_INNER, TW, PUSH_I0, PUSH_I1, PUSH_J0, PUSH_J1):
    """Whether a chunk of r touches the push kernel's taps (upsample mode): chunks that do not
    skip the push MMA, whose embedded push weights are all zero there."""
    inside = push_taps(r, K_TOTAL, RED_INNER, TW, PUSH_I0, PUSH_I1, PUSH_J0, PUSH_J1)
    return tl.max(inside.to(tl.int32), axis=0) > 0
