"""Backward kernels of the fused push-pull convolution.

No kernel here writes a masked gradient field. The GEMM kernels form the masked gradients of the
two responses on the fly, from grad_output g and the packed masks (uint8 [2, N, ceil(C_out/8),
Ho, Wo], bit o % 8 of byte o // 8; masks[0] = [P > 0], masks[1] = [Q' > 0]), as they load their
A operand:

    gP[n, o, p] = g[n, o, p] * [P > 0]
    gQ[n, o, p] = sum over the clipped a x a window of q around p of  c_o * gQ'_g[n, o, q] * [Q' > 0] / count(q)
                  (the avg-pool adjoint, count_include_pad=False; without pooling just c_o * g * [Q' > 0])

with c_o = -alpha[o], or 1 for the dual output, whose second half of g (channels C_out + o) feeds Q.
Per mode the operands are
    upsample:  input gradient: G = gP + the prefilter's adjoint of gQ (`pull_prefilter_adjoint`) against
               the push kernel (one MMA); weight gradient: the same G against x over the input pixels
               (one MMA, `pp_bwd_weight_adjoint_kernel`), or gP against the push taps and gQ against the
               prefiltered z (forward.py, common.py `pull_prefilter`), both into dk (two MMAs,
               `pp_bwd_weight_kernel`; the launcher picks by its cost model, triton_launch._weight_adjoint_pays)
    invert:    gP - gQ against k (push and the -P0 part of the pull share k), plus the box-sum term
    scale 1:   gP - gQ against k (Q = -P0 - b_in)
formed in the accumulator dtype and rounded to the operand dtype (what autograd would hold) just
before the MMA. Four deterministic kernels (no atomics anywhere):

1. `pp_bwd_input_kernel`: transposed implicit GEMM, tile = BLOCK_M input pixels x BLOCK_N input
   channels of one group, reduction over (push tap, output channel of the group), tap-major, in every
   mode. Upsample runs on the prefilter's adjoint: q = -U k V^T gives
       dx[c](h) = sum_{o, i, j} k[o, c, i, j] G_ij[o](h),
       G_ij[o](h) = gP[o, p(h, i, j)] + sum_{a, b} -U[a, i] V[b, j] gQ[o, p_q(h, a, b)]
   (p / p_q: the output pixel (h + padding - tap * dilation) / stride of the push / pull window, where
   divisible and inside), so G is formed on the CUDA cores from gP at one place and gQ at the nonzero
   U[a, i] V[b, j] only (the forward's tables) and the products are ONE convolution's, against the push
   weights alone (the pull kernel's matrix is not read). Invert adds the box-sum adjoint
   sum_{tap, o in g} shift[o] * gQ[o, p(tap)] (the shift part of q = -k + shift[o]) as a row sum of
   the very gQ tile the MMA consumes: no per-group field goes through memory.
2. `pp_bwd_weight_kernel`: weight-gradient implicit GEMM, tile = BLOCK_M output channels of one
   group x BLOCK_N folded (tap, c) indices, reduction over pixels, split in SPLIT contiguous pixel
   ranges written to separate partial buffers that the launcher sums (deterministic split-K).
   The (tap, c) side runs over the push kernel's taps in every mode. Upsample (the prefilter route)
   accumulates dk = gP x im2col + gQ x z (z: the input prefiltered by -U[:, i] V[:, j]^T, built on the
   fly as the forward's, since the pull response is k against z): 2x one convolution's products, and
   dk comes out directly (no dq to carry back through U, V). Invert also reduces sum_p gQ[o, p] * (sum
   over the tile's (tap, c) of the input) whose total over the r tiles is sum_p gQ[o, p] * S[g, p] =
   d loss / d shift[o].
3. `pp_bwd_weight_adjoint_kernel` (upsample, the adjoint route): the input gradient's algebra read the
   other way round,
       dk[o, c, i, j] = sum_{n, h} x[n, c, h] G_ij[n, o](h)
   over the INPUT pixels h, x unshifted (the tap's shift is in G). Tile = BLOCK_M output channels x
   BLOCK_N input channels of one group for ONE push tap (the tap is in the grid), reduction over the
   input pixels, split-K as 2. One MMA a chunk: one convolution's products at stride 1 (s^2 at stride
   s, the input pixels being s^2 the output pixels), plus G formed on the CUDA cores once per c tile
   (the widest U V pair's 25 FMAs an element at scale 2: the per-tap bound of the input gradient's
   adjoint spilled here). Its c side is padded to the MMA's 16, so
   the prefilter route stays cheaper for few input channels a group (the 3-channel stem) and strides.
4. `pp_bwd_bias_kernel`: d loss / d b_in[o] = sum_p gP - sum_p gQ as a per-channel reduction over
   pixels (split in SPLIT ranges, partials [SPLIT, C_out] summed by the launcher). The pooling
   adjoint preserves sums (each q spreads gQ'[q] / count(q) over count(q) pixels), so it reads g and
   the masks at the same pixel only, no window gather.
"""

import triton
import triton.language as tl

from .common import (
    MODE_INVERT,
    MODE_UPSAMPLE,
    flat_tile,
    gather_taps,
    image_and_pixel,
    mma_grad_operand,
    prefilter_tables,
    pull_prefilter,
    split_chunk,
    tap_chunk,
    window_count,
)


@triton.jit
def _mask_bit(mask_ptr, which_off, n_img, o, pix, CB, HOWO, valid):
    """Bit (o % 8) of masks[which, n, o // 8, pix] as a boolean; the index arguments broadcast."""
    off = which_off + n_img * CB * HOWO + (o // 8) * HOWO + pix
    byte = tl.load(mask_ptr + off, mask=valid, other=0).to(tl.int32)
    return ((byte >> (o % 8)) & 1) != 0


@triton.jit
def grad_push(g_ptr, mask_ptr, n_img, o, pix, valid, C_OUT, HOWO, DUAL: tl.constexpr, ACC: tl.constexpr):
    """gP = g * [P > 0] at (n_img (int64), o, pix), broadcast to valid's shape; 0 where not valid."""
    CB = (C_OUT + 7) // 8
    if DUAL:
        g_off = n_img * (2 * C_OUT) * HOWO + o * HOWO + pix
    else:
        g_off = n_img * C_OUT * HOWO + o * HOWO + pix
    bit = _mask_bit(mask_ptr, 0, n_img, o, pix, CB, HOWO, valid)
    return tl.load(g_ptr + g_off, mask=valid & bit, other=0.0).to(ACC)


@triton.jit
def pull_sign(alpha_ptr, o, C_OUT, DUAL: tl.constexpr, ACC: tl.constexpr):
    """c_o of gQ: -alpha[o], or 1 for the dual output."""
    if DUAL:
        c = 1.0
    else:
        c = -tl.load(alpha_ptr + o, mask=o < C_OUT, other=0.0).to(ACC)
    return c


@triton.jit
def grad_pull_unscaled(
    g_ptr,
    mask_ptr,
    n_img,
    o,
    ho,
    wo,
    valid,
    N,
    C_OUT,
    HO,
    WO,
    AVG,
    AVG_PAD,
    DUAL: tl.constexpr,
    POOLED: tl.constexpr,
    ACC: tl.constexpr,
):
    """gQ / c_o = pool_adjoint(g_Q * [Q' > 0]) at (n_img (int64), o, ho, wo), broadcast to valid's
    shape; 0 where not valid (g_Q = g[:, C_OUT + o] for the dual output)."""
    HOWO = HO * WO
    CB = (C_OUT + 7) // 8
    q_which = tl.cast(N, tl.int64) * CB * HOWO  # offset of masks[1]
    if DUAL:
        g_base = n_img * (2 * C_OUT) * HOWO + (o + C_OUT) * HOWO
    else:
        g_base = n_img * C_OUT * HOWO + o * HOWO
    if POOLED:
        gq = tl.zeros_like(valid.to(ACC))
        for di in range(0, AVG):
            hh = ho + (di - AVG_PAD)
            cnt_h = window_count(hh, AVG_PAD, HO)
            ok_h = valid & (hh >= 0) & (hh < HO)
            for dj in range(0, AVG):
                ww = wo + (dj - AVG_PAD)
                cnt_w = window_count(ww, AVG_PAD, WO)
                nb = ok_h & (ww >= 0) & (ww < WO)
                q_pix = hh * WO + ww
                bit = _mask_bit(mask_ptr, q_which, n_img, o, q_pix, CB, HOWO, nb)
                gv = tl.load(g_ptr + g_base + q_pix, mask=nb & bit, other=0.0).to(ACC)
                gq += gv / tl.maximum(cnt_h * cnt_w, 1).to(ACC)
    else:
        pix = ho * WO + wo
        bit = _mask_bit(mask_ptr, q_which, n_img, o, pix, CB, HOWO, valid)
        gq = tl.load(g_ptr + g_base + pix, mask=valid & bit, other=0.0).to(ACC)
    return gq


@triton.jit
def grad_pull(
    g_ptr,
    mask_ptr,
    alpha_ptr,
    n_img,
    o,
    ho,
    wo,
    valid,
    N,
    C_OUT,
    HO,
    WO,
    AVG,
    AVG_PAD,
    DUAL: tl.constexpr,
    POOLED: tl.constexpr,
    ACC: tl.constexpr,
):
    """gQ = pool_adjoint(c_o * g_Q * [Q' > 0]) at (n_img (int64), o, ho, wo), broadcast to valid's
    shape; 0 where not valid. c_o = -alpha[o], or 1 for the dual output (g_Q = g[:, C_OUT + o])."""
    gq = grad_pull_unscaled(g_ptr, mask_ptr, n_img, o, ho, wo, valid, N, C_OUT, HO, WO, AVG, AVG_PAD, DUAL, POOLED, ACC)
    return pull_sign(alpha_ptr, o, C_OUT, DUAL, ACC) * gq


@triton.jit
def output_coord(hn, S, HO):
    """The output coordinate hn / S of a strided convolution's adjoint (hn = input coordinate + padding -
    tap offset) and whether there is one: hn divisible by S and the quotient in [0, HO)."""
    ho = hn // S
    return ho, (hn >= 0) & (hn % S == 0) & (ho < HO)


@triton.jit
def pull_prefilter_adjoint(
    g_ptr,
    mask_ptr,
    n_col,
    o,
    h,
    w,
    row_valid,
    col_valid,
    t,
    SH,
    SW,
    QPH,
    QPW,
    DH,
    DW,
    TH,
    TW,
    QH,
    idx_ptr,
    coef_ptr,
    N,
    C_OUT,
    HO,
    WO,
    AVG,
    AVG_PAD,
    DUAL: tl.constexpr,
    POOLED: tl.constexpr,
    ACC: tl.constexpr,
    TILE_BOUNDS: tl.constexpr = True,
):
    """The adjoint of common.py `pull_prefilter`: the pull part of the input gradient's A operand, as a
    tile of rows = input pixels (n_col [rows, 1], h / w [rows]) and columns = (push tap t = i * TW + j,
    output channel o [1, cols]), in the accumulator dtype, WITHOUT gQ's sign c_o:

        q[o, c] = -U k[o, c] V^T  =>  dx_pull[c](h) = sum_{o, a, b} q[o, c, a, b] gQ[o, p(h, a, b)]
                                                    = sum_{o, i, j} k[o, c, i, j] G_ij[o](h),
        G_ij[o](h) = sum_{a, b} -U[a, i] V[b, j] gQ[o, p(h, a, b)],  p(h, a, b) = (h + pull pad - (a, b) * dil) / stride

    (where divisible and inside the output), so the pull response's gradient is the push weights
    against G: one MMA with the push part gP. Only the nonzero U[a, i] and V[b, j] are visited (the
    tables of pull_prefilter, same layout): an entry of gQ reaches dx only through a nonzero tap of q."""
    i = t // TW  # push row / column of each column's tap
    j = t % TW
    nnz_u, nnz_v, u_rows, v_rows, u_coef, v_coef = prefilter_tables(
        idx_ptr, coef_ptr, i, j, col_valid, TH, TW, QH, TILE_BOUNDS
    )
    acc = tl.zeros((h.shape[0], t.shape[0]), dtype=ACC)
    for e in range(0, nnz_u):
        a = tl.load(u_rows + e * TH + i, mask=col_valid, other=0)  # pull tap row of U's e-th nonzero
        u = tl.load(u_coef + e * TH + i, mask=col_valid, other=0.0).to(ACC)  # -U[a, i]
        ho, ok_h = output_coord(h[:, None] + QPH - (a * DH)[None, :], SH, HO)
        row_ok = row_valid[:, None] & (u != 0)[None, :] & ok_h
        acc_row = tl.zeros_like(acc)  # sum over b of V[b, j] * gQ at output pixel p(h, a, b)
        for f in range(0, nnz_v):
            b = tl.load(v_rows + f * TW + j, mask=col_valid, other=0)
            v = tl.load(v_coef + f * TW + j, mask=col_valid, other=0.0).to(ACC)
            wo, ok_w = output_coord(w[:, None] + QPW - (b * DW)[None, :], SW, WO)
            ok = row_ok & (v != 0)[None, :] & ok_w
            gq = grad_pull_unscaled(
                g_ptr, mask_ptr, n_col, o, ho, wo, ok, N, C_OUT, HO, WO, AVG, AVG_PAD, DUAL, POOLED, ACC
            )
            acc_row += v[None, :] * gq
        acc += u[None, :] * acc_row
    return acc


@triton.jit
def pp_bwd_input_kernel(
    g_ptr,
    mask_ptr,
    alpha_ptr,
    shift_ptr,
    wp_ptr,
    pull_idx_ptr,
    pull_coef_ptr,
    gx_ptr,
    N,
    C_IN,
    H,
    W,
    C_OUT,
    HO,
    WO,
    G,
    CG,
    CGO,
    SH,
    SW,
    PH,
    PW,
    DH,
    DW,
    TH,
    TW,  # stride, padding, dilation and size of the push kernel
    QPH,
    QPW,
    QH,
    QW,  # upsample: padding and size of the pull kernel (QW: the cost model's, the tables need QH only)
    AVG,
    AVG_PAD,
    MODE: tl.constexpr,
    DUAL: tl.constexpr,
    POOLED: tl.constexpr,
    IS_FP64: tl.constexpr,
    ALLOW_TF32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    g = tl.program_id(2)
    HW = H * W
    K_TOTAL = TH * TW * CGO
    ACC = tl.float64 if IS_FP64 else tl.float32
    w_ty = wp_ptr.dtype.element_ty

    offs_m, m_valid = flat_tile(pid_m, BLOCK_M, N * HW)
    offs_c, c_valid = flat_tile(pid_c, BLOCK_N, CG)
    n_img, pix = image_and_pixel(offs_m, HW)
    h = pix // W
    w = pix % W
    n_col = n_img[:, None]
    w_base = g * K_TOTAL * CG

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    if MODE == MODE_INVERT:
        t_sum = tl.zeros((BLOCK_M,), dtype=ACC)
    for k0 in range(0, K_TOTAL, BLOCK_K):
        r, r_valid, t, o = tap_chunk(k0, BLOCK_K, K_TOTAL, CGO, g)  # reduction over (push tap, output channel)
        o = o[None, :]
        ho, ok_h = output_coord(h[:, None] + PH - (t // TW)[None, :] * DH, SH, HO)
        wo, ok_w = output_coord(w[:, None] + PW - (t % TW)[None, :] * DW, SW, WO)
        a_mask = m_valid[:, None] & r_valid[None, :] & ok_h & ok_w
        w_mask = r_valid[:, None] & c_valid[None, :]
        wp = tl.load(wp_ptr + w_base + r[:, None] * CG + offs_c[None, :], mask=w_mask, other=0.0)
        gp = grad_push(g_ptr, mask_ptr, n_col, o, ho * WO + wo, a_mask, C_OUT, HO * WO, DUAL, ACC)
        if MODE == MODE_UPSAMPLE:
            # G = gP + c_o * sum_{a, b} -U[a, i] V[b, j] gQ (pull_prefilter_adjoint): one MMA against k
            gq = pull_prefilter_adjoint(
                *(g_ptr, mask_ptr, n_col, o, h, w, m_valid, r_valid, t, SH, SW, QPH, QPW, DH, DW, TH, TW, QH),
                *(pull_idx_ptr, pull_coef_ptr, N, C_OUT, HO, WO, AVG, AVG_PAD, DUAL, POOLED, ACC),
            )
            a_op = gp + pull_sign(alpha_ptr, o, C_OUT, DUAL, ACC) * gq
        else:
            gq = grad_pull(
                g_ptr, mask_ptr, alpha_ptr, n_col, o, ho, wo, a_mask, N, C_OUT, HO, WO, AVG, AVG_PAD, DUAL, POOLED, ACC
            )
            a_op = gp - gq
            if MODE == MODE_INVERT:
                # Box-sum adjoint: every input channel of the group gets sum_{tap, o} shift[o] * gQ.
                sh = tl.load(shift_ptr + o, mask=r_valid[None, :], other=0.0).to(ACC)
                t_sum += tl.sum(gq * sh, axis=1)
        acc = mma_grad_operand(a_op.to(w_ty), wp, acc, IS_FP64, ALLOW_TF32)

    if MODE == MODE_INVERT:
        acc += t_sum[:, None]

    x_off = n_col * C_IN * HW + (g * CG + offs_c)[None, :] * HW + pix[:, None]
    tl.store(gx_ptr + x_off, acc.to(gx_ptr.dtype.element_ty), mask=m_valid[:, None] & c_valid[None, :])


@triton.jit
def pp_bwd_weight_kernel(
    x_ptr,
    g_ptr,
    mask_ptr,
    alpha_ptr,
    pull_idx_ptr,
    pull_coef_ptr,
    gw_ptr,
    gs_ptr,
    N,
    C_IN,
    H,
    W,
    C_OUT,
    HO,
    WO,
    CG,
    CGO,
    SH,
    SW,
    PH,
    PW,
    DH,
    DW,
    TH,
    TW,  # stride, padding, dilation and size of the push kernel
    QPH,
    QPW,
    QH,
    QW,  # upsample: padding and size of the pull kernel
    AVG,
    AVG_PAD,
    PIX_PER_SPLIT,
    NUM_O_TILES,
    NUM_R_TILES,
    MODE: tl.constexpr,
    DUAL: tl.constexpr,
    POOLED: tl.constexpr,
    NEED_W: tl.constexpr,
    IS_FP64: tl.constexpr,
    ALLOW_TF32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_go = tl.program_id(0)
    pid_r = tl.program_id(1)
    split = tl.program_id(2)
    g = pid_go // NUM_O_TILES
    o_tile = pid_go % NUM_O_TILES
    HOWO = HO * WO
    P_TOTAL = N * HOWO
    K_TOTAL = TH * TW * CG
    ACC = tl.float64 if IS_FP64 else tl.float32
    x_ty = x_ptr.dtype.element_ty

    ol = o_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    o_valid = ol < CGO
    offs_o = g * CGO + ol
    o_row = offs_o[:, None]
    r, r_valid, t, c = tap_chunk(pid_r * BLOCK_N, BLOCK_N, K_TOTAL, CG, g)

    acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    if MODE == MODE_INVERT:
        acc_s = tl.zeros((BLOCK_M,), dtype=ACC)

    for p0 in range(0, PIX_PER_SPLIT, BLOCK_K):
        p, p_valid = split_chunk(split, p0, BLOCK_K, PIX_PER_SPLIT, P_TOTAL)
        n_img, pix = image_and_pixel(p, HOWO)
        ho = pix // WO
        wo = pix % WO
        f_mask = o_valid[:, None] & p_valid[None, :]
        x_rows = x_ptr + n_img * C_IN * H * W
        xt = gather_taps(x_rows, ho * SH - PH, wo * SW - PW, p_valid, r_valid, t, c, TW, DH, DW, H, W)
        n_row = n_img[None, :]
        gq = grad_pull(
            *(g_ptr, mask_ptr, alpha_ptr, n_row, o_row, ho[None, :], wo[None, :], f_mask),
            *(N, C_OUT, HO, WO, AVG, AVG_PAD, DUAL, POOLED, ACC),
        )
        if MODE == MODE_UPSAMPLE:
            # dk = gP^T x_taps + gQ^T z (forward.py: the pull response is k against the prefiltered z)
            zt = pull_prefilter(
                *(x_rows, ho * SH - QPH, wo * SW - QPW, p_valid, r_valid, t, c),
                *(TH, TW, DH, DW, H, W, QH, pull_idx_ptr, pull_coef_ptr, ACC),
                TILE_BOUNDS=False,  # (tap, c) tiles span the taps: the widest pair's bounds (fewer registers)
            )
            gp = grad_push(g_ptr, mask_ptr, n_row, o_row, pix[None, :], f_mask, C_OUT, HOWO, DUAL, ACC)
            acc1 = mma_grad_operand(gp.to(x_ty), xt, acc1, IS_FP64, ALLOW_TF32)
            acc1 = mma_grad_operand(gq.to(x_ty), zt.to(x_ty), acc1, IS_FP64, ALLOW_TF32)
        else:
            if NEED_W:
                gp = grad_push(g_ptr, mask_ptr, n_row, o_row, pix[None, :], f_mask, C_OUT, HOWO, DUAL, ACC)
                acc1 = mma_grad_operand((gp - gq).to(x_ty), xt, acc1, IS_FP64, ALLOW_TF32)
            if MODE == MODE_INVERT:
                xs = tl.sum(xt.to(ACC), axis=1)
                acc_s += tl.sum(gq * xs[None, :], axis=1)

    out_mask = o_valid[:, None] & r_valid[None, :]
    w_off = split.to(tl.int64) * C_OUT * K_TOTAL + o_row * K_TOTAL + r[None, :]
    if NEED_W:
        tl.store(gw_ptr + w_off, acc1, mask=out_mask)
    if MODE == MODE_INVERT:
        s_off = (split * NUM_R_TILES + pid_r) * C_OUT + offs_o
        tl.store(gs_ptr + s_off, acc_s, mask=o_valid)


@triton.jit
def pp_bwd_bias_kernel(
    g_ptr,
    mask_ptr,
    alpha_ptr,
    part_ptr,
    N,
    C_OUT,
    HO,
    WO,
    PIX_PER_SPLIT,
    DUAL: tl.constexpr,
    IS_FP64: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """part[split, o] = sum over the split's pixels p (flattened over batch) of gP[o, p] - gQ'[o, p]
    (unpooled: the pooling adjoint keeps the sum)."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    HOWO = HO * WO
    P_TOTAL = N * HOWO
    ACC = tl.float64 if IS_FP64 else tl.float32
    offs_n, n_valid = flat_tile(pid_n, BLOCK_N, C_OUT)
    o_row = offs_n[None, :]
    acc = tl.zeros((BLOCK_N,), dtype=ACC)
    for m0 in range(0, PIX_PER_SPLIT, BLOCK_M):
        p, p_valid = split_chunk(split, m0, BLOCK_M, PIX_PER_SPLIT, P_TOTAL)
        n_img, pix = image_and_pixel(p, HOWO)
        n_col, pix = n_img[:, None], pix[:, None]
        valid = p_valid[:, None] & n_valid[None, :]
        gp = grad_push(g_ptr, mask_ptr, n_col, o_row, pix, valid, C_OUT, HOWO, DUAL, ACC)
        # unpooled gQ': with POOLED=False grad_pull reads the single position ho * WO + wo = pix
        gq = grad_pull(
            g_ptr, mask_ptr, alpha_ptr, n_col, o_row, 0, pix, valid, N, C_OUT, HO, WO, 1, 0, DUAL, False, ACC
        )
        acc += tl.sum(gp - gq, axis=0)
    tl.store(part_ptr + split * C_OUT + offs_n, acc, mask=n_valid)


@triton.jit
def pp_bwd_weight_adjoint_kernel(
    x_ptr,
    g_ptr,
    mask_ptr,
    alpha_ptr,
    pull_idx_ptr,
    pull_coef_ptr,
    gw_ptr,
    N,
    C_IN,
    H,
    W,
    C_OUT,
    HO,
    WO,
    CG,
    CGO,
    SH,
    SW,
    PH,
    PW,
    DH,
    DW,
    TH,
    TW,  # stride, padding, dilation and size of the push kernel
    QPH,
    QPW,
    QH,
    QW,  # padding and size of the pull kernel (QW: the cost model's, the tables need QH only)
    AVG,
    AVG_PAD,
    PIX_PER_SPLIT,
    NUM_O_TILES,
    NUM_C_TILES,
    DUAL: tl.constexpr,
    POOLED: tl.constexpr,
    IS_FP64: tl.constexpr,
    ALLOW_TF32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Upsample's weight gradient on the prefilter's adjoint (the input gradient's operand G):

        dk[o, c, i, j] = sum_{n, h} x[n, c, h] G_ij[n, o](h),
        G_ij[o](h) = gP[o, p(h, i, j)] + c_o sum_{a, b} -U[a, i] V[b, j] gQ'[o, p_q(h, a, b)]

    over the INPUT pixels h (N * H * W), x read unshifted. Tile: BLOCK_M output channels x BLOCK_N input
    channels of one group for ONE push tap (grid: (group, o tile), (tap, c tile), split); reduction over
    the split's input pixels in BLOCK_K chunks, one MMA each. It accumulates dk^T (rows c, columns o):
    G is formed as G^T [pixels, o], the layout of pull_prefilter_adjoint (rows pixels, columns (tap, o)),
    and x^T [c, pixels] is the contiguous side of x. Partials [split, C_out, (tap, c)] as
    pp_bwd_weight_kernel's."""
    pid_go = tl.program_id(0)
    pid_tc = tl.program_id(1)
    split = tl.program_id(2)
    g = pid_go // NUM_O_TILES
    o_tile = pid_go % NUM_O_TILES
    tap = pid_tc // NUM_C_TILES  # push tap (i, j) = (tap // TW, tap % TW)
    c_tile = pid_tc % NUM_C_TILES
    HW = H * W
    K_TOTAL = TH * TW * CG
    ACC = tl.float64 if IS_FP64 else tl.float32
    x_ty = x_ptr.dtype.element_ty

    ol = o_tile * BLOCK_M + tl.arange(0, BLOCK_M)  # output channel of the group
    o_valid = ol < CGO
    offs_o = g * CGO + ol
    o = offs_o[None, :]
    cl = c_tile * BLOCK_N + tl.arange(0, BLOCK_N)  # input channel of the group
    c_valid = cl < CG
    x_chan = (g * CG + cl)[:, None] * HW
    t = tap + tl.zeros((BLOCK_M,), dtype=tl.int32)  # every G column's tap (the adjoint's column layout)
    sign = pull_sign(alpha_ptr, o, C_OUT, DUAL, ACC)

    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=ACC)  # dk^T[c, o] of this tap
    for p0 in range(0, PIX_PER_SPLIT, BLOCK_K):
        p, p_valid = split_chunk(split, p0, BLOCK_K, PIX_PER_SPLIT, N * HW)  # flat input pixels
        n_img, pix = image_and_pixel(p, HW)
        h = pix // W
        w = pix % W
        n_col = n_img[:, None]
        # push: input pixel h meets tap (i, j) of output pixel (h + pad - (i, j) * dil) / stride
        ho, ok_h = output_coord(h + PH - (tap // TW) * DH, SH, HO)
        wo, ok_w = output_coord(w + PW - (tap % TW) * DW, SW, WO)
        gp_mask = (p_valid & ok_h & ok_w)[:, None] & o_valid[None, :]
        gp = grad_push(g_ptr, mask_ptr, n_col, o, (ho * WO + wo)[:, None], gp_mask, C_OUT, HO * WO, DUAL, ACC)
        gq = pull_prefilter_adjoint(
            *(g_ptr, mask_ptr, n_col, o, h, w, p_valid, o_valid, t, SH, SW, QPH, QPW, DH, DW, TH, TW, QH),
            *(pull_idx_ptr, pull_coef_ptr, N, C_OUT, HO, WO, AVG, AVG_PAD, DUAL, POOLED, ACC),
            TILE_BOUNDS=False,  # the per-tap bound spilled 8 B here (sm_90, Triton 3.6, tf32x3)
        )
        g_t = (gp + sign * gq).to(x_ty)  # G^T [pixels, o], rounded to the operand dtype
        # x^T [c, pixels]: x[n, c, h, w] unshifted (the tap's shift is in G)
        x_off = n_img[None, :] * C_IN * HW + x_chan + pix[None, :]
        xt = tl.load(x_ptr + x_off, mask=c_valid[:, None] & p_valid[None, :], other=0.0)
        acc = mma_grad_operand(xt, g_t, acc, IS_FP64, ALLOW_TF32)

    # partial [split, o, (tap, c)]: dk^T's row c, column o
    w_off = split.to(tl.int64) * C_OUT * K_TOTAL + o * K_TOTAL + (tap * CG + cl)[:, None]
    tl.store(gw_ptr + w_off, acc, mask=c_valid[:, None] & o_valid[None, :])
