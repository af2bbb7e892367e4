"""Small @triton.jit helpers shared by the forward and backward kernels."""

import triton
import triton.language as tl

# Pull modes, as the `MODE` constexpr of every kernel (the launcher passes `.value`).
MODE_SCALE1 = tl.constexpr(0)  # 2020, scale 1: q = -k, the pull response is -P0
MODE_INVERT = tl.constexpr(1)  # 2024: q = -k + shift[o], pull response = shift[o] * S - P0
MODE_UPSAMPLE = tl.constexpr(2)  # 2020, scale != 1: q = -U k V^T on its own (larger) window (see pull_prefilter)


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
def window_count(center, HALF, SIZE):
    """How many of the coordinates center - HALF .. center + HALF lie in [0, SIZE): one side of an average
    pooling window's in-image pixel count (count_include_pad=False)."""
    return tl.minimum(center + HALF, SIZE - 1) - tl.maximum(center - HALF, 0) + 1


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
def gather_taps(x_rows, hi0, wi0, row_valid, col_valid, t, c, TW, DH, DW, H, W):
    """The implicit im2col tile x[row, c[col], hi0[row] + (t // TW) * DH, wi0[row] + (t % TW) * DW]
    (0 outside the image and where a row or column is not valid). x_rows: [rows] pointers to each row's
    image; hi0 / wi0: [rows] input coordinates of tap (0, 0); t / c: [cols] tap and channel."""
    hi = hi0[:, None] + (t // TW)[None, :] * DH
    wi = wi0[:, None] + (t % TW)[None, :] * DW
    inside = row_valid[:, None] & col_valid[None, :] & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
    return tl.load(x_rows[:, None] + c[None, :] * (H * W) + hi * W + wi, mask=inside, other=0.0)


@triton.jit
def prefilter_tables(idx_ptr, coef_ptr, i, j, col_valid, TH, TW, QH, TILE_BOUNDS: tl.constexpr):
    """The loop bounds and table pointers of pull_prefilter and its adjoint, for a tile whose columns have
    push taps (i, j) (valid where col_valid): (nnz_u, nnz_v, u_rows, v_rows, u_coef, v_coef). With
    TILE_BOUNDS the bounds are the most nonzeros among the tile's columns of U (U[:, i]) and of V
    (V[:, j]): a tile of one push tap (every chunk once the channels fill it) visits only that tap's
    nonzero pairs, 9 to 25 at scale 2 (13.4 on average over a 3 x 3 kernel's taps), not the 25 of the
    widest column pair; without, the widest pair's (both weight-gradient kernels, where the per-tile bound
    spilled: benchmarks/tuning.md). Table layout
    (triton_launch._prefilter_tables): idx = [most nonzeros of a column of U, of V, nonzeros of each of U's
    TH columns, of each of V's TW columns, U's rows (e, i) at e * TH + i, V's (f, j) at f * TW + j];
    coef = [-U at U's rows' places, V at V's]."""
    if TILE_BOUNDS:
        nnz_u = tl.max(tl.load(idx_ptr + 2 + i, mask=col_valid, other=0))
        nnz_v = tl.max(tl.load(idx_ptr + 2 + TH + j, mask=col_valid, other=0))
    else:
        nnz_u = tl.load(idx_ptr)
        nnz_v = tl.load(idx_ptr + 1)
    u_rows = idx_ptr + 2 + TH + TW
    return nnz_u, nnz_v, u_rows, u_rows + QH * TH, coef_ptr, coef_ptr + QH * TH


@triton.jit
def pull_prefilter(
    x_rows,
    hi0,
    wi0,
    row_valid,
    col_valid,
    t,
    c,
    TH,
    TW,
    DH,
    DW,
    H,
    W,
    QH,
    idx_ptr,
    coef_ptr,
    ACC: tl.constexpr,
    TILE_BOUNDS: tl.constexpr = True,
):
    """The pull operand z of the upsample prefilter algebra, as a tile like gather_taps' (rows: output
    pixels, columns: (push tap t = i * TW + j, channel c)), in the accumulator dtype:

        q[o, c] = -U k[o, c] V^T  =>  conv2d(x, q)[o] = sum_{c, i, j} k[o, c, i, j] z[c, i, j],
        z[c, i, j] = conv2d(x[c], -U[:, i] V[:, j]^T)  (stride, pull padding, dilation)

    so the pull response is the push weights times z: the same GEMM as the push response's.
    hi0 / wi0 are the input coordinates of the PULL window's tap (0, 0) (pull padding). Only the nonzero
    entries of U's column i and V's column j are visited (bilinear U: up to 2 * scale - 1 a column),
    from the launcher's tables (`prefilter_tables`: row a of the e-th nonzero of U's column i, column b of
    the f-th of V's column j, and -U[a, i], V[b, j]), as many as the tile's columns need at most
    (TILE_BOUNDS) or as the widest column pair has. Entries
    past a column's nonzeros have coefficient 0 and load nothing, so an input value reaches z[c, i, j]
    only through a nonzero U[a, i] * V[b, j] (as it reaches conv2d(x, q) only through the taps of q it is
    multiplied by: the forward's non-finite fallback relies on it).
    Its adjoint, which forms the input gradient's operand from gQ the same way, is backward.py
    `pull_prefilter_adjoint`."""
    i = t // TW  # push row / column of each column's tap
    j = t % TW
    nnz_u, nnz_v, u_rows, v_rows, u_coef, v_coef = prefilter_tables(
        idx_ptr, coef_ptr, i, j, col_valid, TH, TW, QH, TILE_BOUNDS
    )
    x_chan = x_rows[:, None] + c[None, :] * (H * W)
    z = tl.zeros((hi0.shape[0], t.shape[0]), dtype=ACC)
    for e in range(0, nnz_u):
        a = tl.load(u_rows + e * TH + i, mask=col_valid, other=0)
        u = tl.load(u_coef + e * TH + i, mask=col_valid, other=0.0).to(ACC)
        hi = hi0[:, None] + (a * DH)[None, :]  # input row of pull tap row a
        row_ok = row_valid[:, None] & (u != 0)[None, :] & (hi >= 0) & (hi < H)
        z_row = tl.zeros_like(z)  # sum over b of V[b, j] * x at pull tap (a, b)
        for f in range(0, nnz_v):
            b = tl.load(v_rows + f * TW + j, mask=col_valid, other=0)
            v = tl.load(v_coef + f * TW + j, mask=col_valid, other=0.0).to(ACC)
            wi = wi0[:, None] + (b * DW)[None, :]  # input column of pull tap column b
            ok = row_ok & (v != 0)[None, :] & (wi >= 0) & (wi < W)
            xv = tl.load(x_chan + hi * W + wi, mask=ok, other=0.0).to(ACC)
            z_row += v[None, :] * xv
        z += u[None, :] * z_row
    return z
