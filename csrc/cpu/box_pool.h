// The average pooling of the pull response (avg_kernel, count_include_pad=False) on one plane in cache,
// and its adjoint: a horizontal then a vertical box sum over zero-padded copies (no clipped windows to
// special-case), scaled by 1 / (the clipped window's size) from a table formed once per scratch, so that
// every loop vectorizes (no division per value).
#pragma once

#include <algorithm>
#include <cstdint>

#include "clones.h"
#include "dense_kernels.h"
#include "scratch.h"

namespace pushpull {
namespace cpu {

// Clipped box window along one axis.
struct Window {
  int64_t radius;
  int64_t lo(int64_t i) const { return std::max<int64_t>(i - radius, 0); }
  int64_t hi(int64_t i, int64_t n) const { return std::min<int64_t>(i + radius, n - 1); }
};

// out[h, w] = sum of in[h, w - r .. w + r] for `height` rows of `in` (row h at in + h * stride) with r
// zeros before and after each row, so that the clipped windows need no case of their own.
template <typename acc_t>
void box_rows(const acc_t* in, int64_t stride, acc_t* out, int64_t height, int64_t width, int64_t r) {
  dense::window_sum_rows(in, stride, r, height, width, out);
}

// out[h, w] = scale[h, w] * (sum of in[h - r .. h + r, w]) (scale null: 1) for a plane `in` with r zero
// rows above and below it.
template <typename acc_t>
void box_columns(const acc_t* in, acc_t* out, const acc_t* scale, int64_t height, int64_t width, int64_t r) {
  dense::window_columns(in, r, scale, height, width, out);
}

// The pooling of one plane at a time, and its scratch: the plane copied into rows padded with zeros
// (count_include_pad=False then only scales by 1 / the clipped window's size). Zeros where windows
// are clipped: the padding of both buffers is written once, here, and never again.
template <typename acc_t>
struct BoxPool {
  int64_t height = 0, width = 0, radius = 0, stride = 0;
  ScratchVector<acc_t> inverse_count;  // [plane]: 1 / the clipped window's size
  ScratchVector<acc_t> rows;           // r zeros, then each row followed by r zeros (row stride width + r)
  ScratchVector<acc_t> columns;        // r zero rows, the horizontal sums [height, width], r zero rows

  BoxPool() = default;
  BoxPool(int64_t h, int64_t w, int64_t r)
      : height(h),
        width(w),
        radius(r),
        stride(w + r),
        inverse_count(h * w),
        rows(r + h * (w + r), acc_t(0)),
        columns((h + 2 * r) * w, acc_t(0)) {
    const Window win{r};
    for (int64_t i = 0; i < h; ++i) {
      for (int64_t j = 0; j < w; ++j) {
        const int64_t count = (win.hi(i, h) - win.lo(i) + 1) * (win.hi(j, w) - win.lo(j) + 1);
        inverse_count[i * w + j] = acc_t(1) / static_cast<acc_t>(count);
      }
    }
  }

  // values = their average over the windows, in place. (Inlined, as box_sums, into the cloned epilogues.)
  PUSHPULL_ALWAYS_INLINE void average(acc_t* values) { box_sums(values, nullptr, inverse_count.data()); }

  // values = the adjoint of `average` applied to them, in place: each value divided by its window's
  // size, then summed over the same (symmetric) windows.
  PUSHPULL_ALWAYS_INLINE void adjoint(acc_t* values) { box_sums(values, inverse_count.data(), nullptr); }

 private:
  // values = scale_out * box sums of (scale_in * values) (a null scale: 1).
  PUSHPULL_ALWAYS_INLINE void box_sums(acc_t* values, const acc_t* scale_in, const acc_t* scale_out) {
    for (int64_t h = 0; h < height; ++h) {
      acc_t* __restrict__ row = rows.data() + radius + h * stride;
      const acc_t* __restrict__ v = values + h * width;
      if (scale_in) {
        const acc_t* __restrict__ s = scale_in + h * width;
        for (int64_t w = 0; w < width; ++w) row[w] = v[w] * s[w];
      } else {
        for (int64_t w = 0; w < width; ++w) row[w] = v[w];
      }
    }
    acc_t* sums = columns.data() + radius * width;
    box_rows(rows.data() + radius, stride, sums, height, width, radius);
    box_columns(static_cast<const acc_t*>(sums), values, scale_out, height, width, radius);
  }
};

}  // namespace cpu
}  // namespace pushpull
