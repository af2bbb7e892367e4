// The separable prefilter of the upsample pull on the CPU: the per-plane loops (used by the batched
// prefilter below and by ImagePath), the batched prefilter and its adjoint, and CpuBackend, the CPU
// side of the shared ATen algebra (csrc/common/aten_algebra.h).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "../common/aten_algebra.h"
#include "clones.h"
#include "dense_kernels.h"

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
  // Strided columns (stride_w > 1) go through stride_w phases: phase p of a padded row holds its entries
  // p, p + stride_w, ... (line_stride of them), so that entry wo * s + b * dw, tap b of output column wo,
  // is entry wo + (b * dw) / s of phase (b * dw) % s, and the horizontal filter runs at stride 1. The
  // vertical pass does not mix columns: it runs on the input rows' phases and writes the phases of its rows.
  // (A default-constructed geometry, ImagePath's without a separable pull, has stride_w 0: one phase.)
  int64_t phases() const { return std::max<int64_t>(stride_w, 1); }
  int64_t line_stride() const { return (padded_width() + phases() - 1) / phases(); }
  // the vertical pass [phases, kh * Ho, line_stride]; strided, the input rows' phases [phases, H,
  // line_stride]; one [Ho, line_stride] block of the horizontal pass
  int64_t input_phases_size() const { return stride_w > 1 ? phases() * height * line_stride() : 0; }
  int64_t tmp_size() const {
    return (phases() * kernel_h * out_height + out_height) * line_stride() + input_phases_size();
  }
};

inline PrefilterGeometry prefilter_geometry(const Geometry& geo, const ConvArgs& c, const at::Tensor& rows,
                                            const at::Tensor& cols) {
  return {geo.height,    geo.width,     geo.out_height,    geo.out_width,    geo.kernel_h,
          geo.kernel_w,  rows.size(0),  cols.size(0),      c.stride[0],      c.stride[1],
          c.dilation[0], c.dilation[1], c.pull_padding[0], c.pull_padding[1]};
}

// The outputs m in [0, count) whose input column m * s + offset lies in [0, width), as [lo, hi).
inline std::pair<int64_t, int64_t> valid_range(int64_t offset, int64_t s, int64_t width, int64_t count) {
  const int64_t lo = offset >= 0 ? 0 : std::min(count, (-offset + s - 1) / s);
  const int64_t hi = width - offset <= 0 ? 0 : std::min(count, (width - offset + s - 1) / s);
  return {lo, std::max(lo, hi)};
}

// out[m] = src[m * s] for m in [lo, hi). Strides 1 and 2 (the papers' layers) as constants, so that the
// copy vectorizes (a stride-2 gather is two loads and a shuffle, not one load per value).
template <typename In, typename Out>
PUSHPULL_ALWAYS_INLINE void strided_copy(const In* __restrict__ src, int64_t s, int64_t lo, int64_t hi,
                                         Out* __restrict__ out) {
  if (s == 1) {
    std::copy(src + lo, src + hi, out + lo);
  } else if (s == 2) {
    for (int64_t m = lo; m < hi; ++m) out[m] = static_cast<Out>(src[2 * m]);
  } else {
    for (int64_t m = lo; m < hi; ++m) out[m] = static_cast<Out>(src[m * s]);
  }
}

// Input rows [h_begin, h_end) of x as g.phases() phases of their zero-padded rows: entry m of phase p of
// row h at out + (p * H + h) * line_stride is input column m * stride_w + p - pad_w (zero outside).
template <typename scalar_t, typename acc_t>
PUSHPULL_CPU_CLONES void split_input_rows(const PrefilterGeometry& g, const scalar_t* __restrict__ x, int64_t h_begin,
                                          int64_t h_end, acc_t* __restrict__ out) {
  const int64_t ls = g.line_stride(), s = g.stride_w;
  for (int64_t p = 0; p < s; ++p) {
    const int64_t first = p - g.pad_w;  // the input column of entry 0
    const auto [lo, hi] = valid_range(first, s, g.width, ls);
    for (int64_t h = h_begin; h < h_end; ++h) {
      acc_t* __restrict__ row = out + (p * g.height + h) * ls;
      std::fill(row, row + lo, acc_t(0));
      strided_copy(x + h * g.width + first, s, lo, hi, row);
      std::fill(row + hi, row + ls, acc_t(0));
    }
  }
}

// vertical_pass from the input rows' phases (stride_w > 1): each row of `lines` is ONE dense::weighted_sum of
// its nonzero terms over the phase row's line_stride values (rows of about 60 values on ResNet-50's stem,
// where a zero fill and a loop per term spent more time on each row's ends than on its vectors: the pass
// and its weighted sums 1.8 -> 1.3 ms of thread time per inference call, batch 8, two threads).
template <typename acc_t>
void strided_vertical_pass(const PrefilterGeometry& g, const acc_t* rows, const acc_t* input_phases, int64_t ho_begin,
                           int64_t ho_end, acc_t* lines) {
  const int64_t ls = g.line_stride(), rows_total = g.kernel_h * g.out_height;
  std::vector<const acc_t*> src(g.pull_h);
  std::vector<acc_t> weight(g.pull_h);
  for (int64_t p = 0; p < g.phases(); ++p) {
    for (int64_t i = 0; i < g.kernel_h; ++i) {
      for (int64_t ho = ho_begin; ho < ho_end; ++ho) {
        acc_t* t = lines + (p * rows_total + i * g.out_height + ho) * ls;
        int64_t terms = 0;
        for (int64_t a = 0; a < g.pull_h; ++a) {
          const int64_t h = g.in_row(ho, a);
          const acc_t u = -rows[a * g.kernel_h + i];
          if (h < 0 || h >= g.height || u == acc_t(0)) continue;
          src[terms] = input_phases + (p * g.height + h) * ls, weight[terms++] = u;
        }
        if (terms == 0) {
          std::fill(t, t + ls, acc_t(0));
        } else {
          dense::weighted_sum(src.data(), weight.data(), terms, ls, t);
        }
      }
    }
  }
}

// The vertical pass of output rows [ho_begin, ho_end) into `lines` [phases, kh * Ho, line_stride]: row
// (i, ho) is sum_a -rows[a, i] * (input row in_row(ho, a)), read from the input rows' phases
// (split_input_rows; strided_vertical_pass) or, at stride_w 1 (one phase), from x, written at pad_w.
template <typename scalar_t, typename acc_t>
PUSHPULL_CPU_CLONES void vertical_pass(const PrefilterGeometry& g, const acc_t* rows, const scalar_t* __restrict__ x,
                                       const acc_t* __restrict__ input_phases, int64_t ho_begin, int64_t ho_end,
                                       acc_t* __restrict__ lines) {
  if (input_phases) {  // whole phase rows: one weighted sum of the row's terms (no zero fill, no pass per term)
    strided_vertical_pass(g, rows, input_phases, ho_begin, ho_end, lines);
    return;
  }
  const int64_t ls = g.line_stride();
  for (int64_t i = 0; i < g.kernel_h; ++i) {
    for (int64_t ho = ho_begin; ho < ho_end; ++ho) {
      acc_t* __restrict__ t = lines + (i * g.out_height + ho) * ls;
      std::fill(t, t + ls, acc_t(0));
      for (int64_t a = 0; a < g.pull_h; ++a) {
        const int64_t h = g.in_row(ho, a);
        if (h < 0 || h >= g.height) continue;
        const acc_t u = -rows[a * g.kernel_h + i];
        if (u == acc_t(0)) continue;  // bilinear interpolation matrices are half zeros
        const scalar_t* __restrict__ xr = x + h * g.width;
        for (int64_t w = 0; w < g.width; ++w) t[g.pad_w + w] += u * static_cast<acc_t>(xr[w]);
      }
    }
  }
}

// One plane: x [H, W] -> z [kh * kw, Ho, Wo] for the output rows [ho_begin, ho_end), handed over one
// row at a time as emit(tap, ho, row of Wo values); tmp (tmp_size) holds the vertical pass, the input
// rows' phases (strided) and the horizontal pass of one tap.
template <typename scalar_t, typename acc_t, typename Emit>
PUSHPULL_CPU_CLONES void prefilter_plane(const PrefilterGeometry& g, const acc_t* rows, const acc_t* cols,
                                         const scalar_t* __restrict__ x, int64_t ho_begin, int64_t ho_end,
                                         acc_t* __restrict__ tmp, Emit emit) {
  const int64_t rows_total = g.kernel_h * g.out_height, ls = g.line_stride();
  acc_t* lines = tmp;
  acc_t* input_phases = nullptr;
  if (g.stride_w > 1) {
    input_phases = lines + g.phases() * rows_total * ls;
    const int64_t h_begin = std::max<int64_t>(g.in_row(ho_begin, 0), 0);
    const int64_t h_end = std::min(g.in_row(ho_end - 1, g.pull_h - 1) + 1, g.height);
    split_input_rows(g, x, h_begin, h_end, input_phases);
  }
  vertical_pass(g, rows, x, static_cast<const acc_t*>(input_phases), ho_begin, ho_end, lines);
  // The kh x Ho rows of each phase of the vertical pass, `ls` apart, read as ONE line per i: output
  // (ho, wo) of tap column j is then sum_b v[b] * line[ho * ls + wo + offsets[b]], a 1-D filter over the
  // whole block with no per-row loop overhead (the values at wo >= Wo are not used).
  // Tap column j's terms: the nonzero cols[b, j] and where tap b of output column 0 sits in the lines.
  std::vector<std::vector<int64_t>> offsets(g.kernel_w);
  std::vector<std::vector<acc_t>> weights(g.kernel_w);
  for (int64_t j = 0; j < g.kernel_w; ++j) {
    for (int64_t b = 0; b < g.pull_w; ++b) {
      const acc_t v = cols[b * g.kernel_w + j];
      if (v == acc_t(0)) continue;
      const int64_t column = b * g.dil_w;  // of tap b, in the padded row, from output column wo * stride_w
      offsets[j].push_back(column % g.phases() * rows_total * ls + column / g.phases());
      weights[j].push_back(v);
    }
  }
  acc_t* __restrict__ out = tmp + g.phases() * rows_total * ls + g.input_phases_size();
  const int64_t length = (ho_end - ho_begin - 1) * ls + g.out_width;
  std::vector<const acc_t*> src;
  for (int64_t i = 0; i < g.kernel_h; ++i) {
    const acc_t* line = lines + (i * g.out_height + ho_begin) * ls;
    for (int64_t j = 0; j < g.kernel_w; ++j) {
      src.clear();
      for (int64_t off : offsets[j]) src.push_back(line + off);
      dense::weighted_sum(src.data(), weights[j].data(), static_cast<int64_t>(src.size()), length, out);
      for (int64_t ho = ho_begin; ho < ho_end; ++ho) {
        emit(i * g.kernel_w + j, ho, static_cast<const acc_t*>(out + (ho - ho_begin) * ls));
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
  std::fill(tmp, tmp + g.kernel_h * g.out_height * wp, acc_t(0));  // the vertical pass's rows
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
