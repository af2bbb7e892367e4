"""The upsample forward at stride 1 on the TAP PATH: one convolution's products, shared by push and pull.

With q = -U k V^T (pull kernel QH x QW, push kernel TH x TW, stride 1, dilation D) and, per push tap
(i, j), the tap response R_ij[o](h, w) = sum_c k[o, c, i, j] x[c, h, w] (one [pixels, C_in] x
[C_in, channels] MMA, x read UNSHIFTED), both responses are shifts of the same nine fields:

    P[o](ho, wo) = sum_ij R_ij[o](ho + i*DH - PH, wo + j*DW - PW)
    Q[o](ho, wo) = sum_ij sum_ab -U[a, i] V[b, j] R_ij[o](ho + a*DH - QPH, wo + b*DW - QPW)

so the products are those of ONE convolution (the prefilter route, kernels/forward.py, runs two: the
push taps and z against the same weights). The shifts and the separable filters work on the accumulator
tile, on chip: `tl.gather` along its rows, first the nonzero V[b, j] along the row (into Z, summed over
the taps j of push row i), then the nonzero U[a, i] down the column (Z into Q, once per push row), and
one gather per tap for the push shift: for a 3 x 3 kernel at scale 2, 9 + 33 + 11 shift-adds per
element of the tile, where the prefilter route spends 13.4 FMAs per element of its operand z.

Tiles. A program owns a 2-D tile of one image: row e of its [BLOCK_M, BLOCK_N] tiles is pixel
(eh, ew) = (e // EW, e % EW) of an EH x EW frame. For a tap, R is computed on the frame's pixels
offset by that tap's smallest shift `lo` (the push shift and the pull shifts of U's / V's nonzeros):
frame row eh of R is input row ho0 + lo + eh, so every shift s it needs is >= 0 and output row eh
reads R's row eh + s - lo. The launcher sizes the frame's one-sided halo HALO_H x HALO_W to the
largest span (hi - lo) of a tap for bilinear pull matrices (4 for a 3 x 3 kernel at scale 2); output rows
eh < EH - HALO_H (columns likewise) are then exact. Pull matrices with wider spans (the op takes any)
are still exact: a tap whose shifts span more than the halo is computed in several frames, each
covering HALO + 1 of its shifts (one MMA per frame; `_tap_extent` counts them from the launcher's
tables of U's and V's nonzeros, so no host sync decides anything).

Pooling (AVG > 1) box-sums Q on the same tile (forward.py `_box_sum`), so the frame also carries the
pooling halo of (AVG - 1) / 2 on every side, and the program writes y and the masks of its inner
pixels once, through the forward's epilogue. NaN / Inf: P adds the same products as conv2d; Q's sums
of infinities can differ from conv2d(x, q)'s (as the prefilter's), so a group whose Q comes out
non-finite on a tile is redone as conv2d(x, q) over the pull window (forward.py `_pull_window_conv`).
Output channels of a tile may straddle groups: each (tap, group) R keeps only its group's columns.
"""

import triton
import triton.language as tl

from .common import flat_tile, mma, prefilter_tables, window_count
from .forward import _box_sum, _non_finite_in, _pp_epilogue, _pull_window_conv


@triton.jit
def _tap_extent(tap, D, PAD, QPAD, nnz_ptr, rows_ptr, T, HALO: tl.constexpr):
    """Push row (or column) `tap`'s smallest shift lo (relative to the output pixel) among its push shift
    and the pull shifts of the nonzeros of U's (V's) column `tap`, and how many frames of HALO + 1 shifts
    cover them up to the largest. rows_ptr: the table of the nonzeros' rows, (e, tap) at e * T + tap, in
    ascending order (triton_launch._prefilter_tables)."""
    push = tap * D - PAD
    nnz = tl.load(nnz_ptr + tap)
    first = tl.load(rows_ptr + tap) * D - QPAD
    last = tl.load(rows_ptr + (tl.maximum(nnz, 1) - 1) * T + tap) * D - QPAD
    lo = tl.where(nnz > 0, tl.minimum(push, first), push)
    hi = tl.where(nnz > 0, tl.maximum(push, last), push)
    return lo, (hi - lo) // (HALO + 1) + 1


@triton.jit
def _shifted(t, shift, BLOCK_M: tl.constexpr):
    """Rows e + shift of t (shift >= 0; rows past the tile clamp to its last row: only halo rows, which
    nothing writes, read them)."""
    idx = tl.minimum(tl.arange(0, BLOCK_M) + shift, BLOCK_M - 1)
    return tl.gather(t, tl.broadcast_to(idx[:, None], t.shape), axis=0)


@triton.jit
def _in_frame(shift, HALO: tl.constexpr):
    return (shift >= 0) & (shift <= HALO)


@triton.jit
def _frame_rows(
    ho0,
    wo0,
    HO,
    WO,
    EH: tl.constexpr,
    EW: tl.constexpr,
    HALO_H: tl.constexpr,
    HALO_W: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Per row e of the frame whose row 0 is output pixel (ho0, wo0): its frame row and column, output
    pixel, and whether its P and Q are exact (the taps' halo below and right of it) and in the image."""
    e = tl.arange(0, BLOCK_M)
    eh = e // EW
    ew = e % EW
    ho = ho0 + eh
    wo = wo0 + ew
    valid = (e < EH * EW) & (eh < EH - HALO_H) & (ew < EW - HALO_W) & (ho >= 0) & (ho < HO) & (wo >= 0) & (wo < WO)
    return eh, ew, ho, wo, valid


@triton.jit
def _tap_response(
    x_img,
    h0,
    w0,
    wp_ptr,
    tap,
    offs_n,
    w_col,
    g,
    CG,
    C_OUT,
    H,
    W,
    acc_like,
    IS_FP64,
    ALLOW_TF32,
    STRADDLE: tl.constexpr,
    EH: tl.constexpr,
    EW: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """R[e, o] = sum_c k[o, c, tap] x[c, h0 + e // EW, w0 + e % EW] over the channels of group g, for the
    columns w_col (the others 0: a NaN / Inf input of group g stays out of other groups' channels). The
    row indices are formed here, in the loads' own layout (kept live across the taps' loops, they spilled)."""
    e = tl.arange(0, BLOCK_M)
    hin = h0 + e // EW
    win = w0 + e % EW
    row_ok = (e < EH * EW) & (hin >= 0) & (hin < H) & (win >= 0) & (win < W)
    pix = hin * W + win
    R = tl.zeros_like(acc_like)
    for c0 in range(0, CG, BLOCK_K):
        c = c0 + tl.arange(0, BLOCK_K)
        c_ok = c < CG
        a = tl.load(
            x_img + (g * CG + c)[None, :] * (H * W) + pix[:, None], mask=row_ok[:, None] & c_ok[None, :], other=0.0
        )
        r = tap * CG + c  # row of the weight matrix: tap-major, channel innermost
        w = tl.load(wp_ptr + r[:, None] * C_OUT + offs_n[None, :], mask=c_ok[:, None] & w_col[None, :], other=0.0)
        R = mma(a, w, R, IS_FP64, ALLOW_TF32)
    if STRADDLE:
        R = tl.where(w_col[None, :], R, 0.0)
    return R


@triton.jit
def pp_fwd_tap_kernel(
    x_ptr,
    wp_ptr,
    wq_ptr,
    pull_idx_ptr,
    pull_coef_ptr,
    bin_ptr,
    bout_ptr,
    alpha_ptr,
    y_ptr,
    mask_ptr,
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
    PH,
    PW,
    DH,
    DW,
    TH,
    TW,  # padding, dilation and size of the push kernel (stride 1)
    NG_TILE,  # most groups one BLOCK_N channel tile straddles
    QPH,
    QPW,
    QH,
    QW,  # padding and size of the pull kernel
    HAS_BIN: tl.constexpr,
    HAS_BOUT: tl.constexpr,
    DUAL: tl.constexpr,
    SAVE_MASKS: tl.constexpr,
    WRITE_Y: tl.constexpr,
    GRAD_SUMS: tl.constexpr,
    AVG: tl.constexpr,  # pooling window (1: no pooling)
    EH: tl.constexpr,
    EW: tl.constexpr,  # the frame: EH x EW pixels of one image, halos included
    HALO_H: tl.constexpr,
    HALO_W: tl.constexpr,  # the taps' one-sided halo (bottom, right)
    IS_FP64: tl.constexpr,
    ALLOW_TF32: tl.constexpr,
    STRADDLE: tl.constexpr,  # NG_TILE > 1: some channel tile spans several groups
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    PR: tl.constexpr = (AVG - 1) // 2  # pooling halo, each side
    OUT_H: tl.constexpr = EH - HALO_H - 2 * PR  # the pixels this program writes: OUT_H x OUT_W
    OUT_W: tl.constexpr = EW - HALO_W - 2 * PR
    tiles_h = (HO + OUT_H - 1) // OUT_H
    tiles_w = (WO + OUT_W - 1) // OUT_W
    tile = pid_m % (tiles_h * tiles_w)
    n_img = pid_m // (tiles_h * tiles_w)
    ho0 = (tile // tiles_w) * OUT_H - PR  # output pixel of the frame's row 0
    wo0 = (tile % tiles_w) * OUT_W - PR
    x_img = x_ptr + n_img.to(tl.int64) * C_IN * H * W

    offs_n, n_valid = flat_tile(pid_n, BLOCK_N, C_OUT)
    o_group = offs_n // CGO
    ACC = tl.float64 if IS_FP64 else tl.float32
    P = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    Q = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    nnz_u, nnz_v, u_rows, v_rows, u_coef, v_coef = prefilter_tables(
        pull_idx_ptr, pull_coef_ptr, 0, 0, n_valid, TH, TW, QH, False
    )
    g_lo = (pid_n * BLOCK_N) // CGO
    g_hi = (tl.minimum(pid_n * BLOCK_N + BLOCK_N, C_OUT) - 1) // CGO
    for gi in range(0, NG_TILE):  # bounds independent of program_id: see forward.py
        g = g_lo + gi
        if g <= g_hi:
            w_col = n_valid & (o_group == g)
            for i in range(0, TH):
                lo_h, frames_h = _tap_extent(i, DH, PH, QPH, pull_idx_ptr + 2, u_rows, TH, HALO_H)
                for fh in range(0, frames_h):
                    base_h = lo_h + fh * (HALO_H + 1)  # R's frame row 0 is input row ho0 + base_h
                    # sum over j of the V[b, j]-filtered R_ij: the taps of push row i share U's column i
                    Z = tl.zeros_like(P)
                    for j in range(0, TW):
                        lo_w, frames_w = _tap_extent(j, DW, PW, QPW, pull_idx_ptr + 2 + TH, v_rows, TW, HALO_W)
                        for fw in range(0, frames_w):
                            base_w = lo_w + fw * (HALO_W + 1)
                            R = _tap_response(
                                *(x_img, ho0 + base_h, wo0 + base_w, wp_ptr, i * TW + j, offs_n, w_col, g),
                                *(CG, C_OUT, H, W, P, IS_FP64, ALLOW_TF32, STRADDLE, EH, EW, BLOCK_M, BLOCK_K),
                            )
                            # push: output row e reads R's row e + (its shift - the frame's base)
                            sh = i * DH - PH - base_h
                            sw = j * DW - PW - base_w
                            if _in_frame(sh, HALO_H) & _in_frame(sw, HALO_W):
                                P += _shifted(R, sh * EW + sw, BLOCK_M)
                            # pull, along the row: V[b, j] into Z's output columns
                            for f in range(0, tl.load(pull_idx_ptr + 2 + TH + j)):
                                sw = tl.load(v_rows + f * TW + j) * DW - QPW - base_w
                                if _in_frame(sw, HALO_W):
                                    Z += tl.load(v_coef + f * TW + j).to(ACC) * _shifted(R, sw, BLOCK_M)
                    # pull, down the column: -U[a, i] from Z's frame rows into Q's output rows
                    for f in range(0, tl.load(pull_idx_ptr + 2 + i)):
                        sh = tl.load(u_rows + f * TH + i) * DH - QPH - base_h
                        if _in_frame(sh, HALO_H):
                            Q += tl.load(u_coef + f * TH + i).to(ACC) * _shifted(Z, sh * EW, BLOCK_M)
            # Sums of infinities through the taps can differ from conv2d(x, q)'s: redo this group exactly.
            _, _, ho, wo, m_valid = _frame_rows(ho0, wo0, HO, WO, EH, EW, HALO_H, HALO_W, BLOCK_M)
            if _non_finite_in(Q, m_valid, w_col):
                x_rows = x_img + tl.zeros((BLOCK_M,), dtype=tl.int64)
                exact = _pull_window_conv(
                    *(x_rows, ho - QPH, wo - QPW, m_valid, wq_ptr, offs_n, w_col, g, Q),
                    *(CG, C_OUT, H, W, QH, QW, DH, DW, IS_FP64, ALLOW_TF32, BLOCK_K),
                )
                Q = tl.where(w_col[None, :], exact, Q)

    eh, ew, ho, wo, m_valid = _frame_rows(ho0, wo0, HO, WO, EH, EW, HALO_H, HALO_W, BLOCK_M)
    if HAS_BIN:
        b = tl.load(bin_ptr + offs_n, mask=n_valid, other=0.0).to(ACC)
        P = P + b[None, :]
        Q = Q - b[None, :]
    if AVG > 1:
        # Q' = avg_pool2d(Q, AVG, stride 1, pad PR, count_include_pad=False) on the inner pixels
        Q = _box_sum(tl.where(m_valid[:, None], Q, 0.0), EW, AVG, BLOCK_M)
        Q = Q / tl.maximum(window_count(ho, PR, HO) * window_count(wo, PR, WO), 1).to(ACC)[:, None]
    written = m_valid & (eh >= PR) & (eh < OUT_H + PR) & (ew >= PR) & (ew < OUT_W + PR)
    _pp_epilogue(
        *(P, Q, n_img.to(tl.int64) + tl.zeros((BLOCK_M,), dtype=tl.int64), ho * WO + wo, written),
        *(bout_ptr, alpha_ptr, y_ptr, mask_ptr, g_ptr, sums_ptr, N, C_OUT, HO * WO),
        *(HAS_BOUT, DUAL, SAVE_MASKS, WRITE_Y, GRAD_SUMS, BLOCK_M, BLOCK_N),
    )
