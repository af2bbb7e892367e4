// Launchers of the pushpull CUDA kernels: plain C++ (no torch, no CUDA headers), so that
//  - csrc/cuda/pushpull_kernels.cu compiles with nvcc alone (tests/test_cuda_compile.py builds it for
//    sm_70, sm_80 and sm_90 on a machine without a GPU), and
//  - tests/cuda_emulation/emulate.cpp can give the same launchers a host implementation that runs the
//    same kernel bodies block by block on the CPU (tests/test_cuda_emulation.py).
// Every launcher takes raw pointers, sizes and a stream, and returns nullptr on success or the CUDA
// error message of the launch (the caller turns it into an exception).
#pragma once

#if defined(__CUDACC_RTC__)
// NVRTC (tests/test_cuda_compile.py) has no standard headers; these are the LP64 types.
typedef long long int64_t;
typedef unsigned long long uint64_t;
typedef unsigned int uint32_t;
typedef unsigned short uint16_t;
typedef unsigned char uint8_t;
#else
#include <cstdint>
#endif

#include "../common/pull_kind.h"

// The CUDA runtime's own definition (driver_types.h); repeating an identical typedef is allowed.
struct CUstream_st;
typedef struct CUstream_st* cudaStream_t;

// Geometry helpers below are also called by the kernels (nvcc defines __host__ / __device__).
#if defined(__CUDACC__)
#define PP_HOST_DEVICE __host__ __device__
#else
#define PP_HOST_DEVICE
#endif

namespace pushpull {
namespace cuda {

// Storage of the 16-bit floating types: the bits of an IEEE half / a bfloat16. Kernels convert them
// to float for arithmetic (pushpull_kernels.cuh, to_acc / from_acc).
struct alignas(2) HalfBits {
  uint16_t bits;
};
struct alignas(2) BFloat16Bits {
  uint16_t bits;
};

// Accumulation type of each storage type: float for the 16-bit types and float, double for double.
template <typename scalar_t>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};
template <typename scalar_t>
using acc_of = typename AccOf<scalar_t>::type;

// Sizes shared by the epilogue and the backward fields: responses are [N, C_out, Ho, Wo] contiguous,
// the box sum [N, groups, Ho, Wo], the masks [2, N, ceil(C_out / 8), Ho, Wo].
struct FieldGeometry {
  int64_t batch, channels, groups, height, width;
  int radius;  // of the average pooling, (avg_kernel - 1) / 2; 0 = no pooling
  bool dual_output;
  PullKind pull;  // kSeparable: pull0 holds R, computed elsewhere
};

// The pull response computed exactly, R = conv(x, q) with q formed (aten_algebra.h, exact_pull_kernel),
// at the pixels where the algebra's R (the prefilter's k @ z, or shift * S - P0) comes out NaN or +-Inf.
// A NaN or Inf in R's window always makes the algebra's R non-finite, so these are the only pixels where
// the two can differ (Inf - Inf = NaN where conv(x, q) gives +-Inf); elsewhere the fast R is kept, and a
// finite input costs a test per pixel. x [N, C_in, H, W] and q [C_out, C_in / groups, q_h, q_w] are
// contiguous, in the accumulation type; pad is the pull padding. x null: R is read as it is (negate, or
// R already conv(x, q)).
template <typename acc_t>
struct ExactPull {
  const acc_t *x, *q;
  int64_t in_channels;
  int in_height, in_width, in_per_group, out_per_group;  // channels per group, of the input and output
  int q_h, q_w, stride_h, stride_w, dil_h, dil_w, pad_h, pad_w;
};

// Forward epilogue: y = ReLU(P0 + b_in) - alpha * ReLU(avg(R - b_in)) + b_out (or the dual output),
// and the packed ReLU masks when `masks` is not null. The responses and the [C_out] vectors are in the
// accumulation type (float32 for 16-bit inputs, whose responses then never round before the biases
// and ReLUs); only the output has the input's type. shift, bias_in and bias_out may be null (absent).
template <typename scalar_t>
struct EpilogueArgs {
  using acc_t = acc_of<scalar_t>;
  FieldGeometry geo;
  const acc_t *push0, *pull0, *box;
  const acc_t *shift, *bias_in, *alpha, *bias_out;
  ExactPull<acc_t> exact;
  scalar_t* out;
  uint8_t* masks;
};

// Backward fields from grad_output and the masks:
//   gP = mask_P * g_push, gQ = avg^T(mask_Q * scale * g_pull) with scale = -alpha (1 for dual);
//   grad_push0 = gP - gQ (negate, shift) or gP (separable); grad_pull0 = gQ (separable);
//   grad_box[n, group] = sum_o shift[o] * gQ[o] (shift);
// and per (image, tile) partial sums over the tile's pixels, [N * tiles, C_out] in acc_t:
//   bias_part = sum(gP - gQ), shift_part = sum(gQ * S), alpha_part = -sum(g_push * ReLU(Q')).
// alpha_part recomputes Q' from push0/pull0/box; every output pointer may be null (not wanted).
// grad_out has the input's type, everything else the accumulation type.
template <typename scalar_t>
struct FieldsArgs {
  using acc_t = acc_of<scalar_t>;
  FieldGeometry geo;
  const scalar_t* grad_out;
  const uint8_t* masks;
  const acc_t *push0, *pull0, *box;
  const acc_t *shift, *bias_in, *alpha;
  ExactPull<acc_t> exact;  // for the alpha_part's Q'
  acc_t *grad_push0, *grad_pull0, *grad_box;
  acc_t *bias_part, *shift_part, *alpha_part;
};

// Separable prefilter of the 2020 pull kernel q[o, c] = -rows @ k[o, c] @ cols^T:
//   z[p, i * kw + j, ho, wo] = sum_{a, b} -rows[a, i] * cols[b, j] * x[p, ho*sh + a*dh - ph, wo*sw + b*dw - pw]
// over input planes p = n * C_in + c, so that z viewed as [N, C_in * kh * kw, Ho, Wo] gives
// conv(x, q) = conv1x1(z, k.view(C_out, C_in/groups * kh * kw, 1, 1), groups).
// rows is [pull_h, kh], cols [pull_w, kw]. It runs in the accumulation type (float or double) only.
struct PrefilterGeometry {
  int64_t planes, height, width, out_height, out_width;
  int kernel_h, kernel_w, pull_h, pull_w;
  int stride_h, stride_w, dil_h, dil_w, pad_h, pad_w;
};

template <typename acc_t>
struct PrefilterArgs {
  PrefilterGeometry geo;
  const acc_t *rows, *cols;
  const acc_t* in;  // prefilter: x [planes, H, W];            adjoint: grad_z [planes, kh*kw, Ho, Wo]
  acc_t* out;       // prefilter: z [planes, kh*kw, Ho, Wo];   adjoint: grad_x [planes, H, W]
};

// ---------------------------------------------------------------- block geometry
// Every kernel runs blocks of kThreads threads over 2-D tiles of tile_h x tile_w pixels (thread t
// owns pixel (t / tile_w, t % tile_w) of its tile); narrow images get narrower, taller tiles.
constexpr int kThreads = 256;

struct Tiling {
  int tile_h, tile_w;
  int64_t tiles_h, tiles_w;
  PP_HOST_DEVICE int64_t count() const { return tiles_h * tiles_w; }
};

PP_HOST_DEVICE inline Tiling tiling(int64_t height, int64_t width) {
  const int tile_w = width <= 8 ? 8 : width <= 16 ? 16 : 32;
  const int tile_h = kThreads / tile_w;
  return {tile_h, tile_w, (height + tile_h - 1) / tile_h, (width + tile_w - 1) / tile_w};
}

// Rows of the partial sums of FieldsArgs: one per (image, tile).
inline int64_t fields_partial_rows(const FieldGeometry& geo) {
  return geo.batch * tiling(geo.height, geo.width).count();
}

// Shared memory of the pooling window sums: a halo tile (tile + radius on every side) and its
// horizontal sums (halo rows x tile columns).
PP_HOST_DEVICE inline int64_t window_shared_elems(const FieldGeometry& geo) {
  if (geo.radius == 0) return 0;
  const Tiling t = tiling(geo.height, geo.width);
  const int64_t halo_h = t.tile_h + 2 * geo.radius, halo_w = t.tile_w + 2 * geo.radius;
  return halo_h * halo_w + halo_h * t.tile_w;
}

// Input columns one prefilter tile reads, and output rows one adjoint tile receives from (the kernels'
// shared-memory tiles).
PP_HOST_DEVICE inline int64_t prefilter_span_w(const PrefilterGeometry& g, int tile_w) {
  return int64_t(tile_w - 1) * g.stride_w + int64_t(g.pull_w - 1) * g.dil_w + 1;
}
PP_HOST_DEVICE inline int64_t adjoint_span_h(const PrefilterGeometry& g, int tile_h) {
  return (int64_t(tile_h - 1) + int64_t(g.pull_h - 1) * g.dil_h) / g.stride_h + 1;
}

// Bytes of shared memory per block. The callers check them against kMaxSharedBytes (the limit
// without opt-in on every architecture) and take another path above it.
constexpr int64_t kMaxSharedBytes = 48 * 1024;
inline int64_t epilogue_shared_bytes(const FieldGeometry& geo, int64_t acc_size) {
  return window_shared_elems(geo) * acc_size;
}
inline int64_t fields_shared_bytes(const FieldGeometry& geo, int64_t acc_size) {
  return (window_shared_elems(geo) + 3 * kThreads) * acc_size;  // + the three block reductions
}
inline int64_t prefilter_shared_bytes(const PrefilterGeometry& g, int64_t acc_size) {
  const Tiling out = tiling(g.out_height, g.out_width), in = tiling(g.height, g.width);
  const int64_t forward = int64_t(g.kernel_h) * out.tile_h * prefilter_span_w(g, out.tile_w);
  const int64_t adjoint = int64_t(g.kernel_h) * adjoint_span_h(g, in.tile_h) * in.tile_w;
  return (forward > adjoint ? forward : adjoint) * acc_size;
}

template <typename scalar_t>
const char* launch_forward_epilogue(const EpilogueArgs<scalar_t>& args, cudaStream_t stream);
template <typename scalar_t>
const char* launch_backward_fields(const FieldsArgs<scalar_t>& args, cudaStream_t stream);
template <typename acc_t>
const char* launch_prefilter(const PrefilterArgs<acc_t>& args, cudaStream_t stream);
template <typename acc_t>
const char* launch_prefilter_adjoint(const PrefilterArgs<acc_t>& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace pushpull
