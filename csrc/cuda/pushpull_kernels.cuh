// Bodies of the pushpull CUDA kernels, written once for two executors:
//  - on the GPU (pushpull_kernels.cu) a block is kThreads CUDA threads, and `blk.phase(f)` runs f on
//    every thread and then __syncthreads();
//  - on the CPU (tests/cuda_emulation/emulate.cpp) `blk.phase(f)` runs f for thread 0, 1, ...,
//    kThreads - 1 in turn, so that every phase sees all writes of the phases before it, as on the GPU.
// A phase function f(t, state) gets the thread index t and that thread's registers `state`, which
// live across phases. No torch and no CUDA-only construct outside `#ifdef __CUDA_ARCH__`.
#pragma once

#if !defined(__CUDACC_RTC__)  // NVRTC has memcpy and fabsf built in, and no standard headers
#include <cmath>
#include <cstring>
#endif

#include "pushpull_launch.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define PP_DEVICE_FN __device__ __forceinline__
#else
#define PP_DEVICE_FN inline
#endif

namespace pushpull {
namespace cuda {

// ---------------------------------------------------------------- 16-bit floats
// Device code uses the CUDA intrinsics; host code (the emulation) the bit-exact conversions below,
// which tests/test_cuda_emulation.py checks against torch on all 65536 values.

PP_DEVICE_FN uint32_t float_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return u;
}
PP_DEVICE_FN float bits_float(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

// IEEE half -> float (exact), as in the FP16 library (Maratyszcza): normal values rebias the
// exponent by scaling, subnormals go through a magic-number subtraction.
PP_DEVICE_FN float half_bits_to_float(uint16_t h) {
  const uint32_t w = uint32_t(h) << 16, sign = w & 0x80000000u, two_w = w + w;
  const float normalized = bits_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = bits_float((two_w >> 17) | (126u << 23)) - 0.5f;
  return bits_float(sign | (two_w < (1u << 27) ? float_bits(denormalized) : float_bits(normalized)));
}

// float -> IEEE half, round to nearest even (same source): the scalings round the mantissa in
// float arithmetic, NaN stays NaN, overflow gives infinity.
PP_DEVICE_FN uint16_t float_to_half_bits(float f) {
  float base = (fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = float_bits(f), shl1_w = w + w, sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = bits_float((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = float_bits(base);
  const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  return uint16_t((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

PP_DEVICE_FN float bfloat16_bits_to_float(uint16_t b) { return bits_float(uint32_t(b) << 16); }

// float -> bfloat16, round to nearest even; NaN -> quiet NaN.
PP_DEVICE_FN uint16_t float_to_bfloat16_bits(float f) {
  const uint32_t u = float_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0u;
  return uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

PP_DEVICE_FN float to_acc(float v) { return v; }
PP_DEVICE_FN double to_acc(double v) { return v; }
PP_DEVICE_FN void store(float* p, float v) { *p = v; }
PP_DEVICE_FN void store(double* p, double v) { *p = v; }
// The 16-bit types: CUDA's intrinsics on the device, the conversions above on the host.
#ifdef __CUDA_ARCH__
PP_DEVICE_FN float to_acc(HalfBits v) { return __half2float(__ushort_as_half(v.bits)); }
PP_DEVICE_FN float to_acc(BFloat16Bits v) { return __bfloat162float(__ushort_as_bfloat16(v.bits)); }
PP_DEVICE_FN void store(HalfBits* p, float v) { p->bits = __half_as_ushort(__float2half_rn(v)); }
PP_DEVICE_FN void store(BFloat16Bits* p, float v) { p->bits = __bfloat16_as_ushort(__float2bfloat16_rn(v)); }
#else
PP_DEVICE_FN float to_acc(HalfBits v) { return half_bits_to_float(v.bits); }
PP_DEVICE_FN float to_acc(BFloat16Bits v) { return bfloat16_bits_to_float(v.bits); }
PP_DEVICE_FN void store(HalfBits* p, float v) { p->bits = float_to_half_bits(v); }
PP_DEVICE_FN void store(BFloat16Bits* p, float v) { p->bits = float_to_bfloat16_bits(v); }
#endif

// NaN propagates as in torch.relu (v < 0 is false for NaN).
template <typename acc_t>
PP_DEVICE_FN acc_t relu(acc_t v) {
  return v < acc_t(0) ? acc_t(0) : v;
}

// The ReLU mask bit of v: set wherever !(v <= 0), NaN included, where torch's ReLU backward passes the
// gradient (threshold_backward), as the CPU backend's masks (csrc/cpu/epilogues.h).
template <typename acc_t>
PP_DEVICE_FN unsigned relu_bit(acc_t v) {
  return v <= acc_t(0) ? 0u : 1u;
}

// Whether v is neither NaN nor +-Inf, from its exponent bits (no flag such as --use_fast_math can fold
// a bit test away, as it may v - v == 0).
PP_DEVICE_FN bool is_finite(float v) { return (float_bits(v) & 0x7F800000u) != 0x7F800000u; }
PP_DEVICE_FN bool is_finite(double v) {
  uint64_t u;
  memcpy(&u, &v, sizeof u);
  return (u & 0x7FF0000000000000ull) != 0x7FF0000000000000ull;
}

// ---------------------------------------------------------------- tiles and pooling windows

// The tile of block `tile` (row-major over the tiles) and the pixel thread t owns in it.
struct TilePixel {
  int ty, tx;    // position in the tile
  int64_t h, w;  // position in the image
  bool inside;   // h < height && w < width
};

PP_DEVICE_FN int64_t tile_row0(const Tiling& tl, int64_t tile) { return (tile / tl.tiles_w) * tl.tile_h; }
PP_DEVICE_FN int64_t tile_col0(const Tiling& tl, int64_t tile) { return (tile % tl.tiles_w) * tl.tile_w; }

PP_DEVICE_FN TilePixel tile_pixel(const Tiling& tl, int64_t tile, int t, int64_t height, int64_t width) {
  TilePixel p;
  p.ty = t / tl.tile_w;
  p.tx = t % tl.tile_w;
  p.h = tile_row0(tl, tile) + p.ty;
  p.w = tile_col0(tl, tile) + p.tx;
  p.inside = p.h < height && p.w < width;
  return p;
}

// Number of valid positions of the (2r+1)^2 pooling window around (h, w): the divisor of
// avg_pool2d with count_include_pad=False.
PP_DEVICE_FN int64_t window_count(int64_t h, int64_t w, int r, int64_t height, int64_t width) {
  const int64_t rows = (h + r < height ? h + r : height - 1) - (h - r > 0 ? h - r : 0) + 1;
  const int64_t cols = (w + r < width ? w + r : width - 1) - (w - r > 0 ? w - r : 0) + 1;
  return rows * cols;
}

// Sums of a field over the clipped (2r+1)^2 window of every pixel of one tile, in shared memory:
// `fill` stores the field on the tile plus a halo of r pixels (zero outside the image), `sum_rows`
// the horizontal sums of each halo row over the tile's columns, `sum_at` the vertical sum of those.
// Each of the first two is one phase; sum_at reads in a later one.
template <typename acc_t>
struct WindowSum {
  acc_t* halo;  // [tile_h + 2r][tile_w + 2r]
  acc_t* rows;  // [tile_h + 2r][tile_w]
  int radius, tile_w, halo_h, halo_w;
  int64_t row0, col0, height, width;  // tile origin and image size

  template <class ValueFn>
  PP_DEVICE_FN void fill(int t, ValueFn value) const {
    for (int i = t; i < halo_h * halo_w; i += kThreads) {
      const int64_t h = row0 - radius + i / halo_w, w = col0 - radius + i % halo_w;
      halo[i] = (h >= 0 && h < height && w >= 0 && w < width) ? value(h, w) : acc_t(0);
    }
  }
  PP_DEVICE_FN void sum_rows(int t) const {
    for (int i = t; i < halo_h * tile_w; i += kThreads) {
      const acc_t* in =
          halo + (i / tile_w) * halo_w + i % tile_w;  // halo column x + d is image column col0 + x + d - r
      acc_t s = 0;
      for (int d = 0; d <= 2 * radius; ++d) s += in[d];
      rows[i] = s;
    }
  }
  PP_DEVICE_FN acc_t sum_at(int ty, int tx) const {
    acc_t s = 0;
    for (int d = 0; d <= 2 * radius; ++d)
      s += rows[(ty + d) * tile_w + tx];  // halo row ty + d is image row row0 + ty + d - r
    return s;
  }
};

template <typename acc_t>
PP_DEVICE_FN WindowSum<acc_t> window_sum(acc_t* smem, const FieldGeometry& geo, const Tiling& tl, int64_t tile) {
  WindowSum<acc_t> win;
  win.radius = geo.radius;
  win.tile_w = tl.tile_w;
  win.halo_h = tl.tile_h + 2 * geo.radius;
  win.halo_w = tl.tile_w + 2 * geo.radius;
  win.halo = smem;
  win.rows = smem + win.halo_h * win.halo_w;
  win.row0 = tile_row0(tl, tile);
  win.col0 = tile_col0(tl, tile);
  win.height = geo.height;
  win.width = geo.width;
  return win;
}

// ---------------------------------------------------------------- the responses

// R = conv(x, q) at output pixel (h, w) of channel o, image n (see ExactPull). A tap in the padding
// multiplies a zero, as in the convolution (0 * NaN = NaN for a NaN in q).
template <typename acc_t>
PP_DEVICE_FN acc_t exact_pull(const ExactPull<acc_t>& e, int64_t n, int64_t o, int64_t h, int64_t w) {
  const int64_t plane = int64_t(e.in_height) * e.in_width;
  const acc_t* q = e.q + o * e.in_per_group * e.q_h * e.q_w;
  const acc_t* x = e.x + (n * e.in_channels + int(o) / e.out_per_group * e.in_per_group) * plane;
  const int h0 = int(h) * e.stride_h - e.pad_h, w0 = int(w) * e.stride_w - e.pad_w;
  acc_t v = 0;
  for (int c = 0; c < e.in_per_group; ++c, x += plane) {
    for (int i = 0; i < e.q_h * e.q_w; ++i, ++q) {  // tap (a, b) = (i / q_w, i % q_w)
      const int hi = h0 + i / e.q_w * e.dil_h, wi = w0 + i % e.q_w * e.dil_w;
      const bool inside = hi >= 0 && hi < e.in_height && wi >= 0 && wi < e.in_width;
      v += *q * (inside ? x[int64_t(hi) * e.in_width + wi] : acc_t(0));
    }
  }
  return v;
}

// Read-only view of the responses: P0 = conv(x, k) and what the pull response is made of.
template <typename scalar_t>
struct Responses {
  using acc_t = acc_of<scalar_t>;
  const FieldGeometry& geo;
  const acc_t *push0, *pull0, *box;
  const acc_t *shift, *bias_in;
  const ExactPull<acc_t>& exact;

  PP_DEVICE_FN acc_t bias(int64_t o) const { return bias_in ? bias_in[o] : acc_t(0); }
  PP_DEVICE_FN int64_t index(int64_t n, int64_t o, int64_t pixel) const {
    return (n * geo.channels + o) * geo.height * geo.width + pixel;
  }
  PP_DEVICE_FN acc_t push(int64_t n, int64_t o, int64_t pixel) const { return push0[index(n, o, pixel)] + bias(o); }
  PP_DEVICE_FN acc_t box_sum(int64_t n, int64_t o, int64_t pixel) const {
    const int64_t group = o / (geo.channels / geo.groups);
    return box[(n * geo.groups + group) * geo.height * geo.width + pixel];
  }
  // Q = R - b_in before the pooling (the formula: the pull response with its bias); where the algebra's
  // R is not finite, R = conv(x, q) itself (ExactPull).
  PP_DEVICE_FN acc_t pull(int64_t n, int64_t o, int64_t h, int64_t w) const {
    const int64_t pixel = h * geo.width + w, i = index(n, o, pixel);
    acc_t q = (geo.pull == PullKind::kSeparable ? pull0[i] : -push0[i]) - bias(o);
    if (geo.pull == PullKind::kShift) q += shift[o] * box_sum(n, o, pixel);
    if (exact.x && !is_finite(q)) q = exact_pull(exact, n, o, h, w) - bias(o);
    return q;
  }
};

// Q' (the pooled pull response) at thread t's pixel: `win` must hold the window sums of Q when
// pooling (pull_window_phases), otherwise Q is read directly.
template <typename scalar_t>
PP_DEVICE_FN acc_of<scalar_t> pooled_pull_at(const Responses<scalar_t>& r, const WindowSum<acc_of<scalar_t>>& win,
                                             const TilePixel& px, int64_t n, int64_t o) {
  using acc_t = acc_of<scalar_t>;
  const FieldGeometry& geo = r.geo;
  if (geo.radius == 0) return r.pull(n, o, px.h, px.w);
  return win.sum_at(px.ty, px.tx) / acc_t(window_count(px.h, px.w, geo.radius, geo.height, geo.width));
}

// The two phases that put the window sums of Q (channel o of image n) into `win` (pooling only).
template <class Block, typename scalar_t>
PP_DEVICE_FN void pull_window_phases(Block& blk, const Responses<scalar_t>& r, const WindowSum<acc_of<scalar_t>>& win,
                                     int64_t n, int64_t o) {
  if (r.geo.radius == 0) return;
  blk.phase(
      [&](int t, typename Block::State&) { win.fill(t, [&](int64_t h, int64_t w) { return r.pull(n, o, h, w); }); });
  blk.phase([&](int t, typename Block::State&) { win.sum_rows(t); });
}

// ---------------------------------------------------------------- forward epilogue
// Block = (image n, octet of 8 output channels, tile); grid order tile fastest, then octet, then n.
// Each thread keeps the ReLU bits of its pixel for the octet's channels and writes one byte per mask.

struct EpilogueState {
  uint8_t push_bits = 0, pull_bits = 0;
};

inline int64_t epilogue_blocks(const FieldGeometry& geo, const Tiling& tl) {
  return geo.batch * ((geo.channels + 7) / 8) * tl.count();
}

template <class Block, typename scalar_t>
PP_DEVICE_FN void forward_epilogue_block(Block& blk, const EpilogueArgs<scalar_t>& a, const Tiling& tl, int64_t block,
                                         acc_of<scalar_t>* smem) {
  using acc_t = acc_of<scalar_t>;
  const FieldGeometry& geo = a.geo;
  const int64_t octets = (geo.channels + 7) / 8, tile = block % tl.count();
  const int64_t octet = (block / tl.count()) % octets, n = block / (tl.count() * octets);
  const int64_t plane = geo.height * geo.width, out_channels = geo.dual_output ? 2 * geo.channels : geo.channels;
  const Responses<scalar_t> r{geo, a.push0, a.pull0, a.box, a.shift, a.bias_in, a.exact};
  const WindowSum<acc_t> win = window_sum(smem, geo, tl, tile);
  for (int j = 0; j < 8 && octet * 8 + j < geo.channels; ++j) {
    const int64_t o = octet * 8 + j;
    pull_window_phases(blk, r, win, n, o);
    blk.phase([&](int t, EpilogueState& s) {
      const TilePixel px = tile_pixel(tl, tile, t, geo.height, geo.width);
      if (!px.inside) return;
      const int64_t pixel = px.h * geo.width + px.w;
      const acc_t p = r.push(n, o, pixel), q = pooled_pull_at(r, win, px, n, o);
      scalar_t* y = a.out + (n * out_channels + o) * plane + pixel;
      if (geo.dual_output) {
        store(y, relu(p));
        store(y + geo.channels * plane, relu(q));
      } else {
        store(y, relu(p) - a.alpha[o] * relu(q) + (a.bias_out ? a.bias_out[o] : acc_t(0)));
      }
      s.push_bits |= uint8_t(relu_bit(p) << j);
      s.pull_bits |= uint8_t(relu_bit(q) << j);
    });
  }
  if (!a.masks) return;
  blk.phase([&](int t, EpilogueState& s) {
    const TilePixel px = tile_pixel(tl, tile, t, geo.height, geo.width);
    if (!px.inside) return;
    const int64_t byte = (n * octets + octet) * plane + px.h * geo.width + px.w;  // masks[0][n][octet][h][w]
    a.masks[byte] = s.push_bits;
    a.masks[geo.batch * octets * plane + byte] = s.pull_bits;  // masks[1]
  });
}

// ---------------------------------------------------------------- backward fields
// Block = (image n, group, tile), looping over the group's output channels: the box-sum gradient
// sum_o shift[o] * gQ[o] then has one writer per pixel. The per-channel sums over the tile are block
// reductions (a tree in shared memory, deterministic) written to row n * tiles + tile of the partials.

template <typename acc_t>
struct FieldsState {
  acc_t box_grad = 0;  // sum over the group's channels of shift[o] * gQ[o] at this pixel
  acc_t pull_act = 0;  // ReLU(Q') of the current channel (trainable alpha only)
};

inline int64_t fields_blocks(const FieldGeometry& geo, const Tiling& tl) { return geo.batch * geo.groups * tl.count(); }

// Sums reduce[k * kThreads + t] over t for k < 3 into reduce[k * kThreads]: log2(kThreads) phases.
template <class Block, typename acc_t>
PP_DEVICE_FN void block_reduce3(Block& blk, acc_t* reduce) {
  for (int half = kThreads / 2; half > 0; half /= 2) {
    blk.phase([&](int t, typename Block::State&) {
      if (t >= half) return;
      for (int k = 0; k < 3; ++k) reduce[k * kThreads + t] += reduce[k * kThreads + t + half];
    });
  }
}

template <typename scalar_t>
struct GradView {
  using acc_t = acc_of<scalar_t>;
  const FieldsArgs<scalar_t>& a;
  int64_t out_channels, plane;

  PP_DEVICE_FN bool bit(int which, int64_t n, int64_t o, int64_t pixel) const {  // which: 0 push, 1 pull
    const int64_t octets = (a.geo.channels + 7) / 8;
    const int64_t byte = ((which * a.geo.batch + n) * octets + o / 8) * plane + pixel;
    return (a.masks[byte] >> (o % 8)) & 1u;
  }
  PP_DEVICE_FN acc_t push_grad(int64_t n, int64_t o, int64_t pixel) const {  // dL/dReLU(P)
    return to_acc(a.grad_out[(n * out_channels + o) * plane + pixel]);
  }
  // dL/dQ' where Q' > 0 (zero elsewhere): the dual output's second half, or -alpha * the push's.
  PP_DEVICE_FN acc_t masked_pull_grad(int64_t n, int64_t o, int64_t pixel) const {
    if (!bit(1, n, o, pixel)) return acc_t(0);
    if (a.geo.dual_output) return to_acc(a.grad_out[(n * out_channels + a.geo.channels + o) * plane + pixel]);
    return -a.alpha[o] * push_grad(n, o, pixel);
  }
};

template <class Block, typename scalar_t>
PP_DEVICE_FN void backward_fields_block(Block& blk, const FieldsArgs<scalar_t>& a, const Tiling& tl, int64_t block,
                                        acc_of<scalar_t>* smem) {
  using acc_t = acc_of<scalar_t>;
  using State = typename Block::State;
  const FieldGeometry& geo = a.geo;
  const int64_t tile = block % tl.count(), group = (block / tl.count()) % geo.groups;
  const int64_t n = block / (tl.count() * geo.groups), per_group = geo.channels / geo.groups;
  const int64_t plane = geo.height * geo.width, partial_row = n * tl.count() + tile;
  const Responses<scalar_t> r{geo, a.push0, a.pull0, a.box, a.shift, a.bias_in, a.exact};
  const GradView<scalar_t> g{a, geo.dual_output ? 2 * geo.channels : geo.channels, plane};
  const WindowSum<acc_t> win = window_sum(smem, geo, tl, tile);
  acc_t* reduce = smem + window_shared_elems(geo);  // [3][kThreads]
  const bool want_sums = a.bias_part || a.shift_part || a.alpha_part;
  for (int64_t o = group * per_group; o < (group + 1) * per_group; ++o) {
    if (a.alpha_part) {
      pull_window_phases(blk, r, win, n, o);
      blk.phase([&](int t, State& s) {
        const TilePixel px = tile_pixel(tl, tile, t, geo.height, geo.width);
        s.pull_act = px.inside ? relu(pooled_pull_at(r, win, px, n, o)) : acc_t(0);
      });
    }
    if (geo.radius > 0) {
      // Adjoint of the average: each output's gradient divided by its window count, summed over the
      // windows that contain the pixel (the same clipped windows, the pooling being symmetric).
      blk.phase([&](int t, State&) {
        win.fill(t, [&](int64_t h, int64_t w) {
          const int64_t pixel = h * geo.width + w;
          return g.masked_pull_grad(n, o, pixel) / acc_t(window_count(h, w, geo.radius, geo.height, geo.width));
        });
      });
      blk.phase([&](int t, State&) { win.sum_rows(t); });
    }
    blk.phase([&](int t, State& s) {
      const TilePixel px = tile_pixel(tl, tile, t, geo.height, geo.width);
      for (int k = 0; k < 3; ++k) reduce[k * kThreads + t] = acc_t(0);
      if (!px.inside) return;
      const int64_t pixel = px.h * geo.width + px.w, i = r.index(n, o, pixel);
      const acc_t gq = geo.radius > 0 ? win.sum_at(px.ty, px.tx) : g.masked_pull_grad(n, o, pixel);
      const acc_t g_out = g.push_grad(n, o, pixel), gp = g.bit(0, n, o, pixel) ? g_out : acc_t(0);
      if (a.grad_push0) a.grad_push0[i] = geo.pull == PullKind::kSeparable ? gp : gp - gq;
      if (a.grad_pull0) a.grad_pull0[i] = gq;
      if (geo.pull == PullKind::kShift) s.box_grad += a.shift[o] * gq;
      reduce[t] = gp - gq;                                                   // d b_in
      if (a.shift_part) reduce[kThreads + t] = gq * r.box_sum(n, o, pixel);  // d shift
      if (a.alpha_part) reduce[2 * kThreads + t] = -g_out * s.pull_act;      // d alpha
    });
    if (!want_sums) continue;
    block_reduce3(blk, reduce);
    blk.phase([&](int t, State&) {
      if (t != 0) return;
      const int64_t at = partial_row * geo.channels + o;
      if (a.bias_part) a.bias_part[at] = reduce[0];
      if (a.shift_part) a.shift_part[at] = reduce[kThreads];
      if (a.alpha_part) a.alpha_part[at] = reduce[2 * kThreads];
    });
  }
  if (!a.grad_box) return;
  blk.phase([&](int t, State& s) {
    const TilePixel px = tile_pixel(tl, tile, t, geo.height, geo.width);
    if (px.inside) a.grad_box[(n * geo.groups + group) * plane + px.h * geo.width + px.w] = s.box_grad;
  });
}

// ---------------------------------------------------------------- separable prefilter and adjoint
// Block = (input plane p, tile). The prefilter tiles the output (Ho x Wo), the adjoint the input
// (H x W). Both run a vertical pass into shared memory, then a horizontal pass per pixel.

struct NoState {};

PP_DEVICE_FN int64_t ceil_div(int64_t a, int64_t b) { return a >= 0 ? (a + b - 1) / b : -((-a) / b); }  // b > 0

inline int64_t prefilter_blocks(const PrefilterGeometry& g, const Tiling& tl) { return g.planes * tl.count(); }

// Block `block` of a prefilter kernel: tile `tile` (first row and column row0, col0) of input plane `plane`.
struct PlaneTile {
  int64_t tile, plane, row0, col0;
};
PP_DEVICE_FN PlaneTile plane_tile(const Tiling& tl, int64_t block) {
  const int64_t tile = block % tl.count();
  return {tile, block / tl.count(), tile_row0(tl, tile), tile_col0(tl, tile)};
}

template <class Block, typename acc_t>
PP_DEVICE_FN void prefilter_block(Block& blk, const PrefilterArgs<acc_t>& a, const Tiling& tl, int64_t block,
                                  acc_t* smem) {
  const PrefilterGeometry& g = a.geo;
  const PlaneTile pt = plane_tile(tl, block);
  const int64_t span_w = prefilter_span_w(g, tl.tile_w);
  const int64_t in_col0 = pt.col0 * g.stride_w - g.pad_w;  // input column of span entry 0
  const acc_t* x = a.in + pt.plane * g.height * g.width;
  // Vertical pass: vert[i][ly][s] = sum_a -rows[a, i] * x[(row0 + ly) * sh + a * dh - ph][in_col0 + s].
  blk.phase([&](int t, NoState&) {
    const int64_t per_tap = int64_t(tl.tile_h) * span_w;
    for (int64_t e = t; e < g.kernel_h * per_tap; e += kThreads) {
      const int64_t i = e / per_tap, ly = (e % per_tap) / span_w, w = in_col0 + e % span_w;
      const int64_t ho = pt.row0 + ly;
      acc_t v = 0;
      if (ho < g.out_height && w >= 0 && w < g.width) {
        for (int ta = 0; ta < g.pull_h; ++ta) {
          const int64_t h = ho * g.stride_h + int64_t(ta) * g.dil_h - g.pad_h;
          if (h >= 0 && h < g.height) v -= a.rows[ta * g.kernel_h + i] * x[h * g.width + w];
        }
      }
      smem[e] = v;
    }
  });
  // Horizontal pass: z[i, j] at (ho, wo) = sum_b cols[b, j] * vert[i][ly][tx * sw + b * dw].
  blk.phase([&](int t, NoState&) {
    const TilePixel px = tile_pixel(tl, pt.tile, t, g.out_height, g.out_width);
    if (!px.inside) return;
    const int64_t out_plane = g.out_height * g.out_width, taps = int64_t(g.kernel_h) * g.kernel_w;
    acc_t* z = a.out + pt.plane * taps * out_plane + px.h * g.out_width + px.w;
    for (int i = 0; i < g.kernel_h; ++i) {
      const acc_t* vert = smem + (int64_t(i) * tl.tile_h + px.ty) * span_w + int64_t(px.tx) * g.stride_w;
      for (int j = 0; j < g.kernel_w; ++j) {
        acc_t v = 0;
        for (int tb = 0; tb < g.pull_w; ++tb) v += a.cols[tb * g.kernel_w + j] * vert[int64_t(tb) * g.dil_w];
        z[(int64_t(i) * g.kernel_w + j) * out_plane] = v;
      }
    }
  });
}

template <class Block, typename acc_t>
PP_DEVICE_FN void prefilter_adjoint_block(Block& blk, const PrefilterArgs<acc_t>& a, const Tiling& tl, int64_t block,
                                          acc_t* smem) {
  const PrefilterGeometry& g = a.geo;
  const PlaneTile pt = plane_tile(tl, block);
  // Output rows that reach input rows [row0, row0 + tile_h): ho * sh = h + ph - a * dh for some tap a.
  const int64_t ho_lo0 = ceil_div(pt.row0 + g.pad_h - int64_t(g.pull_h - 1) * g.dil_h, g.stride_h);
  const int64_t ho_lo = ho_lo0 > 0 ? ho_lo0 : 0;
  const int64_t span_h = adjoint_span_h(g, tl.tile_h);
  const int64_t out_plane = g.out_height * g.out_width, taps = int64_t(g.kernel_h) * g.kernel_w;
  const acc_t* gz = a.in + pt.plane * taps * out_plane;
  // Horizontal adjoint: horiz[i][oh][lx] = sum_{j, b} cols[b, j] * gz[i, j][ho_lo + oh][wo] over the
  // output columns wo with wo * sw + b * dw - pw == col0 + lx.
  blk.phase([&](int t, NoState&) {
    const int64_t per_tap = span_h * tl.tile_w;
    for (int64_t e = t; e < g.kernel_h * per_tap; e += kThreads) {
      const int64_t i = e / per_tap, ho = ho_lo + (e % per_tap) / tl.tile_w, w = pt.col0 + e % tl.tile_w;
      acc_t v = 0;
      if (ho < g.out_height && w < g.width) {
        for (int tb = 0; tb < g.pull_w; ++tb) {
          const int64_t num = w + g.pad_w - int64_t(tb) * g.dil_w;
          if (num < 0 || num % g.stride_w != 0 || num / g.stride_w >= g.out_width) continue;
          const acc_t* column = gz + i * g.kernel_w * out_plane + ho * g.out_width + num / g.stride_w;
          for (int j = 0; j < g.kernel_w; ++j) v += a.cols[tb * g.kernel_w + j] * column[j * out_plane];
        }
      }
      smem[e] = v;
    }
  });
  // Vertical adjoint: grad_x[h][w] = sum_{i, a} -rows[a, i] * horiz[i][ho - ho_lo][lx], ho * sh = h + ph - a * dh.
  blk.phase([&](int t, NoState&) {
    const TilePixel px = tile_pixel(tl, pt.tile, t, g.height, g.width);
    if (!px.inside) return;
    acc_t v = 0;
    for (int ta = 0; ta < g.pull_h; ++ta) {
      const int64_t num = px.h + g.pad_h - int64_t(ta) * g.dil_h;
      if (num < 0 || num % g.stride_h != 0 || num / g.stride_h >= g.out_height) continue;
      const int64_t oh = num / g.stride_h - ho_lo;  // in [0, span_h) by the choice of ho_lo
      for (int i = 0; i < g.kernel_h; ++i)
        v -= a.rows[ta * g.kernel_h + i] * smem[(i * span_h + oh) * tl.tile_w + px.tx];
    }
    a.out[pt.plane * g.height * g.width + px.h * g.width + px.w] = v;
  });
}

}  // namespace cuda
}  // namespace pushpull
