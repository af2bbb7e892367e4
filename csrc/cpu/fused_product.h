// The stride-1 prefilter route's two products with the forward epilogue in registers (PrefilterPath, float):
// P0 = W @ (x shifted by each tap) and R = W @ z (its prefilter), then for each pixel
//   y = ReLU(P0 + b) - alpha * ReLU(R - b) + b_out,
// the ReLU masks (bit o % 8 of byte o / 8, set where !(v <= 0)) and ReLU(Q') when saved, written as the
// accumulators leave the registers. The two products and the epilogue's arithmetic then overlap: apart, the
// epilogue (two loads, a store and a dozen vector operations per output vector) took 17 % of
// cifar-stem-2020's forward on the 2-core AMD EPYC while the products waited on their multiply-adds.
#pragma once

#include <cstdint>
#include <cstring>

#include "dense_kernels.h"

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"  // vector arguments of always-inline helpers never cross an ABI boundary

namespace pushpull {
namespace dense {

// One image's outputs: per channel vectors [C_out] (bias_in, bias_out null for none) and planes of n pixels.
template <typename T>
struct ResponseEpilogue {
  const T *bias_in, *alpha, *bias_out;
  T* y;                      // [C_out, n]
  T* saved;                  // ReLU(Q') [C_out, n], or null
  uint8_t *mask_p, *mask_q;  // [C_out / 8, n] each, or null
};

// The mask bytes of L pixels from per-lane bits (push bits in byte 0 of each lane, pull bits in byte 1).
// Eight float lanes: one byte shuffle gathers both (an element-wise conversion of the lanes to bytes came
// out as one extract per lane, GCC 12, without AVX-512); sixteen (AVX-512): that conversion, one vpmovdb
// per byte row; else lane by lane.
template <int L, typename Bits>
PUSHPULL_ALWAYS_INLINE void store_mask_bytes(Bits bits, uint8_t* mask_p, uint8_t* mask_q) {
  if constexpr (L == 8 && sizeof(Bits) == 32) {
    using Bytes = typename VecOf<uint8_t, 32>::type;
    // Per 128-bit half: its 4 lanes' push bytes, then their pull bytes.
    const Bytes gathered = __builtin_shuffle(reinterpret_cast<Bytes>(bits),
                                             Bytes{0,  4,  8,  12, 1,  5,  9,  13, 0,  0,  0,  0,  0,  0,  0,  0,  //
                                                   16, 20, 24, 28, 17, 21, 25, 29, 16, 16, 16, 16, 16, 16, 16, 16});
    std::memcpy(mask_p, &gathered[0], 4), std::memcpy(mask_q, &gathered[4], 4);
    std::memcpy(mask_p + 4, &gathered[16], 4), std::memcpy(mask_q + 4, &gathered[20], 4);
  } else if constexpr (L == 16 && sizeof(Bits) == 64) {
    using Lanes = typename VecOf<int32_t, 64>::type;
    using Bytes16 = typename VecOf<uint8_t, 16>::type;
    const Lanes lanes = reinterpret_cast<Lanes>(bits);
    const Bytes16 p = __builtin_convertvector(lanes & 0xff, Bytes16);
    const Bytes16 q = __builtin_convertvector((lanes >> 8) & 0xff, Bytes16);
    std::memcpy(mask_p, &p, 16), std::memcpy(mask_q, &q, 16);
  } else {
    for (int l = 0; l < L; ++l) {
      mask_p[l] = static_cast<uint8_t>(bits[l]), mask_q[l] = static_cast<uint8_t>(bits[l] >> 8);
    }
  }
}

// Channels o0 .. o0 + 7 at pixels [col, col + L) (B's columns from b_col): tiles of kRows channels, each
// with both responses (2 kRows accumulators; the k loop is the products' own order, so P0 and R round as in
// gemm_into's tiles), then the epilogue of its channels. The masks' bits gather over the 8 channels.
template <typename T, int Bytes, int kRows, bool kMasks, bool kSaved>
PUSHPULL_ALWAYS_INLINE void push_pull_octet(const T* w, int64_t k_size, const T* const* push, const T* const* pull,
                                            int64_t b_col, int64_t col, int64_t n, int64_t o0,
                                            const ResponseEpilogue<T>& out) {
  constexpr int L = Bytes / sizeof(T);
  using V = typename VecOf<T, Bytes>::type;
  using Bits = decltype(V{} < V{});  // lanes of T's width: -1 where a comparison holds
  Bits bits{};
  PUSHPULL_UNROLL
  for (int half = 0; half < 8 / kRows; ++half) {
    const int64_t first = o0 + half * kRows;
    const T* a = w + first * k_size;
    V acc_p[kRows], acc_q[kRows];
    PUSHPULL_UNROLL
    for (int r = 0; r < kRows; ++r) acc_p[r] = V{}, acc_q[r] = V{};
    for (int64_t k = 0; k < k_size; ++k) {
      const V xp = load<V>(push[k] + b_col), xq = load<V>(pull[k] + b_col);
      PUSHPULL_UNROLL
      for (int r = 0; r < kRows; ++r) {
        const T s = a[r * k_size + k];
        acc_p[r] += s * xp;
        acc_q[r] += s * xq;
      }
    }
    PUSHPULL_UNROLL
    for (int r = 0; r < kRows; ++r) {
      const int64_t o = first + r;
      const T b = out.bias_in ? out.bias_in[o] : T(0), bo = out.bias_out ? out.bias_out[o] : T(0);
      const V vp = acc_p[r] + b, vq = acc_q[r] - b;
      // One comparison per response gives its ReLU (NaN kept; -0 gives +0) and its mask bit.
      const Bits not_p = vp <= T(0), not_q = vq <= T(0);
      const V relu_pull = not_q ? V{} : vq;
      const V y = (not_p ? V{} : vp) - out.alpha[o] * relu_pull + bo;
      std::memcpy(out.y + o * n + col, &y, sizeof(V));
      if constexpr (kSaved) std::memcpy(out.saved + o * n + col, &relu_pull, sizeof(V));
      if constexpr (kMasks) {
        const int bit = half * kRows + r;
        bits |= (~not_p & (1 << bit)) | (~not_q & (256 << bit));
      }
    }
  }
  if constexpr (kMasks) store_mask_bytes<L>(bits, out.mask_p + o0 / 8 * n + col, out.mask_q + o0 / 8 * n + col);
}

template <typename T, int Bytes, int kRows, bool kMasks, bool kSaved>
PUSHPULL_ALWAYS_INLINE void push_pull_columns(const T* w, int64_t k_size, int64_t channels, const T* const* push,
                                              const T* const* pull, ColumnMap b_map, int64_t n,
                                              const ResponseEpilogue<T>& out) {
  constexpr int L = Bytes / sizeof(T);
  for (int64_t col = 0; col < n; col += L) {
    const int64_t b_col = b_map.at(col);
    for (int64_t o0 = 0; o0 < channels; o0 += 8)
      push_pull_octet<T, Bytes, kRows, kMasks, kSaved>(w, k_size, push, pull, b_col, col, n, o0, out);
  }
}

template <typename T, int Bytes, int kRows>
PUSHPULL_ALWAYS_INLINE void push_pull_body(const T* w, int64_t k_size, int64_t channels, const T* const* push,
                                           const T* const* pull, ColumnMap b_map, int64_t n,
                                           const ResponseEpilogue<T>& out) {
  if (out.mask_p && out.saved)
    return push_pull_columns<T, Bytes, kRows, true, true>(w, k_size, channels, push, pull, b_map, n, out);
  if (out.mask_p)
    return push_pull_columns<T, Bytes, kRows, true, false>(w, k_size, channels, push, pull, b_map, n, out);
  push_pull_columns<T, Bytes, kRows, false, false>(w, k_size, channels, push, pull, b_map, n, out);
}

// Vectors of 8 pixels (AVX2: tiles of 4 channels, 8 accumulators in its 16 registers) and of 16 on AVX-512
// (all 8 channels in one tile, 16 accumulators in its 32: two multiply-adds per cycle of latency 4 need 8
// independent ones in flight, and each k's loads serve twice the multiply-adds). On a core that splits
// 64-byte operations in two (the 2-core AMD EPYC) the 64-byte vectors still halve the instructions per
// multiply-add, and the masks' bytes are two vpmovdb: cifar-stem-2020's forward, two threads, 2.1-2.3 ->
// 1.8-1.9 ms (3 alternated runs, against 32-byte vectors on AVX-512).
#define PUSHPULL_FUSED_VERSION(attr, name, bytes, rows)                                                  \
  template <typename T>                                                                                  \
  attr void push_pull_product_##name(const T* w, int64_t k_size, int64_t channels, const T* const* push, \
                                     const T* const* pull, ColumnMap b_map, int64_t n,                   \
                                     const ResponseEpilogue<T>& out) {                                   \
    push_pull_body<T, bytes, rows>(w, k_size, channels, push, pull, b_map, n, out);                      \
  }
PUSHPULL_FUSED_VERSION(, baseline, 16, 4)
#ifdef PUSHPULL_DENSE_X86
PUSHPULL_FUSED_VERSION(PUSHPULL_TARGET_AVX2, avx2, 32, 4)
PUSHPULL_FUSED_VERSION(PUSHPULL_TARGET_AVX512, avx512, 64, 8)
#endif
#undef PUSHPULL_FUSED_VERSION

// The values of T the product's columns come in (n and b_map's width: multiples of it).
template <typename T>
int64_t fused_vector_values() {
  return isa() == Isa::kBaseline ? 16 / sizeof(T) : isa() == Isa::kAvx2 ? 32 / sizeof(T) : 64 / sizeof(T);
}

// The epilogue's outputs of channels [0, channels) (a multiple of 8) over n pixels: the product of w
// ([channels, k_size]) by the rows push[k] and pull[k], column p read at b_map.at(p).
template <typename T>
void push_pull_product(const T* w, int64_t k_size, int64_t channels, const T* const* push, const T* const* pull,
                       ColumnMap b_map, int64_t n, const ResponseEpilogue<T>& out) {
#ifdef PUSHPULL_DENSE_X86
  if (isa() == Isa::kAvx512) return push_pull_product_avx512<T>(w, k_size, channels, push, pull, b_map, n, out);
  if (isa() == Isa::kAvx2) return push_pull_product_avx2<T>(w, k_size, channels, push, pull, b_map, n, out);
#endif
  push_pull_product_baseline<T>(w, k_size, channels, push, pull, b_map, n, out);
}

}  // namespace dense
}  // namespace pushpull

#pragma GCC diagnostic pop
