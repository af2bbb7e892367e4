// Small matrix products on "panel-packed" operands, for the per-image upsample path of the CPU kernel.
//
// The products there are thin (16-64 rows, K = C_in/groups * kh * kw of 27-576) and run once per image
// inside at::parallel_for, where BLAS on the 2-core AMD EPYC of benchmarks/results/cpu-2core reached
// about 20 GFLOP/s per core; register-tiled AVX2/FMA loops on packed panels reach about twice that.
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
#include <type_traits>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define PUSHPULL_HAVE_AVX2_KERNELS 1
#endif

namespace pushpull {
namespace panel {

constexpr int64_t kPanel = 24;  // 3 AVX registers of 8 floats

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

// ---- portable versions (float64, float on CPUs without AVX2/FMA, and the edges of the AVX2 tiles)

// C[m, pix] = sum_k A[m, k] * B[k, pix] for rows m in [m_begin, m_end); A row-major (lda), B packed with
// k_rows rows, C row-major (ldc; padded(pixels) columns written).
template <typename T>
void product_generic(const T* a, int64_t lda, int64_t m_begin, int64_t m_end, const T* b, int64_t k_rows,
                     int64_t pixels, T* c, int64_t ldc) {
  for (int64_t p = 0; p < panels(pixels); ++p) {
    const T* bp = b + p * k_rows * kPanel;
    for (int64_t m = m_begin; m < m_end; ++m) {
      T acc[kPanel] = {};
      for (int64_t k = 0; k < k_rows; ++k) {
        const T av = a[m * lda + k];
        for (int64_t l = 0; l < kPanel; ++l) acc[l] += av * bp[k * kPanel + l];
      }
      std::copy(acc, acc + kPanel, c + m * ldc + p * kPanel);
    }
  }
}

// C[m, k] += sum_pix A[m, pix] * B[k, pix] for m in [m_begin, m_end), k in [k_begin, k_end); A packed with
// m_rows rows, B packed with k_rows rows, C row-major (ldc).
template <typename T>
void gram_generic(const T* a, int64_t m_rows, int64_t m_begin, int64_t m_end, const T* b, int64_t k_rows,
                  int64_t k_begin, int64_t k_end, int64_t pixels, T* c, int64_t ldc) {
  for (int64_t m = m_begin; m < m_end; ++m) {
    for (int64_t k = k_begin; k < k_end; ++k) {
      T acc = 0;
      for (int64_t p = 0; p < panels(pixels); ++p) {
        const T* ap = a + (p * m_rows + m) * kPanel;
        const T* bp = b + (p * k_rows + k) * kPanel;
        for (int64_t l = 0; l < kPanel; ++l) acc += ap[l] * bp[l];
      }
      c[m * ldc + k] += acc;
    }
  }
}

#ifdef PUSHPULL_HAVE_AVX2_KERNELS
// ---- AVX2/FMA versions for float, compiled for AVX2 whatever the build flags, chosen at run time.
// The accumulators are named variables: GCC keeps an array of __m256 in registers but also stores it
// to the stack on every iteration.
#define PUSHPULL_AVX2 __attribute__((target("avx2,fma")))

// 4 rows of C over one panel: 12 accumulators; each k broadcasts 4 values of A and loads 3 of B.
PUSHPULL_AVX2 inline void product_tile4(const float* a, int64_t lda, const float* bp, int64_t k_rows, float* c,
                                        int64_t ldc) {
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c02 = c00, c10 = c00, c11 = c00, c12 = c00;
  __m256 c20 = c00, c21 = c00, c22 = c00, c30 = c00, c31 = c00, c32 = c00;
  const float *a0 = a, *a1 = a + lda, *a2 = a + 2 * lda, *a3 = a + 3 * lda;
  for (int64_t k = 0; k < k_rows; ++k, bp += kPanel) {
    const __m256 b0 = _mm256_loadu_ps(bp), b1 = _mm256_loadu_ps(bp + 8), b2 = _mm256_loadu_ps(bp + 16);
    __m256 av = _mm256_broadcast_ss(a0 + k);
    c00 = _mm256_fmadd_ps(av, b0, c00), c01 = _mm256_fmadd_ps(av, b1, c01), c02 = _mm256_fmadd_ps(av, b2, c02);
    av = _mm256_broadcast_ss(a1 + k);
    c10 = _mm256_fmadd_ps(av, b0, c10), c11 = _mm256_fmadd_ps(av, b1, c11), c12 = _mm256_fmadd_ps(av, b2, c12);
    av = _mm256_broadcast_ss(a2 + k);
    c20 = _mm256_fmadd_ps(av, b0, c20), c21 = _mm256_fmadd_ps(av, b1, c21), c22 = _mm256_fmadd_ps(av, b2, c22);
    av = _mm256_broadcast_ss(a3 + k);
    c30 = _mm256_fmadd_ps(av, b0, c30), c31 = _mm256_fmadd_ps(av, b1, c31), c32 = _mm256_fmadd_ps(av, b2, c32);
  }
  const __m256 rows[4][3] = {{c00, c01, c02}, {c10, c11, c12}, {c20, c21, c22}, {c30, c31, c32}};
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 3; ++j) _mm256_storeu_ps(c + i * ldc + 8 * j, rows[i][j]);
}

PUSHPULL_AVX2 inline void product_avx2(const float* a, int64_t lda, int64_t m_rows, const float* b, int64_t k_rows,
                                       int64_t pixels, float* c, int64_t ldc) {
  // Panels outer: one panel of B (k_rows x 24 floats) stays in L1 while every row tile of A uses it.
  const int64_t m_tiled = m_rows / 4 * 4;
  for (int64_t p = 0; p < panels(pixels); ++p) {
    const float* bp = b + p * k_rows * kPanel;
    for (int64_t m = 0; m < m_tiled; m += 4) product_tile4(a + m * lda, lda, bp, k_rows, c + m * ldc + p * kPanel, ldc);
  }
  if (m_tiled < m_rows) product_generic(a, lda, m_tiled, m_rows, b, k_rows, pixels, c, ldc);
}

PUSHPULL_AVX2 inline float horizontal_sum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

// A 4 x 3 block of C: dot products over all pixels, 8 pixels per lane, summed across lanes at the end.
PUSHPULL_AVX2 inline void gram_tile4x3(const float* a, int64_t m_rows, const float* b, int64_t k_rows, int64_t n_panels,
                                       float* c, int64_t ldc) {
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c02 = c00, c10 = c00, c11 = c00, c12 = c00;
  __m256 c20 = c00, c21 = c00, c22 = c00, c30 = c00, c31 = c00, c32 = c00;
  for (int64_t p = 0; p < n_panels; ++p) {
    const float* ap = a + p * m_rows * kPanel;
    const float* bp = b + p * k_rows * kPanel;
    for (int l = 0; l < kPanel; l += 8) {
      const __m256 b0 = _mm256_loadu_ps(bp + l), b1 = _mm256_loadu_ps(bp + kPanel + l);
      const __m256 b2 = _mm256_loadu_ps(bp + 2 * kPanel + l);
      __m256 av = _mm256_loadu_ps(ap + l);
      c00 = _mm256_fmadd_ps(av, b0, c00), c01 = _mm256_fmadd_ps(av, b1, c01), c02 = _mm256_fmadd_ps(av, b2, c02);
      av = _mm256_loadu_ps(ap + kPanel + l);
      c10 = _mm256_fmadd_ps(av, b0, c10), c11 = _mm256_fmadd_ps(av, b1, c11), c12 = _mm256_fmadd_ps(av, b2, c12);
      av = _mm256_loadu_ps(ap + 2 * kPanel + l);
      c20 = _mm256_fmadd_ps(av, b0, c20), c21 = _mm256_fmadd_ps(av, b1, c21), c22 = _mm256_fmadd_ps(av, b2, c22);
      av = _mm256_loadu_ps(ap + 3 * kPanel + l);
      c30 = _mm256_fmadd_ps(av, b0, c30), c31 = _mm256_fmadd_ps(av, b1, c31), c32 = _mm256_fmadd_ps(av, b2, c32);
    }
  }
  const __m256 block[4][3] = {{c00, c01, c02}, {c10, c11, c12}, {c20, c21, c22}, {c30, c31, c32}};
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 3; ++j) c[i * ldc + j] += horizontal_sum(block[i][j]);
}

PUSHPULL_AVX2 inline void gram_avx2(const float* a, int64_t m_rows, const float* b, int64_t k_rows, int64_t pixels,
                                    float* c, int64_t ldc) {
  const int64_t m_tiled = m_rows / 4 * 4, k_tiled = k_rows / 3 * 3;
  // Chunks of 16 panels (384 pixels), so that the chunk of B stays in L2 while every tile reads it.
  constexpr int64_t kChunk = 16;
  for (int64_t p = 0; p < panels(pixels); p += kChunk) {
    const int64_t n_panels = std::min(kChunk, panels(pixels) - p);
    const float *ap = a + p * m_rows * kPanel, *bp = b + p * k_rows * kPanel;
    for (int64_t m = 0; m < m_tiled; m += 4)
      for (int64_t k = 0; k < k_tiled; k += 3)
        gram_tile4x3(ap + m * kPanel, m_rows, bp + k * kPanel, k_rows, n_panels, c + m * ldc + k, ldc);
  }
  // The edges: the last rows (all columns), and the last columns of the tiled rows.
  gram_generic(a, m_rows, m_tiled, m_rows, b, k_rows, 0, k_rows, pixels, c, ldc);
  gram_generic(a, m_rows, 0, m_tiled, b, k_rows, k_tiled, k_rows, pixels, c, ldc);
}
#undef PUSHPULL_AVX2

inline bool cpu_has_avx2_fma() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}
#else
inline bool cpu_has_avx2_fma() { return false; }
#endif

// Whether float products run the AVX2 kernels (else the portable ones).
inline bool fast_float_kernels() { return cpu_has_avx2_fma(); }

template <typename T>
void product(const T* a, int64_t lda, int64_t m_rows, const T* b, int64_t k_rows, int64_t pixels, T* c, int64_t ldc) {
#ifdef PUSHPULL_HAVE_AVX2_KERNELS
  if constexpr (std::is_same_v<T, float>) {
    if (cpu_has_avx2_fma()) return product_avx2(a, lda, m_rows, b, k_rows, pixels, c, ldc);
  }
#endif
  product_generic(a, lda, 0, m_rows, b, k_rows, pixels, c, ldc);
}

template <typename T>
void gram(const T* a, int64_t m_rows, const T* b, int64_t k_rows, int64_t pixels, T* c, int64_t ldc) {
#ifdef PUSHPULL_HAVE_AVX2_KERNELS
  if constexpr (std::is_same_v<T, float>) {
    if (cpu_has_avx2_fma()) return gram_avx2(a, m_rows, b, k_rows, pixels, c, ldc);
  }
#endif
  gram_generic(a, m_rows, 0, m_rows, b, k_rows, 0, k_rows, pixels, c, ldc);
}

}  // namespace panel
}  // namespace pushpull
