// Dense loops of the CPU routes: a matrix product and a Gram product, on row pointers (the stride-1 routes,
// tap_path.h and prefilter_path.h, over shifted lines) or on packed panels (image_path.h, panel_gemm.h),
// and a weighted sum of shifted lines. Each is written once, with GCC vector extensions, and compiled
// three times: for AVX-512, for AVX2/FMA and for the build's baseline; the CPU picks one at run time
// (ATen's own kernels dispatch on the CPU's capability in the same spirit). The environment variable
// PUSHPULL_CPU_ISA=avx2|baseline caps the choice, so that every version can be tested on one machine.
//
// Lengths along the pixel axis given to the products are multiples of kGrain<T> (64 bytes of T), the
// widest vector; the buffers of the routes are laid out so (zero-filled past the data).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>

#include "clones.h"

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"  // vector arguments of always-inline helpers never cross an ABI boundary

namespace pushpull {
namespace dense {

template <typename T>
constexpr int64_t kGrain = 64 / sizeof(T);

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// The width of a panel of a packed operand (panel_gemm.h): 3 AVX-512 vectors of floats (a register tile's
// width), 6 AVX2 ones; a multiple of kGrain for float and double.
constexpr int64_t kPanelWidth = 48;
static_assert(kPanelWidth % kGrain<float> == 0 && kPanelWidth % kGrain<double> == 0);

// Unrolls a loop over a register tile's rows or vectors completely, early: GCC otherwise may keep the
// accumulator arrays in memory (zeroed with rep stos, copied out in halves).
#define PUSHPULL_UNROLL _Pragma("GCC unroll 32")

template <typename T, int Bytes>
struct VecOf {
  typedef T type __attribute__((vector_size(Bytes)));
};

// Keeps v in a register: where two multiply-adds read one loaded vector, GCC folds the load into both,
// loading it twice (the load ports are what the weighted sums wait on).
template <typename V>
PUSHPULL_ALWAYS_INLINE void in_register(V& v) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  asm("" : "+v"(v));
#else
  (void)v;
#endif
}

template <typename V, typename T>
PUSHPULL_ALWAYS_INLINE V load(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));  // an unaligned vector load
  return v;
}

template <typename V, typename T>
PUSHPULL_ALWAYS_INLINE void store(T* p, V v) {
  in_register(v);  // else GCC may copy an accumulator kept on the stack in 16-byte halves (AVX2)
  std::memcpy(p, &v, sizeof(V));
}

// ---- the rows of an operand: row pointers (the tap path's shifted lines) or rows at a fixed stride (a
// packed panel, panel_gemm.h). row(k) is where row k starts; from(k) the same rows from row k on.

template <typename T>
struct RowPointers {
  const T* const* rows;
  PUSHPULL_ALWAYS_INLINE const T* row(int64_t k) const { return rows[k]; }
  PUSHPULL_ALWAYS_INLINE RowPointers from(int64_t k) const { return {rows + k}; }
};

template <typename T>
struct StridedRows {
  const T* first;
  int64_t stride;
  PUSHPULL_ALWAYS_INLINE const T* row(int64_t k) const { return first + k * stride; }
  PUSHPULL_ALWAYS_INLINE StridedRows from(int64_t k) const { return {first + k * stride, stride}; }
};

// Where column q of a product is in a row of B or C: q itself, or (width > 0) column q % width of row
// q / width of a plane whose rows are `stride` apart (a product over a plane's dense pixels read from or
// written into the gapped layout of gapped_planes.h). B's rows: width a multiple of the vector length, so
// that no vector straddles two rows; C's may have other widths (StraddlingStores).
struct ColumnMap {
  int64_t width = 0, stride = 0;
  PUSHPULL_ALWAYS_INLINE int64_t at(int64_t q) const { return width ? q / width * stride + q % width : q; }
};

// The NV vectors of columns from p, through `map`.
template <typename T, int Bytes, int NV>
PUSHPULL_ALWAYS_INLINE void column_block(const ColumnMap& map, int64_t p, int64_t (&cols)[NV]) {
  PUSHPULL_UNROLL
  for (int v = 0; v < NV; ++v) cols[v] = map.at(p + v * (Bytes / int64_t(sizeof(T))));
}

// How a product's register tile writes vector v of its column block into a row of C: at cols[v].
template <typename T, int Bytes, int NV>
struct PlainStores {
  int64_t cols[NV];
  PlainStores(const ColumnMap& map, int64_t p) { column_block<T, Bytes>(map, p, cols); }
  template <typename V>
  PUSHPULL_ALWAYS_INLINE void put(T* row, int v, V acc) const {
    store(row + cols[v], acc);
  }
};

#if defined(__GNUC__) && !defined(__clang__)
#define PUSHPULL_STRADDLING_STORES 1  // GCC's __builtin_shuffle with indices known at run time

template <typename T>
using LaneIndex = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;

// Over a plane's dense pixels into rows of the gapped layout that are not whole vectors (at least one
// vector wide, gaps shorter than one): a vector that straddles a row's end goes out as two shuffled stores,
// its lanes of the first row with the gap's zeros after them, then (one vector on) the rest of its lanes of
// the next row with zeros past them. Those zeros fall where the next vector of C's row goes: it is written
// later (a tile stores its vectors, the product its column blocks, in order), and the last vector's fall
// into the plane's bottom margin, which the caller keeps at least two vectors long. Not accumulating.
// The tap path's product then skips the gaps where rows are not whole vectors: ResNet-50's layer1 convs
// (64 channels, 28 x 28, batch 8; 784 columns instead of 880) inference 3.05-3.13 -> 2.80-2.98 ms, two
// threads on the 2-core AMD EPYC with AVX-512, 3 alternated runs.
template <typename T, int Bytes, int NV>
struct StraddlingStores {
  static constexpr int L = Bytes / sizeof(T);
  using V = typename VecOf<T, Bytes>::type;
  using I = typename VecOf<LaneIndex<T>, Bytes>::type;
  int64_t cols[NV];
  bool split[NV];
  I first[NV], second[NV];  // lane indices into (acc, zeros): L picks a zero
  StraddlingStores(const ColumnMap& map, int64_t p) {
    const int64_t jump = map.stride - map.width;
    for (int v = 0; v < NV; ++v) {
      const int64_t q = p + v * L, lanes = map.width - q % map.width;  // of the first row
      cols[v] = map.at(q);
      split[v] = lanes < L;
      for (int l = 0; l < L; ++l) {
        first[v][l] = l < lanes ? l : (l - jump >= lanes ? l - jump : L);
        second[v][l] = l < jump && L + l - jump >= lanes ? L + l - jump : L;
      }
    }
  }
  PUSHPULL_ALWAYS_INLINE void put(T* row, int v, V acc) const {
    if (!split[v]) return store(row + cols[v], acc);
    store(row + cols[v], V(__builtin_shuffle(acc, V{}, first[v])));
    store(row + cols[v] + L, V(__builtin_shuffle(acc, V{}, second[v])));
  }
};
#endif

// ---- the bodies, for vectors of `Bytes` bytes

// MR rows of C times NV vectors of columns (vector v at b_cols[v] in B's rows, written by out.put), over
// all k: the accumulators stay in registers. With `prefetch` (a column offset, else 0) the tile also asks
// for B's lines that many columns on.
template <typename T, int Bytes, int MR, int NV, typename Rows, typename Stores>
PUSHPULL_ALWAYS_INLINE void gemm_tile(const T* a, int64_t lda, int64_t k_size, const Rows& b, const int64_t* b_cols,
                                      const Stores& out, T* c, int64_t ldc, bool accumulate, int64_t prefetch) {
  using V = typename VecOf<T, Bytes>::type;
  V acc[MR][NV];
  PUSHPULL_UNROLL
  for (int r = 0; r < MR; ++r) {
    PUSHPULL_UNROLL
    for (int v = 0; v < NV; ++v) acc[r][v] = accumulate ? load<V>(c + r * ldc + out.cols[v]) : V{};
  }
  for (int64_t k = 0; k < k_size; ++k) {
    V bv[NV];
    PUSHPULL_UNROLL
    for (int v = 0; v < NV; ++v) bv[v] = load<V>(b.row(k) + b_cols[v]);
    if (prefetch) {
      PUSHPULL_UNROLL
      for (int line = 0; line < (NV * Bytes + 63) / 64; ++line)
        __builtin_prefetch(b.row(k) + b_cols[0] + prefetch + line * kGrain<T>);
    }
    PUSHPULL_UNROLL
    for (int r = 0; r < MR; ++r) {
      const T s = a[r * lda + k];
      PUSHPULL_UNROLL
      for (int v = 0; v < NV; ++v) acc[r][v] += s * bv[v];
    }
  }
  PUSHPULL_UNROLL
  for (int r = 0; r < MR; ++r) {
    PUSHPULL_UNROLL
    for (int v = 0; v < NV; ++v) out.put(c + r * ldc, v, acc[r][v]);
  }
}

template <typename T, int Bytes, int MR, int NV, typename Rows, typename Stores>
PUSHPULL_ALWAYS_INLINE void gemm_columns(const T* a, int64_t lda, int64_t m_rows, int64_t k_size, const Rows& b,
                                         const int64_t* b_cols, const Stores& out, T* c, int64_t ldc, bool accumulate) {
  // Tiles of MR rows, then of MR / 2, ... down to single rows. The first tile of the widest blocks
  // prefetches the B block two on: B's rows are many streams (the tap path: one per input channel, from
  // L3), which the hardware prefetchers do not follow, and a thin product reuses a block of B too few
  // times to hide the misses (m = 18: 26-31 -> 34 GMAC/s, one thread, AMD EPYC).
  int64_t r = 0;
  for (; r + MR <= m_rows; r += MR) {
    const int64_t prefetch = r == 0 && NV > 1 ? 2 * NV * (Bytes / int64_t(sizeof(T))) : 0;
    gemm_tile<T, Bytes, MR, NV>(a + r * lda, lda, k_size, b, b_cols, out, c + r * ldc, ldc, accumulate, prefetch);
  }
  if constexpr (MR > 1) {
    gemm_columns<T, Bytes, MR / 2, NV>(a + r * lda, lda, m_rows - r, k_size, b, b_cols, out, c + r * ldc, ldc,
                                       accumulate);
  }
}

// Column blocks outer: a block of B (k_size x NV * L) stays in L1 while every row tile reads it. Stores:
// PlainStores or StraddlingStores, for NV vectors and for one.
template <typename T, int Bytes, int MR, int NV, template <typename, int, int> class Stores, typename Rows>
PUSHPULL_ALWAYS_INLINE void gemm_blocks(const T* a, int64_t lda, int64_t m_rows, int64_t k_size, const Rows& b,
                                        int64_t n, T* c, int64_t ldc, bool accumulate, const ColumnMap& b_map,
                                        const ColumnMap& c_map) {
  constexpr int L = Bytes / sizeof(T);
  int64_t p = 0;
  for (; p + NV * L <= n; p += NV * L) {
    int64_t b_cols[NV];
    column_block<T, Bytes>(b_map, p, b_cols);
    gemm_columns<T, Bytes, MR, NV>(a, lda, m_rows, k_size, b, b_cols, Stores<T, Bytes, NV>(c_map, p), c, ldc,
                                   accumulate);
  }
  for (; p < n; p += L) {
    int64_t b_cols[1];
    column_block<T, Bytes>(b_map, p, b_cols);
    gemm_columns<T, Bytes, MR, 1>(a, lda, m_rows, k_size, b, b_cols, Stores<T, Bytes, 1>(c_map, p), c, ldc, accumulate);
  }
}

template <typename T, int Bytes, int MR, int NV, typename Rows>
PUSHPULL_ALWAYS_INLINE void gemm_body(const T* a, int64_t lda, int64_t m_rows, int64_t k_size, const Rows& b, int64_t n,
                                      T* c, int64_t ldc, bool accumulate, const ColumnMap& b_map = {},
                                      const ColumnMap& c_map = {}) {
#ifdef PUSHPULL_STRADDLING_STORES
  if (c_map.width % (Bytes / int64_t(sizeof(T))) != 0) {
    return gemm_blocks<T, Bytes, MR, NV, StraddlingStores>(a, lda, m_rows, k_size, b, n, c, ldc, false, b_map, c_map);
  }
#endif
  gemm_blocks<T, Bytes, MR, NV, PlainStores>(a, lda, m_rows, k_size, b, n, c, ldc, accumulate, b_map, c_map);
}

// The same product on packed operands: panel p of B (k_size rows of kPanelWidth) gives columns
// [p * kPanelWidth, (p + 1) * kPanelWidth) of C.
template <typename T, int Bytes, int MR, int NV>
PUSHPULL_ALWAYS_INLINE void panel_gemm_body(const T* a, int64_t lda, int64_t m_rows, int64_t k_size, const T* b,
                                            int64_t panels, T* c, int64_t ldc) {
  for (int64_t p = 0; p < panels; ++p) {
    const StridedRows<T> panel{b + p * k_size * kPanelWidth, kPanelWidth};
    gemm_body<T, Bytes, MR, NV>(a, lda, m_rows, k_size, panel, kPanelWidth, c + p * kPanelWidth, ldc, false);
  }
}

// Bytes of the smaller Gram operand's chunk (see gram_body): half the smallest L2 seen (512 KiB, AMD EPYC).
constexpr int64_t kGramChunkBytes = 256 * 1024;
// The most pixels a chunk holds: each chunk ends with a sum across the lanes of every accumulator.
constexpr int64_t kGramChunk = 4096;

// The pixels of a Gram product are runs of RunLen contiguous values (a compile-time length, so that the
// loop over a run unrolls; 0: `length`, known at run time); run s of a row starts s * step values after the
// row's start (the tap path: one line cut into runs, step = RunLen; packed operands: one run per panel,
// step = a panel's size; a plane's rows, dense in one operand and gapped in the other: a row per run).
struct Runs {
  int64_t count, a_step, b_step, length = 0;
};

template <int64_t RunLen>
PUSHPULL_ALWAYS_INLINE int64_t run_length(const Runs& runs) {
  return RunLen ? RunLen : runs.length;
}

// C[r, q] += sum_pix A[r, pix] * B[q, pix] for an MR x QR block over runs [first, end): vector partial
// sums, added across lanes at the end.
template <typename T, int Bytes, int MR, int QR, int64_t RunLen, typename ARows, typename BRows>
PUSHPULL_ALWAYS_INLINE void gram_tile(const ARows& a, const BRows& b, const Runs& runs, int64_t first, int64_t end,
                                      T* c, int64_t ldc) {
  using V = typename VecOf<T, Bytes>::type;
  constexpr int L = Bytes / sizeof(T);
  V acc[MR][QR];
  PUSHPULL_UNROLL
  for (int r = 0; r < MR; ++r) {
    PUSHPULL_UNROLL
    for (int q = 0; q < QR; ++q) acc[r][q] = V{};
  }
  const int64_t run_len = run_length<RunLen>(runs);
  for (int64_t s = first; s < end; ++s) {
    const int64_t a_run = s * runs.a_step, b_run = s * runs.b_step;
    for (int64_t p = 0; p < run_len; p += L) {
      V bv[QR];
      PUSHPULL_UNROLL
      for (int q = 0; q < QR; ++q) bv[q] = load<V>(b.row(q) + b_run + p);
      PUSHPULL_UNROLL
      for (int r = 0; r < MR; ++r) {
        const V av = load<V>(a.row(r) + a_run + p);
        PUSHPULL_UNROLL
        for (int q = 0; q < QR; ++q) acc[r][q] += av * bv[q];
      }
    }
  }
  PUSHPULL_UNROLL
  for (int r = 0; r < MR; ++r) {
    PUSHPULL_UNROLL
    for (int q = 0; q < QR; ++q) {
      T sum = 0;
      PUSHPULL_UNROLL
      for (int l = 0; l < L; ++l) sum += acc[r][q][l];
      c[r * ldc + q] += sum;
    }
  }
}

// Tiles of QR columns of C, then of QR / 2, ... down to single columns.
template <typename T, int Bytes, int MR, int QR, int64_t RunLen, typename ARows, typename BRows>
PUSHPULL_ALWAYS_INLINE void gram_rows(const ARows& a, const BRows& b, int64_t q_rows, const Runs& runs, int64_t first,
                                      int64_t end, T* c, int64_t ldc) {
  int64_t q = 0;
  for (; q + QR <= q_rows; q += QR) gram_tile<T, Bytes, MR, QR, RunLen>(a, b.from(q), runs, first, end, c + q, ldc);
  if constexpr (QR > 1) {
    gram_rows<T, Bytes, MR, QR / 2, RunLen>(a, b.from(q), q_rows - q, runs, first, end, c + q, ldc);
  }
}

// Tiles of MR rows of C, then of MR / 2, ... down to single rows.
template <typename T, int Bytes, int MR, int QR, int64_t RunLen, typename ARows, typename BRows>
PUSHPULL_ALWAYS_INLINE void gram_chunk(const ARows& a, int64_t m_rows, const BRows& b, int64_t q_rows, const Runs& runs,
                                       int64_t first, int64_t end, T* c, int64_t ldc) {
  int64_t r = 0;
  for (; r + MR <= m_rows; r += MR)
    gram_rows<T, Bytes, MR, QR, RunLen>(a.from(r), b, q_rows, runs, first, end, c + r * ldc, ldc);
  if constexpr (MR > 1) {
    gram_chunk<T, Bytes, MR / 2, QR, RunLen>(a.from(r), m_rows - r, b, q_rows, runs, first, end, c + r * ldc, ldc);
  }
}

// Tiles of MR rows of C for QR columns, then of MR / 2, ... down to single rows.
template <typename T, int Bytes, int MR, int QR, int64_t RunLen, typename ARows, typename BRows>
PUSHPULL_ALWAYS_INLINE void gram_cols(const ARows& a, int64_t m_rows, const BRows& b, const Runs& runs, int64_t first,
                                      int64_t end, T* c, int64_t ldc) {
  int64_t r = 0;
  for (; r + MR <= m_rows; r += MR)
    gram_tile<T, Bytes, MR, QR, RunLen>(a.from(r), b, runs, first, end, c + r * ldc, ldc);
  if constexpr (MR > 1) {
    gram_cols<T, Bytes, MR / 2, QR, RunLen>(a.from(r), m_rows - r, b, runs, first, end, c + r * ldc, ldc);
  }
}

// gram_chunk with the columns' tiles outer: the tiles of B rows are read once, A's chunk many times.
template <typename T, int Bytes, int MR, int QR, int64_t RunLen, typename ARows, typename BRows>
PUSHPULL_ALWAYS_INLINE void gram_chunk_by_columns(const ARows& a, int64_t m_rows, const BRows& b, int64_t q_rows,
                                                  const Runs& runs, int64_t first, int64_t end, T* c, int64_t ldc) {
  int64_t q = 0;
  for (; q + QR <= q_rows; q += QR)
    gram_cols<T, Bytes, MR, QR, RunLen>(a, m_rows, b.from(q), runs, first, end, c + q, ldc);
  if constexpr (QR > 1) {
    gram_chunk_by_columns<T, Bytes, MR, QR / 2, RunLen>(a, m_rows, b.from(q), q_rows - q, runs, first, end, c + q, ldc);
  }
}

template <typename T, int Bytes, int MR, int QR, int64_t RunLen, typename ARows, typename BRows>
PUSHPULL_ALWAYS_INLINE void gram_body(const ARows& a, int64_t m_rows, const BRows& b, int64_t q_rows, const Runs& runs,
                                      T* c, int64_t ldc) {
  // Equal chunks of pixels, as many as the smaller operand's chunk fits in kGramChunkBytes (at most
  // kGramChunk): its chunk stays in L2 while the tiles of the larger one stream through once (a tile's
  // rows of a chunk in L1). With A's tiles outer and the larger B (imagenet-stem-2024's weight gradient:
  // 147 operand rows, 64 gradient rows) the whole of B was read again from L3 for every tile of A.
  const int64_t smaller = std::max<int64_t>(std::min(m_rows, q_rows), 1);
  const int64_t run_len = std::max<int64_t>(run_length<RunLen>(runs), 1);
  const int64_t fit = kGramChunkBytes / (smaller * run_len * static_cast<int64_t>(sizeof(T)));
  const int64_t max_runs = std::clamp<int64_t>(fit, 1, std::max<int64_t>(kGramChunk / run_len, 1));
  const int64_t chunks = (runs.count + max_runs - 1) / max_runs;
  const int64_t chunk = chunks > 0 ? (runs.count + chunks - 1) / chunks : 1;
  for (int64_t s = 0; s < runs.count; s += chunk) {
    const int64_t end = std::min(s + chunk, runs.count);
    if (m_rows <= q_rows)
      gram_chunk_by_columns<T, Bytes, MR, QR, RunLen>(a, m_rows, b, q_rows, runs, s, end, c, ldc);
    else
      gram_chunk<T, Bytes, MR, QR, RunLen>(a, m_rows, b, q_rows, runs, s, end, c, ldc);
  }
}

// ---- weighted sums of shifted lines: sum.chunk<NV>(p) writes [p, p + NV * L), sum.scalar(p) one value.

// sum.chunk<count>(0) for a run-time count in [1, NV].
template <int NV, typename Sum>
PUSHPULL_ALWAYS_INLINE void chunk_of(int64_t count, const Sum& sum) {
  if constexpr (NV > 1) {
    if (count < NV) return chunk_of<NV - 1>(count, sum);
  }
  sum.template chunk<NV>(0);
}

// Covers [0, n): chunks of kChains vectors (kChains independent chains of multiply-adds hide the FMA
// latency), then ONE more chunk that ends at n, overlapping the one before: it rewrites the same sums
// (the outputs never alias the inputs), where a tail of single vectors and scalars ran at a fraction of
// the speed (a 32 x 32 plane's lines end in 93 values). A shorter line (one row of a plane: 32 or 56
// values on the ResNets) is one chunk of all its whole vectors, then one vector that ends at n.
template <int L, typename Sum>
PUSHPULL_ALWAYS_INLINE void cover_line(int64_t n, const Sum& sum) {
  constexpr int64_t wide = Sum::kChains * L;
  int64_t p = 0;
  if (n >= wide) {
    for (; p + wide <= n; p += wide) sum.template chunk<Sum::kChains>(p);
    if (p < n) sum.template chunk<Sum::kChains>(n - wide);
    return;
  }
  if (n >= L) {
    chunk_of<Sum::kChains - 1>(n / L, sum);
    if (n % L) sum.template chunk<1>(n - L);
    return;
  }
  for (; p < n; ++p) sum.scalar(p);
}

// A chunk's NV accumulators set to zero, and stored at out (L values each).
template <typename V, int NV>
PUSHPULL_ALWAYS_INLINE void clear(V (&acc)[NV]) {
  PUSHPULL_UNROLL
  for (int v = 0; v < NV; ++v) acc[v] = V{};
}

template <int L, typename T, typename V, int NV>
PUSHPULL_ALWAYS_INLINE void store_chunk(T* out, const V (&acc)[NV]) {
  PUSHPULL_UNROLL
  for (int v = 0; v < NV; ++v) store(out + v * L, acc[v]);
}

// out[p] = sum_t w[t] * src[t][from + p].
template <typename T, int Bytes>
struct WeightedSum {
  using V = typename VecOf<T, Bytes>::type;
  static constexpr int L = Bytes / sizeof(T), kChains = 8;
  const T* const* src;
  const T* w;
  int64_t terms;
  T* out;
  int64_t from = 0;

  template <int NV>
  PUSHPULL_ALWAYS_INLINE void chunk(int64_t p) const {
    V acc[NV];
    clear(acc);
    for (int64_t t = 0; t < terms; ++t) {
      const T* s = src[t] + from + p;
      PUSHPULL_UNROLL
      for (int v = 0; v < NV; ++v) acc[v] += w[t] * load<V>(s + v * L);
    }
    store_chunk<L>(out + p, acc);
  }
  PUSHPULL_ALWAYS_INLINE void scalar(int64_t p) const {
    T acc = 0;
    for (int64_t t = 0; t < terms; ++t) acc += w[t] * src[t][from + p];
    out[p] = acc;
  }
};

// out0[p] = sum_t w0[t] * src[t][p] and out1[p] = sum_t w1[t] * src[t][p], where terms [0, both) feed both
// sums, [both, both + only1) only out1 and the rest only out0 (whose weight in the other sum must be zero:
// the scalar tail takes every term): one load per term for two lines that read the same shifted planes
// (the tap path's push and pull lines of a kernel row).
template <typename T, int Bytes>
struct WeightedPair {
  using V = typename VecOf<T, Bytes>::type;
  // 16 accumulators in AVX-512's 32 registers, 12 in the 16 of AVX2 and SSE: a term that feeds one sum
  // only advances kChains chains of multiply-adds, each waiting on the last (4 cycles): with 4 chains the
  // upsample's pull line (8 terms of its own) waited on them (AVX2 on the AMD EPYC: 12 cycles a vector).
  static constexpr int L = Bytes / sizeof(T), kChains = Bytes == 64 ? 8 : 6;
  const T* const* src;
  const T *w0, *w1;
  int64_t both, only1, terms;
  T *out0, *out1;

  template <int NV>
  PUSHPULL_ALWAYS_INLINE void chunk(int64_t p) const {
    V acc0[NV], acc1[NV];
    clear(acc0), clear(acc1);
    int64_t t = 0;
    for (; t < both; ++t) {
      const T* s = src[t] + p;
      PUSHPULL_UNROLL
      for (int v = 0; v < NV; ++v) {
        V x = load<V>(s + v * L);
        in_register(x);
        acc0[v] += w0[t] * x;
        acc1[v] += w1[t] * x;
      }
    }
    for (; t < both + only1; ++t) {
      PUSHPULL_UNROLL
      for (int v = 0; v < NV; ++v) acc1[v] += w1[t] * load<V>(src[t] + p + v * L);
    }
    for (; t < terms; ++t) {
      PUSHPULL_UNROLL
      for (int v = 0; v < NV; ++v) acc0[v] += w0[t] * load<V>(src[t] + p + v * L);
    }
    store_chunk<L>(out0 + p, acc0), store_chunk<L>(out1 + p, acc1);
  }
  PUSHPULL_ALWAYS_INLINE void scalar(int64_t p) const {
    T acc0 = 0, acc1 = 0;
    for (int64_t t = 0; t < terms; ++t) acc0 += w0[t] * src[t][p], acc1 += w1[t] * src[t][p];
    out0[p] = acc0, out1[p] = acc1;
  }
};

// WeightedPair where out0 is the plain sum of the first Both terms (weights 1, no terms of out0 alone) and
// out1's weights come in runs of equal values (Runs: their lengths, in order): each run is summed, then
// multiplied once by its weight, held in a register for the whole line. Per vector that is one load per term
// and no weight loads (WeightedPair broadcasts both weights of every term from memory in every chunk). The
// tap path's rows of the 2020 upsample (kernel 3, scale 2: pull weights 1/3, 2/3 and 1 in runs 2, 1 | 2, 4,
// 2 once sorted): cifar-b1-2020's inference 16.2 -> 15.4 ms on one thread (medians of 4 alternated runs, AMD
// EPYC, AVX2), before 3 x 3 kernels took TapPath::responses_by_columns; now the rows of 3-wide kernels with
// another height. The same for the vertical pass (WeightedSum) was slower: its rows are one chunk of 4 vectors.
template <typename T, int Bytes, int Both, int... Runs>
struct RunPair {
  using V = typename VecOf<T, Bytes>::type;
  static constexpr int L = Bytes / sizeof(T), kChains = 3, kRuns = sizeof...(Runs);
  static constexpr int kTerms = (Runs + ...);
  static constexpr int kLength[kRuns] = {Runs...};
  const T* src[kTerms];
  V weight[kRuns];
  T *out0, *out1;

  // Whether a pair's terms have this layout (w1 holding exactly these runs, w0 one for the first Both).
  static bool matches(const T* w0, const T* w1, int64_t both, int64_t only1, int64_t terms) {
    if (both != Both || terms != kTerms || only1 != kTerms - Both) return false;
    for (int t = 0; t < Both; ++t)
      if (w0[t] != T(1)) return false;
    for (int r = 0, t = 0; r < kRuns; t += kLength[r++])
      for (int k = 1; k < kLength[r]; ++k)
        if (w1[t + k] != w1[t]) return false;
    return true;
  }

  RunPair(const T* const* s, const T* w1, T* o0, T* o1) : out0(o0), out1(o1) {
    for (int t = 0; t < kTerms; ++t) src[t] = s[t];
    for (int r = 0, t = 0; r < kRuns; t += kLength[r++]) weight[r] = V{} + w1[t];
  }

  template <int NV>
  PUSHPULL_ALWAYS_INLINE void chunk(int64_t p) const {
    PUSHPULL_UNROLL
    for (int v = 0; v < NV; ++v) {
      const int64_t q = p + v * L;
      V sum0{}, sum1{};
      int t = 0;
      PUSHPULL_UNROLL
      for (int r = 0; r < kRuns; ++r) {
        V run{};
        PUSHPULL_UNROLL
        for (int k = 0; k < kLength[r]; ++k, ++t) {
          V x = load<V>(src[t] + q);
          in_register(x);
          if (t < Both) sum0 += x;
          run += x;
        }
        sum1 += weight[r] * run;
      }
      store(out0 + q, sum0), store(out1 + q, sum1);
    }
  }
  PUSHPULL_ALWAYS_INLINE void scalar(int64_t p) const {
    T sum0 = 0, sum1 = 0;
    for (int r = 0, t = 0; r < kRuns; ++r) {
      T run = 0;
      for (int k = 0; k < kLength[r]; ++k, ++t) {
        if (t < Both) sum0 += src[t][p];
        run += src[t][p];
      }
      sum1 += weight[r][0] * run;
    }
    out0[p] = sum0, out1[p] = sum1;
  }
};

// The weights of a 3-tap line upsampled to 7 taps by linear interpolation (the 2020 pull of a 3 x 3 kernel
// at scale 2, one dimension): the three outputs' weights on the seven shifted sources, zero elsewhere,
//   out0 = c x0 + a0 x1 + b0 x2,  out1 = p (x1 + x5) + q (x2 + x4) + c x3,  out2 = b2 x4 + a2 x5 + c x6,
// with c = +1 or -1 (the interpolation's knots, negated for the pull).
template <typename T>
struct TriangleWeights {
  T a0, b0, p, q, b2, a2;
  bool negate;
};

// The three outputs from 7 loads: 6 multiply-adds and 3 additions per vector where the 11 terms as
// separate weighted sums were 11 loads and 11 multiply-adds (the symmetric pairs are added first). kExtra:
// out[j] also adds extra[j] (the tap path's push term of each tap in the horizontal adjoint).
template <typename T, int Bytes, bool kNegate, bool kExtra>
struct TriangleTaps {
  using V = typename VecOf<T, Bytes>::type;
  static constexpr int L = Bytes / sizeof(T), kChains = 2;
  const T* src[7];
  V a0, b0, p, q, b2, a2;
  T* out[3];
  const T* extra[3];

  TriangleTaps(const T* const* s, const TriangleWeights<T>& w, T* const* o, const T* const* e)
      : a0(V{} + w.a0), b0(V{} + w.b0), p(V{} + w.p), q(V{} + w.q), b2(V{} + w.b2), a2(V{} + w.a2) {
    for (int t = 0; t < 7; ++t) src[t] = s[t];
    for (int j = 0; j < 3; ++j) out[j] = o[j], extra[j] = kExtra ? e[j] : nullptr;
  }

  template <int NV>
  PUSHPULL_ALWAYS_INLINE void chunk(int64_t at) const {
    PUSHPULL_UNROLL
    for (int v = 0; v < NV; ++v) {
      const int64_t i = at + v * L;
      V x[7];
      PUSHPULL_UNROLL
      for (int t = 0; t < 7; ++t) x[t] = load<V>(src[t] + i), in_register(x[t]);
      V knot0 = kNegate ? -x[0] : x[0], knot3 = kNegate ? -x[3] : x[3], knot6 = kNegate ? -x[6] : x[6];
      if constexpr (kExtra) {
        knot0 += load<V>(extra[0] + i), knot3 += load<V>(extra[1] + i), knot6 += load<V>(extra[2] + i);
      }
      store(out[0] + i, knot0 + a0 * x[1] + b0 * x[2]);
      store(out[1] + i, knot3 + p * (x[1] + x[5]) + q * (x[2] + x[4]));
      store(out[2] + i, knot6 + b2 * x[4] + a2 * x[5]);
    }
  }
  PUSHPULL_ALWAYS_INLINE void scalar(int64_t i) const {
    T x[7];
    for (int t = 0; t < 7; ++t) x[t] = src[t][i];
    const T sign = kNegate ? T(-1) : T(1);
    T knot[3] = {sign * x[0], sign * x[3], sign * x[6]};
    if constexpr (kExtra) {
      for (int j = 0; j < 3; ++j) knot[j] += extra[j][i];
    }
    out[0][i] = knot[0] + a0[0] * x[1] + b0[0] * x[2];
    out[1][i] = knot[1] + p[0] * (x[1] + x[5]) + q[0] * (x[2] + x[4]);
    out[2][i] = knot[2] + b2[0] * x[4] + a2[0] * x[5];
  }
};

// The weighted sum of three lines that TriangleRows and TriangleAlongRow take, from line 0 at shifts 0..2
// (r0..r2), line 1 at 1..5 (s1..s5) and line 2 at 4..6 (t4..t6), with the weights w (vectors, or T):
//   c (r0 + s3 + t6) + a0 r1 + b0 r2 + p (s1 + s5) + q (s2 + s4) + b2 t4 + a2 t5   (c = -1 if kNegate, else 1).
// The values come as arguments (a lambda over captured arrays left GCC storing the arrays to the stack).
template <bool kNegate, typename W, typename U>
PUSHPULL_ALWAYS_INLINE U triangle_sum(const W& w, U r0, U r1, U r2, U s1, U s2, U s3, U s4, U s5, U t4, U t5, U t6) {
  const U knots = r0 + s3 + t6;
  const U line0 = (kNegate ? -knots : knots) + w.a0 * r1 + w.b0 * r2;  // three short chains, not one long one
  const U line1 = w.p * (s1 + s5) + w.q * (s2 + s4);
  const U line2 = w.b2 * t4 + w.a2 * t5;
  return line0 + (line1 + line2);
}

// TriangleWeights broadcast to vectors of V.
template <typename V>
struct TriangleVectors {
  V a0, b0, p, q, b2, a2;
  template <typename T>
  explicit TriangleVectors(const TriangleWeights<T>& w)
      : a0(V{} + w.a0), b0(V{} + w.b0), p(V{} + w.p), q(V{} + w.q), b2(V{} + w.b2), a2(V{} + w.a2) {}
};

// Columns [0, width) (width >= L) of a pass whose vectors of columns walk down `rows` rows together
// (pass.columns(rows, cols)): pairs of vectors, so that each row's inputs come into the cache once, the last
// vector ending at `width` (overlapping the one before: it rewrites the same values; outputs never alias
// the inputs).
template <int L, typename Pass>
PUSHPULL_ALWAYS_INLINE void cover_columns(int64_t width, int64_t rows, const Pass& pass) {
  for (int64_t col = 0; col < width; col += 2 * L) {
    if (col + L >= width) {
      pass.columns(rows, {width - L});
    } else {
      pass.columns(rows, {col, std::min(col + L, width - L)});
    }
  }
}

// The transpose of TriangleTaps over whole rows: output row h (columns [0, width)) is triangle_sum of three
// lines' rows h + s. A vector of columns walks down the rows with the 11 rows it weighs in registers: one
// new row of each line per output row, 3 loads (the tap path's vertical pull: blocks of 4 rows read 20
// vectors and, out of registers, stored half of them to the stack). kPush: also the plain sum
// l0(h + 2) + l1(h + 3) + l2(h + 4) into push_out, from the same registers (TapPath::by_columns).
template <typename T, int Bytes, bool kNegate, bool kPush>
struct TriangleRows {
  using V = typename VecOf<T, Bytes>::type;
  static constexpr int L = Bytes / sizeof(T);
  const T* line[3];
  int64_t stride;  // between two rows of a line
  TriangleWeights<T> w;  // broadcast to vectors where a walk starts
  T *out, *push_out;
  int64_t out_stride;

  TriangleRows(const T* const* lines, int64_t line_stride, const TriangleWeights<T>& weights, T* o, T* push,
               int64_t o_stride)
      : stride(line_stride), w(weights), out(o), push_out(push), out_stride(o_stride) {
    for (int i = 0; i < 3; ++i) line[i] = lines[i];
  }

  // Rows [0, rows), columns [cols[v], cols[v] + L) for v < NV: NV vectors of columns walk down together
  // (each row's lines then come into the cache once).
  template <int NV>
  PUSHPULL_ALWAYS_INLINE void columns(int64_t rows, const int64_t (&cols)[NV]) const {
    const TriangleVectors<V> wv(w);
    const T *l0 = line[0], *l1 = line[1] + stride, *l2 = line[2] + 4 * stride;
    V r0[NV], r1[NV], s1[NV], s2[NV], s3[NV], s4[NV], t4[NV], t5[NV];
    PUSHPULL_UNROLL
    for (int v = 0; v < NV; ++v) {
      const int64_t c = cols[v];
      r0[v] = load<V>(l0 + c), r1[v] = load<V>(l0 + stride + c);  // l0 at h, h + 1
      s1[v] = load<V>(l1 + c), s2[v] = load<V>(l1 + stride + c), s3[v] = load<V>(l1 + 2 * stride + c);
      s4[v] = load<V>(l1 + 3 * stride + c);
      t4[v] = load<V>(l2 + c), t5[v] = load<V>(l2 + stride + c);  // l2 at h + 4, h + 5
    }
    l0 += 2 * stride, l1 += 4 * stride, l2 += 2 * stride;  // the next rows to load: h + 2, h + 5, h + 6
    for (int64_t h = 0; h < rows; ++h, l0 += stride, l1 += stride, l2 += stride) {
      PUSHPULL_UNROLL
      for (int v = 0; v < NV; ++v) {
        const int64_t c = cols[v];
        const V r2 = load<V>(l0 + c), s5 = load<V>(l1 + c), t6 = load<V>(l2 + c);
        const int64_t at = h * out_stride + c;
        store(out + at, triangle_sum<kNegate>(wv, r0[v], r1[v], r2, s1[v], s2[v], s3[v], s4[v], s5, t4[v], t5[v], t6));
        if constexpr (kPush) store(push_out + at, r2 + s3[v] + t4[v]);
        r0[v] = r1[v], r1[v] = r2, s1[v] = s2[v], s2[v] = s3[v], s3[v] = s4[v], s4[v] = s5, t4[v] = t5[v], t5[v] = t6;
      }
    }
  }

  // One value: row h, column c.
  PUSHPULL_ALWAYS_INLINE void scalar(int64_t h, int64_t c) const {
    auto at = [&](int i, int64_t s) PUSHPULL_INLINE_LAMBDA { return line[i][(h + s) * stride + c]; };
    out[h * out_stride + c] = triangle_sum<kNegate>(w, at(0, 0), at(0, 1), at(0, 2), at(1, 1), at(1, 2), at(1, 3),
                                                    at(1, 4), at(1, 5), at(2, 4), at(2, 5), at(2, 6));
    if constexpr (kPush) push_out[h * out_stride + c] = at(0, 2) + at(1, 3) + at(2, 4);
  }
};

// Rows [0, rows) of a TriangleRows pass: cover_columns, or value by value in rows narrower than a vector.
template <typename T, int Bytes, bool kNegate, bool kPush>
PUSHPULL_ALWAYS_INLINE void triangle_rows_body(const TriangleRows<T, Bytes, kNegate, kPush>& pass, int64_t rows,
                                               int64_t width) {
  constexpr int L = Bytes / sizeof(T);
  if (width < L) {
    for (int64_t h = 0; h < rows; ++h)
      for (int64_t c = 0; c < width; ++c) pass.scalar(h, c);
    return;
  }
  cover_columns<L>(width, rows, pass);
}

// A TriangleRows pass over rows [0, rows) and columns [0, width), with the push sum if `push` is given.
template <typename T, int Bytes, bool kNegate>
PUSHPULL_ALWAYS_INLINE void triangle_rows_pass(const T* const* lines, int64_t stride, const TriangleWeights<T>& w,
                                               int64_t rows, int64_t width, T* out, int64_t out_stride, T* push) {
  if (push)
    return triangle_rows_body(TriangleRows<T, Bytes, kNegate, true>(lines, stride, w, out, push, out_stride), rows,
                              width);
  triangle_rows_body(TriangleRows<T, Bytes, kNegate, false>(lines, stride, w, out, push, out_stride), rows, width);
}

// The tap path's horizontal pass after its vertical one (TapPath::by_columns), one row: out0 = the plain sum
// of the three push sources, out1 = triangle_sum along the row of the three lines (shift s, s values on):
// 14 loads a vector from six base registers, where the kernel rows' horizontal pairs before the vertical
// pass read 33.
template <typename T, int Bytes, bool kNegate>
struct TriangleAlongRow {
  using V = typename VecOf<T, Bytes>::type;
  static constexpr int L = Bytes / sizeof(T), kChains = 4;
  const T *push[3], *line[3];
  TriangleWeights<T> w;  // broadcast to vectors in each chunk
  T *out0, *out1;

  TriangleAlongRow(const T* const* push_src, const T* const* lines, const TriangleWeights<T>& weights, int64_t offset,
                   T* o0, T* o1)
      : w(weights), out0(o0), out1(o1) {
    for (int i = 0; i < 3; ++i) push[i] = push_src[i] + offset, line[i] = lines[i] + offset;
  }

  template <int NV>
  PUSHPULL_ALWAYS_INLINE void chunk(int64_t p) const {
    const TriangleVectors<V> wv(w);
    PUSHPULL_UNROLL
    for (int v = 0; v < NV; ++v) {
      const int64_t i = p + v * L;
      const T *l0 = line[0] + i, *l1 = line[1] + i, *l2 = line[2] + i;
      auto ld = [](const T* at) PUSHPULL_INLINE_LAMBDA { return load<V>(at); };
      store(out1 + i, triangle_sum<kNegate>(wv, ld(l0), ld(l0 + 1), ld(l0 + 2), ld(l1 + 1), ld(l1 + 2), ld(l1 + 3),
                                            ld(l1 + 4), ld(l1 + 5), ld(l2 + 4), ld(l2 + 5), ld(l2 + 6)));
      store(out0 + i, ld(push[0] + i) + ld(push[1] + i) + ld(push[2] + i));
    }
  }
  PUSHPULL_ALWAYS_INLINE void scalar(int64_t i) const {
    const T *l0 = line[0] + i, *l1 = line[1] + i, *l2 = line[2] + i;
    out1[i] = triangle_sum<kNegate>(w, l0[0], l0[1], l0[2], l1[1], l1[2], l1[3], l1[4], l1[5], l2[4], l2[5], l2[6]);
    out0[i] = push[0][i] + push[1][i] + push[2][i];
  }
};

// out[p] = scale[p] * sum_{d = -r..r} in[p + d * step] (scale null: 1): the box sums of the average pooling
// (box_pool.h), every term inside the caller's zero-padded buffer.
template <typename T, int Bytes>
struct WindowSum {
  using V = typename VecOf<T, Bytes>::type;
  static constexpr int L = Bytes / sizeof(T), kChains = Bytes == 64 ? 8 : 4;
  const T* in;
  int64_t step, radius;
  const T* scale;
  T* out;

  template <int NV>
  PUSHPULL_ALWAYS_INLINE void chunk(int64_t p) const {
    V acc[NV];
    clear(acc);
    for (int64_t d = -radius; d <= radius; ++d) {
      PUSHPULL_UNROLL
      for (int v = 0; v < NV; ++v) acc[v] += load<V>(in + p + d * step + v * L);
    }
    if (scale) {
      PUSHPULL_UNROLL
      for (int v = 0; v < NV; ++v) acc[v] *= load<V>(scale + p + v * L);
    }
    store_chunk<L>(out + p, acc);
  }
  PUSHPULL_ALWAYS_INLINE void scalar(int64_t p) const {
    T acc = 0;
    for (int64_t d = -radius; d <= radius; ++d) acc += in[p + d * step];
    out[p] = scale ? acc * scale[p] : acc;
  }
};

// WindowSum down the columns of a plane (step = its row stride `width`) for a radius R known at compile time:
// NV vectors of columns walk down the rows with the 2R + 1 rows of their windows in registers, one load per
// output vector where WindowSum loads 2R + 1 (the same sums in the same order).
template <typename T, int Bytes, int R>
struct WindowColumns {
  using V = typename VecOf<T, Bytes>::type;
  const T* in;
  int64_t width;
  const T* scale;
  T* out;

  template <int NV>
  PUSHPULL_ALWAYS_INLINE void columns(int64_t rows, const int64_t (&cols)[NV]) const {
    V window[2 * R + 1][NV];  // window[k]: row h - R + k
    PUSHPULL_UNROLL
    for (int k = 0; k < 2 * R; ++k) {
      PUSHPULL_UNROLL
      for (int v = 0; v < NV; ++v) window[k][v] = load<V>(in + (k - R) * width + cols[v]);
    }
    for (int64_t h = 0; h < rows; ++h) {
      PUSHPULL_UNROLL
      for (int v = 0; v < NV; ++v) {
        window[2 * R][v] = load<V>(in + (h + R) * width + cols[v]);
        V acc = window[0][v];
        PUSHPULL_UNROLL
        for (int k = 1; k <= 2 * R; ++k) acc += window[k][v];
        if (scale) acc *= load<V>(scale + h * width + cols[v]);
        store(out + h * width + cols[v], acc);
        PUSHPULL_UNROLL
        for (int k = 0; k < 2 * R; ++k) window[k][v] = window[k + 1][v];
      }
    }
  }
};

// ---- the three compiled versions

enum class Isa { kBaseline, kAvx2, kAvx512 };

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PUSHPULL_DENSE_X86 1
#define PUSHPULL_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx2,fma")))
#define PUSHPULL_TARGET_AVX2 __attribute__((target("avx2,fma")))
#endif

// The register tiles (mr x nv vectors for the products, gm x gq for the Gram products): 24 accumulators in
// the 32 AVX-512 registers, 12 in the 16 AVX2 ones, 8 or 12 in SSE's. The AVX-512 Gram tile is 6 x 4 rather
// than 8 x 3: the tap path's weight gradient has C_in/groups = 16 columns (8 x 3 left one in single-column
// tiles; cifar-b1-2020's forward + backward went from 15.7 to 13.8 ms, best of 5, one thread, on the Xeon).
#define PUSHPULL_DENSE_VERSION(attr, name, bytes, mr, nv, gm, gq)                                                     \
  template <typename T>                                                                                               \
  attr void gemm_##name(const T* a, int64_t lda, int64_t m, int64_t k, const T* const* b, int64_t n, T* c,            \
                        int64_t ldc, bool accumulate) {                                                               \
    gemm_body<T, bytes, mr, nv>(a, lda, m, k, RowPointers<T>{b}, n, c, ldc, accumulate);                              \
  }                                                                                                                   \
  template <typename T>                                                                                               \
  attr void gemm_into_##name(const T* a, int64_t lda, int64_t m, int64_t k, const T* const* b, int64_t n, T* c,       \
                             int64_t ldc, ColumnMap b_map, ColumnMap c_map) {                                         \
    gemm_body<T, bytes, mr, nv>(a, lda, m, k, RowPointers<T>{b}, n, c, ldc, false, b_map, c_map);                     \
  }                                                                                                                   \
  template <typename T>                                                                                               \
  attr void panel_gemm_##name(const T* a, int64_t lda, int64_t m, int64_t k, const T* b, int64_t panels, T* c,        \
                              int64_t ldc) {                                                                          \
    panel_gemm_body<T, bytes, mr, nv>(a, lda, m, k, b, panels, c, ldc);                                               \
  }                                                                                                                   \
  template <typename T>                                                                                               \
  attr void gram_##name(const T* a, int64_t lda, int64_t m, const T* const* b, int64_t q, int64_t n, T* c,            \
                        int64_t ldc) {                                                                                \
    const Runs runs{n / kGrain<T>, kGrain<T>, kGrain<T>};                                                             \
    const StridedRows<T> a_rows{a, lda};                                                                              \
    gram_body<T, bytes, gm, gq, kGrain<T>>(a_rows, m, RowPointers<T>{b}, q, runs, c, ldc);                            \
  }                                                                                                                   \
  template <typename T>                                                                                               \
  attr void row_gram_##name(const T* const* a, int64_t m, const T* const* b, int64_t q, int64_t n, T* c,              \
                            int64_t ldc) {                                                                            \
    const Runs runs{n / kGrain<T>, kGrain<T>, kGrain<T>};                                                             \
    gram_body<T, bytes, gm, gq, kGrain<T>>(RowPointers<T>{a}, m, RowPointers<T>{b}, q, runs, c, ldc);                 \
  }                                                                                                                   \
  template <typename T>                                                                                               \
  attr void row_gram_rows_##name(const T* const* a, int64_t m, const T* const* b, int64_t q, int64_t rows,            \
                                 int64_t width, int64_t a_stride, int64_t b_stride, T* c, int64_t ldc) {              \
    const Runs runs{rows, a_stride, b_stride, width};                                                                 \
    gram_body<T, bytes, gm, gq, 0>(RowPointers<T>{a}, m, RowPointers<T>{b}, q, runs, c, ldc);                         \
  }                                                                                                                   \
  template <typename T>                                                                                               \
  attr void panel_gram_##name(const T* a, int64_t m, const T* b, int64_t q, int64_t panels, T* c, int64_t ldc) {      \
    const Runs runs{panels, m * kPanelWidth, q * kPanelWidth};                                                        \
    const StridedRows<T> a_rows{a, kPanelWidth}, b_rows{b, kPanelWidth};                                              \
    gram_body<T, bytes, gm, gq, kPanelWidth>(a_rows, m, b_rows, q, runs, c, ldc);                                     \
  }                                                                                                                   \
  template <typename T>                                                                                               \
  attr void weighted_sum_##name(const T* const* src, const T* w, int64_t terms, int64_t n, T* out) {                  \
    cover_line<bytes / int(sizeof(T))>(n, WeightedSum<T, bytes>{src, w, terms, out});                                 \
  }                                                                                                                   \
  template <typename T>                                                                                               \
  attr void weighted_sum_rows_##name(const T* const* src, const T* w, int64_t terms, int64_t rows, int64_t n,         \
                                     int64_t src_stride, T* out, int64_t out_stride) {                                \
    constexpr int L = bytes / int(sizeof(T));                                                                         \
    for (int64_t r = 0; r < rows; ++r)                                                                                \
      cover_line<L>(n, WeightedSum<T, bytes>{src, w, terms, out + r * out_stride, r * src_stride});                   \
  }                                                                                                                   \
  template <typename T>                                                                                               \
  attr void weighted_pair_##name(const T* const* src, const T* w0, const T* w1, int64_t both, int64_t only1,          \
                                 int64_t terms, int64_t n, T* out0, T* out1) {                                        \
    constexpr int L = bytes / int(sizeof(T));                                                                         \
    using Upsample2 = RunPair<T, bytes, 3, 2, 1, 2, 4, 2>;                                                            \
    if (Upsample2::matches(w0, w1, both, only1, terms)) return cover_line<L>(n, Upsample2(src, w1, out0, out1));      \
    cover_line<L>(n, WeightedPair<T, bytes>{src, w0, w1, both, only1, terms, out0, out1});                            \
  }                                                                                                                   \
  template <typename T>                                                                                               \
  attr void triangle_taps_##name(const T* const* src, const TriangleWeights<T>& w, int64_t n, T* const* out,          \
                                 const T* const* extra) {                                                             \
    constexpr int L = bytes / int(sizeof(T));                                                                         \
    if (extra) {                                                                                                      \
      if (w.negate) return cover_line<L>(n, TriangleTaps<T, bytes, true, true>(src, w, out, extra));                  \
      return cover_line<L>(n, TriangleTaps<T, bytes, false, true>(src, w, out, extra));                               \
    }                                                                                                                 \
    if (w.negate) return cover_line<L>(n, TriangleTaps<T, bytes, true, false>(src, w, out, extra));                   \
    cover_line<L>(n, TriangleTaps<T, bytes, false, false>(src, w, out, extra));                                       \
  }                                                                                                                   \
  template <typename T>                                                                                               \
  attr void triangle_rows_##name(const T* const* lines, int64_t stride, const TriangleWeights<T>& w, int64_t rows,    \
                                 int64_t width, T* out, int64_t out_stride, T* push) {                                \
    if (w.negate) return triangle_rows_pass<T, bytes, true>(lines, stride, w, rows, width, out, out_stride, push);    \
    triangle_rows_pass<T, bytes, false>(lines, stride, w, rows, width, out, out_stride, push);                        \
  }                                                                                                                   \
  template <typename T>                                                                                               \
  attr void triangle_along_rows_##name(const T* const* push, const T* const* lines, const TriangleWeights<T>& w,      \
                                       int64_t rows, int64_t width, int64_t in_stride, T* out0, T* out1,              \
                                       int64_t out_stride) {                                                          \
    constexpr int L = bytes / int(sizeof(T));                                                                         \
    for (int64_t r = 0; r < rows; ++r) {                                                                              \
      T *o0 = out0 + r * out_stride, *o1 = out1 + r * out_stride;                                                     \
      if (w.negate) {                                                                                                 \
        cover_line<L>(width, TriangleAlongRow<T, bytes, true>(push, lines, w, r * in_stride, o0, o1));                \
      } else {                                                                                                        \
        cover_line<L>(width, TriangleAlongRow<T, bytes, false>(push, lines, w, r * in_stride, o0, o1));               \
      }                                                                                                               \
    }                                                                                                                 \
  }                                                                                                                   \
  template <typename T>                                                                                               \
  attr void window_sum_rows_##name(const T* in, int64_t row_stride, int64_t radius, int64_t rows, int64_t width,      \
                                   T* out) {                                                                          \
    for (int64_t h = 0; h < rows; ++h)                                                                                \
      cover_line<bytes / int(sizeof(T))>(                                                                             \
          width, WindowSum<T, bytes>{in + h * row_stride, 1, radius, nullptr, out + h * width});                      \
  }                                                                                                                   \
  template <typename T>                                                                                               \
  attr void window_columns_##name(const T* in, int64_t radius, const T* scale, int64_t rows, int64_t width, T* out) { \
    constexpr int L = bytes / int(sizeof(T));                                                                         \
    if (width >= L && radius == 1)                                                                                    \
      return cover_columns<L>(width, rows, WindowColumns<T, bytes, 1>{in, width, scale, out});                        \
    if (width >= L && radius == 2)                                                                                    \
      return cover_columns<L>(width, rows, WindowColumns<T, bytes, 2>{in, width, scale, out});                        \
    if (width >= L && radius == 3)                                                                                    \
      return cover_columns<L>(width, rows, WindowColumns<T, bytes, 3>{in, width, scale, out});                        \
    cover_line<L>(rows * width, WindowSum<T, bytes>{in, width, radius, scale, out});                                  \
  }

PUSHPULL_DENSE_VERSION(, baseline, 16, 4, 2, 4, 3)
#ifdef PUSHPULL_DENSE_X86
PUSHPULL_DENSE_VERSION(PUSHPULL_TARGET_AVX2, avx2, 32, 4, 3, 4, 3)
PUSHPULL_DENSE_VERSION(PUSHPULL_TARGET_AVX512, avx512, 64, 8, 3, 6, 4)
#endif
#undef PUSHPULL_DENSE_VERSION

inline Isa detect_isa() {
  Isa best = Isa::kBaseline;
#ifdef PUSHPULL_DENSE_X86
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

#ifdef PUSHPULL_DENSE_X86
#define PUSHPULL_DENSE_DISPATCH(fn, ...)    \
  switch (isa()) {                          \
    case Isa::kAvx512:                      \
      return fn##_avx512<T>(__VA_ARGS__);   \
    case Isa::kAvx2:                        \
      return fn##_avx2<T>(__VA_ARGS__);     \
    default:                                \
      return fn##_baseline<T>(__VA_ARGS__); \
  }
#else
#define PUSHPULL_DENSE_DISPATCH(fn, ...) return fn##_baseline<T>(__VA_ARGS__);
#endif

// C[m, p] (+)= sum_k A[m, k] * b[k][p] for m < m_rows, p < n (n a multiple of kGrain<T>): A row-major (lda),
// row k of B at b[k], C row-major (ldc). `accumulate`: add to C rather than overwrite it.
template <typename T>
void gemm(const T* a, int64_t lda, int64_t m_rows, int64_t k_size, const T* const* b, int64_t n, T* c, int64_t ldc,
          bool accumulate) {
  PUSHPULL_DENSE_DISPATCH(gemm, a, lda, m_rows, k_size, b, n, c, ldc, accumulate)
}

// The same product (not accumulating) with column p read at b_map.at(p) in B's rows and written at
// c_map.at(p) in C's (ColumnMap). b_map's width: a multiple of vector_values<T>(); c_map's: one that
// maps_rows_of accepts with its stride (n a multiple of vector_values<T>() where the map is b_map's alone).
template <typename T>
void gemm_into(const T* a, int64_t lda, int64_t m_rows, int64_t k_size, const T* const* b, int64_t n, T* c, int64_t ldc,
               ColumnMap b_map, ColumnMap c_map) {
  PUSHPULL_DENSE_DISPATCH(gemm_into, a, lda, m_rows, k_size, b, n, c, ldc, b_map, c_map)
}

// The values of T in one vector of the chosen version.
template <typename T>
int64_t vector_values() {
  switch (isa()) {
    case Isa::kAvx512:
      return 64 / sizeof(T);
    case Isa::kAvx2:
      return 32 / sizeof(T);
    default:
      return 16 / sizeof(T);
  }
}

// Whether rows of `width` values can be a ColumnMap's (gemm_into): whole vectors of the chosen version; or,
// given the rows' `stride` (C's map only, see StraddlingStores), at least one vector wide with gaps
// shorter than one.
template <typename T>
bool maps_rows_of(int64_t width, int64_t stride = 0) {
  const int64_t lanes = vector_values<T>();
  if (width % lanes == 0) return true;
#ifdef PUSHPULL_STRADDLING_STORES
  return stride > 0 && width >= lanes && stride - width < lanes;
#else
  return false;
#endif
}

// C[m, q] += sum_p A[m, p] * b[q][p] for m < m_rows, q < q_rows, p < n (n a multiple of kGrain<T>).
template <typename T>
void gram(const T* a, int64_t lda, int64_t m_rows, const T* const* b, int64_t q_rows, int64_t n, T* c, int64_t ldc) {
  PUSHPULL_DENSE_DISPATCH(gram, a, lda, m_rows, b, q_rows, n, c, ldc)
}

// The same with the rows of A given by pointers: C[m, q] += sum_p a[m][p] * b[q][p].
template <typename T>
void row_gram(const T* const* a, int64_t m_rows, const T* const* b, int64_t q_rows, int64_t n, T* c, int64_t ldc) {
  PUSHPULL_DENSE_DISPATCH(row_gram, a, m_rows, b, q_rows, n, c, ldc)
}

// The same over `rows` rows of `width` values (a multiple of vector_values<T>()), the rows of a and b
// a_stride and b_stride apart: C[m, q] += sum_{r, p} a[m][r * a_stride + p] * b[q][r * b_stride + p] (a
// plane's gapped rows against its dense ones).
template <typename T>
void row_gram_rows(const T* const* a, int64_t m_rows, const T* const* b, int64_t q_rows, int64_t rows, int64_t width,
                   int64_t a_stride, int64_t b_stride, T* c, int64_t ldc) {
  PUSHPULL_DENSE_DISPATCH(row_gram_rows, a, m_rows, b, q_rows, rows, width, a_stride, b_stride, c, ldc)
}

// The same two products on packed operands (panel_gemm.h): `panels` panels of kPanelWidth values per row,
// panel p of an operand with `rows` rows at p * rows * kPanelWidth.
// C[m, pix] = sum_k A[m, k] * B[k, pix]: A row-major (lda), B packed with k_size rows, C row-major (ldc,
// panels * width columns written).
template <typename T>
void panel_gemm(const T* a, int64_t lda, int64_t m_rows, int64_t k_size, const T* b, int64_t panels, T* c,
                int64_t ldc) {
  PUSHPULL_DENSE_DISPATCH(panel_gemm, a, lda, m_rows, k_size, b, panels, c, ldc)
}

// C[m, q] += sum_pix A[m, pix] * B[q, pix]: A packed with m_rows rows, B with q_rows rows, C row-major (ldc).
template <typename T>
void panel_gram(const T* a, int64_t m_rows, const T* b, int64_t q_rows, int64_t panels, T* c, int64_t ldc) {
  PUSHPULL_DENSE_DISPATCH(panel_gram, a, m_rows, b, q_rows, panels, c, ldc)
}

// out[p] = sum_t w[t] * src[t][p] for p < n.
template <typename T>
void weighted_sum(const T* const* src, const T* w, int64_t terms, int64_t n, T* out) {
  PUSHPULL_DENSE_DISPATCH(weighted_sum, src, w, terms, n, out)
}

// The same over `rows` rows of n values: out[r * out_stride + p] = sum_t w[t] * src[t][r * src_stride + p]
// (a gapped plane's rows into a dense one).
template <typename T>
void weighted_sum_rows(const T* const* src, const T* w, int64_t terms, int64_t rows, int64_t n, int64_t src_stride,
                       T* out, int64_t out_stride) {
  PUSHPULL_DENSE_DISPATCH(weighted_sum_rows, src, w, terms, rows, n, src_stride, out, out_stride)
}

// Two weighted sums of the same terms at once (see WeightedPair for the three groups of terms).
template <typename T>
void weighted_pair(const T* const* src, const T* w0, const T* w1, int64_t both, int64_t only1, int64_t terms, int64_t n,
                   T* out0, T* out1) {
  PUSHPULL_DENSE_DISPATCH(weighted_pair, src, w0, w1, both, only1, terms, n, out0, out1)
}

// The three lines out[0..2] of a TriangleWeights pass from the seven shifted sources src[0..6], p < n;
// with `extra`, out[j] also adds extra[j][p].
template <typename T>
void triangle_taps(const T* const* src, const TriangleWeights<T>& w, int64_t n, T* const* out,
                   const T* const* extra = nullptr) {
  PUSHPULL_DENSE_DISPATCH(triangle_taps, src, w, n, out, extra)
}

// out[h * out_stride + c] for h < rows, c < width: the TriangleRows pass of the three lines (row h of line i
// at lines[i] + h * stride; each line read from row 0 to rows + 5); with push, its plain sum there too.
template <typename T>
void triangle_rows(const T* const* lines, int64_t stride, const TriangleWeights<T>& w, int64_t rows, int64_t width,
                   T* out, int64_t out_stride, T* push = nullptr) {
  PUSHPULL_DENSE_DISPATCH(triangle_rows, lines, stride, w, rows, width, out, out_stride, push)
}

// Row r < rows, columns p < width: out0[r * out_stride + p] = the sum of push[j][r * in_stride + p] (j < 3) and
// out1[...] = the TriangleAlongRow sum of lines[j] + r * in_stride (shift s at s values on).
template <typename T>
void triangle_along_rows(const T* const* push, const T* const* lines, const TriangleWeights<T>& w, int64_t rows,
                         int64_t width, int64_t in_stride, T* out0, T* out1, int64_t out_stride) {
  PUSHPULL_DENSE_DISPATCH(triangle_along_rows, push, lines, w, rows, width, in_stride, out0, out1, out_stride)
}

// out[h * width + w] = sum_{d = -radius..radius} in[h * stride + w + d] for h < rows, w < width (the terms
// past a row's ends inside the caller's zero padding); out must not overlap in.
template <typename T>
void window_sum_rows(const T* in, int64_t stride, int64_t radius, int64_t rows, int64_t width, T* out) {
  PUSHPULL_DENSE_DISPATCH(window_sum_rows, in, stride, radius, rows, width, out)
}

// out[p] = scale[p] * sum_{d = -radius..radius} in[p + d * width] for p < rows * width (scale null: 1): box
// sums down the columns of a plane [rows, width] with `radius` zero rows above and below it; out must not
// overlap in.
template <typename T>
void window_columns(const T* in, int64_t radius, const T* scale, int64_t rows, int64_t width, T* out) {
  PUSHPULL_DENSE_DISPATCH(window_columns, in, radius, scale, rows, width, out)
}

#undef PUSHPULL_DENSE_DISPATCH

}  // namespace dense
}  // namespace pushpull

#pragma GCC diagnostic pop
