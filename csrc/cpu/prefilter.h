// The separable prefilter of the upsample pull on the CPU: the per-plane loops (used by the batched
// prefilter below and by ImagePath), the batched prefilter and its adjoint, and CpuBackend, the CPU
// side of the shared ATen algebra (csrc/common/aten_algebra.h).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <utility>

#include "../common/aten_algebra.h"
#include "clones.h"

namespace pushpull {
namespace cpu {

// ---- upsample: q[o, c] = -rows @ k[o, c] @ cols^T, so conv(x, q)[o] = sum_{c,i,j} k[o,c,i,j] z[c,i,j] with
// z[c,i,j] = conv(x[c], -rows[:, i] cols[:, j]^T): a separable prefilter of each input plane, after which
// push and pull share the weight matrix [C_out, C_in/groups * kh * kw].

// Index math shared by the prefilter and its adjoint: output row ho with tap a reads input row
// ho * stride + a * dilation - pull_padding (zero outside [0, H)). Columns go through a zero-padded
// row of `padded_width` entries whose entry wp is input column wp - pad_w, so that the inner loops
// over output columns have no bounds test and vectorize.
struct PrefilterGeometry {
  int64_t height, width, out_height, out_width, kernel_h, kernel_w, pull_h, pull_w;
  int64_t stride_h, stride_w, dil_h, dil_w, pad_h, pad_w;
  int64_t in_row(int64_t ho, int64_t a) const { return ho * stride_h + a * dil_h - pad_h; }
  int64_t padded_width() const {
    return std::max((out_width - 1) * stride_w + (pull_w - 1) * dil_w + 1, pad_w + width);
  }
  // the vertical pass [kh, Ho, padded_width], then one [Ho, padded_width] block of the horizontal one
  int64_t tmp_size() const { return (kernel_h + 1) * out_height * padded_width(); }
};

inline PrefilterGeometry prefilter_geometry(const Geometry& geo, const ConvArgs& c, const at::Tensor& rows,
                                            const at::Tensor& cols) {
  return {geo.height,    geo.width,     geo.out_height,    geo.out_width,    geo.kernel_h,
          geo.kernel_w,  rows.size(0),  cols.size(0),      c.stride[0],      c.stride[1],
          c.dilation[0], c.dilation[1], c.pull_padding[0], c.pull_padding[1]};
}

// out[k] = sum_b taps[b * tap_stride] * line[k + b * dilation] for k < length, skipping zero taps. Eight
// outputs at a time stay in registers over all taps (the fixed 8-lane loop is what the compiler
// vectorizes); the tail goes one by one. Pull kernels wider than kMaxTaps go tap by tap.
template <typename acc_t>
PUSHPULL_CPU_CLONES void filter_line(const acc_t* __restrict__ line, int64_t length, const acc_t* taps,
                                     int64_t tap_stride, int64_t n_taps, int64_t dilation, acc_t* __restrict__ out) {
  constexpr int64_t kMaxTaps = 32;
  if (n_taps > kMaxTaps) {
    std::fill(out, out + length, acc_t(0));
    for (int64_t b = 0; b < n_taps; ++b) {
      const acc_t v = taps[b * tap_stride];
      for (int64_t k = 0; k < length; ++k) out[k] += v * line[k + b * dilation];
    }
    return;
  }
  acc_t weights[kMaxTaps];
  int64_t offsets[kMaxTaps], used = 0;
  for (int64_t b = 0; b < n_taps; ++b) {
    const acc_t v = taps[b * tap_stride];
    if (v != acc_t(0)) weights[used] = v, offsets[used++] = b * dilation;
  }
  int64_t k = 0;
  for (; k + 8 <= length; k += 8) {
    acc_t acc[8] = {};
    for (int64_t t = 0; t < used; ++t) {
      const acc_t* __restrict__ src = line + k + offsets[t];
      for (int l = 0; l < 8; ++l) acc[l] += weights[t] * src[l];
    }
    for (int l = 0; l < 8; ++l) out[k + l] = acc[l];
  }
  for (; k < length; ++k) {
    acc_t acc = 0;
    for (int64_t t = 0; t < used; ++t) acc += weights[t] * line[k + offsets[t]];
    out[k] = acc;
  }
}

// One plane: x [H, W] -> z [kh * kw, Ho, Wo] for the output rows [ho_begin, ho_end), handed over one
// row at a time as emit(tap, ho, row of Wo values); tmp holds the vertical pass [kh, Ho, padded_width].
template <typename scalar_t, typename acc_t, typename Emit>
PUSHPULL_CPU_CLONES void prefilter_plane(const PrefilterGeometry& g, const acc_t* rows, const acc_t* cols,
                                         const scalar_t* __restrict__ x, int64_t ho_begin, int64_t ho_end,
                                         acc_t* __restrict__ tmp, acc_t* __restrict__ row_acc, Emit emit) {
  const int64_t wp = g.padded_width();
  for (int64_t i = 0; i < g.kernel_h; ++i) {
    std::fill(tmp + (i * g.out_height + ho_begin) * wp, tmp + (i * g.out_height + ho_end) * wp, acc_t(0));
    for (int64_t ho = ho_begin; ho < ho_end; ++ho) {
      acc_t* __restrict__ t = tmp + (i * g.out_height + ho) * wp + g.pad_w;
      for (int64_t a = 0; a < g.pull_h; ++a) {
        const int64_t h = g.in_row(ho, a);
        if (h < 0 || h >= g.height) continue;
        const acc_t u = -rows[a * g.kernel_h + i];
        if (u == acc_t(0)) continue;  // bilinear interpolation matrices are half zeros
        const scalar_t* __restrict__ xr = x + h * g.width;
        for (int64_t w = 0; w < g.width; ++w) t[w] += u * static_cast<acc_t>(xr[w]);
      }
    }
  }
  if (g.stride_w == 1) {
    // The kh x Ho rows of the vertical pass, wp apart, read as ONE line per i: output (ho, wo) of tap
    // column j is then sum_b v[b] * line[ho * wp + wo + b * dw], a 1-D filter over the whole block with
    // no per-row loop overhead (the values at wo >= Wo are not used). `out` is the block after tmp.
    acc_t* __restrict__ out = tmp + g.kernel_h * g.out_height * wp;
    const int64_t length = (ho_end - ho_begin - 1) * wp + g.out_width;
    for (int64_t i = 0; i < g.kernel_h; ++i) {
      const acc_t* __restrict__ line = tmp + (i * g.out_height + ho_begin) * wp;
      for (int64_t j = 0; j < g.kernel_w; ++j) {
        filter_line(line, length, cols + j, g.kernel_w, g.pull_w, g.dil_w, out);
        for (int64_t ho = ho_begin; ho < ho_end; ++ho) {
          emit(i * g.kernel_w + j, ho, static_cast<const acc_t*>(out + (ho - ho_begin) * wp));
        }
      }
    }
    return;
  }
  for (int64_t i = 0; i < g.kernel_h; ++i) {
    for (int64_t ho = ho_begin; ho < ho_end; ++ho) {
      const acc_t* __restrict__ t = tmp + (i * g.out_height + ho) * wp;
      for (int64_t j = 0; j < g.kernel_w; ++j) {
        std::fill(row_acc, row_acc + g.out_width, acc_t(0));
        for (int64_t b = 0; b < g.pull_w; ++b) {
          const acc_t v = cols[b * g.kernel_w + j];
          if (v == acc_t(0)) continue;
          const acc_t* __restrict__ tb = t + b * g.dil_w;
          for (int64_t wo = 0; wo < g.out_width; ++wo) row_acc[wo] += v * tb[wo * g.stride_w];
        }
        emit(i * g.kernel_w + j, ho, static_cast<const acc_t*>(row_acc));
      }
    }
  }
}

// Adjoint of prefilter_plane: gz [kh * kw, Ho, Wo] -> gx [H, W] (overwritten); tmp as above,
// row_acc holds one input plane [H, W].
template <typename scalar_t, typename acc_t>
PUSHPULL_CPU_CLONES void prefilter_adjoint_plane(const PrefilterGeometry& g, const acc_t* rows, const acc_t* cols,
                                                 const scalar_t* __restrict__ gz, int64_t tap_stride,
                                                 acc_t* __restrict__ tmp, scalar_t* __restrict__ gx,
                                                 acc_t* __restrict__ plane_acc) {
  const int64_t wp = g.padded_width();
  std::fill(tmp, tmp + g.tmp_size(), acc_t(0));
  for (int64_t i = 0; i < g.kernel_h; ++i) {
    for (int64_t ho = 0; ho < g.out_height; ++ho) {
      acc_t* __restrict__ t = tmp + (i * g.out_height + ho) * wp;
      for (int64_t j = 0; j < g.kernel_w; ++j) {
        const scalar_t* __restrict__ zr = gz + (i * g.kernel_w + j) * tap_stride + ho * g.out_width;
        for (int64_t b = 0; b < g.pull_w; ++b) {
          const acc_t v = cols[b * g.kernel_w + j];
          if (v == acc_t(0)) continue;
          acc_t* __restrict__ tb = t + b * g.dil_w;
          for (int64_t wo = 0; wo < g.out_width; ++wo) tb[wo * g.stride_w] += v * static_cast<acc_t>(zr[wo]);
        }
      }
    }
  }
  std::fill(plane_acc, plane_acc + g.height * g.width, acc_t(0));
  for (int64_t i = 0; i < g.kernel_h; ++i) {
    for (int64_t ho = 0; ho < g.out_height; ++ho) {
      const acc_t* __restrict__ t = tmp + (i * g.out_height + ho) * wp + g.pad_w;
      for (int64_t a = 0; a < g.pull_h; ++a) {
        const int64_t h = g.in_row(ho, a);
        if (h < 0 || h >= g.height) continue;
        const acc_t u = -rows[a * g.kernel_h + i];
        if (u == acc_t(0)) continue;
        acc_t* __restrict__ out = plane_acc + h * g.width;
        for (int64_t w = 0; w < g.width; ++w) out[w] += u * t[w];
      }
    }
  }
  for (int64_t p = 0; p < g.height * g.width; ++p) gx[p] = static_cast<scalar_t>(plane_acc[p]);
}

// z = the prefilter of every input plane, [C_in * kh * kw, N, Ho * Wo] (rows ordered (c, i, j) like the
// weight's flattening), and its adjoint grad_z -> grad_x [N, C_in, H, W].
at::Tensor prefilter(const at::Tensor& x, const at::Tensor& rows, const at::Tensor& cols, const Geometry& geo,
                     const ConvArgs& c);
at::Tensor prefilter_adjoint(const at::Tensor& grad_z, const at::Tensor& rows, const at::Tensor& cols,
                             const Geometry& geo, const ConvArgs& c);

// The push weight as one matrix per group, [groups, C_out/groups, C_in/groups * kh * kw].
at::Tensor grouped_weight(const at::Tensor& weight, int64_t groups);

// Whether the batched prefilter and matrix product compute the pull (see prefilter.cpp).
bool use_prefilter(const Geometry& geo);

// The CPU side of the shared algebra: the batched prefilter and ONE matrix product per group.
class CpuBackend : public AtenBackend {
 public:
  bool prefilter_pays(const Geometry& geo, const ConvArgs&, const at::Tensor&, const at::Tensor&) const override {
    return use_prefilter(geo);
  }
  at::Tensor prefilter_pull(const at::Tensor& x, const at::Tensor& w, const at::Tensor& rows, const at::Tensor& cols,
                            const Geometry& geo, const ConvArgs& c) const override;
  bool prefilter_pull_is_channel_major() const override { return true; }
  std::pair<at::Tensor, at::Tensor> prefilter_pull_backward(const at::Tensor& grad_pull, const at::Tensor& x,
                                                            const at::Tensor& w, const at::Tensor& rows,
                                                            const at::Tensor& cols, const Geometry& geo,
                                                            const ConvArgs& c, bool need_x, bool need_w) const override;
};

}  // namespace cpu
}  // namespace pushpull
