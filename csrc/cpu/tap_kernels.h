// Dense loops of the CPU stride-1 routes (tap_path.h, prefilter_path.h): a matrix product, a Gram product and
// a weighted sum of shifted lines. Each is written once, with GCC vector extensions, and compiled
// three times: for AVX-512, for AVX2/FMA and for the build's baseline; the CPU picks one at run time
// (ATen's own kernels dispatch on the CPU's capability in the same spirit). The environment variable
// PUSHPULL_CPU_ISA=avx2|baseline caps the choice, so that every version can be tested on one machine.
//
// Lengths along the pixel axis given to gemm and gram are multiples of kGrain<T> (64 bytes of T), the
// widest vector; the buffers of the tap path are laid out so (zero-filled past the data).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"  // vector arguments of always-inline helpers never cross an ABI boundary

namespace pushpull {
namespace tap_kernels {

template <typename T>
constexpr int64_t kGrain = 64 / sizeof(T);

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

#define PUSHPULL_INLINE inline __attribute__((always_inline))

template <typename T, int Bytes>
struct VecOf {
  typedef T type __attribute__((vector_size(Bytes)));
};

template <typename V, typename T>
PUSHPULL_INLINE V load(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));  // an unaligned vector load
  return v;
}

template <typename V, typename T>
PUSHPULL_INLINE void store(T* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}

// ---- the bodies, for vectors of `Bytes` bytes

// MR rows of C times NV vectors of columns, over all k: the accumulators stay in registers.
template <typename T, int Bytes, int MR, int NV>
PUSHPULL_INLINE void gemm_tile(const T* a, int64_t lda, int64_t k_size, const T* const* b, int64_t p, T* c, int64_t ldc,
                               bool accumulate) {
  using V = typename VecOf<T, Bytes>::type;
  constexpr int L = Bytes / sizeof(T);
  V acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = accumulate ? load<V>(c + r * ldc + v * L) : V{};
  for (int64_t k = 0; k < k_size; ++k) {
    V bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = load<V>(b[k] + p + v * L);
    for (int r = 0; r < MR; ++r) {
      const T s = a[r * lda + k];
      for (int v = 0; v < NV; ++v) acc[r][v] += s * bv[v];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) store(c + r * ldc + v * L, acc[r][v]);
}

template <typename T, int Bytes, int MR, int NV>
PUSHPULL_INLINE void gemm_columns(const T* a, int64_t lda, int64_t m_rows, int64_t k_size, const T* const* b, int64_t p,
                                  T* c, int64_t ldc, bool accumulate) {
  // Tiles of MR rows, then of MR / 2, ... down to single rows.
  int64_t r = 0;
  for (; r + MR <= m_rows; r += MR)
    gemm_tile<T, Bytes, MR, NV>(a + r * lda, lda, k_size, b, p, c + r * ldc + p, ldc, accumulate);
  if constexpr (MR > 1) {
    gemm_columns<T, Bytes, MR / 2, NV>(a + r * lda, lda, m_rows - r, k_size, b, p, c + r * ldc, ldc, accumulate);
  }
}

template <typename T, int Bytes, int MR, int NV>
PUSHPULL_INLINE void gemm_body(const T* a, int64_t lda, int64_t m_rows, int64_t k_size, const T* const* b, int64_t n,
                               T* c, int64_t ldc, bool accumulate) {
  constexpr int L = Bytes / sizeof(T);
  // Column blocks outer: a block of B (k_size x NV * L) stays in L1 while every row tile reads it.
  int64_t p = 0;
  for (; p + NV * L <= n; p += NV * L) gemm_columns<T, Bytes, MR, NV>(a, lda, m_rows, k_size, b, p, c, ldc, accumulate);
  for (; p < n; p += L) gemm_columns<T, Bytes, MR, 1>(a, lda, m_rows, k_size, b, p, c, ldc, accumulate);
}

// C[r, q] += sum_p A[r, p] * B[q, p] for an MR x QR block: vector partial sums, added across lanes at the end.
template <typename T, int Bytes, int MR, int QR>
PUSHPULL_INLINE void gram_tile(const T* a, int64_t lda, const T* const* b, int64_t first, int64_t n, T* c,
                               int64_t ldc) {
  using V = typename VecOf<T, Bytes>::type;
  constexpr int L = Bytes / sizeof(T);
  V acc[MR][QR] = {};
  for (int64_t p = first; p < first + n; p += L) {
    V bv[QR];
    for (int q = 0; q < QR; ++q) bv[q] = load<V>(b[q] + p);
    for (int r = 0; r < MR; ++r) {
      const V av = load<V>(a + r * lda + (p - first));
      for (int q = 0; q < QR; ++q) acc[r][q] += av * bv[q];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int q = 0; q < QR; ++q) {
      T sum = 0;
      for (int l = 0; l < L; ++l) sum += acc[r][q][l];
      c[r * ldc + q] += sum;
    }
}

template <typename T, int Bytes, int MR, int QR>
PUSHPULL_INLINE void gram_rows(const T* a, int64_t lda, const T* const* b, int64_t q_rows, int64_t first, int64_t n,
                               T* c, int64_t ldc) {
  int64_t q = 0;
  for (; q + QR <= q_rows; q += QR) gram_tile<T, Bytes, MR, QR>(a, lda, b + q, first, n, c + q, ldc);
  for (; q < q_rows; ++q) gram_tile<T, Bytes, MR, 1>(a, lda, b + q, first, n, c + q, ldc);
}

template <typename T, int Bytes, int MR, int QR>
PUSHPULL_INLINE void gram_body(const T* a, int64_t lda, int64_t m_rows, const T* const* b, int64_t q_rows, int64_t n,
                               T* c, int64_t ldc) {
  // Chunks of pixels, so that the chunk of every row stays in L2 while all the tiles read it.
  constexpr int64_t kChunk = 1024;
  for (int64_t p = 0; p < n; p += kChunk) {
    const int64_t len = std::min(kChunk, n - p);
    int64_t r = 0;
    for (; r + MR <= m_rows; r += MR)
      gram_rows<T, Bytes, MR, QR>(a + r * lda + p, lda, b, q_rows, p, len, c + r * ldc, ldc);
    for (; r < m_rows; ++r) gram_rows<T, Bytes, 1, QR>(a + r * lda + p, lda, b, q_rows, p, len, c + r * ldc, ldc);
  }
}

// out[p] = sum_t w[t] * src[t][p] for p < n (any n). Eight vectors at a time: eight independent chains
// of multiply-adds hide the FMA latency (two chains left the loop waiting on it).
template <typename T, int Bytes, int NV>
PUSHPULL_INLINE int64_t weighted_sum_vectors(const T* const* src, const T* w, int64_t terms, int64_t p, int64_t n,
                                             T* out) {
  using V = typename VecOf<T, Bytes>::type;
  constexpr int L = Bytes / sizeof(T);
  for (; p + NV * L <= n; p += NV * L) {
    V acc[NV] = {};
    for (int64_t t = 0; t < terms; ++t) {
      const T* s = src[t] + p;
      for (int v = 0; v < NV; ++v) acc[v] += w[t] * load<V>(s + v * L);
    }
    for (int v = 0; v < NV; ++v) store(out + p + v * L, acc[v]);
  }
  return p;
}

template <typename T, int Bytes>
PUSHPULL_INLINE void weighted_sum_body(const T* const* src, const T* w, int64_t terms, int64_t n, T* out) {
  int64_t p = weighted_sum_vectors<T, Bytes, 8>(src, w, terms, 0, n, out);
  p = weighted_sum_vectors<T, Bytes, 1>(src, w, terms, p, n, out);
  for (; p < n; ++p) {
    T acc = 0;
    for (int64_t t = 0; t < terms; ++t) acc += w[t] * src[t][p];
    out[p] = acc;
  }
}

// ---- the three compiled versions

enum class Isa { kBaseline, kAvx2, kAvx512 };

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PUSHPULL_TAPS_X86 1
#define PUSHPULL_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx2,fma")))
#define PUSHPULL_TARGET_AVX2 __attribute__((target("avx2,fma")))
#endif

// The register tiles: 24 accumulators in the 32 AVX-512 registers, 12 in the 16 AVX2 ones, 8 in SSE's.
#define PUSHPULL_TAP_VERSION(attr, name, bytes, mr, nv)                                                    \
  template <typename T>                                                                                    \
  attr void gemm_##name(const T* a, int64_t lda, int64_t m, int64_t k, const T* const* b, int64_t n, T* c, \
                        int64_t ldc, bool accumulate) {                                                    \
    gemm_body<T, bytes, mr, nv>(a, lda, m, k, b, n, c, ldc, accumulate);                                   \
  }                                                                                                        \
  template <typename T>                                                                                    \
  attr void gram_##name(const T* a, int64_t lda, int64_t m, const T* const* b, int64_t q, int64_t n, T* c, \
                        int64_t ldc) {                                                                     \
    gram_body<T, bytes, 4, 3>(a, lda, m, b, q, n, c, ldc);                                                 \
  }                                                                                                        \
  template <typename T>                                                                                    \
  attr void weighted_sum_##name(const T* const* src, const T* w, int64_t terms, int64_t n, T* out) {       \
    weighted_sum_body<T, bytes>(src, w, terms, n, out);                                                    \
  }

PUSHPULL_TAP_VERSION(, baseline, 16, 4, 2)
#ifdef PUSHPULL_TAPS_X86
PUSHPULL_TAP_VERSION(PUSHPULL_TARGET_AVX2, avx2, 32, 4, 3)
PUSHPULL_TAP_VERSION(PUSHPULL_TARGET_AVX512, avx512, 64, 8, 3)
#endif
#undef PUSHPULL_TAP_VERSION

inline Isa detect_isa() {
  Isa best = Isa::kBaseline;
#ifdef PUSHPULL_TAPS_X86
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::kAvx2;
  if (best == Isa::kAvx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl"))
    best = Isa::kAvx512;
#endif
  const char* cap = std::getenv("PUSHPULL_CPU_ISA");
  if (cap && std::string(cap) == "baseline") return Isa::kBaseline;
  if (cap && std::string(cap) == "avx2") return std::min(best, Isa::kAvx2);
  return best;
}

inline Isa isa() {
  static const Isa chosen = detect_isa();
  return chosen;
}

inline const char* isa_name() {
  switch (isa()) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "baseline";
  }
}

#ifdef PUSHPULL_TAPS_X86
#define PUSHPULL_TAP_DISPATCH(fn, ...)      \
  switch (isa()) {                          \
    case Isa::kAvx512:                      \
      return fn##_avx512<T>(__VA_ARGS__);   \
    case Isa::kAvx2:                        \
      return fn##_avx2<T>(__VA_ARGS__);     \
    default:                                \
      return fn##_baseline<T>(__VA_ARGS__); \
  }
#else
#define PUSHPULL_TAP_DISPATCH(fn, ...) return fn##_baseline<T>(__VA_ARGS__);
#endif

// C[m, p] (+)= sum_k A[m, k] * b[k][p] for m < m_rows, p < n (n a multiple of kGrain<T>): A row-major (lda),
// row k of B at b[k], C row-major (ldc). `accumulate`: add to C rather than overwrite it.
template <typename T>
void gemm(const T* a, int64_t lda, int64_t m_rows, int64_t k_size, const T* const* b, int64_t n, T* c, int64_t ldc,
          bool accumulate) {
  PUSHPULL_TAP_DISPATCH(gemm, a, lda, m_rows, k_size, b, n, c, ldc, accumulate)
}

// C[m, q] += sum_p A[m, p] * b[q][p] for m < m_rows, q < q_rows, p < n (n a multiple of kGrain<T>).
template <typename T>
void gram(const T* a, int64_t lda, int64_t m_rows, const T* const* b, int64_t q_rows, int64_t n, T* c, int64_t ldc) {
  PUSHPULL_TAP_DISPATCH(gram, a, lda, m_rows, b, q_rows, n, c, ldc)
}

// out[p] = sum_t w[t] * src[t][p] for p < n.
template <typename T>
void weighted_sum(const T* const* src, const T* w, int64_t terms, int64_t n, T* out) {
  PUSHPULL_TAP_DISPATCH(weighted_sum, src, w, terms, n, out)
}

#undef PUSHPULL_TAP_DISPATCH
#undef PUSHPULL_INLINE

}  // namespace tap_kernels
}  // namespace pushpull

#pragma GCC diagnostic pop
