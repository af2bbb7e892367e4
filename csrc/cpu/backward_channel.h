// One output channel's pass of the CPU backward epilogue (BackwardChannel): the masked gradients of the
// push and pull from the ReLU masks, and the partial sums of the vector gradients. A portable loop that
// the compiler vectorizes, and its float form in AVX-512 intrinsics, chosen at run time by dense::isa().
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "clones.h"
#include "dense_kernels.h"

#ifdef PUSHPULL_DENSE_X86
#include <immintrin.h>
#endif

namespace pushpull {
namespace cpu {

// g's value where the mask bit is set, else 0 (also for a NaN g: ReLU' is 0 there, as in torch).
// Branch-free, so that the loops vectorize: the value's bits AND all-ones (bit set) or zero (+0.0).
template <typename acc_t>
PUSHPULL_ALWAYS_INLINE acc_t masked(uint8_t mask, uint8_t bit, acc_t value) {
  using bits_t = std::conditional_t<sizeof(acc_t) == 8, uint64_t, uint32_t>;
  static_assert(sizeof(bits_t) == sizeof(acc_t));
  const bits_t keep = bits_t(0) - static_cast<bits_t>((mask & bit) != 0);
  bits_t v;
  std::memcpy(&v, &value, sizeof v);
  v &= keep;
  std::memcpy(&value, &v, sizeof v);
  return value;
}

// The sums of one channel's pass: of g, gp, gq and gq * box_sums.
template <typename acc_t>
struct ChannelSums {
  acc_t g, gp, gq, gq_box;
};

template <typename acc_t>
struct BackwardChannel;

#ifdef PUSHPULL_DENSE_X86
template <bool kPushMinusPull, bool kBox, bool kMaskPull>
PUSHPULL_TARGET_AVX512 ChannelSums<float> backward_channel_avx512(const BackwardChannel<float>& ch, int64_t plane);
#endif

// gp = the push's masked gradient, read from g and the mask; gq = the pull's (kMaskPull: masked here from
// g_q and its mask and written to gq; else read from gq, pooled back before); push = gp (or gp - gq,
// kPushMinusPull); the sums of g, gp and gq; and (kBox) box += m * gq and the sum of gq * box_sums. Sums in
// 64 bytes of interleaved partial sums (a fixed order: deterministic). Each variant does only its own work,
// in one loop that vectorizes: the one loop for all (a box field and its sum written to spare planes where
// absent, gq masked in a pass of its own) kept its sums on the stack and took 12 % of cifar-stem-2020's
// forward + backward.
template <typename acc_t>
struct BackwardChannel {
  const uint8_t* __restrict__ mask_p;
  const uint8_t* __restrict__ mask_q;
  uint8_t bit;
  const acc_t* __restrict__ g;
  const acc_t* __restrict__ g_q;
  acc_t pull_scale;
  acc_t* __restrict__ gq;
  const acc_t* __restrict__ box_sums;
  acc_t m;
  acc_t* __restrict__ push;
  acc_t* __restrict__ box;
  // The next channel's output gradient (or null), asked for a line at a time as this one's is read: its
  // plane starts a new page, where the hardware's prefetcher stops, and its first read then waited on memory.
  const acc_t* next_g;
  using Sums = ChannelSums<acc_t>;

  template <bool kPushMinusPull, bool kBox, bool kMaskPull>
  PUSHPULL_ALWAYS_INLINE Sums pass(int64_t plane) const {
#ifdef PUSHPULL_DENSE_X86
    if constexpr (std::is_same_v<acc_t, float>) {
      if (dense::isa() == dense::Isa::kAvx512)
        return backward_channel_avx512<kPushMinusPull, kBox, kMaskPull>(*this, plane);
    }
#endif
    constexpr int64_t kLanes = 64 / sizeof(acc_t);
    acc_t g_lanes[kLanes] = {}, gp_lanes[kLanes] = {}, gq_lanes[kLanes] = {}, box_lanes[kLanes] = {};
    auto step = [&](int64_t p, int64_t lane) {
      const acc_t gp = masked(mask_p[p], bit, g[p]);
      acc_t q;
      if constexpr (kMaskPull) {
        q = masked(mask_q[p], bit, pull_scale * g_q[p]);
        gq[p] = q;
      } else {
        q = gq[p];
      }
      push[p] = kPushMinusPull ? gp - q : gp;
      g_lanes[lane] += g[p], gp_lanes[lane] += gp, gq_lanes[lane] += q;
      if constexpr (kBox) box[p] += m * q, box_lanes[lane] += q * box_sums[p];
    };
    int64_t p = 0;
    for (; p + kLanes <= plane; p += kLanes) {
      if (next_g) __builtin_prefetch(next_g + p);
      for (int64_t l = 0; l < kLanes; ++l) step(p + l, l);
    }
    for (; p < plane; ++p) step(p, 0);
    Sums sums{0, 0, 0, 0};
    for (int64_t l = 0; l < kLanes; ++l) {
      sums.g += g_lanes[l], sums.gp += gp_lanes[l], sums.gq += gq_lanes[l], sums.gq_box += box_lanes[l];
    }
    return sums;
  }

  template <bool kPushMinusPull>
  PUSHPULL_ALWAYS_INLINE Sums pass(int64_t plane, bool with_box, bool mask_pull) const {
    if (with_box) {
      return mask_pull ? pass<kPushMinusPull, true, true>(plane) : pass<kPushMinusPull, true, false>(plane);
    }
    return mask_pull ? pass<kPushMinusPull, false, true>(plane) : pass<kPushMinusPull, false, false>(plane);
  }
};

#ifdef PUSHPULL_DENSE_X86
// Lanes whose mask byte (16 of them at `bytes`) has `bit` set: the bytes widened to 32-bit lanes and
// tested (vpmovzxbd, vptestmd).
PUSHPULL_TARGET_AVX512 PUSHPULL_ALWAYS_INLINE __mmask16 lanes_with_bit(const uint8_t* bytes, __m512i bit) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes));
  return _mm512_test_epi32_mask(_mm512_maskz_cvtepu8_epi32(0xFFFF, b), bit);  // maskz: GCC 12 warns on the plain form
}

// The sum of v's lanes in the portable pass's order.
PUSHPULL_TARGET_AVX512 PUSHPULL_ALWAYS_INLINE float lane_total(__m512 v) {
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, v);
  float sum = 0;
  for (float lane : lanes) sum += lane;
  return sum;
}

// The float pass 16 pixels a step, the last step's lanes past the plane masked off (their mask bytes
// copied to a zeroed buffer: the planes' bytes may end the tensor). GCC 12 compiled the portable loop in
// 16-byte vectors, its lane sums spilled to the stack, and a vector-extension form converted the mask
// bytes one lane at a time: see the README's CPU notes for what this one measured.
template <bool kPushMinusPull, bool kBox, bool kMaskPull>
PUSHPULL_TARGET_AVX512 ChannelSums<float> backward_channel_avx512(const BackwardChannel<float>& ch, int64_t plane) {
  const __m512i bit = _mm512_set1_epi32(ch.bit);
  const __m512 scale = _mm512_set1_ps(ch.pull_scale), m = _mm512_set1_ps(ch.m);
  __m512 sum_g = _mm512_setzero_ps(), sum_gp = sum_g, sum_gq = sum_g, sum_box = sum_g;
  alignas(16) uint8_t tail_p[16] = {}, tail_q[16] = {};
  for (int64_t p = 0; p < plane; p += 16) {
    const int64_t left = plane - p;
    const __mmask16 live = left >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
    const uint8_t *mask_p = ch.mask_p + p, *mask_q = ch.mask_q + p;
    if (left < 16) {
      std::memcpy(tail_p, mask_p, left), mask_p = tail_p;
      if (kMaskPull) std::memcpy(tail_q, mask_q, left), mask_q = tail_q;
    }
    if (ch.next_g) _mm_prefetch(reinterpret_cast<const char*>(ch.next_g + p), _MM_HINT_T0);
    const __m512 g = _mm512_maskz_loadu_ps(live, ch.g + p);
    const __m512 gp = _mm512_maskz_mov_ps(lanes_with_bit(mask_p, bit), g);
    __m512 q;
    if constexpr (kMaskPull) {
      q = _mm512_maskz_mul_ps(lanes_with_bit(mask_q, bit), scale, _mm512_maskz_loadu_ps(live, ch.g_q + p));
      _mm512_mask_storeu_ps(ch.gq + p, live, q);
    } else {
      q = _mm512_maskz_loadu_ps(live, ch.gq + p);
    }
    _mm512_mask_storeu_ps(ch.push + p, live, kPushMinusPull ? _mm512_sub_ps(gp, q) : gp);
    sum_g = _mm512_add_ps(sum_g, g), sum_gp = _mm512_add_ps(sum_gp, gp), sum_gq = _mm512_add_ps(sum_gq, q);
    if constexpr (kBox) {
      _mm512_mask_storeu_ps(ch.box + p, live, _mm512_fmadd_ps(m, q, _mm512_maskz_loadu_ps(live, ch.box + p)));
      sum_box = _mm512_fmadd_ps(q, _mm512_maskz_loadu_ps(live, ch.box_sums + p), sum_box);
    }
  }
  return {lane_total(sum_g), lane_total(sum_gp), lane_total(sum_gq), lane_total(sum_box)};
}
#endif

}  // namespace cpu
}  // namespace pushpull
