// The stride-1 upsample route that filters each INPUT channel (PrefilterPath).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <type_traits>
#include <vector>

#include "gapped_planes.h"
#include "scratch.h"
#include "dense_kernels.h"
#include "fused_product.h"

namespace pushpull {
namespace cpu {

// The input-side prefilter at stride 1, on the same gapped layout: z[c, t] = the separable prefilter of
// input plane c for tap t (README.md, "How it is fast"), and one weight matrix W [C_out/groups, K], K = C_in/groups *
// taps, times two operands whose rows are planes: P0 = W @ (x shifted by each tap), R = W @ z. Shifted
// planes are pointers into the gapped input, so there is no im2col. The choice for few input channels
// (the ResNet stems), where filtering each input channel is cheaper than filtering each output one.
// Backward: dW += gP0 @ (shifted x)^T + gR @ z^T; dx = the shifts' adjoint of W^T @ gP0 plus the
// prefilter's adjoint of W^T @ gR.
template <typename T>
struct PrefilterWorkspace {
  ScratchVector<T> xg;          // the input image [C_in, plane_size], gapped
  ScratchVector<T> z;           // its prefilter [C_in * taps, plane_size]
  ScratchVector<T> lines;       // one channel's vertical pass (or its adjoint) [kh, plane_size]
  ScratchVector<T> resp;        // P0 and R [2, C_out, plane_size] (their gradients, backward: zero outside the planes)
  ScratchVector<T> push, pull;  // [C_out, plane]: as the epilogues read them
  ScratchVector<T> grad_cols;   // W^T @ gP0 and W^T @ gR of one group [2, K, plane_size]
  ScratchVector<T> line;        // one input gradient plane, gapped
  std::vector<const T*> rows, grad_rows;
  std::vector<T> gram;      // one group's weight gradient, transposed [K, C_out/groups]
  bool resp_dirty = false;  // resp holds responses (values in the gaps): cleared before the backward's use
  TermScratch<T> terms;
};

template <typename scalar_t>
struct PrefilterPath : GappedPlanes {
  using T = scalar_t;
  const T* weight;    // [C_out, K]
  const T* weight_t;  // per group W^T [groups, K, C_out/groups] (backward only)
  int64_t k_size;
  std::vector<ShiftTerm<T>> vertical, horizontal;  // input line -> kh lines -> taps lines
  std::vector<int64_t> shift;                      // tap t's offset in the push operand
  // Each pass in one TriangleWeights sweep where its weights have that form (3 x 3 kernels at scale 2).
  std::optional<dense::TriangleWeights<T>> vertical_triangle, horizontal_triangle;

  PrefilterPath(const Geometry& g, const ConvArgs& c, const at::Tensor& rows, const at::Tensor& cols, const T* w,
                const T* w_t)
      : GappedPlanes(g, c, rows.size(0), cols.size(0), dense::kGrain<T>),
        weight(w),
        weight_t(w_t),
        k_size(in_per_group * taps) {
    const int64_t kh = g.kernel_h, kw = g.kernel_w;
    const auto [r, k] = interpolation_doubles(rows, cols);
    const double *rp = r.const_data_ptr<double>(), *kp = k.const_data_ptr<double>();
    for (int64_t i = 0; i < kh; ++i)
      for (int64_t a = 0; a < pull_h; ++a)
        if (rp[a * kh + i] != 0) vertical.push_back({0, i, (a * dh - qh) * ws_stride, static_cast<T>(-rp[a * kh + i])});
    for (int64_t i = 0; i < kh; ++i)
      for (int64_t j = 0; j < kw; ++j) {
        shift.push_back((i * dh - ph) * ws_stride + j * dw - pw);
        for (int64_t b = 0; b < pull_w; ++b)
          if (kp[b * kw + j] != 0) horizontal.push_back({i, i * kw + j, b * dw - qw, static_cast<T>(kp[b * kw + j])});
      }
    vertical_triangle = triangle_weights<T>(rp, pull_h, kh, -1.0);
    horizontal_triangle = triangle_weights<T>(kp, pull_w, kw, 1.0);
  }

  // The products run over the output rows from rows_begin() (aligned; row 0's left gap included).
  int64_t product_length() const { return dense::round_up(gap + output_length(), dense::kGrain<T>); }

  PrefilterWorkspace<T> workspace(bool backward) const {
    PrefilterWorkspace<T> ws;
    ws.xg.resize(geo.in_channels * plane_size);
    ws.z.resize(geo.in_channels * taps * plane_size);
    ws.lines.resize(geo.kernel_h * plane_size);
    ws.resp.resize(2 * geo.out_channels * plane_size);
    ws.push.resize(geo.out_channels * plane);
    ws.pull.resize(geo.out_channels * plane);
    if (backward) {
      ws.grad_cols.resize(2 * k_size * plane_size);
      ws.line.resize(plane_size);
    }
    return ws;
  }

  // Image n into ws.xg and its prefilter into ws.z (false: check_finite found NaN or +-Inf in it).
  bool load_operands(const T* x, int64_t n, PrefilterWorkspace<T>& ws, bool check_finite = false) const {
    if (!load_input(x, n, ws.xg.data(), check_finite)) return false;
    prefilter(ws);
    return true;
  }

  // z of every input channel, from ws.xg. The vertical pass covers whole rows (gaps included: zeros), so
  // that the horizontal one reads zeros past the rows' ends.
  void prefilter(PrefilterWorkspace<T>& ws) const {
    const int64_t rows_length = geo.out_height * ws_stride;
    for (int64_t c = 0; c < geo.in_channels; ++c) {
      const T* x = ws.xg.data() + c * plane_size;
      T* z = ws.z.data() + c * taps * plane_size;
      if (vertical_triangle) {
        triangle_pass(*vertical_triangle, x + rows_begin() - qh * ws_stride, dh * ws_stride,
                      ws.lines.data() + rows_begin(), rows_length);
      } else {
        for (int64_t i = 0; i < geo.kernel_h; ++i)
          apply(vertical, i, false, x, ws.lines.data(), rows_begin(), rows_length, ws.terms);
      }
      for (int64_t i = 0; i < geo.kernel_h; ++i) {
        if (horizontal_triangle) {
          const T* line = ws.lines.data() + i * plane_size + at(0, 0) - qw;
          triangle_pass(*horizontal_triangle, line, dw, z + i * geo.kernel_w * plane_size + at(0, 0), output_length());
          continue;
        }
        for (int64_t t = i * geo.kernel_w; t < (i + 1) * geo.kernel_w; ++t)
          apply(horizontal, t, false, static_cast<const T*>(ws.lines.data()), z, at(0, 0), output_length(), ws.terms);
      }
    }
  }

  // B rows of group grp: the shifted input planes (push) or the prefiltered ones (pull), from output pixel
  // `start` of the gapped layout.
  const T* const* operand(int64_t grp, bool pull, PrefilterWorkspace<T>& ws, int64_t start) const {
    ws.rows.resize(k_size);
    for (int64_t k = 0; k < k_size; ++k) {
      const int64_t c = grp * in_per_group + k / taps, t = k % taps;
      ws.rows[k] =
          pull ? ws.z.data() + (c * taps + t) * plane_size + start : ws.xg.data() + c * plane_size + start + shift[t];
    }
    return ws.rows.data();
  }

  // P0 and R of the image in ws.xg (prefilter() done) into ws.push / ws.pull. Where the output width is a
  // multiple of the vector length, the products run over the output's pixels alone, reading the operands at
  // their places in the gapped layout and writing the dense planes the epilogue reads (cifar-stem-2020: 1024
  // columns instead of 1136, and no copy); else over the gapped rows into ws.resp, copied out after.
  void responses(PrefilterWorkspace<T>& ws) const {
    const bool dense_output = dense::maps_rows_of<T>(geo.out_width);
    for (int64_t grp = 0; grp < geo.groups; ++grp) {
      const T* a = weight + grp * out_per_group * k_size;
      for (int64_t r = 0; r < 2; ++r) {
        if (dense_output) {
          T* c = (r == 1 ? ws.pull : ws.push).data() + grp * out_per_group * plane;
          dense::gemm_into(a, k_size, out_per_group, k_size, operand(grp, r == 1, ws, at(0, 0)), plane, c, plane,
                           dense::ColumnMap{geo.out_width, ws_stride}, {});
          continue;
        }
        T* c = ws.resp.data() + (r * geo.out_channels + grp * out_per_group) * plane_size + rows_begin();
        dense::gemm(a, k_size, out_per_group, k_size, operand(grp, r == 1, ws, rows_begin()), product_length(), c,
                    plane_size, false);
      }
    }
    if (dense_output) return;
    ws.resp_dirty = true;
    for (int64_t o = 0; o < geo.out_channels; ++o) {
      from_gapped(ws.resp.data() + o * plane_size, geo.out_height, geo.out_width, ws.push.data() + o * plane);
      from_gapped(ws.resp.data() + (geo.out_channels + o) * plane_size, geo.out_height, geo.out_width,
                  ws.pull.data() + o * plane);
    }
  }

  // Whether fused_responses can do a float forward: one group, whole octets of channels (a mask byte is
  // one tile pair's), output rows of whole vectors, and Q' = R - bias alone (no pooling, a single output).
  bool fuses_epilogue() const {
    return std::is_same_v<T, float> && geo.groups == 1 && geo.out_channels % 8 == 0 && !geo.dual_output &&
           geo.avg_kernel <= 1 && geo.out_width % dense::fused_vector_values<T>() == 0;
  }

  // The forward's outputs of the image in ws.xg (prefilter() done) straight from the two products'
  // registers (fused_product.h): no P0 and R planes, no pass of the epilogue over them.
  void fused_responses(PrefilterWorkspace<T>& ws, const dense::ResponseEpilogue<T>& out) const {
    // operand() fills ws.rows for either operand: the push rows move to ws.grad_rows (idle in a forward).
    const T* const* push = operand(0, false, ws, at(0, 0));
    ws.grad_rows.assign(push, push + k_size);
    dense::push_pull_product(weight, k_size, geo.out_channels, ws.grad_rows.data(), operand(0, true, ws, at(0, 0)),
                             dense::ColumnMap{geo.out_width, ws_stride}, plane, out);
  }

  // From the gradient fields in ws.push / ws.pull (ws.xg and ws.z filled when grad_w_image is wanted).
  void backward(T* grad_w_image, T* grad_x, PrefilterWorkspace<T>& ws) const {
    if (grad_w_image && !grad_x && dense::maps_rows_of<T>(geo.out_width)) {
      for (int64_t grp = 0; grp < geo.groups; ++grp)
        for (int64_t r = 0; r < 2; ++r) {
          const T* g = (r == 1 ? ws.pull : ws.push).data() + grp * out_per_group * plane;
          weight_gradient(grp, r == 1, g, true, grad_w_image + grp * out_per_group * k_size, ws);
        }
      return;
    }
    // The gradients in the gapped layout, zero outside the planes: resp is cleared where it held responses
    // (the gradients themselves fill the planes alone).
    if (ws.resp_dirty) std::fill(ws.resp.begin(), ws.resp.end(), T(0));
    ws.resp_dirty = false;
    for (int64_t o = 0; o < geo.out_channels; ++o) {
      to_gapped(ws.push.data() + o * plane, geo.out_height, geo.out_width, ws.resp.data() + o * plane_size);
      to_gapped(ws.pull.data() + o * plane, geo.out_height, geo.out_width,
                ws.resp.data() + (geo.out_channels + o) * plane_size);
    }
    const int64_t n = product_length(), begin = rows_begin();
    for (int64_t grp = 0; grp < geo.groups; ++grp) {
      for (int64_t r = 0; r < 2; ++r) {
        const T* g = ws.resp.data() + (r * geo.out_channels + grp * out_per_group) * plane_size + begin;
        if (grad_w_image) weight_gradient(grp, r == 1, g, false, grad_w_image + grp * out_per_group * k_size, ws);
        if (grad_x) {
          ws.rows.resize(out_per_group);
          for (int64_t o = 0; o < out_per_group; ++o) ws.rows[o] = g + o * plane_size;
          dense::gemm(weight_t + grp * k_size * out_per_group, out_per_group, k_size, out_per_group, ws.rows.data(), n,
                      ws.grad_cols.data() + r * k_size * plane_size + begin, plane_size, false);
        }
      }
      if (grad_x) {
        for (int64_t c = 0; c < in_per_group; ++c)
          input_gradient(c, grad_x + (grp * in_per_group + c) * geo.height * geo.width, ws);
      }
    }
  }

  // grad_w of group grp (rows [C_out/groups, K]) += its gradient rows g times the operand rows. The Gram
  // product runs transposed, the K operand rows as its tile rows: the stems' K = 27 is 4 x 6 + 3 rows
  // (C_out/groups = 16: 6 + 6 + 3 + 1 rows, each tile short of the register budget). Gapped g (plane_size
  // apart): over the product's flat range from rows_begin(). Dense g (the epilogue's planes, `plane` apart;
  // output rows of whole vectors): over the output's pixels alone, each operand row read at its place in
  // the gapped layout; no copy of g into that layout and no products over its gaps (cifar-stem-2020's
  // weight gradient: 1024 pixels instead of 1136).
  void weight_gradient(int64_t grp, bool pull, const T* g, bool dense_g, T* grad_w, PrefilterWorkspace<T>& ws) const {
    ws.grad_rows.resize(out_per_group);
    for (int64_t o = 0; o < out_per_group; ++o) ws.grad_rows[o] = g + o * (dense_g ? plane : plane_size);
    ws.gram.assign(k_size * out_per_group, T(0));
    if (dense_g) {
      dense::row_gram_rows(operand(grp, pull, ws, at(0, 0)), k_size, ws.grad_rows.data(), out_per_group, geo.out_height,
                           geo.out_width, ws_stride, geo.out_width, ws.gram.data(), out_per_group);
    } else {
      dense::row_gram(operand(grp, pull, ws, rows_begin()), k_size, ws.grad_rows.data(), out_per_group,
                      product_length(), ws.gram.data(), out_per_group);
    }
    for (int64_t o = 0; o < out_per_group; ++o)
      for (int64_t k = 0; k < k_size; ++k) grad_w[o * k_size + k] += ws.gram[k * out_per_group + o];
  }

  // dx of input channel c of the group: the shifts' adjoint of its push rows plus the prefilter's adjoint
  // of its pull rows, ONE weighted sum over the input plane.
  void input_gradient(int64_t c, T* grad_x_plane, PrefilterWorkspace<T>& ws) const {
    const T* push_rows = ws.grad_cols.data() + c * taps * plane_size;
    const T* pull_rows = ws.grad_cols.data() + (k_size + c * taps) * plane_size;
    const int64_t rows_length = geo.out_height * ws_stride;
    for (int64_t i = 0; i < geo.kernel_h; ++i)
      apply(horizontal, i, true, pull_rows, ws.lines.data(), rows_begin(), rows_length, ws.terms);
    auto& src = ws.terms.src;
    auto& w = ws.terms.weights;
    src.clear(), w.clear();
    const int64_t begin = at(0, 0);
    for (int64_t t = 0; t < taps; ++t) src.push_back(push_rows + t * plane_size + begin - shift[t]), w.push_back(T(1));
    for (const auto& term : vertical)
      src.push_back(ws.lines.data() + term.out * plane_size + begin - term.offset), w.push_back(term.weight);
    dense::weighted_sum(src.data(), w.data(), static_cast<int64_t>(src.size()), input_length(), ws.line.data() + begin);
    from_gapped(ws.line.data(), geo.height, geo.width, grad_x_plane);
  }
};
}  // namespace cpu
}  // namespace pushpull
