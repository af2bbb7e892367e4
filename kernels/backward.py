"""Backward kernels of the fused push-pull convolution.

Three deterministic kernels (no atomics anywhere):

1. `pp_bwd_fields_kernel` (elementwise over [N, C_out, Ho, Wo]): from grad_output and the packed
   masks it forms the masked gradient fields gP = g * [P > 0] and gQ = pool_adjoint(c * g * [Q' > 0])
   (c = -alpha[o], or 1 for the dual output's second half). The average-pool adjoint with
   count_include_pad=False is gathered on the fly: gQ[p] = sum over the a x a windows w holding p of
   gQ'[w] / count(w). It writes
     upsample:       F1 = gP,       F2 = gQ   (the two convolutions have different kernels)
     invert:         F1 = gP - gQ,  F2 = gQ   (push and the -P0 part of the pull share k)
     scale 1:        F1 = gP - gQ             (Q = -P0 - b_in)
   in the input dtype (what autograd would hold).
2. `pp_bwd_input_kernel`: transposed implicit GEMM, tile = BLOCK_M input pixels x BLOCK_N input
   channels of one group, reduction over (tap, output channel of the group), tap-major. Upsample
   feeds F2 with the pull kernel and F1 with the embedded push kernel from the same tap loop
   (skipping push MMAs on chunks without push taps). Invert adds the box-sum adjoint of
   T[n, g] = sum_{o in g} shift[o] * gQ[o] (computed by the launcher) to every channel of the group.
3. `pp_bwd_weight_kernel`: weight-gradient implicit GEMM, tile = BLOCK_M output channels of one
   group x BLOCK_N folded (tap, c) indices, reduction over pixels, split in SPLIT contiguous pixel
   ranges written to separate partial buffers that the launcher sums (deterministic split-K).
   Upsample accumulates F1 x im2col (push, embedded window) and F2 x im2col (pull) from the same
   gathered input tile; invert also reduces sum_p gQ[o, p] * (sum over the tile's (tap, c) of the
   input) whose total over the r tiles is sum_p gQ[o, p] * S[g, p] = d loss / d shift[o].
"""
import triton
import triton.language as tl

from .common import MODE_INVERT, MODE_UPSAMPLE, any_push_tap, mma


@triton.jit
def _mask_bit(mask_ptr, which_off, n_img, offs_n, pix, CB, HOWO, valid):
    """Bit (o % 8) of masks[which, n, o // 8, pix] as a boolean [BLOCK_M, BLOCK_N]."""
    off = which_off + n_img[:, None] * CB * HOWO + (offs_n // 8)[None, :] * HOWO + pix
    byte = tl.load(mask_ptr + off, mask=valid, other=0).to(tl.int32)
    return ((byte >> (offs_n % 8)[None, :]) & 1) != 0


@triton.jit
def pp_bwd_fields_kernel(
    g_ptr, mask_ptr, alpha_ptr, f1_ptr, f2_ptr,
    N, C_OUT, HO, WO, AVG, AVG_PAD,
    MODE: tl.constexpr, DUAL: tl.constexpr, POOLED: tl.constexpr, IS_FP64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    HOWO = HO * WO
    CB = (C_OUT + 7) // 8
    ACC = tl.float64 if IS_FP64 else tl.float32
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_valid = offs_m < N * HOWO
    n_valid = offs_n < C_OUT
    valid = m_valid[:, None] & n_valid[None, :]
    n_img = (offs_m // HOWO).to(tl.int64)
    pix = offs_m % HOWO
    ho = pix // WO
    wo = pix % WO
    if DUAL:
        g_img = n_img[:, None] * (2 * C_OUT) * HOWO
        q_chan = offs_n + C_OUT
    else:
        g_img = n_img[:, None] * C_OUT * HOWO
        q_chan = offs_n
    q_which = tl.cast(N, tl.int64) * CB * HOWO  # offset of masks[1]

    bit_p = _mask_bit(mask_ptr, 0, n_img, offs_n, pix[:, None], CB, HOWO, valid)
    g_p = tl.load(g_ptr + g_img + offs_n[None, :] * HOWO + pix[:, None], mask=valid, other=0.0).to(ACC)
    gP = tl.where(bit_p, g_p, 0.0)

    if POOLED:
        gQ = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
        for di in range(0, AVG):
            hh = ho + di - AVG_PAD
            cnt_h = tl.minimum(hh + AVG_PAD, HO - 1) - tl.maximum(hh - AVG_PAD, 0) + 1
            for dj in range(0, AVG):
                ww = wo + dj - AVG_PAD
                cnt_w = tl.minimum(ww + AVG_PAD, WO - 1) - tl.maximum(ww - AVG_PAD, 0) + 1
                inside = (hh >= 0) & (hh < HO) & (ww >= 0) & (ww < WO)
                nb = valid & inside[:, None]
                q_pix = (hh * WO + ww)[:, None]
                bit_q = _mask_bit(mask_ptr, q_which, n_img, offs_n, q_pix, CB, HOWO, nb)
                g_q = tl.load(g_ptr + g_img + q_chan[None, :] * HOWO + q_pix, mask=nb, other=0.0).to(ACC)
                cnt = tl.maximum(cnt_h * cnt_w, 1).to(ACC)
                gQ += tl.where(bit_q, g_q, 0.0) / cnt[:, None]
    else:
        bit_q = _mask_bit(mask_ptr, q_which, n_img, offs_n, pix[:, None], CB, HOWO, valid)
        g_q = tl.load(g_ptr + g_img + q_chan[None, :] * HOWO + pix[:, None], mask=valid, other=0.0).to(ACC)
        gQ = tl.where(bit_q, g_q, 0.0)
    if not DUAL:
        alpha = tl.load(alpha_ptr + offs_n, mask=n_valid, other=0.0).to(ACC)
        gQ = -alpha[None, :] * gQ

    f_off = n_img[:, None] * C_OUT * HOWO + offs_n[None, :] * HOWO + pix[:, None]
    f_ty = f1_ptr.dtype.element_ty
    if MODE == MODE_UPSAMPLE:
        tl.store(f1_ptr + f_off, gP.to(f_ty), mask=valid)
        tl.store(f2_ptr + f_off, gQ.to(f_ty), mask=valid)
    else:
        tl.store(f1_ptr + f_off, (gP - gQ).to(f_ty), mask=valid)
        if MODE == MODE_INVERT:
            tl.store(f2_ptr + f_off, gQ.to(f_ty), mask=valid)


@triton.jit
def pp_bwd_input_kernel(
    f1_ptr, f2_ptr, t_ptr, wp_ptr, wq_ptr, gx_ptr,
    N, C_IN, H, W, C_OUT, HO, WO, G, CG, CGO,
    SH, SW, PH, PW, DH, DW, TH, TW,
    PUSH_I0, PUSH_I1, PUSH_J0, PUSH_J1,
    MODE: tl.constexpr, IS_FP64: tl.constexpr, ALLOW_TF32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    g = tl.program_id(2)
    HW = H * W
    HOWO = HO * WO
    K_TOTAL = TH * TW * CGO
    ACC = tl.float64 if IS_FP64 else tl.float32

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = pid_c * BLOCK_N + tl.arange(0, BLOCK_N)
    m_valid = offs_m < N * HW
    c_valid = offs_c < CG
    n_img = (offs_m // HW).to(tl.int64)
    pix = offs_m % HW
    h = pix // W
    w = pix % W
    f_img = n_img * C_OUT * HOWO + g * CGO * HOWO     # [BLOCK_M], 64-bit
    w_base = g * K_TOTAL * CG

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k0 in range(0, K_TOTAL, BLOCK_K):
        r = k0 + tl.arange(0, BLOCK_K)
        r_valid = r < K_TOTAL
        t = r // CGO
        ol = r % CGO
        hn = h[:, None] + PH - (t // TW)[None, :] * DH
        wn = w[:, None] + PW - (t % TW)[None, :] * DW
        ho = hn // SH
        wo = wn // SW
        a_mask = (m_valid[:, None] & r_valid[None, :] & (hn >= 0) & (wn >= 0)
                  & (hn % SH == 0) & (wn % SW == 0) & (ho < HO) & (wo < WO))
        f_off = f_img[:, None] + ol[None, :] * HOWO + ho * WO + wo
        w_mask = r_valid[:, None] & c_valid[None, :]
        w_off = w_base + r[:, None] * CG + offs_c[None, :]
        if MODE == MODE_UPSAMPLE:
            a2 = tl.load(f2_ptr + f_off, mask=a_mask, other=0.0)
            wq = tl.load(wq_ptr + w_off, mask=w_mask, other=0.0)
            acc = mma(a2, wq, acc, IS_FP64, ALLOW_TF32)
            if any_push_tap(r, K_TOTAL, CGO, TW, PUSH_I0, PUSH_I1, PUSH_J0, PUSH_J1):
                a1 = tl.load(f1_ptr + f_off, mask=a_mask, other=0.0)
                wp = tl.load(wp_ptr + w_off, mask=w_mask, other=0.0)
                acc = mma(a1, wp, acc, IS_FP64, ALLOW_TF32)
        else:
            a1 = tl.load(f1_ptr + f_off, mask=a_mask, other=0.0)
            wp = tl.load(wp_ptr + w_off, mask=w_mask, other=0.0)
            acc = mma(a1, wp, acc, IS_FP64, ALLOW_TF32)

    if MODE == MODE_INVERT:
        # Box-sum adjoint: every input channel of the group gets sum over taps of T[n, g, ho, wo].
        t_img = (n_img * G + g) * HOWO
        t_sum = tl.zeros((BLOCK_M,), dtype=ACC)
        for tap in range(0, TH * TW):
            hn1 = h + PH - (tap // TW) * DH
            wn1 = w + PW - (tap % TW) * DW
            ho1 = hn1 // SH
            wo1 = wn1 // SW
            ok = (m_valid & (hn1 >= 0) & (wn1 >= 0) & (hn1 % SH == 0) & (wn1 % SW == 0)
                  & (ho1 < HO) & (wo1 < WO))
            t_sum += tl.load(t_ptr + t_img + ho1 * WO + wo1, mask=ok, other=0.0).to(ACC)
        acc += t_sum[:, None]

    x_off = n_img[:, None] * C_IN * HW + (g * CG + offs_c)[None, :] * HW + pix[:, None]
    tl.store(gx_ptr + x_off, acc.to(gx_ptr.dtype.element_ty), mask=m_valid[:, None] & c_valid[None, :])


@triton.jit
def pp_bwd_weight_kernel(
    x_ptr, f1_ptr, f2_ptr, gw1_ptr, gw2_ptr, gs_ptr,
    N, C_IN, H, W, C_OUT, HO, WO, CG, CGO,
    SH, SW, PH, PW, DH, DW, TH, TW,
    PUSH_I0, PUSH_I1, PUSH_J0, PUSH_J1,
    PIX_PER_SPLIT, NUM_O_TILES, NUM_R_TILES,
    MODE: tl.constexpr, NEED_W: tl.constexpr, IS_FP64: tl.constexpr, ALLOW_TF32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_go = tl.program_id(0)
    pid_r = tl.program_id(1)
    split = tl.program_id(2)
    g = pid_go // NUM_O_TILES
    o_tile = pid_go % NUM_O_TILES
    HW = H * W
    HOWO = HO * WO
    P_TOTAL = N * HOWO
    K_TOTAL = TH * TW * CG
    ACC = tl.float64 if IS_FP64 else tl.float32

    ol = o_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    o_valid = ol < CGO
    offs_o = g * CGO + ol
    r = pid_r * BLOCK_N + tl.arange(0, BLOCK_N)
    r_valid = r < K_TOTAL
    t = r // CG
    c = g * CG + r % CG
    ti = t // TW
    tj = t % TW
    if MODE == MODE_UPSAMPLE:
        has_push = any_push_tap(r, K_TOTAL, CG, TW, PUSH_I0, PUSH_I1, PUSH_J0, PUSH_J1)

    acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    if MODE == MODE_UPSAMPLE:
        acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    if MODE == MODE_INVERT:
        acc_s = tl.zeros((BLOCK_M,), dtype=ACC)

    p_start = split * PIX_PER_SPLIT
    for p0 in range(0, PIX_PER_SPLIT, BLOCK_K):
        kk = p0 + tl.arange(0, BLOCK_K)
        p = p_start + kk
        p_valid = (p < P_TOTAL) & (kk < PIX_PER_SPLIT)
        n_img = (p // HOWO).to(tl.int64)
        pix = p % HOWO
        ho = pix // WO
        wo = pix % WO
        f_off = n_img[None, :] * C_OUT * HOWO + offs_o[:, None] * HOWO + pix[None, :]
        f_mask = o_valid[:, None] & p_valid[None, :]
        hi = (ho * SH - PH)[:, None] + ti[None, :] * DH
        wi = (wo * SW - PW)[:, None] + tj[None, :] * DW
        x_mask = p_valid[:, None] & r_valid[None, :] & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
        x_off = n_img[:, None] * C_IN * HW + c[None, :] * HW + hi * W + wi
        xt = tl.load(x_ptr + x_off, mask=x_mask, other=0.0)
        if MODE == MODE_UPSAMPLE:
            f2 = tl.load(f2_ptr + f_off, mask=f_mask, other=0.0)
            acc2 = mma(f2, xt, acc2, IS_FP64, ALLOW_TF32)
            if has_push:
                f1 = tl.load(f1_ptr + f_off, mask=f_mask, other=0.0)
                acc1 = mma(f1, xt, acc1, IS_FP64, ALLOW_TF32)
        else:
            if NEED_W:
                f1 = tl.load(f1_ptr + f_off, mask=f_mask, other=0.0)
                acc1 = mma(f1, xt, acc1, IS_FP64, ALLOW_TF32)
            if MODE == MODE_INVERT:
                f2 = tl.load(f2_ptr + f_off, mask=f_mask, other=0.0).to(ACC)
                xs = tl.sum(xt.to(ACC), axis=1)
                acc_s += tl.sum(f2 * xs[None, :], axis=1)

    out_mask = o_valid[:, None] & r_valid[None, :]
    w_off = split.to(tl.int64) * C_OUT * K_TOTAL + offs_o[:, None] * K_TOTAL + r[None, :]
    if NEED_W:
        tl.store(gw1_ptr + w_off, acc1, mask=out_mask)
    if MODE == MODE_UPSAMPLE:
        tl.store(gw2_ptr + w_off, acc2, mask=out_mask)
    if MODE == MODE_INVERT:
        s_off = (split * NUM_R_TILES + pid_r) * C_OUT + offs_o
        tl.store(gs_ptr + s_off, acc_s, mask=o_valid)
