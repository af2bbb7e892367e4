// The average pooling of the pull response (avg_kernel, count_include_pad=False) on one plane in cache,
// and its adjoint: a horizontal then a vertical box sum, scaled by 1 / (the clipped window's size) from
// a table formed once per scratch, so that every loop vectorizes (no division per value).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "clones.h"

namespace pushpull {
namespace cpu {

// Clipped box window along one axis.
struct Window {
  int64_t radius;
  int64_t lo(int64_t i) const { return std::max<int64_t>(i - radius, 0); }
  int64_t hi(int64_t i, int64_t n) const { return std::min<int64_t>(i + radius, n - 1); }
};

// out[h, w] = sum of in[h, w - r .. w + r] (clipped to the row). in and out are distinct.
template <typename acc_t>
PUSHPULL_CPU_CLONES void box_rows(const acc_t* __restrict__ in, acc_t* __restrict__ out, int64_t height,
                                  int64_t width, int64_t radius) {
  for (int64_t h = 0; h < height; ++h) {
    const acc_t* __restrict__ row = in + h * width;
    acc_t* __restrict__ sum = out + h * width;
    for (int64_t w = 0; w < width; ++w) sum[w] = row[w];
    for (int64_t d = 1; d <= std::min(radius, width - 1); ++d) {
      for (int64_t w = 0; w < width - d; ++w) sum[w] += row[w + d];
      for (int64_t w = d; w < width; ++w) sum[w] += row[w - d];
    }
  }
}

// out[h, w] = scale[h, w] * (sum of in[h - r .. h + r, w], clipped to the plane); scale null: 1. Each
// shift of the window is one loop over the rows it reaches, as one flat range. in and out are distinct.
template <typename acc_t>
PUSHPULL_CPU_CLONES void box_columns(const acc_t* __restrict__ in, acc_t* __restrict__ out, const acc_t* scale,
                                     int64_t height, int64_t width, int64_t radius) {
  const int64_t plane = height * width;
  for (int64_t p = 0; p < plane; ++p) out[p] = in[p];
  for (int64_t d = 1; d <= std::min(radius, height - 1); ++d) {
    const int64_t shift = d * width;
    for (int64_t p = 0; p < plane - shift; ++p) out[p] += in[p + shift];
    for (int64_t p = shift; p < plane; ++p) out[p] += in[p - shift];
  }
  if (!scale) return;
  for (int64_t p = 0; p < plane; ++p) out[p] *= scale[p];
}

template <typename acc_t>
struct BoxPool {
  int64_t height = 0, width = 0, radius = 0;
  std::vector<acc_t> inverse_count;  // [plane]: 1 / the clipped window's size

  BoxPool() = default;
  BoxPool(int64_t h, int64_t w, int64_t r) : height(h), width(w), radius(r), inverse_count(h * w) {
    const Window win{r};
    for (int64_t i = 0; i < h; ++i) {
      for (int64_t j = 0; j < w; ++j) {
        const int64_t count = (win.hi(i, h) - win.lo(i) + 1) * (win.hi(j, w) - win.lo(j) + 1);
        inverse_count[i * w + j] = acc_t(1) / static_cast<acc_t>(count);
      }
    }
  }

  // values = their average over the windows, in place; tmp: scratch of a plane.
  void average(acc_t* values, acc_t* tmp) const {
    box_rows(values, tmp, height, width, radius);
    box_columns(tmp, values, inverse_count.data(), height, width, radius);
  }

  // values = the adjoint of `average` applied to them, in place: each value divided by its window's
  // size, then summed over the same (symmetric) windows.
  void adjoint(acc_t* values, acc_t* tmp) const {
    const int64_t plane = height * width;
    for (int64_t p = 0; p < plane; ++p) values[p] *= inverse_count[p];
    box_rows(values, tmp, height, width, radius);
    box_columns(tmp, values, static_cast<const acc_t*>(nullptr), height, width, radius);
  }
};

}  // namespace cpu
}  // namespace pushpull
