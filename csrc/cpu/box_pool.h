// The average pooling of the pull response (avg_kernel, count_include_pad=False) on one plane in cache,
// and its adjoint: a horizontal then a vertical box sum, scaled by 1 / (the clipped window's size) from
// a table formed once per scratch, so that every loop vectorizes (no division per value).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
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

// out[p] = sum of in[p + d * step], d = -r..r, for p in [begin, end) (every term inside the plane),
// times scale[p] unless scale is null. Eight sums at a time stay in a vector over the window (one
// store each); a GCC vector type, as the auto-vectorizer turns the shifted loads into gathers.
template <typename acc_t>
__attribute__((always_inline)) inline void window_sums(const acc_t* __restrict__ in, acc_t* __restrict__ out,
                                                       const acc_t* __restrict__ scale, int64_t begin, int64_t end,
                                                       int64_t step, int64_t r) {
  typedef acc_t vec __attribute__((vector_size(8 * sizeof(acc_t))));
  int64_t p = begin;
  for (; p + 8 <= end; p += 8) {
    vec acc, term;
    std::memcpy(&acc, in + p - r * step, sizeof acc);
    for (int64_t d = 1 - r; d <= r; ++d) {
      std::memcpy(&term, in + p + d * step, sizeof term);
      acc += term;
    }
    if (scale) {
      std::memcpy(&term, scale + p, sizeof term);
      acc *= term;
    }
    std::memcpy(out + p, &acc, sizeof acc);
  }
  for (; p < end; ++p) {
    acc_t acc = in[p - r * step];
    for (int64_t d = 1 - r; d <= r; ++d) acc += in[p + d * step];
    out[p] = scale ? acc * scale[p] : acc;
  }
}

// out[h, w] = sum of in[h, w - r .. w + r] (clipped to the row). in and out are distinct. The sums run
// over the plane as one flat range (the rows are short); the r columns at each end of a row, whose flat
// windows reach into the next row, are then summed again, clipped.
template <typename acc_t>
PUSHPULL_CPU_CLONES void box_rows(const acc_t* __restrict__ in, acc_t* __restrict__ out, int64_t height,
                                  int64_t width, int64_t radius) {
  const int64_t plane = height * width, r = std::min(radius, width - 1);
  window_sums(in, out, static_cast<const acc_t*>(nullptr), r, plane - r, 1, r);
  const Window win{r};
  const auto clipped = [&](int64_t h, int64_t w) {
    acc_t sum = in[h * width + win.lo(w)];
    for (int64_t v = win.lo(w) + 1; v <= win.hi(w, width); ++v) sum += in[h * width + v];
    out[h * width + w] = sum;
  };
  for (int64_t h = 0; h < height; ++h) {
    for (int64_t w = 0; w < std::min(r, width); ++w) clipped(h, w);
    for (int64_t w = std::max(r, width - r); w < width; ++w) clipped(h, w);
  }
}

// out[h, w] = scale[h, w] * (sum of in[h - r .. h + r, w], clipped to the plane); scale null: 1. The
// rows whose window is whole run as one flat range; the r rows at each end, clipped, row by row.
template <typename acc_t>
PUSHPULL_CPU_CLONES void box_columns(const acc_t* __restrict__ in, acc_t* __restrict__ out, const acc_t* scale,
                                     int64_t height, int64_t width, int64_t radius) {
  const int64_t r = std::min(radius, height - 1);
  window_sums(in, out, scale, r * width, (height - r) * width, width, r);
  const Window win{r};
  const auto clipped = [&](int64_t h) {
    acc_t* __restrict__ o = out + h * width;
    for (int64_t w = 0; w < width; ++w) o[w] = in[win.lo(h) * width + w];
    for (int64_t u = win.lo(h) + 1; u <= win.hi(h, height); ++u)
      for (int64_t w = 0; w < width; ++w) o[w] += in[u * width + w];
    if (scale)
      for (int64_t w = 0; w < width; ++w) o[w] *= scale[h * width + w];
  };
  for (int64_t h = 0; h < std::min(r, height); ++h) clipped(h);
  for (int64_t h = std::max(r, height - r); h < height; ++h) clipped(h);
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
