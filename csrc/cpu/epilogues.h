// The fused per-plane passes of the CPU backend, shared by every route: one pass per (image, 8 output
// channels) does the pooling, ReLUs, alpha, biases and packs the ReLU masks 8 channels per byte
// (forward); one pass per (image, group) forms the masked gradient fields and the partial sums of the
// vector gradients from the masks (backward).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <type_traits>

#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>  // sysconf
#endif
#ifdef __SSE2__
#include <emmintrin.h>
#endif

#include "../common/aten_algebra.h"
#include "backward_channel.h"
#include "box_pool.h"
#include "clones.h"
#include "prefilter.h"
#include "scratch.h"

namespace pushpull {
namespace cpu {

// Where the planes of a field live: plane (n, o) starts at base + n * image + o * channel. The batched
// paths point into ATen's results; the per-image path into its workspace (image stride 0).
template <typename T>
struct FieldView {
  T* base = nullptr;
  int64_t image = 0, channel = 0;
  T* plane(int64_t n, int64_t o) const { return base + n * image + o * channel; }
  explicit operator bool() const { return base != nullptr; }
};

// Read-only view of the responses and the per-channel vectors, shared by forward and backward.
template <typename scalar_t>
struct PlaneInputs {
  using acc_t = at::opmath_type<scalar_t>;
  const Geometry& geo;
  FieldView<const scalar_t> push0, pull0;
  const scalar_t *box, *shift, *bias_in;
  int64_t plane;  // Ho * Wo

  acc_t bias(int64_t o) const { return bias_in ? static_cast<acc_t>(bias_in[o]) : acc_t(0); }

  // Q' of channel o of image n into `q`, pooled with `pool` (inlined into the cloned epilogues).
  PUSHPULL_ALWAYS_INLINE void pull_response(int64_t n, int64_t o, acc_t* q, BoxPool<acc_t>& pool) const {
    const scalar_t* p0 = push0.plane(n, o);
    const scalar_t* r0 = pull0 ? pull0.plane(n, o) : nullptr;
    const int64_t g = o / (geo.out_channels / geo.groups);
    const scalar_t* s = box ? box + (n * geo.groups + g) * plane : nullptr;
    const acc_t m = shift ? static_cast<acc_t>(shift[o]) : acc_t(0), b = bias(o);
    if (r0) {
      for (int64_t p = 0; p < plane; ++p) q[p] = static_cast<acc_t>(r0[p]) - b;
    } else if (!s) {
      for (int64_t p = 0; p < plane; ++p) q[p] = -static_cast<acc_t>(p0[p]) - b;
    } else {
      // m * S rounded on its own, in a loop of its own: never fused into a multiply-add with -P0 - bias.
      // Where the pull response is exactly zero (tied weights), the rounded product cancels P0 exactly
      // and Q' stays 0 as in the reference's own convolution; a fused one would leave the product's
      // rounding error, whose sign would set the ReLU mask.
      for (int64_t p = 0; p < plane; ++p) q[p] = m * static_cast<acc_t>(s[p]);
      for (int64_t p = 0; p < plane; ++p) q[p] += -static_cast<acc_t>(p0[p]) - b;
    }
    if (geo.avg_kernel > 1) pool.average(q);
  }
};

// The layout of the batched responses: P0 is [N, C_out, plane]; conv(x, q) is [C_out, N, plane] on the
// batched prefilter path (one matrix product per group) and [N, C_out, plane] on the direct one.
template <typename T>
FieldView<T> push_field(const Geometry& geo, T* base) {
  const int64_t plane = geo.out_height * geo.out_width;
  return {base, geo.out_channels * plane, plane};
}
template <typename T>
FieldView<T> pull_field(const Geometry& geo, T* base, bool channel_major) {
  const int64_t plane = geo.out_height * geo.out_width;
  return channel_major ? FieldView<T>{base, plane, geo.batch * plane} : push_field(geo, base);
}

template <typename scalar_t>
PlaneInputs<scalar_t> plane_inputs(const Geometry& geo, const Responses& r, const OptTensor& shift,
                                   const OptTensor& bias_in) {
  auto ptr = [](const at::Tensor& t) { return t.defined() ? t.const_data_ptr<scalar_t>() : nullptr; };
  auto opt_ptr = [](const OptTensor& t) { return t.has_value() ? t->const_data_ptr<scalar_t>() : nullptr; };
  return {geo,
          push_field(geo, ptr(r.push0)),
          pull_field(geo, ptr(r.pull0), r.pull_channel_major),
          ptr(r.box),
          opt_ptr(shift),
          opt_ptr(bias_in),
          geo.out_height * geo.out_width};
}

// Per-thread scratch of the epilogues: a few planes in the accumulation type, and the pooling.
template <typename acc_t>
struct PlaneScratch {
  ScratchVector<acc_t> q, grad, spare;  // spare: where the backward pass writes what nobody reads
  BoxPool<acc_t> pool;
  explicit PlaneScratch(const Geometry& geo) : q(geo.out_height * geo.out_width), grad(q.size()), spare(q.size()) {
    if (geo.avg_kernel > 1) pool = BoxPool<acc_t>(geo.out_height, geo.out_width, (geo.avg_kernel - 1) / 2);
  }
};

template <typename scalar_t>
struct ForwardOutputs {
  const scalar_t *alpha, *bias_out;
  scalar_t* y;
  uint8_t* masks;        // nullptr when they are not saved
  scalar_t* saved_pull;  // ReLU(Q') [N, C_out, plane] for alpha's gradient (save_pull; else nullptr)
  bool stream = false;   // y and ReLU(Q') written with non-temporal stores (streams_outputs)
};

// The last level cache's bytes as Linux's sysfs lists cpu 0's caches (glibc's sysconf read 320 MiB for
// a 32 MiB L3 in a virtual machine); sysconf where sysfs has none; 0 if neither knows.
inline int64_t last_level_cache_bytes() {
  int64_t best_level = 0, bytes = 0;
  for (int index = 0; index < 16; ++index) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/";
    std::ifstream level_file(dir + "level"), size_file(dir + "size");
    int64_t level = 0, size = 0;
    std::string unit;
    if (!(level_file >> level) || !(size_file >> size)) break;
    size_file >> unit;  // "K" or "M" right after the number, or nothing
    const int64_t scale = unit == "M" ? (1 << 20) : unit == "K" ? 1024 : 1;
    if (level >= best_level) best_level = level, bytes = size * scale;
  }
#ifdef _SC_LEVEL3_CACHE_SIZE
  if (bytes == 0) bytes = std::max<int64_t>(sysconf(_SC_LEVEL3_CACHE_SIZE), 0);
#endif
  return bytes;
}

// Whether a forward's outputs (y and the saved ReLU(Q'), `bytes` in all) are larger than the last level
// cache: they are then written with non-temporal stores, which do not read each line from memory before
// writing it (an ordinary store does) and leave the cache to the data still to be read, as glibc's memcpy
// does past a fraction of the cache. cifar-stem-2024's training forward (64 channels at batch 128: 67 MB
// of y and ReLU(Q') against 32 MiB of L3) spent most of its epilogue waiting on those stores: 8.4-9.0 ->
// 7.6-8.0 ms on two threads of the 2-core AMD EPYC with AVX-512 (3 alternated runs).
// PUSHPULL_CPU_STREAM_OUTPUTS=always / never overrides the rule (the tests run small layers both ways).
inline bool streams_outputs(int64_t bytes) {
#ifdef __SSE2__
  const char* choice = std::getenv("PUSHPULL_CPU_STREAM_OUTPUTS");
  if (choice && std::strcmp(choice, "always") == 0) return true;
  if (choice && std::strcmp(choice, "never") == 0) return false;
  static const int64_t cache = last_level_cache_bytes();
  return cache > 0 && bytes > cache;
#else
  return false;
#endif
}

// dst[0, n) = src[0, n): non-temporal stores where dst is 16-byte aligned and n values fill whole 16-byte
// stores, else an ordinary copy. (The stores are weakly ordered: forward_epilogue_octet fences them.)
template <typename T>
PUSHPULL_ALWAYS_INLINE void stream_values(const T* src, int64_t n, T* dst) {
#ifdef __SSE2__
  const int64_t bytes = n * static_cast<int64_t>(sizeof(T));
  if (reinterpret_cast<uintptr_t>(dst) % 16 == 0 && bytes % 16 == 0) {
    const char* from = reinterpret_cast<const char*>(src);
    char* to = reinterpret_cast<char*>(dst);
    for (int64_t i = 0; i < bytes; i += 16)
      _mm_stream_si128(reinterpret_cast<__m128i*>(to + i), _mm_loadu_si128(reinterpret_cast<const __m128i*>(from + i)));
    return;
  }
#endif
  std::memcpy(dst, src, n * sizeof(T));
}

// Whether every value is finite: x - x is 0 for a finite x and NaN for NaN or +-Inf. Partial sums of two
// 64-byte vectors' worth of lanes, so that the loop maps onto whole vectors with no shuffles (eight lanes
// had GCC transpose them into AVX-512 registers) in two independent chains (their order does not
// matter: any NaN stays NaN).
template <typename T>
PUSHPULL_CPU_CLONES bool values_finite(const T* values, int64_t count) {
  constexpr int kLanes = 2 * 64 / sizeof(T);
  T acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= count; i += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += values[i + l] - values[i + l];
  for (; i < count; ++i) acc[0] += values[i] - values[i];
  bool finite = true;
  for (int l = 0; l < kLanes; ++l) finite = finite && acc[l] == T(0);
  return finite;
}

// NaN propagates through the ReLUs as in torch.relu (v < 0 is false for NaN), and its mask bit is set
// as torch's ReLU backward passes the gradient wherever !(v <= 0).
template <typename acc_t>
PUSHPULL_ALWAYS_INLINE acc_t relu_nan_kept(acc_t v) {
  return v < acc_t(0) ? acc_t(0) : v;
}

// y (or the dual output's two planes) and ReLU(Q') when it is saved, at pixels [from, from + n) of a
// channel, written from out_* + 0. Q' = q[p] + q_offset (q_offset = -bias when q is the pull response read
// in place).
template <bool kDual, bool kSaved, typename acc_t, typename scalar_t, typename Q>
PUSHPULL_ALWAYS_INLINE void channel_values(const scalar_t* __restrict__ p0, const Q* __restrict__ q, acc_t b,
                                           acc_t q_offset, acc_t a, acc_t bo, int64_t from, int64_t n,
                                           scalar_t* __restrict__ y_push, scalar_t* __restrict__ y_pull,
                                           scalar_t* __restrict__ saved) {
  for (int64_t i = 0; i < n; ++i) {
    const int64_t p = from + i;
    const acc_t relu_pull = relu_nan_kept(static_cast<acc_t>(q[p]) + q_offset);
    const acc_t relu_push = relu_nan_kept(static_cast<acc_t>(p0[p]) + b);
    if constexpr (kDual) {
      y_push[i] = static_cast<scalar_t>(relu_push);
      y_pull[i] = static_cast<scalar_t>(relu_pull);
    } else {
      y_push[i] = static_cast<scalar_t>(relu_push - a * relu_pull + bo);
    }
    if constexpr (kSaved) saved[i] = static_cast<scalar_t>(relu_pull);
  }
}

// One output channel: its values (channel_values) in one pass over its plane, or (kStream) in blocks
// computed into a buffer in cache and streamed out; the channel's bit of both masks in a second pass (a
// loop of its own, so that each vectorizes).
template <bool kDual, bool kSaved, bool kMasks, bool kStream, typename acc_t, typename scalar_t, typename Q>
PUSHPULL_ALWAYS_INLINE void forward_channel(const scalar_t* __restrict__ p0, const Q* __restrict__ q, acc_t b,
                                            acc_t q_offset, acc_t a, acc_t bo, int64_t plane,
                                            scalar_t* __restrict__ y_push, scalar_t* __restrict__ y_pull,
                                            scalar_t* __restrict__ saved, uint8_t* __restrict__ mask_p,
                                            uint8_t* __restrict__ mask_q, uint8_t bit) {
  if constexpr (kStream) {
    constexpr int64_t kBlock = 256;
    alignas(64) scalar_t push_block[kBlock], pull_block[kBlock], saved_block[kBlock];
    for (int64_t from = 0; from < plane; from += kBlock) {
      const int64_t n = std::min(kBlock, plane - from);
      channel_values<kDual, kSaved>(p0, q, b, q_offset, a, bo, from, n, push_block, pull_block, saved_block);
      stream_values(push_block, n, y_push + from);
      if constexpr (kDual) stream_values(pull_block, n, y_pull + from);
      if constexpr (kSaved) stream_values(saved_block, n, saved + from);
    }
  } else {
    channel_values<kDual, kSaved>(p0, q, b, q_offset, a, bo, 0, plane, y_push, y_pull, saved);
  }
  if constexpr (kMasks) {
    for (int64_t p = 0; p < plane; ++p) {
      mask_p[p] |= (static_cast<acc_t>(p0[p]) + b <= acc_t(0)) ? uint8_t(0) : bit;
      mask_q[p] |= (static_cast<acc_t>(q[p]) + q_offset <= acc_t(0)) ? uint8_t(0) : bit;
    }
  }
}

// forward_channel with its four switches as template arguments, so that each variant's loop vectorizes.
template <bool kStream, typename acc_t, typename scalar_t, typename Q>
PUSHPULL_ALWAYS_INLINE void forward_channel(bool dual, bool save, bool masks, const scalar_t* p0, const Q* q, acc_t b,
                                            acc_t q_offset, acc_t a, acc_t bo, int64_t plane, scalar_t* y_push,
                                            scalar_t* y_pull, scalar_t* saved, uint8_t* mask_p, uint8_t* mask_q,
                                            uint8_t bit) {
#define PUSHPULL_FORWARD_CHANNEL(D, S, M) \
  return forward_channel<D, S, M, kStream>(p0, q, b, q_offset, a, bo, plane, y_push, y_pull, saved, mask_p, mask_q, bit)
  if (masks) {
    if (dual) PUSHPULL_FORWARD_CHANNEL(true, false, true);
    if (save) PUSHPULL_FORWARD_CHANNEL(false, true, true);
    PUSHPULL_FORWARD_CHANNEL(false, false, true);
  }
  if (dual) PUSHPULL_FORWARD_CHANNEL(true, false, false);
  PUSHPULL_FORWARD_CHANNEL(false, false, false);
#undef PUSHPULL_FORWARD_CHANNEL
}

template <typename acc_t, typename scalar_t, typename Q>
PUSHPULL_ALWAYS_INLINE void forward_channel(bool dual, bool save, bool masks, bool stream, const scalar_t* p0,
                                            const Q* q, acc_t b, acc_t q_offset, acc_t a, acc_t bo, int64_t plane,
                                            scalar_t* y_push, scalar_t* y_pull, scalar_t* saved, uint8_t* mask_p,
                                            uint8_t* mask_q, uint8_t bit) {
  if (stream) {
    return forward_channel<true>(dual, save, masks, p0, q, b, q_offset, a, bo, plane, y_push, y_pull, saved, mask_p,
                                 mask_q, bit);
  }
  forward_channel<false>(dual, save, masks, p0, q, b, q_offset, a, bo, plane, y_push, y_pull, saved, mask_p, mask_q,
                         bit);
}

// Output and masks of image n, channels 8 * octet .. 8 * octet + 7, from the responses of image n_in of
// `in` (n itself, or 0 for a one-image workspace). Each mask byte has a single writer. The op's checks
// guarantee that ReLU(Q') is saved only with the masks and a single output.
template <typename scalar_t>
PUSHPULL_CPU_CLONES void forward_epilogue_octet(const PlaneInputs<scalar_t>& in, int64_t n_in, int64_t n, int64_t octet,
                                                const ForwardOutputs<scalar_t>& out,
                                                PlaneScratch<at::opmath_type<scalar_t>>& scratch) {
  using acc_t = at::opmath_type<scalar_t>;
  const Geometry& geo = in.geo;
  const int64_t plane = in.plane, octets = (geo.out_channels + 7) / 8;
  const int64_t out_c = geo.dual_output ? 2 * geo.out_channels : geo.out_channels;
  uint8_t* mask_p = out.masks ? out.masks + (n * octets + octet) * plane : nullptr;
  uint8_t* mask_q = out.masks ? mask_p + geo.batch * octets * plane : nullptr;  // masks[1]
  // Q' = R - bias read in place where nothing else enters it (no box sum, no pooling); else formed in scratch.
  const bool pull_in_place = in.pull0 && !in.box && geo.avg_kernel <= 1;
  if (out.masks) std::fill(mask_p, mask_p + plane, 0), std::fill(mask_q, mask_q + plane, 0);
  for (int64_t o = octet * 8; o < std::min(octet * 8 + 8, geo.out_channels); ++o) {
    const acc_t b = in.bias(o), a = static_cast<acc_t>(out.alpha[o]);
    const acc_t bo = out.bias_out ? static_cast<acc_t>(out.bias_out[o]) : acc_t(0);
    scalar_t* y_push = out.y + (n * out_c + o) * plane;
    scalar_t* y_pull = geo.dual_output ? out.y + (n * out_c + geo.out_channels + o) * plane : nullptr;
    scalar_t* saved = out.saved_pull ? out.saved_pull + (n * geo.out_channels + o) * plane : nullptr;
    const uint8_t bit = static_cast<uint8_t>(1u << (o % 8));
    const scalar_t* p0 = in.push0.plane(n_in, o);
    if (pull_in_place) {
      forward_channel(geo.dual_output, saved != nullptr, mask_p != nullptr, out.stream, p0, in.pull0.plane(n_in, o), b,
                      -b, a, bo, plane, y_push, y_pull, saved, mask_p, mask_q, bit);
    } else {
      in.pull_response(n_in, o, scratch.q.data(), scratch.pool);
      forward_channel(geo.dual_output, saved != nullptr, mask_p != nullptr, out.stream, p0,
                      static_cast<const acc_t*>(scratch.q.data()), b, acc_t(0), a, bo, plane, y_push, y_pull, saved,
                      mask_p, mask_q, bit);
    }
  }
#ifdef __SSE2__
  if (out.stream) _mm_sfence();  // the non-temporal stores reach memory before anyone reads the outputs
#endif
}

template <typename scalar_t>
ForwardOutputs<scalar_t> forward_outputs(const OptTensor& bias_out, const at::Tensor& alpha, at::Tensor& out,
                                         uint8_t* masks, scalar_t* saved_pull) {
  const int64_t bytes = out.numel() * static_cast<int64_t>(sizeof(scalar_t)) * (saved_pull ? 2 : 1);
  return {alpha.const_data_ptr<scalar_t>(),
          bias_out ? bias_out->const_data_ptr<scalar_t>() : nullptr,
          out.data_ptr<scalar_t>(),
          masks,
          saved_pull,
          streams_outputs(bytes)};
}

template <typename scalar_t>
void forward_epilogue(const PlaneInputs<scalar_t>& in, const ForwardOutputs<scalar_t>& out) {
  const Geometry& geo = in.geo;
  const int64_t octets = (geo.out_channels + 7) / 8;
  at::parallel_for(0, geo.batch * octets, 1, [&](int64_t begin, int64_t end) {
    PlaneScratch<at::opmath_type<scalar_t>> scratch(geo);
    for (int64_t task = begin; task < end; ++task) {
      forward_epilogue_octet(in, task / octets, task / octets, task % octets, out, scratch);
    }
  });
}

// Masked gradient fields and per-(image, channel) partial sums of the vector gradients.
struct BackwardFields {
  GradientFields grads;  // allocated by the batched path only (the per-image paths use their workspace)
  VectorParts parts;     // [N, C_out] in the accumulation type
};

template <typename scalar_t>
struct BackwardOutputs {
  using acc_t = at::opmath_type<scalar_t>;
  FieldView<scalar_t> grad_push0, grad_pull0;
  scalar_t* grad_box;  // [N, groups, plane] (image n_in of backward_epilogue_group)
  acc_t *shift_part, *bias_part, *alpha_part, *bias_out_part;
};

template <typename scalar_t>
BackwardOutputs<scalar_t> backward_outputs(const Geometry& geo, BackwardFields& f) {
  using acc_t = at::opmath_type<scalar_t>;
  auto ptr = [](at::Tensor& t) { return t.defined() ? t.data_ptr<scalar_t>() : nullptr; };
  auto acc_ptr = [](at::Tensor& t) { return t.defined() ? t.data_ptr<acc_t>() : nullptr; };
  return {push_field(geo, ptr(f.grads.grad_push0)),
          pull_field(geo, ptr(f.grads.grad_pull0), use_prefilter(geo)),
          ptr(f.grads.grad_box),
          acc_ptr(f.parts.shift),
          acc_ptr(f.parts.bias),
          acc_ptr(f.parts.alpha),
          acc_ptr(f.parts.bias_out)};
}

// sum_p a[p] * b[p] (b == nullptr: sum_p a[p]) in 64 bytes of interleaved partial sums: the loop vectorizes
// and the order is fixed, so the result is deterministic.
template <typename acc_t, typename T>
PUSHPULL_ALWAYS_INLINE acc_t lane_dot(const acc_t* __restrict__ a, const T* __restrict__ b, int64_t n) {
  constexpr int64_t kLanes = 64 / sizeof(acc_t);
  acc_t lanes[kLanes] = {};
  int64_t p = 0;
  if (b) {
    for (; p + kLanes <= n; p += kLanes)
      for (int64_t l = 0; l < kLanes; ++l) lanes[l] += a[p + l] * static_cast<acc_t>(b[p + l]);
  } else {
    for (; p + kLanes <= n; p += kLanes)
      for (int64_t l = 0; l < kLanes; ++l) lanes[l] += a[p + l];
  }
  for (; p < n; ++p) lanes[0] += b ? a[p] * static_cast<acc_t>(b[p]) : a[p];
  acc_t sum = 0;
  for (int64_t l = 0; l < kLanes; ++l) sum += lanes[l];
  return sum;
}

// out[p] = scale * g[p] where the mask bit is set, else 0 (see masked).
template <typename acc_t, typename T>
PUSHPULL_ALWAYS_INLINE void masked_gradient(const uint8_t* __restrict__ mask, uint8_t bit, const T* __restrict__ g,
                                            acc_t scale, int64_t n, acc_t* __restrict__ out) {
  for (int64_t p = 0; p < n; ++p) out[p] = masked(mask[p], bit, scale * static_cast<acc_t>(g[p]));
}

// What the backward epilogue reads besides the responses.
template <typename scalar_t>
struct BackwardInputs {
  const scalar_t *grad_out, *alpha;
  const uint8_t* masks;
  const scalar_t* saved_pull;  // ReLU(Q') saved by the forward (save_pull), else nullptr
  bool recompute_pull;         // for the alpha gradient, when the forward did not save it
};

// Gradient fields of image n, group grp (n_in: its index in `in`; see forward_epilogue_octet). One task
// per (image, group), so the group's box-sum gradient has a single writer. The CPU epilogues run float and
// double only (float16 / bfloat16 run in float), so the accumulation type is the fields' own.
template <typename scalar_t>
PUSHPULL_CPU_CLONES void backward_epilogue_group(const PlaneInputs<scalar_t>& in, int64_t n_in, int64_t n, int64_t grp,
                                                 const BackwardInputs<scalar_t>& bin,
                                                 const BackwardOutputs<scalar_t>& f,
                                                 PlaneScratch<at::opmath_type<scalar_t>>& scratch,
                                                 ScratchVector<at::opmath_type<scalar_t>>& box_grad) {
  using acc_t = at::opmath_type<scalar_t>;
  static_assert(std::is_same_v<acc_t, scalar_t>, "the CPU epilogues run float and double");
  const Geometry& geo = in.geo;
  const int64_t plane = in.plane, octets = (geo.out_channels + 7) / 8, per_group = geo.out_channels / geo.groups;
  const int64_t out_c = geo.dual_output ? 2 * geo.out_channels : geo.out_channels;
  std::fill(box_grad.begin(), box_grad.end(), acc_t(0));
  for (int64_t o = grp * per_group; o < (grp + 1) * per_group; ++o) {
    const int64_t byte = (n * octets + o / 8) * plane, no = n * geo.out_channels + o;
    const uint8_t bit = static_cast<uint8_t>(1u << (o % 8));
    const uint8_t *mask_p = bin.masks + byte, *mask_q = bin.masks + geo.batch * octets * plane + byte;
    const scalar_t* g_p = bin.grad_out + (n * out_c + o) * plane;
    const scalar_t* g_q = geo.dual_output ? bin.grad_out + (n * out_c + geo.out_channels + o) * plane : g_p;
    const acc_t pull_scale = geo.dual_output ? acc_t(1) : -static_cast<acc_t>(bin.alpha[o]);
    if (bin.recompute_pull) {
      acc_t* q = scratch.q.data();
      in.pull_response(n_in, o, q, scratch.pool);
      for (int64_t p = 0; p < plane; ++p) q[p] = relu_nan_kept(q[p]);
      f.alpha_part[no] = -lane_dot(q, g_p, plane);
    } else if (f.alpha_part && bin.saved_pull) {
      f.alpha_part[no] = -lane_dot(bin.saved_pull + no * plane, g_p, plane);
    }
    // gq, the pull's masked gradient, straight into its gradient field where there is one; pooled back
    // (avg_kernel > 1) in a pass of its own, else masked in the channel's one pass below.
    acc_t* gq = f.grad_pull0 ? f.grad_pull0.plane(n_in, o) : scratch.grad.data();
    const bool pooled = geo.avg_kernel > 1;
    if (pooled) {
      masked_gradient(mask_q, bit, g_q, pull_scale, plane, gq);
      scratch.pool.adjoint(gq);
    }
    const scalar_t* s = in.box ? in.box + (n_in * geo.groups + grp) * plane : nullptr;
    const BackwardChannel<acc_t> ch{mask_p,
                                    mask_q,
                                    bit,
                                    g_p,
                                    g_q,
                                    pull_scale,
                                    gq,
                                    s ? s : g_p,  // without box sums: a read-only plane, its sum unread
                                    in.shift ? static_cast<acc_t>(in.shift[o]) : acc_t(0),
                                    f.grad_push0 ? f.grad_push0.plane(n_in, o) : scratch.q.data(),
                                    f.grad_box ? box_grad.data() : scratch.spare.data(),
                                    o + 1 < (grp + 1) * per_group ? g_p + plane : nullptr};
    // The box terms where the box sums are read or their gradient written (a missing one: a spare plane).
    const bool with_box = s || f.grad_box;
    // The pull goes through the push response (R = -P0 + ...) unless it is separable.
    const auto sums = geo.pull == PullKind::kSeparable ? ch.template pass<false>(plane, with_box, !pooled)
                                                       : ch.template pass<true>(plane, with_box, !pooled);
    if (f.bias_part) f.bias_part[no] = sums.gp - sums.gq;
    if (f.bias_out_part) f.bias_out_part[no] = sums.g;
    if (f.shift_part) f.shift_part[no] = s ? sums.gq_box : acc_t(0);
  }
  if (f.grad_box) {
    scalar_t* out = f.grad_box + (n_in * geo.groups + grp) * plane;
    for (int64_t p = 0; p < plane; ++p) out[p] = static_cast<scalar_t>(box_grad[p]);
  }
}

template <typename scalar_t>
void backward_epilogue(const PlaneInputs<scalar_t>& in, const BackwardInputs<scalar_t>& bin,
                       const BackwardOutputs<scalar_t>& f) {
  const Geometry& geo = in.geo;
  at::parallel_for(0, geo.batch * geo.groups, 1, [&](int64_t begin, int64_t end) {
    PlaneScratch<at::opmath_type<scalar_t>> scratch(geo);
    ScratchVector<at::opmath_type<scalar_t>> box_grad(f.grad_box ? in.plane : 0);
    for (int64_t task = begin; task < end; ++task) {
      backward_epilogue_group(in, task / geo.groups, task / geo.groups, task % geo.groups, bin, f, scratch, box_grad);
    }
  });
}

// Everything the backward paths read.
struct BackwardRequest {
  const Geometry& geo;
  const ConvArgs& conv;
  const at::Tensor &x, &w, &grad_out, &masks, &alpha;
  const OptTensor &shift, &bias_in, &pull_rows, &pull_cols;
  Needs need;
};

// Whether the forward's saved buffer holds ReLU(Q') after the masks (save_pull).
inline bool pull_saved(const Geometry& geo, const at::Tensor& masks) { return masks.numel() != mask_shape(geo)[0]; }

// ReLU(Q') in the forward's saved buffer, or nullptr when it holds the masks alone.
template <typename scalar_t>
const scalar_t* saved_pull(const BackwardRequest& req) {
  if (!pull_saved(req.geo, req.masks)) return nullptr;
  return reinterpret_cast<const scalar_t*>(req.masks.const_data_ptr<uint8_t>() + saved_pull_offset(req.geo));
}

template <typename scalar_t>
BackwardInputs<scalar_t> backward_inputs(const BackwardRequest& req) {
  const scalar_t* saved = saved_pull<scalar_t>(req);
  return {req.grad_out.const_data_ptr<scalar_t>(), req.alpha.const_data_ptr<scalar_t>(),
          req.masks.const_data_ptr<uint8_t>(), saved, req.need.alpha && !saved};
}

}  // namespace cpu
}  // namespace pushpull
