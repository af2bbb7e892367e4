"""Forward kernels of the fused push-pull convolution.

`pp_fwd_conv_kernel` is an implicit-GEMM convolution: one program owns a tile of BLOCK_M output
pixels (without pooling: flattened over batch and space, so small feature maps do not waste the
tile; with pooling: a 2-D tile of one image with its halo, see below) times BLOCK_N output channels,
and reduces over a *tap window* of the input: the folded index r = tap * C_in_per_group + c
(tap = i * TW + j, input channel innermost), so that a 3-channel stem with a 3x3 kernel is one
27-long reduction and not 9 padded 3-long ones. Loads of the input are gathered with padding masks
(no im2col buffer); the weights come as a [K, C_out] matrix prepared by the launcher. The
accumulator is fp32 (fp64 for fp64).

Pull modes (MODE constexpr, see common.py):
- scale 1 (q = -k): one MMA; the pull response is -P0.
- invert (q = -k + shift[o]): one MMA; S (the per-group box sum of the input) is the row sum of the
  very input tiles the MMA consumes, so R = shift[o] * S - P0 costs no second convolution.
- upsample (q = -U k V^T, pull kernel kh' x kw'): the prefilter algebra (common.py `pull_prefilter`):
  conv2d(x, q)[o] = sum_{c,i,j} k[o,c,i,j] z[c,i,j] with z[c,i,j] = conv2d(x[c], -U[:,i] V[:,j]^T), so
  push and pull are the SAME weight tile against two operands: the gathered push taps, and z built in
  registers from input loads weighted by the nonzero U[a,i] V[b,j] (pull padding). Two MMAs per chunk
  of the push kernel's reduction: 2x one convolution's products (at stride 1 the launcher may take the
  tap path instead, forward_taps.py: one MMA per chunk on frames with a halo) (the pull window's 49 taps are never an
  MMA's K). NaN / Inf: z's sums of infinities can differ from conv2d(x, q)'s (an Inf under weights of
  mixed sign is NaN through z, +-Inf in conv2d), so a group whose pull accumulator comes out non-finite
  on a tile (which any non-finite input it reads makes it) is redone as conv2d(x, q) over the whole pull
  window (`_pull_window_conv`, against the pull kernel's own matrix): exact, and only such tiles pay.

Output channels of one tile may straddle groups (the tile is aligned to 8 channels so that the
packed mask bytes are owned by exactly one program): the program loops over the groups its tile
touches, masking the weights of the other groups' channels. With groups == 1 this is one pass.

Epilogue (no pooling): P = P0 + b_in, Q = R - b_in, y = relu(P) - alpha * relu(Q) + b_out (or the
dual concat), mask bits, all in registers; y is written once and the masks once, 8 channels a byte.
The backward's recompute (relu(Q') for a trained alpha, or the masks forward did not save) runs the same
kernel without writing y (WRITE_Y off): with GRAD_SUMS it reads grad_output instead and writes each
tile's per-channel sums of grad_output * relu(Q') and of grad_output (alpha's and b_out's gradients), so
no field is written but the masks.

With pooling (avg_kernel a > 1) every output pixel needs Q on a halo of r = (a-1)/2 pixels: the
program's pixel tile is then a 2-D tile of one image WITH its halo, EH x EW pixels (flattened row-major
into BLOCK_M >= EH * EW rows; the launcher picks all three, `triton_launch._pool_tile`), of which the inner
(EH - 2r) x (EW - 2r) are this program's outputs. P and Q are computed on the whole tile (the halo is
recomputed by the neighbouring tiles: the product overhead is BLOCK_M / inner pixels, see the cost
model), Q outside the image is zeroed, and Q is box-summed on chip, separably (`_box_sum`: a
gathers along the row, then a along the column, `tl.gather` over the tile's rows) and divided by the
count of its window's pixels inside the image (count_include_pad=False, exact at borders). The same
epilogue then writes y and the masks once for the inner pixels: no scratch field, no second launch.

The scratch path (POOL_SCRATCH) is kept for the layers where the recomputed halo's products would cost
more than the traffic they save (the launcher's rule, `triton_launch._fused_pooling_pays`: wide layers
in float32 with TF32 off or float64, upsample with large windows): the flat tiles of the unpooled
kernel write P and Q (accumulator dtype) to two fields of the output's size and
`pp_fwd_pool_epilogue_kernel` pools Q (count_include_pad=False) and applies the same epilogue: 2 writes
and 2 (cache-served a x a) reads of a field more, and a second launch.
"""

import triton
import triton.language as tl

from .common import (
    MODE_INVERT,
    MODE_UPSAMPLE,
    flat_tile,
    gather_taps,
    image_and_pixel,
    mma,
    pull_prefilter,
    tap_chunk,
    window_count,
)


@triton.jit
def _field_offsets(n_img, pix, offs_n, C_OUT, HOWO):
    """Offsets of a [pixels, channels] tile in an [N, C_OUT, Ho, Wo] field (y, grad_output)."""
    return n_img[:, None] * C_OUT * HOWO + offs_n[None, :] * HOWO + pix[:, None]


@triton.jit
def _pp_epilogue(
    P,
    Q,
    n_img,
    pix,
    m_valid,
    bout_ptr,
    alpha_ptr,
    y_ptr,
    mask_ptr,
    g_ptr,
    sums_ptr,
    N,
    C_OUT,
    HOWO,
    HAS_BOUT: tl.constexpr,
    DUAL: tl.constexpr,
    SAVE_MASKS: tl.constexpr,
    WRITE_Y: tl.constexpr,
    GRAD_SUMS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """P, Q: [BLOCK_M, BLOCK_N] push response and (pooled) pull response, biases included, of this
    program's tile; rows: image n_img (int64), pixel pix, written where m_valid; columns: channel tile
    program_id(1). Writes y (WRITE_Y), the masks (SAVE_MASKS) and, for the backward's recompute
    (GRAD_SUMS), this tile's share of the alpha and b_out gradients (see below)."""
    pid_n = tl.program_id(1)
    offs_n, n_valid = flat_tile(pid_n, BLOCK_N, C_OUT)
    valid = m_valid[:, None] & n_valid[None, :]
    zero = tl.zeros_like(P)
    # ReLU as torch.relu: NaN stays NaN (tl.maximum's default would turn it into 0).
    rp = tl.maximum(P, zero, propagate_nan=tl.PropagateNan.ALL)
    rq = tl.maximum(Q, zero, propagate_nan=tl.PropagateNan.ALL)
    if WRITE_Y:
        out_ty = y_ptr.dtype.element_ty
        if DUAL:
            base = n_img[:, None] * (2 * C_OUT) * HOWO + pix[:, None]
            tl.store(y_ptr + base + offs_n[None, :] * HOWO, rp.to(out_ty), mask=valid)
            tl.store(y_ptr + base + (offs_n[None, :] + C_OUT) * HOWO, rq.to(out_ty), mask=valid)
        else:
            alpha = tl.load(alpha_ptr + offs_n, mask=n_valid, other=0.0).to(P.dtype)
            out = rp - alpha[None, :] * rq
            if HAS_BOUT:
                bout = tl.load(bout_ptr + offs_n, mask=n_valid, other=0.0).to(P.dtype)
                out = out + bout[None, :]
            tl.store(y_ptr + _field_offsets(n_img, pix, offs_n, C_OUT, HOWO), out.to(out_ty), mask=valid)
    if GRAD_SUMS:
        # The gradients of alpha (d y / d alpha[o] = -relu(Q')[o]) and b_out, as partial sums over this
        # tile's pixels, per channel: sums[program_id(0), 0] = sum g * relu(Q'), sums[program_id(0), 1] =
        # sum g (sums: [pixel tiles, 2, C_OUT]; the launcher adds the rows up), so that relu(Q') never goes
        # through memory and g is read once.
        off = _field_offsets(n_img, pix, offs_n, C_OUT, HOWO)
        gt = tl.where(valid, tl.load(g_ptr + off, mask=valid, other=0.0).to(P.dtype), 0.0)
        row = sums_ptr + tl.program_id(0) * 2 * C_OUT + offs_n
        tl.store(row, tl.sum(gt * tl.where(valid, rq, 0.0), axis=0), mask=n_valid)
        tl.store(row + C_OUT, tl.sum(gt, axis=0), mask=n_valid)
    if SAVE_MASKS:
        # masks[2, N, ceil(C_OUT / 8), Ho, Wo]: bit (o % 8) of byte o // 8. BLOCK_N % 8 == 0 and the
        # tile starts at a multiple of BLOCK_N, so this program owns whole bytes.
        NB: tl.constexpr = BLOCK_N // 8
        CB = (C_OUT + 7) // 8
        bit = (1 << (offs_n % 8))[None, :]
        # ReLU'(v) = [not v <= 0], as torch's threshold_backward: a NaN passes its gradient on.
        bp = tl.where(valid & (P <= 0), 0, tl.where(valid, bit, 0))
        bq = tl.where(valid & (Q <= 0), 0, tl.where(valid, bit, 0))
        byte_p = tl.sum(tl.reshape(bp, (BLOCK_M, NB, 8)), axis=2).to(tl.uint8)
        byte_q = tl.sum(tl.reshape(bq, (BLOCK_M, NB, 8)), axis=2).to(tl.uint8)
        offs_b = pid_n * NB + tl.arange(0, NB)
        bvalid = m_valid[:, None] & (offs_b < CB)[None, :]
        moff = n_img[:, None] * CB * HOWO + offs_b[None, :] * HOWO + pix[:, None]
        tl.store(mask_ptr + moff, byte_p, mask=bvalid)
        tl.store(mask_ptr + tl.cast(N, tl.int64) * CB * HOWO + moff, byte_q, mask=bvalid)


@triton.jit
def _box_sum(q, EW: tl.constexpr, AVG: tl.constexpr, BLOCK_M: tl.constexpr):
    """The AVG x AVG box sum of q [BLOCK_M, channels], whose row e is pixel (e // EW, e % EW) of a 2-D
    tile, on chip: AVG gathers of rows along the tile's rows, then AVG along its columns (separable).
    Exact for the rows at least (AVG - 1) / 2 pixels inside the tile's edges; the others get clamped
    neighbours (the caller writes no such row)."""
    HALO: tl.constexpr = (AVG - 1) // 2
    e = tl.arange(0, BLOCK_M)
    rows = tl.zeros_like(q)
    for dj in tl.static_range(AVG):
        idx = tl.minimum(tl.maximum(e + (dj - HALO), 0), BLOCK_M - 1)
        rows += tl.gather(q, tl.broadcast_to(idx[:, None], q.shape), axis=0)
    box = tl.zeros_like(q)
    for di in tl.static_range(AVG):
        idx = tl.minimum(tl.maximum(e + (di - HALO) * EW, 0), BLOCK_M - 1)
        box += tl.gather(rows, tl.broadcast_to(idx[:, None], q.shape), axis=0)
    return box


@triton.jit
def _non_finite_in(acc, row_valid, col_valid):
    """Whether the tile acc holds a NaN or +-Inf among its valid entries (x - x is NaN exactly there)."""
    bad = ((acc - acc) != 0) & row_valid[:, None] & col_valid[None, :]
    return tl.max(bad.to(tl.int32)) > 0


@triton.jit
def _pull_window_conv(
    x_img,
    hq0,
    wq0,
    m_valid,
    wq_ptr,
    offs_n,
    w_col,
    g,
    acc_like,
    CG,
    C_OUT,
    H,
    W,
    QH,
    QW,
    DH,
    DW,
    IS_FP64,
    ALLOW_TF32,
    BLOCK_K: tl.constexpr,
):
    """conv2d(x, q) of group g on this tile as an implicit GEMM over the whole QH x QW pull window
    (r = (a * QW + b) * CG + c against the pull kernel's matrix wq): the upsample forward's exact path
    for tiles whose input holds a NaN / Inf, where the prefilter's sums of infinities can differ from
    conv2d's (an Inf under weights of mixed sign: +-Inf in conv2d(x, q), NaN through z)."""
    acc = tl.zeros_like(acc_like)
    K_PULL = CG * QH * QW
    for k0 in range(0, K_PULL, BLOCK_K):
        r, r_valid, t, c = tap_chunk(k0, BLOCK_K, K_PULL, CG, g)
        a = gather_taps(x_img, hq0, wq0, m_valid, r_valid, t, c, QW, DH, DW, H, W)
        wq = tl.load(wq_ptr + r[:, None] * C_OUT + offs_n[None, :], mask=r_valid[:, None] & w_col[None, :], other=0.0)
        acc = mma(a, wq, acc, IS_FP64, ALLOW_TF32)
    return acc


@triton.jit
def pp_fwd_conv_kernel(
    x_ptr,
    wp_ptr,
    wq_ptr,
    pull_idx_ptr,
    pull_coef_ptr,
    shift_ptr,
    bin_ptr,
    bout_ptr,
    alpha_ptr,
    y_ptr,
    mask_ptr,
    pbuf_ptr,
    qbuf_ptr,
    g_ptr,
    sums_ptr,
    N,
    C_IN,
    H,
    W,
    C_OUT,
    HO,
    WO,
    CG,
    CGO,  # input / output channels per group
    SH,
    SW,
    PH,
    PW,
    DH,
    DW,
    TH,
    TW,  # stride, padding, dilation and size of the push kernel
    NG_TILE,  # most groups one BLOCK_N channel tile straddles
    QPH,
    QPW,
    QH,
    QW,  # upsample: padding and size of the pull kernel
    MODE: tl.constexpr,
    HAS_BIN: tl.constexpr,
    HAS_BOUT: tl.constexpr,
    DUAL: tl.constexpr,
    SAVE_MASKS: tl.constexpr,
    WRITE_Y: tl.constexpr,
    GRAD_SUMS: tl.constexpr,  # the backward's recompute: alpha's and b_out's gradients, partial sums (_pp_epilogue)
    AVG: tl.constexpr,  # pooling window (1: no pooling)
    POOL_EH: tl.constexpr,
    POOL_EW: tl.constexpr,  # pooling: the pixel tile, halo included (EH x EW of one image)
    POOL_SCRATCH: tl.constexpr,  # pooling through the P / Q scratch fields and pp_fwd_pool_epilogue_kernel
    IS_FP64: tl.constexpr,
    ALLOW_TF32: tl.constexpr,
    STRADDLE: tl.constexpr,  # NG_TILE > 1: some channel tile spans several groups
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    HOWO = HO * WO
    K_TOTAL = CG * TH * TW

    offs_n, n_valid = flat_tile(pid_n, BLOCK_N, C_OUT)
    if AVG > 1 and not POOL_SCRATCH:
        # a POOL_EH x POOL_EW tile of one image, its inner pixels this program's outputs, the rest halo
        HALO: tl.constexpr = (AVG - 1) // 2
        tiles_h = (HO + POOL_EH - 2 * HALO - 1) // (POOL_EH - 2 * HALO)
        tiles_w = (WO + POOL_EW - 2 * HALO - 1) // (POOL_EW - 2 * HALO)
        tile = pid_m % (tiles_h * tiles_w)
        e = tl.arange(0, BLOCK_M)  # row e of the tile: pixel (e // POOL_EW, e % POOL_EW) of it
        ho = (tile // tiles_w) * (POOL_EH - 2 * HALO) - HALO + e // POOL_EW
        wo = (tile % tiles_w) * (POOL_EW - 2 * HALO) - HALO + e % POOL_EW
        m_valid = (e < POOL_EH * POOL_EW) & (ho >= 0) & (ho < HO) & (wo >= 0) & (wo < WO)
        n_img = tl.zeros((BLOCK_M,), dtype=tl.int64) + (pid_m // (tiles_h * tiles_w))
        pix = ho * WO + wo
    else:
        offs_m, m_valid = flat_tile(pid_m, BLOCK_M, N * HOWO)
        n_img, pix = image_and_pixel(offs_m, HOWO)
        ho = pix // WO
        wo = pix % WO
    # input coordinates of tap (0, 0) of the push window, and (upsample) of the pull window
    hi0 = ho * SH - PH
    wi0 = wo * SW - PW
    hq0 = ho * SH - QPH
    wq0 = wo * SW - QPW
    x_img = x_ptr + n_img * C_IN * H * W  # [BLOCK_M] pointers (64-bit image offset)
    o_group = offs_n // CGO

    ACC = tl.float64 if IS_FP64 else tl.float32
    acc_p = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    if MODE == MODE_UPSAMPLE:
        acc_q = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    if MODE == MODE_INVERT:
        s_tile = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)

    g_lo = (pid_n * BLOCK_N) // CGO
    g_hi = (tl.minimum(pid_n * BLOCK_N + BLOCK_N, C_OUT) - 1) // CGO
    # Loop bounds independent of program_id (NG_TILE = most groups one tile touches, from the
    # host) keep the loop a plain counted loop; iterations past this tile's last group are skipped.
    for gi in range(0, NG_TILE):
        g = g_lo + gi
        if g <= g_hi:
            w_col = n_valid & (o_group == g)
            if STRADDLE:
                # Each group into its own accumulator, merged by column below: with one shared
                # accumulator a NaN / Inf input of group g would reach the other groups' channels
                # through their zero (masked) weights (0 * Inf = NaN), which conv2d never does.
                kept_p = acc_p
                acc_p = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
                if MODE == MODE_UPSAMPLE:
                    kept_q = acc_q
                    acc_q = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
            if MODE == MODE_INVERT:
                s_g = tl.zeros((BLOCK_M,), dtype=ACC)
            for k0 in range(0, K_TOTAL, BLOCK_K):
                r, r_valid, t, c = tap_chunk(k0, BLOCK_K, K_TOTAL, CG, g)
                a = gather_taps(x_img, hi0, wi0, m_valid, r_valid, t, c, TW, DH, DW, H, W)
                w_mask = r_valid[:, None] & w_col[None, :]
                wp = tl.load(wp_ptr + r[:, None] * C_OUT + offs_n[None, :], mask=w_mask, other=0.0)
                acc_p = mma(a, wp, acc_p, IS_FP64, ALLOW_TF32)
                if MODE == MODE_UPSAMPLE:
                    # the pull response: the same weights against the prefiltered input z
                    z = pull_prefilter(
                        *(x_img, hq0, wq0, m_valid, r_valid, t, c),
                        *(TH, TW, DH, DW, H, W, QH, pull_idx_ptr, pull_coef_ptr, ACC),
                    )
                    acc_q = mma(z.to(a.dtype), wp, acc_q, IS_FP64, ALLOW_TF32)
                if MODE == MODE_INVERT:
                    s_g += tl.sum(a.to(ACC), axis=1)
            if MODE == MODE_UPSAMPLE:
                # A NaN / Inf input (and only one: z is finite otherwise) leaves a non-finite z entry and
                # so a non-finite acc_q row: redo this group's pull response as conv2d(x, q) itself.
                if _non_finite_in(acc_q, m_valid, w_col):
                    acc_q = _pull_window_conv(
                        *(x_img, hq0, wq0, m_valid, wq_ptr, offs_n, w_col, g, acc_q),
                        *(CG, C_OUT, H, W, QH, QW, DH, DW, IS_FP64, ALLOW_TF32, BLOCK_K),
                    )
            if MODE == MODE_INVERT:
                s_tile = tl.where((o_group == g)[None, :], s_g[:, None], s_tile)
            if STRADDLE:
                acc_p = tl.where(w_col[None, :], acc_p, kept_p)
                if MODE == MODE_UPSAMPLE:
                    acc_q = tl.where(w_col[None, :], acc_q, kept_q)

    # Pull response before bias, R.
    if MODE == MODE_INVERT:
        shift = tl.load(shift_ptr + offs_n, mask=n_valid, other=0.0).to(ACC)
        R = shift[None, :] * s_tile - acc_p
    elif MODE == MODE_UPSAMPLE:
        R = acc_q
    else:
        R = -acc_p
    P = acc_p
    Q = R
    if HAS_BIN:
        b = tl.load(bin_ptr + offs_n, mask=n_valid, other=0.0).to(ACC)
        P = P + b[None, :]
        Q = Q - b[None, :]

    if POOL_SCRATCH:
        valid = m_valid[:, None] & n_valid[None, :]
        off = _field_offsets(n_img, pix, offs_n, C_OUT, HOWO)
        tl.store(pbuf_ptr + off, P, mask=valid)
        tl.store(qbuf_ptr + off, Q, mask=valid)
    else:
        if AVG > 1:
            # Q' = avg_pool2d(Q, AVG, stride 1, pad HALO, count_include_pad=False) on the inner pixels
            Q = _box_sum(tl.where(m_valid[:, None], Q, 0.0), POOL_EW, AVG, BLOCK_M)
            count_h = window_count(ho, HALO, HO)
            count_w = window_count(wo, HALO, WO)
            Q = Q / tl.maximum(count_h * count_w, 1).to(ACC)[:, None]
            inner = (e // POOL_EW >= HALO) & (e // POOL_EW < POOL_EH - HALO)
            inner = inner & (e % POOL_EW >= HALO) & (e % POOL_EW < POOL_EW - HALO)
            m_valid = m_valid & inner
        _pp_epilogue(
            *(P, Q, n_img, pix, m_valid, bout_ptr, alpha_ptr, y_ptr, mask_ptr, g_ptr, sums_ptr, N, C_OUT, HOWO),
            *(HAS_BOUT, DUAL, SAVE_MASKS, WRITE_Y, GRAD_SUMS, BLOCK_M, BLOCK_N),
        )


@triton.jit
def pp_fwd_pool_epilogue_kernel(
    pbuf_ptr,
    qbuf_ptr,
    bin_ptr,
    bout_ptr,
    alpha_ptr,
    y_ptr,
    mask_ptr,
    g_ptr,
    sums_ptr,
    N,
    C_OUT,
    HO,
    WO,
    AVG,
    AVG_PAD,
    HAS_BOUT: tl.constexpr,
    DUAL: tl.constexpr,
    SAVE_MASKS: tl.constexpr,
    WRITE_Y: tl.constexpr,
    GRAD_SUMS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Q' = avg_pool2d(Q, AVG, stride 1, pad AVG_PAD, count_include_pad=False), then the epilogue."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    HOWO = HO * WO
    offs_m, m_valid = flat_tile(pid_m, BLOCK_M, N * HOWO)
    offs_n, n_valid = flat_tile(pid_n, BLOCK_N, C_OUT)
    n_img, pix = image_and_pixel(offs_m, HOWO)
    ho = pix // WO
    wo = pix % WO
    valid = m_valid[:, None] & n_valid[None, :]
    base = n_img[:, None] * C_OUT * HOWO + offs_n[None, :] * HOWO
    P = tl.load(pbuf_ptr + base + pix[:, None], mask=valid, other=0.0)
    q_sum = tl.zeros((BLOCK_M, BLOCK_N), dtype=P.dtype)
    for di in range(0, AVG):
        hh = ho + di - AVG_PAD
        for dj in range(0, AVG):
            ww = wo + dj - AVG_PAD
            inside = (hh >= 0) & (hh < HO) & (ww >= 0) & (ww < WO)
            q_sum += tl.load(qbuf_ptr + base + (hh * WO + ww)[:, None], mask=valid & inside[:, None], other=0.0)
    count = window_count(ho, AVG_PAD, HO) * window_count(wo, AVG_PAD, WO)
    Q = q_sum / tl.maximum(count, 1).to(P.dtype)[:, None]
    _pp_epilogue(
        *(P, Q, n_img, pix, m_valid, bout_ptr, alpha_ptr, y_ptr, mask_ptr, g_ptr, sums_ptr, N, C_OUT, HOWO),
        *(HAS_BOUT, DUAL, SAVE_MASKS, WRITE_Y, GRAD_SUMS, BLOCK_M, BLOCK_N),
    )
