// The "gapped" layout of the two stride-1 upsample routes (TapPath, PrefilterPath).
//
// Layout ("gapped rows"): every plane is stored flat with row stride Ws = max(W, Wo) + G, entry (r, c) at
// L + (V + r) * Ws + G + c, zero in the gaps between rows, in the L lead values and V margin rows above,
// below, and in the slack at the end. L (>= G) puts the start of row 0, rows_begin(), on a 64-byte
// boundary, where the matrix products start: their unshifted operands and results are aligned loads. G and V are the largest horizontal and vertical shifts of any pass, so a shifted read past
// a row's end or the plane's edge reads zeros: each pass is ONE 1-D loop over the whole plane with no
// bounds test (dense::weighted_sum), and the matrix products run over the plane's flat range.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <utility>
#include <vector>

#include "epilogues.h"
#include "dense_kernels.h"

namespace pushpull {
namespace cpu {

// out[e] += weight * in[e + offset] over a plane: `in` and `out` index lines of the pass's input and output.
template <typename T>
struct ShiftTerm {
  int64_t in, out, offset;
  T weight;
};

template <typename T>
struct TermScratch {
  std::vector<const T*> src;  // the terms of one weighted sum
  std::vector<T> weights;
};

// dst[0, n) = src[0, n) for the layout's short rows (32 or 56 values on the ResNets): fixed 64-byte blocks,
// which the compiler moves inline, then the tail; a call to memmove per row cost more than its copy.
template <typename T>
inline void copy_row(const T* __restrict__ src, int64_t n, T* __restrict__ dst) {
  constexpr int64_t kBlock = 64 / sizeof(T);
  int64_t i = 0;
  for (; i + kBlock <= n; i += kBlock) std::memcpy(dst + i, src + i, 64);
  for (; i < n; ++i) dst[i] = src[i];
}

// The gapped layout and what both stride-1 paths do with it.
struct GappedPlanes {
  const Geometry& geo;
  int64_t taps, in_per_group, out_per_group, plane;
  int64_t dh, dw, ph, pw, qh, qw, pull_h, pull_w;
  int64_t gap, margin, ws_stride, lead, plane_size;  // G, V, Ws, L and the length of one gapped plane

  GappedPlanes(const Geometry& g, const ConvArgs& c, int64_t pull_rows, int64_t pull_cols, int64_t grain)
      : geo(g),
        taps(g.kernel_h * g.kernel_w),
        in_per_group(g.in_channels / g.groups),
        out_per_group(g.out_channels / g.groups),
        plane(g.out_height * g.out_width),
        dh(c.dilation[0]),
        dw(c.dilation[1]),
        ph(c.padding[0]),
        pw(c.padding[1]),
        qh(c.pull_padding[0]),
        qw(c.pull_padding[1]),
        pull_h(pull_rows),
        pull_w(pull_cols) {
    // Forward shifts reach pw / qw left and (kw - 1) dw - pw / (pull_w - 1) dw - qw right; backward the reverse.
    gap = std::max({pw, qw, (g.kernel_w - 1) * dw - pw, (pull_w - 1) * dw - qw, int64_t(0)});
    margin = std::max({ph, qh, (g.kernel_h - 1) * dh - ph, (pull_h - 1) * dh - qh, int64_t(0)});
    ws_stride = std::max(g.width, g.out_width) + gap;
    // L >= G: a product starting at rows_begin() reads B rows shifted left by up to G values in bounds.
    lead = gap + (grain - (gap + margin * ws_stride) % grain) % grain;
    const int64_t rows_max = std::max(g.height, g.out_height);
    plane_size = dense::round_up(lead + (2 * margin + rows_max) * ws_stride + 2 * gap, grain) + grain;
  }

  int64_t at(int64_t r, int64_t c) const { return lead + (margin + r) * ws_stride + gap + c; }
  // Where row 0 starts (its left gap), a multiple of the grain: the matrix products' first pixel.
  int64_t rows_begin() const { return lead + margin * ws_stride; }
  // Lengths of the flat ranges from at(0, 0) over the input plane and over the output plane.
  int64_t input_length() const { return (geo.height - 1) * ws_stride + geo.width; }
  int64_t output_length() const { return (geo.out_height - 1) * ws_stride + geo.out_width; }

  // Copies plane(s) [rows, cols] (row stride `cols`) into / out of the gapped layout.
  template <typename T>
  void to_gapped(const T* src, int64_t rows, int64_t cols, T* dst) const {
    for (int64_t r = 0; r < rows; ++r) copy_row(src + r * cols, cols, dst + at(r, 0));
  }
  template <typename T>
  void from_gapped(const T* src, int64_t rows, int64_t cols, T* dst) const {
    for (int64_t r = 0; r < rows; ++r) copy_row(src + at(r, 0), cols, dst + r * cols);
  }
  // Image n of x into the gapped planes xg; or, with a dense_stride, into planes without gaps that far
  // apart. With check_finite, false as soon as a plane holds NaN or +-Inf: each plane is tested just after
  // its copy, in cache, so that the image is read from memory once.
  template <typename T>
  bool load_input(const T* x, int64_t n, T* xg, bool check_finite = false, int64_t dense_stride = 0) const {
    const int64_t in_plane = geo.height * geo.width;
    for (int64_t c = 0; c < geo.in_channels; ++c) {
      const T* plane_in = x + (n * geo.in_channels + c) * in_plane;
      if (dense_stride) {
        std::memcpy(xg + c * dense_stride, plane_in, in_plane * sizeof(T));
      } else {
        to_gapped(plane_in, geo.height, geo.width, xg + c * plane_size);
      }
      if (check_finite && !values_finite(plane_in, in_plane)) return false;
    }
    return true;
  }

  // Line `line` of out_base (lines plane_size apart), positions [begin, begin + n), from the terms of
  // `terms` writing it; adjoint: from the terms reading it, the shifts reversed.
  template <typename T>
  void apply(const std::vector<ShiftTerm<T>>& terms, int64_t line, bool adjoint, const T* in_base, T* out_base,
             int64_t begin, int64_t n, TermScratch<T>& scratch) const {
    const int64_t count = gather(terms, line, adjoint, in_base + begin, scratch);
    dense::weighted_sum(scratch.src.data(), scratch.weights.data(), count, n, out_base + line * plane_size + begin);
  }

  // The forward terms writing `line`, from the gapped lines of in_base, into a dense plane [Ho, Wo]: the
  // output rows alone, no copy out of the gapped layout afterwards.
  template <typename T>
  void apply_to_plane(const std::vector<ShiftTerm<T>>& terms, int64_t line, const T* in_base, T* plane_out,
                      TermScratch<T>& scratch) const {
    const int64_t count = gather(terms, line, false, in_base + at(0, 0), scratch);
    dense::weighted_sum_rows(scratch.src.data(), scratch.weights.data(), count, geo.out_height, geo.out_width,
                             ws_stride, plane_out, geo.out_width);
  }

  // scratch <- the sources (from in_base, lines plane_size apart) and weights of the terms of `line`.
  template <typename T>
  int64_t gather(const std::vector<ShiftTerm<T>>& terms, int64_t line, bool adjoint, const T* in_base,
                 TermScratch<T>& scratch) const {
    scratch.src.clear(), scratch.weights.clear();
    for (const auto& t : terms) {
      if ((adjoint ? t.in : t.out) != line) continue;
      const int64_t from = adjoint ? t.out : t.in;
      scratch.src.push_back(in_base + from * plane_size + (adjoint ? -t.offset : t.offset));
      scratch.weights.push_back(t.weight);
    }
    return static_cast<int64_t>(scratch.src.size());
  }

  // A TriangleWeights pass (dense::triangle_taps): lines out, out + plane_size, out + 2 plane_size over n
  // values from the 7 sources first + s * step; with `extra`, line j also adds extra[j].
  template <typename T>
  void triangle_pass(const dense::TriangleWeights<T>& w, const T* first, int64_t step, T* out, int64_t n,
                     const T* const* extra = nullptr) const {
    const T* src[7];
    T* dst[3];
    for (int s = 0; s < 7; ++s) src[s] = first + s * step;
    for (int j = 0; j < 3; ++j) dst[j] = out + j * plane_size;
    dense::triangle_taps(src, w, n, dst, extra);
  }

  // The responses (or their gradients) in a workspace's push / pull, [C_out, plane], as the epilogues see them.
  int64_t field_stride() const { return plane; }
  template <typename Workspace, typename T>
  PlaneInputs<T> inputs(const Workspace& ws, const T* bias_in) const {
    return {geo, {ws.push.data(), 0, plane}, {ws.pull.data(), 0, plane}, nullptr, nullptr, bias_in, plane};
  }
};

// The TriangleWeights (dense_kernels.h) of a pass whose source s weighs sign * m[s * outputs + j] in output
// j, if it has their form (every weight that form uses nonzero, as the term lists keep them).
template <typename T>
std::optional<dense::TriangleWeights<T>> triangle_weights(const double* m, int64_t sources, int64_t outputs,
                                                          double sign) {
  if (sources != 7 || outputs != 3) return std::nullopt;
  static constexpr bool kUsed[7][3] = {{1, 0, 0}, {1, 1, 0}, {1, 1, 0}, {0, 1, 0}, {0, 1, 1}, {0, 1, 1}, {0, 0, 1}};
  auto w = [&](int s, int j) { return sign * m[s * 3 + j]; };
  for (int s = 0; s < 7; ++s)
    for (int j = 0; j < 3; ++j)
      if ((w(s, j) != 0) != kUsed[s][j]) return std::nullopt;
  const double c = w(0, 0);
  if ((c != 1 && c != -1) || w(3, 1) != c || w(6, 2) != c || w(1, 1) != w(5, 1) || w(2, 1) != w(4, 1))
    return std::nullopt;
  auto t = [](double v) { return static_cast<T>(v); };
  return dense::TriangleWeights<T>{t(w(1, 0)), t(w(2, 0)), t(w(1, 1)), t(w(2, 1)), t(w(4, 2)), t(w(5, 2)), c < 0};
}

// The interpolation matrices as doubles, [pull_h, kh] and [pull_w, kw].
inline std::pair<at::Tensor, at::Tensor> interpolation_doubles(const at::Tensor& rows, const at::Tensor& cols) {
  return {rows.contiguous().to(at::kDouble), cols.contiguous().to(at::kDouble)};
}
}  // namespace cpu
}  // namespace pushpull
