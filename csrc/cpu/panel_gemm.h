// The "panel-packed" layout of the per-image path (image_path.h): its operands are thin (16-64 rows,
// K = C_in/groups * kh * kw of 27-576) and multiplied once per image inside at::parallel_for, where a
// register-tiled product on packed panels (dense_kernels.h) beats a BLAS call per image.
//
// Panel layout of a [rows x pixels] operand: pixels are cut into panels of kPanel columns, and panel p
// holds rows x kPanel values, row-major: element (r, pix) lives at
//   (pix / kPanel) * rows * kPanel + r * kPanel + pix % kPanel.
// A tile of the product then reads kPanel consecutive values per row. Columns past the last pixel are
// zero, so that sums over pixels need no bounds test.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "dense_kernels.h"

namespace pushpull {
namespace panel {

constexpr int64_t kPanel = dense::kPanelWidth;

inline int64_t panels(int64_t pixels) { return (pixels + kPanel - 1) / kPanel; }
inline int64_t padded(int64_t pixels) { return panels(pixels) * kPanel; }

// Copies pixels [first, first + count) of row `r` from src into a packed operand of `rows` rows. The
// columns past the last pixel are left as they are: zero them once (a zero-initialised buffer).
template <typename T>
void pack_segment(const T* src, int64_t first, int64_t count, int64_t rows, int64_t r, T* packed) {
  while (count > 0) {
    const int64_t panel = first / kPanel, lane = first % kPanel, n = std::min(count, kPanel - lane);
    T* dst = packed + (panel * rows + r) * kPanel + lane;
    if (n == kPanel) {
      std::memcpy(dst, src, kPanel * sizeof(T));  // a fixed size: vector moves, not a call or `rep movs`
    } else {
      for (int64_t l = 0; l < n; ++l) dst[l] = src[l];
    }
    src += n, first += n, count -= n;
  }
}

// Copies row `r` ([pixels] contiguous) into a packed operand of `rows` rows, zero-filling the tail.
template <typename T>
void pack_row(const T* src, int64_t pixels, int64_t rows, int64_t r, T* packed) {
  pack_segment(src, 0, pixels, rows, r, packed);
  const int64_t tail = padded(pixels) - pixels;
  if (tail > 0) std::fill_n(packed + ((panels(pixels) - 1) * rows + r) * kPanel + kPanel - tail, tail, T(0));
}

// C[m, pix] = sum_k A[m, k] * B[k, pix] for m < m_rows: A row-major (lda), B packed with k_rows rows, C
// row-major (ldc; padded(pixels) columns written).
template <typename T>
void product(const T* a, int64_t lda, int64_t m_rows, const T* b, int64_t k_rows, int64_t pixels, T* c, int64_t ldc) {
  dense::panel_gemm(a, lda, m_rows, k_rows, b, panels(pixels), c, ldc);
}

// C[m, k] += sum_pix A[m, pix] * B[k, pix]: A packed with m_rows rows, B packed with k_rows rows, C
// row-major (ldc).
template <typename T>
void gram(const T* a, int64_t m_rows, const T* b, int64_t k_rows, int64_t pixels, T* c, int64_t ldc) {
  dense::panel_gram(a, m_rows, b, k_rows, panels(pixels), c, ldc);
}

}  // namespace panel
}  // namespace pushpull
