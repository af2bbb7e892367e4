// The stride-1 upsample route that filters each OUTPUT channel (TapPath).
//
// At stride 1 the separable pull moves to the output side. The per-tap products
//   Y[o, t] = sum_c k[o, c, t] x[c]            (t = (i, j) a kernel tap; c over o's group)
// are ONE matrix product, [C_out * kh * kw, C_in/groups] by the input's pixels, and give both responses
// by shifts and separable filters of Y (rows / cols are the interpolation matrices, q = -rows k cols^T):
//   P0[o](h, w) = sum_{i,j} Y[o,i,j](h + i dh - ph, w + j dw - pw)
//   R[o](h, w)  = sum_{i,j,a,b} -rows[a,i] cols[b,j] Y[o,i,j](h + a dh - qh, w + b dw - qw)
// Per pixel that is C_out * C_in/groups * kh * kw multiply-adds for BOTH responses (half of the
// prefilter's two products, and no im2col), plus per output channel a horizontal pass (tap row i: the
// sum over j, 2 * kh lines) and a vertical one. Backward runs the transposed maps: the masked gradient
// fields give gY, then dW = gY @ x^T and dx = W^T @ gY.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "gapped_planes.h"
#include "scratch.h"
#include "dense_kernels.h"

namespace pushpull {
namespace cpu {

template <typename T>
struct TapWorkspace {
  ScratchVector<T> xg;          // the input image [C_in, plane_size], gapped; or (dense_input) its planes dense
  bool dense_input = false;     // a forward workspace: xg holds the planes without gaps, dense_stride apart
  ScratchVector<T> y;           // Y of a block of output channels [block * taps, plane_size] (or gY)
  ScratchVector<T> lines;       // one channel's horizontal pass [2 * kh, plane_size]: push rows, then pull rows
  ScratchVector<T> columns;     // or its vertical pass (TapPath::by_columns) [2 * kw, plane_size]: push, then pull
  ScratchVector<T> grad_resp;   // their gradients: written only inside the planes (the rest stays zero)
  ScratchVector<T> push, pull;  // [C_out, plane]: the responses, then their gradients (as the epilogues read)
  ScratchVector<T> gx;          // the input gradient [C_in, plane_size], gapped
  ScratchVector<T> dw;          // a block's weight gradient [block * taps, C_in/groups]
  std::vector<const T*> rows;   // B operand rows of a product
  TermScratch<T> terms;
};

// Bytes of Y of one block of output channels (at most 8 channels; halved until the block fits). Four times
// the EPYC's 512 KiB L2: the product's height (channels x taps rows) outweighs the filters reading the tap
// planes from L3. imagenet-b1-2020 (64 channels, 56 x 56: 140 KiB of tap planes a channel) takes blocks of
// 8 channels, a product of 72 rows, where 512 KiB gave 2 (18 rows): its inference 8.35 -> 7.93 ms on one
// thread, 5.33 -> 4.67 ms on two, forward + backward 25.4 -> 23.8 and 14.7 -> 13.7 ms (medians of 9
// interleaved rounds, batch 2). Layers whose blocks were already 8 channels (32 x 32 planes) do not change.
constexpr int64_t kTapBlockBytes = 2048 * 1024;

template <typename scalar_t>
struct TapPath : GappedPlanes {
  using T = scalar_t;
  const T* wstack;    // [C_out, taps, C_in/groups]: the A operand of Y
  const T* weight_t;  // per group W^T [groups, C_in/groups, C_out/groups, taps] (backward, for dx; else null)
  int64_t block;      // output channels per block
  std::vector<ShiftTerm<T>> horizontal, vertical;
  // The horizontal terms of kernel row i's push line (i) and pull line (kh + i), for dense::weighted_pair:
  // first those both lines take (same tap, same shift), then the pull's own, then the push's own.
  struct RowPair {
    std::vector<int64_t> tap, offset;
    std::vector<T> push_weight, pull_weight;
    int64_t both = 0, pull_only = 0;
  };
  std::vector<RowPair> row_pairs;
  // The vertical pull pass's weights where they have that form (kernels of 3 rows at scale 2). Forward:
  // dense::triangle_rows, 3 loads per output row where its 11 terms were 11 (with the horizontal one as
  // well: responses_by_columns). Backward: its adjoint, the three pull lines from one sweep
  // (dense::triangle_taps).
  std::optional<dense::TriangleWeights<T>> vertical_pull_triangle;
  // The horizontal pull's: responses_by_columns' row pass, and its adjoint in the backward.
  std::optional<dense::TriangleWeights<T>> horizontal_triangle;

  TapPath(const Geometry& g, const ConvArgs& c, const at::Tensor& rows, const at::Tensor& cols, const T* wstack_,
          const T* w_t)
      : GappedPlanes(g, c, rows.size(0), cols.size(0), dense::kGrain<T>), wstack(wstack_), weight_t(w_t) {
    const int64_t kh = g.kernel_h, kw = g.kernel_w;
    const auto [r, k] = interpolation_doubles(rows, cols);
    const double *rp = r.const_data_ptr<double>(), *kp = k.const_data_ptr<double>();
    // Horizontal: line i (push) and kh + i (pull) of a channel from its tap rows t = i * kw + j.
    for (int64_t i = 0; i < kh; ++i) {
      for (int64_t j = 0; j < kw; ++j) horizontal.push_back({i * kw + j, i, j * dw - pw, T(1)});
      for (int64_t j = 0; j < kw; ++j)
        for (int64_t b = 0; b < pull_w; ++b)
          if (kp[b * kw + j] != 0)
            horizontal.push_back({i * kw + j, kh + i, b * dw - qw, static_cast<T>(kp[b * kw + j])});
    }
    // Vertical: response 0 (push) and 1 (pull) from the lines, shifted by whole rows.
    for (int64_t i = 0; i < kh; ++i) vertical.push_back({i, 0, (i * dh - ph) * ws_stride, T(1)});
    for (int64_t i = 0; i < kh; ++i)
      for (int64_t a = 0; a < pull_h; ++a)
        if (rp[a * kh + i] != 0)
          vertical.push_back({kh + i, 1, (a * dh - qh) * ws_stride, static_cast<T>(-rp[a * kh + i])});
    for (int64_t i = 0; i < kh; ++i) row_pairs.push_back(row_pair(i));
    vertical_pull_triangle = triangle_weights<T>(rp, pull_h, kh, -1.0);
    horizontal_triangle = triangle_weights<T>(kp, pull_w, kw, 1.0);
    const int64_t per_channel = taps * plane_size * static_cast<int64_t>(sizeof(T));
    block = 8;
    while (block > 1 && block * per_channel > kTapBlockBytes) block /= 2;
    block = std::min(block, out_per_group);
  }

  // Kernel row i's RowPair, from the horizontal terms of its two lines (the one list the backward uses too).
  RowPair row_pair(int64_t i) const {
    const int64_t kh = geo.kernel_h;
    std::vector<ShiftTerm<T>> push, pull;
    for (const auto& t : horizontal) {
      if (t.out == i) push.push_back(t);
      if (t.out == kh + i) pull.push_back(t);
    }
    RowPair pair;
    auto add = [&](const ShiftTerm<T>& t, T w_push, T w_pull) {
      pair.tap.push_back(t.in), pair.offset.push_back(t.offset);
      pair.push_weight.push_back(w_push), pair.pull_weight.push_back(w_pull);
    };
    auto same = [](const ShiftTerm<T>& a, const ShiftTerm<T>& b) { return a.in == b.in && a.offset == b.offset; };
    std::vector<bool> push_taken(push.size(), false);
    std::vector<std::pair<ShiftTerm<T>, T>> shared;  // a pull term and its weight in the push line
    std::vector<ShiftTerm<T>> pull_only;
    for (const auto& q : pull) {
      auto it = std::find_if(push.begin(), push.end(), [&](const ShiftTerm<T>& t) { return same(t, q); });
      if (it == push.end()) {
        pull_only.push_back(q);
        continue;
      }
      push_taken[it - push.begin()] = true;
      shared.push_back({q, it->weight});
    }
    // Equal pull weights side by side in each group: dense::weighted_pair may then sum them before multiplying.
    std::stable_sort(shared.begin(), shared.end(),
                     [](const auto& a, const auto& b) { return a.first.weight < b.first.weight; });
    std::stable_sort(pull_only.begin(), pull_only.end(),
                     [](const ShiftTerm<T>& a, const ShiftTerm<T>& b) { return a.weight < b.weight; });
    for (const auto& [q, w_push] : shared) add(q, w_push, q.weight);
    pair.both = static_cast<int64_t>(pair.tap.size());
    pair.pull_only = static_cast<int64_t>(pull_only.size());
    for (const auto& q : pull_only) add(q, T(0), q.weight);
    for (size_t k = 0; k < push.size(); ++k)
      if (!push_taken[k]) add(push[k], push[k].weight, T(0));
    return pair;
  }

  // The flat range of the input rows and their gaps, the matrix products' pixel axis (a multiple of kGrain).
  int64_t product_begin() const { return rows_begin(); }
  int64_t product_length() const { return dense::round_up(geo.height * ws_stride + gap, dense::kGrain<T>); }

  TapWorkspace<T> workspace(bool backward) const {
    TapWorkspace<T> ws;
    ws.dense_input = !backward && product_maps_dense_pixels();
    ws.xg.resize(geo.in_channels * (ws.dense_input ? dense_stride() : plane_size));
    ws.y.resize(block * taps * plane_size);
    if (backward || !by_columns()) ws.lines.resize(2 * geo.kernel_h * plane_size);
    if (by_columns()) ws.columns.resize(2 * geo.kernel_w * plane_size);
    ws.push.resize(geo.out_channels * plane);
    ws.pull.resize(geo.out_channels * plane);
    if (backward) {
      ws.grad_resp.resize(2 * plane_size);
      ws.gx.resize(geo.in_channels * plane_size);
      ws.dw.resize(block * taps * in_per_group);
    }
    return ws;
  }

  // Pointers to `count` rows of `base` (`stride` apart, else plane_size) at `offset`: a product's B operand.
  const T* const* row_pointers(const T* base, int64_t count, int64_t offset, TapWorkspace<T>& ws,
                               int64_t stride = 0) const {
    ws.rows.resize(count);
    for (int64_t k = 0; k < count; ++k) ws.rows[k] = base + k * (stride ? stride : plane_size) + offset;
    return ws.rows.data();
  }

  // Image n into ws.xg (false: check_finite found NaN or +-Inf in it).
  bool load_operands(const T* x, int64_t n, TapWorkspace<T>& ws, bool check_finite = false) const {
    return load_input(x, n, ws.xg.data(), check_finite, ws.dense_input ? dense_stride() : 0);
  }

  // Whether the forward's tap product runs over the input's dense pixels (tap_product): rows of whole
  // vectors, or rows whose vectors straddle (dense::StraddlingStores) with two vectors of bottom margin
  // after the last row for the zeros a straddling store writes past it.
  bool product_maps_dense_pixels() const {
    return dense::maps_rows_of<T>(geo.width, ws_stride) && at(geo.height, 0) + 2 * dense::kGrain<T> <= plane_size;
  }

  // The distance between two dense input planes: not a multiple of 4 KiB (a 32 x 32 float plane is), so
  // that the product's B rows do not all fall into the same sets of the L1 cache (cifar-b1-2020's forward
  // took 15 % longer reading the image's own planes).
  int64_t dense_stride() const { return dense::round_up(geo.height * geo.width, dense::kGrain<T>) + dense::kGrain<T>; }

  // P0 and R of image n (its input already in ws.xg) into ws.push / ws.pull.
  void responses(TapWorkspace<T>& ws) const {
    const int64_t kh = geo.kernel_h;
    for_each_block([&](int64_t grp, int64_t o0, int64_t count) {
      tap_product(grp, o0, count, ws);
      for (int64_t ol = 0; ol < count; ++ol) {
        const T* y = ws.y.data() + ol * taps * plane_size;
        if (by_columns()) {
          responses_by_columns(y, ws.columns.data(), ws.push.data() + (o0 + ol) * plane,
                               ws.pull.data() + (o0 + ol) * plane);
          continue;
        }
        T* l = ws.lines.data();
        for (int64_t i = 0; i < kh; ++i) horizontal_pair(i, y, l, ws);
        apply_to_plane(vertical, 0, static_cast<const T*>(l), ws.push.data() + (o0 + ol) * plane, ws.terms);
        if (vertical_pull_triangle && dh == 1) {
          triangle_pull(l, ws.pull.data() + (o0 + ol) * plane);
        } else {
          apply_to_plane(vertical, 1, static_cast<const T*>(l), ws.pull.data() + (o0 + ol) * plane, ws.terms);
        }
      }
    });
  }

  // Whether the forward runs its vertical pass first (responses_by_columns): both passes of the triangle form
  // (a 3 x 3 kernel at scale 2, which takes no dilation).
  bool by_columns() const { return vertical_pull_triangle && horizontal_triangle && dh == 1 && dw == 1; }

  // A channel's P0 and R (dense planes) from its tap planes y, the vertical pass first. Per kernel column j,
  // the push column (taps (i, j) shifted by i - ph rows, summed) and the pull column (their TriangleRows
  // pass) from one walk down the three tap planes; then per output row both responses from the six columns
  // (TriangleAlongRow). The passes load 9 + 14 vectors per output vector where the kernel rows' horizontal
  // pairs and then the vertical passes loaded 33 + 8. The columns are written at the input's columns only:
  // the rest of each row stays zero, the padding the row pass reads. (qh = ph + 2 here, P0 and R having one
  // size: the push rows are the pull's shifts 2, 3 and 4.)
  void responses_by_columns(const T* y, T* columns, T* push_out, T* pull_out) const {
    const int64_t kw = geo.kernel_w, begin = at(0, 0);
    const T *push[3], *pull[3];
    for (int64_t j = 0; j < kw; ++j) {
      const T* lines[3];
      for (int64_t i = 0; i < 3; ++i) lines[i] = y + (i * kw + j) * plane_size + begin - qh * ws_stride;
      dense::triangle_rows(lines, ws_stride, *vertical_pull_triangle, geo.out_height, geo.width,
                           columns + (kw + j) * plane_size + begin, ws_stride, columns + j * plane_size + begin);
      push[j] = columns + j * plane_size + at(0, j - pw);
      pull[j] = columns + (kw + j) * plane_size + at(0, -qw);
    }
    dense::triangle_along_rows(push, pull, *horizontal_triangle, geo.out_height, geo.out_width, ws_stride, push_out,
                               pull_out, geo.out_width);
  }

  // The horizontal adjoint of kernel row i, the tap planes i * kw + j (j < 3) of gy: each its push line's
  // term plus the pull line's, the three from one sweep of the pull line (shifts -(b dw - qw), b < 7).
  void horizontal_adjoint_row(int64_t i, const T* l, T* gy) const {
    const int64_t begin = at(0, 0);
    const T* push[3];
    for (int64_t j = 0; j < 3; ++j) push[j] = l + i * plane_size + begin - (j * dw - pw);
    triangle_pass(*horizontal_triangle, l + (geo.kernel_h + i) * plane_size + begin + qw, -dw,
                  gy + i * 3 * plane_size + begin, input_length(), push);
  }

  // A channel's pull response from its pull lines (kh .. 2 kh - 1 of l), as apply_to_plane(vertical, 1).
  void triangle_pull(const T* l, T* plane_out) const {
    const T* lines[3];
    for (int64_t i = 0; i < 3; ++i) lines[i] = l + (geo.kernel_h + i) * plane_size + at(0, 0) - qh * ws_stride;
    dense::triangle_rows(lines, ws_stride, *vertical_pull_triangle, geo.out_height, geo.out_width, plane_out,
                         geo.out_width);
  }

  // Y of output channels o0 .. o0 + count - 1 (of group grp) into ws.y. From the gapped input, over its flat
  // range (gaps included: zeros in, zeros out); or (dense_input) over the dense planes' pixels, each written
  // at its place in the gapped layout (the gaps of ws.y stay the zeros they started as): no products for
  // the gaps (cifar-b1-2020: 1024 columns instead of 1136).
  void tap_product(int64_t grp, int64_t o0, int64_t count, TapWorkspace<T>& ws) const {
    const T* a = wstack + o0 * taps * in_per_group;
    const int64_t m_rows = count * taps;
    if (!ws.dense_input) {
      const auto b = row_pointers(ws.xg.data() + grp * in_per_group * plane_size, in_per_group, product_begin(), ws);
      dense::gemm(a, in_per_group, m_rows, in_per_group, b, product_length(), ws.y.data() + product_begin(), plane_size,
                  /*accumulate=*/false);
      return;
    }
    const auto b =
        row_pointers(ws.xg.data() + grp * in_per_group * dense_stride(), in_per_group, 0, ws, dense_stride());
    dense::gemm_into(a, in_per_group, m_rows, in_per_group, b, geo.height * geo.width, ws.y.data() + at(0, 0),
                     plane_size, {}, dense::ColumnMap{geo.width, ws_stride});
  }

  // Lines i (push) and kh + i (pull) of a channel's lines `l` from its tap planes `y`, in one pass.
  void horizontal_pair(int64_t i, const T* y, T* l, TapWorkspace<T>& ws) const {
    const RowPair& pair = row_pairs[i];
    const int64_t terms = static_cast<int64_t>(pair.tap.size()), begin = at(0, 0);
    ws.terms.src.resize(terms);
    for (int64_t t = 0; t < terms; ++t) ws.terms.src[t] = y + pair.tap[t] * plane_size + begin + pair.offset[t];
    dense::weighted_pair(ws.terms.src.data(), pair.push_weight.data(), pair.pull_weight.data(), pair.both,
                         pair.pull_only, terms, output_length_h(), l + i * plane_size + begin,
                         l + (geo.kernel_h + i) * plane_size + begin);
  }

  // The horizontal lines cover the input rows at the output's columns.
  int64_t output_length_h() const { return (geo.height - 1) * ws_stride + geo.out_width; }

  // From the gradient fields in ws.push / ws.pull: the weight gradient of the image (grad_w_image,
  // [C_out, C_in/groups * taps], added to) and its input gradient (grad_x, [C_in, H, W]).
  void backward(T* grad_w_image, T* grad_x, TapWorkspace<T>& ws) const {
    const int64_t kh = geo.kernel_h, lines = 2 * kh, begin = at(0, 0);
    for_each_block([&](int64_t grp, int64_t o0, int64_t count) {
      for (int64_t ol = 0; ol < count; ++ol) {
        T* l = ws.lines.data();
        T* gy = ws.y.data() + ol * taps * plane_size;
        to_gapped(ws.push.data() + (o0 + ol) * plane, geo.out_height, geo.out_width, ws.grad_resp.data());
        to_gapped(ws.pull.data() + (o0 + ol) * plane, geo.out_height, geo.out_width, ws.grad_resp.data() + plane_size);
        const T* grad_resp = ws.grad_resp.data();
        for (int64_t line = 0; line < (vertical_pull_triangle ? kh : lines); ++line)
          apply(vertical, line, true, grad_resp, l, begin, output_length_h(), ws.terms);
        if (vertical_pull_triangle) {  // the pull lines kh .. 2 kh - 1 from the pull's gradient (response 1)
          triangle_pass(*vertical_pull_triangle, grad_resp + plane_size + begin + qh * ws_stride, -dh * ws_stride,
                        l + kh * plane_size + begin, output_length_h());
        }
        if (horizontal_triangle) {
          for (int64_t i = 0; i < kh; ++i) horizontal_adjoint_row(i, l, gy);
        }
        for (int64_t t = 0; t < taps; ++t) {
          if (!horizontal_triangle)
            apply(horizontal, t, true, static_cast<const T*>(l), gy, begin, input_length(), ws.terms);
          // The gaps must read zero in the products below (the sums above leave shifted values there).
          for (int64_t r = 0; r + 1 < geo.height; ++r)
            std::fill(gy + t * plane_size + at(r, geo.width), gy + t * plane_size + at(r + 1, 0), T(0));
        }
      }
      const int64_t m_rows = count * taps, first = product_begin(), n = product_length();
      if (grad_w_image) {
        std::fill(ws.dw.begin(), ws.dw.end(), T(0));
        const auto b = row_pointers(ws.xg.data() + grp * in_per_group * plane_size, in_per_group, first, ws);
        dense::gram(ws.y.data() + first, plane_size, m_rows, b, in_per_group, n, ws.dw.data(), in_per_group);
        for (int64_t ol = 0; ol < count; ++ol)
          for (int64_t c = 0; c < in_per_group; ++c)
            for (int64_t t = 0; t < taps; ++t)
              grad_w_image[((o0 + ol) * in_per_group + c) * taps + t] += ws.dw[(ol * taps + t) * in_per_group + c];
      }
      if (grad_x) {
        const int64_t lda = out_per_group * taps;
        const auto b = row_pointers(ws.y.data(), m_rows, first, ws);
        dense::gemm(weight_t + grp * in_per_group * lda + (o0 - grp * out_per_group) * taps, lda, in_per_group, m_rows,
                    b, n, ws.gx.data() + grp * in_per_group * plane_size + first, plane_size,
                    /*accumulate=*/o0 != grp * out_per_group);  // the group's first block writes (no zero fill)
      }
    });
    if (grad_x) {
      for (int64_t c = 0; c < geo.in_channels; ++c)
        from_gapped(ws.gx.data() + c * plane_size, geo.height, geo.width, grad_x + c * geo.height * geo.width);
    }
  }

  // fn(group, first output channel, count) over the blocks of output channels.
  template <typename Fn>
  void for_each_block(Fn fn) const {
    for (int64_t grp = 0; grp < geo.groups; ++grp)
      for (int64_t o0 = grp * out_per_group; o0 < (grp + 1) * out_per_group; o0 += block)
        fn(grp, o0, std::min(block, (grp + 1) * out_per_group - o0));
  }
};
}  // namespace cpu
}  // namespace pushpull
