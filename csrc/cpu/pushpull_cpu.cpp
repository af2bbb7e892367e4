// CPU kernels of pushpull::forward / pushpull::backward.
//
// Neither pull kernel costs a second full convolution (README.md, "How it is fast"):
//   invert:   R = shift[o] * S - P0, with S the per-group box sum of the input (a 1-channel conv);
//   upsample: R = k @ z (shared weight matrix), z = separable prefilter of the input (rows, cols);
//   scale 1:  R = -P0.
// Upsample at stride 1 runs one image per task on a "gapped" layout (GappedPlanes) with the dense loops
// of tap_kernels.h, by one of two routes chosen by cost: the tap path (Y = W @ x per kernel tap, then
// shifts and separable filters per OUTPUT channel) or the input-side prefilter (per INPUT channel).
// Strided upsample runs ImagePath (per image, panel-packed operands) or, from 32 output channels per
// group, ATen's products on the batch; invert and negate use ATen's convolutions.
// One fused pass per (image, 8 channels) then does the pooling, ReLUs, alpha, biases and packs the ReLU
// masks 8 channels per byte. Backward reads only the masks, forms the masked gradient fields in one
// pass and runs the transposed maps; a trainable alpha recomputes the pull response.
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../common/aten_algebra.h"
#include "../pushpull.h"
#include "panel_gemm.h"
#include "tap_kernels.h"

namespace pushpull {
namespace {

// The per-plane loops below are compiled twice, for AVX2 and for the build's baseline, and the
// loader picks one by the CPU (an ifunc); ATen's own kernels dispatch on the CPU in the same spirit.
#if defined(__linux__) && defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PUSHPULL_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define PUSHPULL_CPU_CLONES
#endif

// ---- upsample: q[o, c] = -rows @ k[o, c] @ cols^T, so conv(x, q)[o] = sum_{c,i,j} k[o,c,i,j] z[c,i,j] with
// z[c,i,j] = conv(x[c], -rows[:, i] cols[:, j]^T): a separable prefilter of each input plane, after which
// push and pull share the weight matrix [C_out, C_in/groups * kh * kw].

// Index math shared by the prefilter and its adjoint: output row ho with tap a reads input row
// ho * stride + a * dilation - pull_padding (zero outside [0, H)). Columns go through a zero-padded
// row of `padded_width` entries whose entry wp is input column wp - pad_w, so that the inner loops
// over output columns have no bounds test and vectorize.
struct PrefilterGeometry {
  int64_t height, width, out_height, out_width, kernel_h, kernel_w, pull_h, pull_w;
  int64_t stride_h, stride_w, dil_h, dil_w, pad_h, pad_w;
  int64_t in_row(int64_t ho, int64_t a) const { return ho * stride_h + a * dil_h - pad_h; }
  int64_t padded_width() const {
    return std::max((out_width - 1) * stride_w + (pull_w - 1) * dil_w + 1, pad_w + width);
  }
  // the vertical pass [kh, Ho, padded_width], then one [Ho, padded_width] block of the horizontal one
  int64_t tmp_size() const { return (kernel_h + 1) * out_height * padded_width(); }
};

PrefilterGeometry prefilter_geometry(const Geometry& geo, const ConvArgs& c, const at::Tensor& rows,
                                     const at::Tensor& cols) {
  return {geo.height,    geo.width,     geo.out_height,    geo.out_width,    geo.kernel_h,
          geo.kernel_w,  rows.size(0),  cols.size(0),      c.stride[0],      c.stride[1],
          c.dilation[0], c.dilation[1], c.pull_padding[0], c.pull_padding[1]};
}

// out[k] = sum_b taps[b * tap_stride] * line[k + b * dilation] for k < length, skipping zero taps. Eight
// outputs at a time stay in registers over all taps (the fixed 8-lane loop is what the compiler
// vectorizes); the tail goes one by one. Pull kernels wider than kMaxTaps go tap by tap.
template <typename acc_t>
PUSHPULL_CPU_CLONES void filter_line(const acc_t* __restrict__ line, int64_t length, const acc_t* taps,
                                     int64_t tap_stride, int64_t n_taps, int64_t dilation, acc_t* __restrict__ out) {
  constexpr int64_t kMaxTaps = 32;
  if (n_taps > kMaxTaps) {
    std::fill(out, out + length, acc_t(0));
    for (int64_t b = 0; b < n_taps; ++b) {
      const acc_t v = taps[b * tap_stride];
      for (int64_t k = 0; k < length; ++k) out[k] += v * line[k + b * dilation];
    }
    return;
  }
  acc_t weights[kMaxTaps];
  int64_t offsets[kMaxTaps], used = 0;
  for (int64_t b = 0; b < n_taps; ++b) {
    const acc_t v = taps[b * tap_stride];
    if (v != acc_t(0)) weights[used] = v, offsets[used++] = b * dilation;
  }
  int64_t k = 0;
  for (; k + 8 <= length; k += 8) {
    acc_t acc[8] = {};
    for (int64_t t = 0; t < used; ++t) {
      const acc_t* __restrict__ src = line + k + offsets[t];
      for (int l = 0; l < 8; ++l) acc[l] += weights[t] * src[l];
    }
    for (int l = 0; l < 8; ++l) out[k + l] = acc[l];
  }
  for (; k < length; ++k) {
    acc_t acc = 0;
    for (int64_t t = 0; t < used; ++t) acc += weights[t] * line[k + offsets[t]];
    out[k] = acc;
  }
}

// One plane: x [H, W] -> z [kh * kw, Ho, Wo] for the output rows [ho_begin, ho_end), handed over one
// row at a time as emit(tap, ho, row of Wo values); tmp holds the vertical pass [kh, Ho, padded_width].
template <typename scalar_t, typename acc_t, typename Emit>
PUSHPULL_CPU_CLONES void prefilter_plane(const PrefilterGeometry& g, const acc_t* rows, const acc_t* cols,
                                         const scalar_t* __restrict__ x, int64_t ho_begin, int64_t ho_end,
                                         acc_t* __restrict__ tmp, acc_t* __restrict__ row_acc, Emit emit) {
  const int64_t wp = g.padded_width();
  for (int64_t i = 0; i < g.kernel_h; ++i) {
    std::fill(tmp + (i * g.out_height + ho_begin) * wp, tmp + (i * g.out_height + ho_end) * wp, acc_t(0));
    for (int64_t ho = ho_begin; ho < ho_end; ++ho) {
      acc_t* __restrict__ t = tmp + (i * g.out_height + ho) * wp + g.pad_w;
      for (int64_t a = 0; a < g.pull_h; ++a) {
        const int64_t h = g.in_row(ho, a);
        if (h < 0 || h >= g.height) continue;
        const acc_t u = -rows[a * g.kernel_h + i];
        if (u == acc_t(0)) continue;  // bilinear interpolation matrices are half zeros
        const scalar_t* __restrict__ xr = x + h * g.width;
        for (int64_t w = 0; w < g.width; ++w) t[w] += u * static_cast<acc_t>(xr[w]);
      }
    }
  }
  if (g.stride_w == 1) {
    // The kh x Ho rows of the vertical pass, wp apart, read as ONE line per i: output (ho, wo) of tap
    // column j is then sum_b v[b] * line[ho * wp + wo + b * dw], a 1-D filter over the whole block with
    // no per-row loop overhead (the values at wo >= Wo are not used). `out` is the block after tmp.
    acc_t* __restrict__ out = tmp + g.kernel_h * g.out_height * wp;
    const int64_t length = (ho_end - ho_begin - 1) * wp + g.out_width;
    for (int64_t i = 0; i < g.kernel_h; ++i) {
      const acc_t* __restrict__ line = tmp + (i * g.out_height + ho_begin) * wp;
      for (int64_t j = 0; j < g.kernel_w; ++j) {
        filter_line(line, length, cols + j, g.kernel_w, g.pull_w, g.dil_w, out);
        for (int64_t ho = ho_begin; ho < ho_end; ++ho) {
          emit(i * g.kernel_w + j, ho, static_cast<const acc_t*>(out + (ho - ho_begin) * wp));
        }
      }
    }
    return;
  }
  for (int64_t i = 0; i < g.kernel_h; ++i) {
    for (int64_t ho = ho_begin; ho < ho_end; ++ho) {
      const acc_t* __restrict__ t = tmp + (i * g.out_height + ho) * wp;
      for (int64_t j = 0; j < g.kernel_w; ++j) {
        std::fill(row_acc, row_acc + g.out_width, acc_t(0));
        for (int64_t b = 0; b < g.pull_w; ++b) {
          const acc_t v = cols[b * g.kernel_w + j];
          if (v == acc_t(0)) continue;
          const acc_t* __restrict__ tb = t + b * g.dil_w;
          for (int64_t wo = 0; wo < g.out_width; ++wo) row_acc[wo] += v * tb[wo * g.stride_w];
        }
        emit(i * g.kernel_w + j, ho, static_cast<const acc_t*>(row_acc));
      }
    }
  }
}

// Adjoint of prefilter_plane: gz [kh * kw, Ho, Wo] -> gx [H, W] (overwritten); tmp as above,
// row_acc holds one input plane [H, W].
template <typename scalar_t, typename acc_t>
PUSHPULL_CPU_CLONES void prefilter_adjoint_plane(const PrefilterGeometry& g, const acc_t* rows, const acc_t* cols,
                                                 const scalar_t* __restrict__ gz, int64_t tap_stride,
                                                 acc_t* __restrict__ tmp, scalar_t* __restrict__ gx,
                                                 acc_t* __restrict__ plane_acc) {
  const int64_t wp = g.padded_width();
  std::fill(tmp, tmp + g.tmp_size(), acc_t(0));
  for (int64_t i = 0; i < g.kernel_h; ++i) {
    for (int64_t ho = 0; ho < g.out_height; ++ho) {
      acc_t* __restrict__ t = tmp + (i * g.out_height + ho) * wp;
      for (int64_t j = 0; j < g.kernel_w; ++j) {
        const scalar_t* __restrict__ zr = gz + (i * g.kernel_w + j) * tap_stride + ho * g.out_width;
        for (int64_t b = 0; b < g.pull_w; ++b) {
          const acc_t v = cols[b * g.kernel_w + j];
          if (v == acc_t(0)) continue;
          acc_t* __restrict__ tb = t + b * g.dil_w;
          for (int64_t wo = 0; wo < g.out_width; ++wo) tb[wo * g.stride_w] += v * static_cast<acc_t>(zr[wo]);
        }
      }
    }
  }
  std::fill(plane_acc, plane_acc + g.height * g.width, acc_t(0));
  for (int64_t i = 0; i < g.kernel_h; ++i) {
    for (int64_t ho = 0; ho < g.out_height; ++ho) {
      const acc_t* __restrict__ t = tmp + (i * g.out_height + ho) * wp + g.pad_w;
      for (int64_t a = 0; a < g.pull_h; ++a) {
        const int64_t h = g.in_row(ho, a);
        if (h < 0 || h >= g.height) continue;
        const acc_t u = -rows[a * g.kernel_h + i];
        if (u == acc_t(0)) continue;
        acc_t* __restrict__ out = plane_acc + h * g.width;
        for (int64_t w = 0; w < g.width; ++w) out[w] += u * t[w];
      }
    }
  }
  for (int64_t p = 0; p < g.height * g.width; ++p) gx[p] = static_cast<scalar_t>(plane_acc[p]);
}

// z: [C_in * kh * kw, N, Ho * Wo], rows ordered (c, i, j) like the weight's flattening, so that each
// group's pull response is ONE matrix product over all images (see pull_from_prefilter).
struct PrefilterLayout {
  int64_t in_channels, taps, batch, out_plane;
  int64_t tap_stride() const { return batch * out_plane; }
  // input plane (n, c), numbered n * C_in + c -> its first tap row in z (rows c * taps.., column block n)
  int64_t offset(int64_t plane) const {
    return ((plane % in_channels) * taps * batch + plane / in_channels) * out_plane;
  }
};

PrefilterLayout prefilter_layout(const Geometry& geo) {
  return {geo.in_channels, geo.kernel_h * geo.kernel_w, geo.batch, geo.out_height * geo.out_width};
}

// Runs plane_fn(plane, rows, cols, tmp, scratch) over the N * C_in input planes in parallel, with the
// interpolation matrices in the accumulation type and per-thread buffers (scratch: scratch_size).
template <typename scalar_t, typename PlaneFn>
void for_each_input_plane(const Geometry& geo, const PrefilterGeometry& g, const at::Tensor& rows,
                          const at::Tensor& cols, int64_t scratch_size, PlaneFn plane_fn) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto r = rows.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  const auto k = cols.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  at::parallel_for(0, geo.batch * geo.in_channels, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> tmp(g.tmp_size()), scratch(scratch_size);
    for (int64_t plane = begin; plane < end; ++plane) {
      plane_fn(plane, r.template data_ptr<acc_t>(), k.template data_ptr<acc_t>(), tmp.data(), scratch.data());
    }
  });
}

at::Tensor prefilter(const at::Tensor& x, const at::Tensor& rows, const at::Tensor& cols, const Geometry& geo,
                     const ConvArgs& c) {
  const auto g = prefilter_geometry(geo, c, rows, cols);
  const auto layout = prefilter_layout(geo);
  auto z = at::empty({geo.in_channels * layout.taps, geo.batch, layout.out_plane}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pushpull_prefilter", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* zp = z.data_ptr<scalar_t>();
    for_each_input_plane<scalar_t>(
        geo, g, rows, cols, geo.out_width, [&](int64_t plane, auto r, auto k, auto tmp, auto row_acc) {
          scalar_t* z_plane = zp + layout.offset(plane);
          prefilter_plane(g, r, k, xp + plane * geo.height * geo.width, 0, geo.out_height, tmp, row_acc,
                          [&](int64_t tap, int64_t ho, auto row) {
                            std::copy(row, row + geo.out_width,
                                      z_plane + tap * layout.tap_stride() + ho * geo.out_width);
                          });
        });
  });
  return z;
}

at::Tensor prefilter_adjoint(const at::Tensor& grad_z, const at::Tensor& rows, const at::Tensor& cols,
                             const Geometry& geo, const ConvArgs& c) {
  const auto g = prefilter_geometry(geo, c, rows, cols);
  const auto layout = prefilter_layout(geo);
  const auto gz = grad_z.contiguous();
  auto gx = at::empty({geo.batch, geo.in_channels, geo.height, geo.width}, gz.options());
  AT_DISPATCH_FLOATING_TYPES(gz.scalar_type(), "pushpull_prefilter_adjoint", [&] {
    const scalar_t* gzp = gz.data_ptr<scalar_t>();
    scalar_t* gxp = gx.data_ptr<scalar_t>();
    const int64_t plane_size = geo.height * geo.width;
    for_each_input_plane<scalar_t>(geo, g, rows, cols, plane_size,
                                   [&](int64_t plane, auto r, auto k, auto tmp, auto acc) {
                                     prefilter_adjoint_plane(g, r, k, gzp + layout.offset(plane), layout.tap_stride(),
                                                             tmp, gxp + plane * plane_size, acc);
                                   });
  });
  return gx;
}

// The push weight as one matrix per group, [groups, C_out/groups, C_in/groups * kh * kw].
at::Tensor grouped_weight(const at::Tensor& weight, int64_t groups) {
  return weight.reshape({groups, weight.size(0) / groups, -1});
}

// conv(x, q) = W_g @ z_g per group: [C_out, N, Ho * Wo] ("channel-major"; see PlaneInputs::pull_plane).
at::Tensor pull_from_prefilter(const at::Tensor& z, const at::Tensor& weight, const Geometry& geo) {
  const auto w_g = grouped_weight(weight, geo.groups);  // explicit sizes: -1 is ambiguous for an empty batch
  return at::matmul(w_g, z.view({geo.groups, w_g.size(2), geo.batch * geo.out_height * geo.out_width}))
      .view({geo.out_channels, geo.batch, geo.out_height * geo.out_width});
}

// The prefilter and matrix product beat oneDNN's direct convolution with the larger pull kernel only
// when the product has enough rows: on the 2-core AMD EPYC of benchmarks/results/cpu-2core, 64 output
// channels per group won (imagenet-b1-2020) and 16 lost (cifar-b1-2020). Below the threshold the pull
// kernel q = -rows @ k @ cols^T is formed and convolved directly.
constexpr int64_t kMinChannelsForPrefilter = 32;

bool use_prefilter(const Geometry& geo) {
  return geo.pull == PullKind::kSeparable && geo.out_channels / geo.groups >= kMinChannelsForPrefilter;
}

// Whether every value is finite: x - x is 0 for a finite x and NaN for NaN or +-Inf. Eight partial sums
// so that the loop vectorizes (their order does not matter: any NaN stays NaN).
template <typename T>
bool all_finite(const T* values, int64_t count) {
  std::atomic<bool> finite{true};
  at::parallel_for(0, count, 1 << 16, [&](int64_t begin, int64_t end) {
    T acc[8] = {};
    int64_t i = begin;
    for (; i + 8 <= end; i += 8)
      for (int l = 0; l < 8; ++l) acc[l] += values[i + l] - values[i + l];
    for (; i < end; ++i) acc[0] += values[i] - values[i];
    for (int l = 0; l < 8; ++l)
      if (acc[l] != T(0)) finite = false;
  });
  return finite;
}

bool all_finite(const at::Tensor& t) {
  bool finite = true;
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "pushpull_all_finite",
                             [&] { finite = all_finite(t.const_data_ptr<scalar_t>(), t.numel()); });
  return finite;
}

// The CPU side of the shared algebra: the batched prefilter and ONE matrix product per group.
class CpuBackend : public AtenBackend {
 public:
  bool prefilter_pays(const Geometry& geo, const ConvArgs&, const at::Tensor&, const at::Tensor&) const override {
    return use_prefilter(geo);
  }

  at::Tensor prefilter_pull(const at::Tensor& x, const at::Tensor& w, const at::Tensor& rows, const at::Tensor& cols,
                            const Geometry& geo, const ConvArgs& c) const override {
    return pull_from_prefilter(prefilter(x, rows, cols, geo, c), w, geo);
  }
  bool prefilter_pull_is_channel_major() const override { return true; }

  // R = W_g @ z per group, so dW += gR @ z^T and dz = W_g^T @ gR (then the prefilter's adjoint).
  std::pair<at::Tensor, at::Tensor> prefilter_pull_backward(const at::Tensor& grad_pull, const at::Tensor& x,
                                                            const at::Tensor& w, const at::Tensor& rows,
                                                            const at::Tensor& cols, const Geometry& geo,
                                                            const ConvArgs& c, bool need_x,
                                                            bool need_w) const override {
    const int64_t pixels = geo.batch * geo.out_height * geo.out_width;
    const auto grad_r = grad_pull.view({geo.groups, geo.out_channels / geo.groups, pixels});
    const auto w_g = grouped_weight(w, geo.groups);
    at::Tensor grad_x, grad_w;
    if (need_w) {
      const auto z = prefilter(x, rows, cols, geo, c).view({geo.groups, w_g.size(2), pixels});
      grad_w = at::matmul(grad_r, z.transpose(-1, -2)).view(w.sizes());
    }
    if (need_x) grad_x = prefilter_adjoint(at::matmul(w_g.transpose(-1, -2), grad_r), rows, cols, geo, c);
    return {grad_x, grad_w};
  }
};

// ---------------------------------------------------------------- fused per-plane passes

// Clipped box window along one axis for the average pooling (count_include_pad=False).
struct Window {
  int64_t radius;
  int64_t lo(int64_t i) const { return std::max<int64_t>(i - radius, 0); }
  int64_t hi(int64_t i, int64_t n) const { return std::min<int64_t>(i + radius, n - 1); }
};

// out[h, w] = sum of in over the clipped (2r+1)^2 window around (h, w), divided by the number of
// valid positions when `average`; tmp is scratch of the plane's size. Row-wise loops over shifted
// ranges (no bounds test inside) so that they vectorize.
template <typename acc_t>
PUSHPULL_CPU_CLONES void box_filter(const acc_t* __restrict__ in, acc_t* __restrict__ tmp, acc_t* __restrict__ out,
                                    int64_t height, int64_t width, int64_t radius, bool average) {
  std::fill(tmp, tmp + height * width, acc_t(0));
  for (int64_t h = 0; h < height; ++h) {
    const acc_t* __restrict__ row = in + h * width;
    acc_t* __restrict__ sum = tmp + h * width;
    for (int64_t dw = -radius; dw <= radius; ++dw) {
      const int64_t lo = std::max<int64_t>(0, -dw), hi = std::min<int64_t>(width, width - dw);
      for (int64_t w = lo; w < hi; ++w) sum[w] += row[w + dw];
    }
  }
  const Window win{radius};
  for (int64_t h = 0; h < height; ++h) {
    acc_t* __restrict__ o = out + h * width;
    std::fill(o, o + width, acc_t(0));
    for (int64_t u = win.lo(h); u <= win.hi(h, height); ++u) {
      const acc_t* __restrict__ sum = tmp + u * width;
      for (int64_t w = 0; w < width; ++w) o[w] += sum[w];
    }
    if (!average) continue;
    const int64_t rows = win.hi(h, height) - win.lo(h) + 1;
    for (int64_t w = 0; w < width; ++w) o[w] /= static_cast<acc_t>(rows * (win.hi(w, width) - win.lo(w) + 1));
  }
}

// Divides each value by the size of its clipped pooling window (first half of the pooling adjoint).
template <typename acc_t>
void divide_by_window_count(acc_t* values, int64_t height, int64_t width, int64_t radius) {
  const Window win{radius};
  for (int64_t h = 0; h < height; ++h) {
    const int64_t rows = win.hi(h, height) - win.lo(h) + 1;
    for (int64_t w = 0; w < width; ++w)
      values[h * width + w] /= static_cast<acc_t>(rows * (win.hi(w, width) - win.lo(w) + 1));
  }
}

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

  // Q' of channel o of image n into `q` (tmp, pooled: scratch of one plane each).
  void pull_response(int64_t n, int64_t o, acc_t* q, acc_t* tmp, acc_t* pooled) const {
    const scalar_t* p0 = push0.plane(n, o);
    const scalar_t* r0 = pull0 ? pull0.plane(n, o) : nullptr;
    const int64_t g = o / (geo.out_channels / geo.groups);
    const scalar_t* s = box ? box + (n * geo.groups + g) * plane : nullptr;
    const acc_t m = shift ? static_cast<acc_t>(shift[o]) : acc_t(0), b = bias(o);
    if (r0) {
      for (int64_t p = 0; p < plane; ++p) q[p] = static_cast<acc_t>(r0[p]) - b;
    } else {
      for (int64_t p = 0; p < plane; ++p) q[p] = -static_cast<acc_t>(p0[p]) - b;
    }
    if (s) {
      for (int64_t p = 0; p < plane; ++p) q[p] += m * static_cast<acc_t>(s[p]);
    }
    if (geo.avg_kernel > 1) {
      box_filter(q, tmp, pooled, geo.out_height, geo.out_width, (geo.avg_kernel - 1) / 2, true);
      std::copy(pooled, pooled + plane, q);
    }
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

// Per-thread scratch of the epilogues: a few planes in the accumulation type.
template <typename acc_t>
struct PlaneScratch {
  std::vector<acc_t> q, tmp, pooled, grad;
  explicit PlaneScratch(int64_t plane) : q(plane), tmp(plane), pooled(plane), grad(plane) {}
};

template <typename scalar_t>
struct ForwardOutputs {
  const scalar_t *alpha, *bias_out;
  scalar_t* y;
  uint8_t* masks;  // nullptr when they are not saved
};

// Output and masks of image n, channels 8 * octet .. 8 * octet + 7, from the responses of image n_in of
// `in` (n itself, or 0 for a one-image workspace). Each mask byte has a single writer.
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
  if (out.masks) std::fill(mask_p, mask_p + plane, 0), std::fill(mask_q, mask_q + plane, 0);
  // NaN propagates through the ReLUs as in torch.relu (v < 0 is false for NaN), and its mask bit is set
  // as torch's ReLU backward passes the gradient wherever !(v <= 0).
  auto relu = [](acc_t v) { return v < acc_t(0) ? acc_t(0) : v; };
  for (int64_t o = octet * 8; o < std::min(octet * 8 + 8, geo.out_channels); ++o) {
    in.pull_response(n_in, o, scratch.q.data(), scratch.tmp.data(), scratch.pooled.data());
    const scalar_t* p0 = in.push0.plane(n_in, o);
    const acc_t b = in.bias(o), a = static_cast<acc_t>(out.alpha[o]);
    const acc_t bo = out.bias_out ? static_cast<acc_t>(out.bias_out[o]) : acc_t(0);
    scalar_t* y_push = out.y + (n * out_c + o) * plane;
    scalar_t* y_pull = geo.dual_output ? out.y + (n * out_c + geo.out_channels + o) * plane : nullptr;
    const acc_t* __restrict__ pull = scratch.q.data();
    if (y_pull) {
      for (int64_t p = 0; p < plane; ++p) {
        y_push[p] = static_cast<scalar_t>(relu(static_cast<acc_t>(p0[p]) + b));
        y_pull[p] = static_cast<scalar_t>(relu(pull[p]));
      }
    } else {
      for (int64_t p = 0; p < plane; ++p) {
        y_push[p] = static_cast<scalar_t>(relu(static_cast<acc_t>(p0[p]) + b) - a * relu(pull[p]) + bo);
      }
    }
    if (out.masks) {
      const uint8_t bit = static_cast<uint8_t>(1u << (o % 8));
      for (int64_t p = 0; p < plane; ++p) {
        mask_p[p] |= (static_cast<acc_t>(p0[p]) + b <= acc_t(0)) ? uint8_t(0) : bit;
        mask_q[p] |= (pull[p] <= acc_t(0)) ? uint8_t(0) : bit;
      }
    }
  }
}

template <typename scalar_t>
ForwardOutputs<scalar_t> forward_outputs(const OptTensor& bias_out, const at::Tensor& alpha, at::Tensor& out,
                                         uint8_t* masks) {
  return {alpha.const_data_ptr<scalar_t>(), bias_out ? bias_out->const_data_ptr<scalar_t>() : nullptr,
          out.data_ptr<scalar_t>(), masks};
}

template <typename scalar_t>
void forward_epilogue(const PlaneInputs<scalar_t>& in, const ForwardOutputs<scalar_t>& out) {
  const Geometry& geo = in.geo;
  const int64_t octets = (geo.out_channels + 7) / 8;
  at::parallel_for(0, geo.batch * octets, 1, [&](int64_t begin, int64_t end) {
    PlaneScratch<at::opmath_type<scalar_t>> scratch(in.plane);
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
  scalar_t* grad_box;  // [N, groups, plane]
  acc_t *shift_part, *bias_part, *alpha_part;
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
          acc_ptr(f.parts.alpha)};
}

// sum_p a[p] * b[p] (b == nullptr: sum_p a[p]) in eight interleaved partial sums: the loop vectorizes
// and the order is fixed, so the result is deterministic.
template <typename acc_t, typename T>
inline acc_t lane_dot(const acc_t* __restrict__ a, const T* __restrict__ b, int64_t n) {
  acc_t lanes[8] = {};
  int64_t p = 0;
  if (b) {
    for (; p + 8 <= n; p += 8)
      for (int l = 0; l < 8; ++l) lanes[l] += a[p + l] * static_cast<acc_t>(b[p + l]);
  } else {
    for (; p + 8 <= n; p += 8)
      for (int l = 0; l < 8; ++l) lanes[l] += a[p + l];
  }
  for (; p < n; ++p) lanes[0] += b ? a[p] * static_cast<acc_t>(b[p]) : a[p];
  acc_t sum = 0;
  for (int l = 0; l < 8; ++l) sum += lanes[l];
  return sum;
}

// out[p] = scale * g[p] where the mask bit is set, else 0 (also for a NaN g: ReLU' is 0 there, as in torch).
template <typename acc_t, typename T>
inline void masked_gradient(const uint8_t* __restrict__ mask, uint8_t bit, const T* __restrict__ g, acc_t scale,
                            int64_t n, acc_t* __restrict__ out) {
  // Branch-free, so that it vectorizes: the value's bits AND all-ones (bit set) or zero (+0.0).
  using bits_t = std::conditional_t<sizeof(acc_t) == 8, uint64_t, uint32_t>;
  static_assert(sizeof(bits_t) == sizeof(acc_t));
  for (int64_t p = 0; p < n; ++p) {
    const acc_t value = scale * static_cast<acc_t>(g[p]);
    const bits_t keep = bits_t(0) - static_cast<bits_t>((mask[p] & bit) != 0);
    bits_t v;
    std::memcpy(&v, &value, sizeof v);
    v &= keep;
    std::memcpy(&out[p], &v, sizeof v);
  }
}

// What the backward epilogue reads besides the responses.
template <typename scalar_t>
struct BackwardInputs {
  const scalar_t *grad_out, *alpha;
  const uint8_t* masks;
  bool recompute_pull;  // for the alpha gradient
};

// Gradient fields of image n, group grp (n_in: its index in `in`; see forward_epilogue_octet). One task
// per (image, group), so the group's box-sum gradient has a single writer.
template <typename scalar_t>
PUSHPULL_CPU_CLONES void backward_epilogue_group(const PlaneInputs<scalar_t>& in, int64_t n_in, int64_t n, int64_t grp,
                                                 const BackwardInputs<scalar_t>& bin,
                                                 const BackwardOutputs<scalar_t>& f,
                                                 PlaneScratch<at::opmath_type<scalar_t>>& scratch,
                                                 std::vector<at::opmath_type<scalar_t>>& box_grad) {
  using acc_t = at::opmath_type<scalar_t>;
  const Geometry& geo = in.geo;
  const int64_t plane = in.plane, octets = (geo.out_channels + 7) / 8, per_group = geo.out_channels / geo.groups;
  const int64_t out_c = geo.dual_output ? 2 * geo.out_channels : geo.out_channels, radius = (geo.avg_kernel - 1) / 2;
  acc_t* gq = scratch.grad.data();
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
      in.pull_response(n_in, o, q, scratch.tmp.data(), scratch.pooled.data());
      for (int64_t p = 0; p < plane; ++p) q[p] = q[p] < acc_t(0) ? acc_t(0) : q[p];  // ReLU, NaN kept
      f.alpha_part[no] = -lane_dot(q, g_p, plane);
    }
    acc_t* gp = scratch.q.data();
    masked_gradient(mask_q, bit, g_q, pull_scale, plane, gq);
    if (geo.avg_kernel > 1) {
      // Adjoint of the average: divide by each output's window count, then sum over the same windows.
      divide_by_window_count(gq, geo.out_height, geo.out_width, radius);
      box_filter(gq, scratch.tmp.data(), scratch.pooled.data(), geo.out_height, geo.out_width, radius, false);
      std::copy(scratch.pooled.begin(), scratch.pooled.end(), gq);
    }
    masked_gradient(mask_p, bit, g_p, acc_t(1), plane, gp);
    const scalar_t* s = in.box ? in.box + (n_in * geo.groups + grp) * plane : nullptr;
    const acc_t m = in.shift ? static_cast<acc_t>(in.shift[o]) : acc_t(0);
    // One simple loop per output, so that each vectorizes.
    if (f.grad_push0) {
      scalar_t* g_push = f.grad_push0.plane(n_in, o);
      if (geo.pull != PullKind::kSeparable) {  // the pull goes through the push response (R = -P0 + ...)
        for (int64_t p = 0; p < plane; ++p) g_push[p] = static_cast<scalar_t>(gp[p] - gq[p]);
      } else {
        for (int64_t p = 0; p < plane; ++p) g_push[p] = static_cast<scalar_t>(gp[p]);
      }
    }
    if (f.grad_pull0) {
      scalar_t* g_pull = f.grad_pull0.plane(n_in, o);
      for (int64_t p = 0; p < plane; ++p) g_pull[p] = static_cast<scalar_t>(gq[p]);
    }
    if (f.grad_box) {
      for (int64_t p = 0; p < plane; ++p) box_grad[p] += m * gq[p];
    }
    const acc_t sum_gp = f.bias_part ? lane_dot(gp, static_cast<const acc_t*>(nullptr), plane) : acc_t(0);
    const acc_t sum_gq = f.bias_part ? lane_dot(gq, static_cast<const acc_t*>(nullptr), plane) : acc_t(0);
    const acc_t sum_gq_box = (s && f.shift_part) ? lane_dot(gq, s, plane) : acc_t(0);
    if (f.bias_part) f.bias_part[no] = sum_gp - sum_gq;
    if (f.shift_part) f.shift_part[no] = sum_gq_box;
  }
  if (f.grad_box) {
    scalar_t* out = f.grad_box + (n * geo.groups + grp) * plane;
    for (int64_t p = 0; p < plane; ++p) out[p] = static_cast<scalar_t>(box_grad[p]);
  }
}

template <typename scalar_t>
void backward_epilogue(const PlaneInputs<scalar_t>& in, const BackwardInputs<scalar_t>& bin,
                       const BackwardOutputs<scalar_t>& f) {
  const Geometry& geo = in.geo;
  at::parallel_for(0, geo.batch * geo.groups, 1, [&](int64_t begin, int64_t end) {
    PlaneScratch<at::opmath_type<scalar_t>> scratch(in.plane);
    std::vector<at::opmath_type<scalar_t>> box_grad(f.grad_box ? in.plane : 0);
    for (int64_t task = begin; task < end; ++task) {
      backward_epilogue_group(in, task / geo.groups, task / geo.groups, task % geo.groups, bin, f, scratch, box_grad);
    }
  });
}

// ---------------------------------------------------------------- upsample, one image at a time

// The upsample pull with the prefilter algebra, one image per task, everything in cache: for each group
// the input's im2col and its prefilter z are packed as panels (panel_gemm.h), and ONE weight matrix
// W_g [C_out/groups, K], K = C_in/groups * kh * kw, multiplies both: P0 = W_g @ im2col, R = W_g @ z. The
// epilogue then reads P0 and R from the workspace. Backward, per image: dW += gP @ im2col^T + gR @ z^T
// (partial sums per image, added in a fixed order), dx = col2im(W_g^T @ gP) + prefilter^T(W_g^T @ gR).
template <typename scalar_t>
struct ImageWorkspace {
  std::vector<scalar_t> cols, z;              // packed operands of a block of rows, group g at g * operand_size
  std::vector<scalar_t> push, pull;           // [C_out, field_ld]: responses, then their gradients
  std::vector<scalar_t> packed_grad;          // one group's gradient field, packed
  std::vector<scalar_t> tap_rows;             // one channel's im2col or prefilter [taps, block pixels]
  std::vector<scalar_t> grad_rows;            // W_g^T @ (a gradient field) [K, padded]
  std::vector<scalar_t> prefilter_tmp, line;  // line: one output row, or one input plane (adjoint)
};

// Packed operands of this many bytes per block of output rows (both of them) stay in the 512 KiB L2 of
// the CPU the path was tuned on (benchmarks/results/cpu-2core) while the products read them.
constexpr int64_t kOperandBlockBytes = 256 * 1024;

template <typename scalar_t>
struct ImagePath {
  const Geometry& geo;
  const ConvArgs& conv;
  PrefilterGeometry pre;
  const scalar_t *rows, *cols;  // interpolation matrices, contiguous
  const scalar_t* weight;       // [C_out, K]
  int64_t plane, padded, taps, in_per_group, out_per_group, k_size;
  int64_t block_rows;  // output rows packed at a time (forward; backward packs whole planes)
  int64_t field_ld;    // row stride of the push/pull fields: a block's product may write 23 past it

  // `blocked`: pack blocks of rows (forward) rather than whole planes (backward).
  ImagePath(const Geometry& g, const ConvArgs& c, const at::Tensor& r, const at::Tensor& k, const at::Tensor& w,
            bool blocked)
      : geo(g),
        conv(c),
        pre(prefilter_geometry(g, c, r, k)),
        rows(r.const_data_ptr<scalar_t>()),
        cols(k.const_data_ptr<scalar_t>()),
        weight(w.const_data_ptr<scalar_t>()),
        plane(g.out_height * g.out_width),
        padded(panel::padded(plane)),
        taps(g.kernel_h * g.kernel_w),
        in_per_group(g.in_channels / g.groups),
        out_per_group(g.out_channels / g.groups),
        k_size(in_per_group * taps),
        field_ld(plane + panel::kPanel) {
    const int64_t row_bytes = 2 * g.groups * k_size * g.out_width * static_cast<int64_t>(sizeof(scalar_t));
    block_rows = blocked ? std::clamp<int64_t>(kOperandBlockBytes / std::max<int64_t>(row_bytes, 1), 1, g.out_height)
                         : g.out_height;
  }

  int64_t operand_size() const { return k_size * panel::padded(block_rows * geo.out_width); }
  const scalar_t* weight_of(int64_t grp) const { return weight + grp * out_per_group * k_size; }

  ImageWorkspace<scalar_t> workspace() const {
    ImageWorkspace<scalar_t> ws;
    ws.cols.resize(geo.groups * operand_size());
    ws.z.resize(geo.groups * operand_size());
    ws.push.resize(geo.out_channels * field_ld);
    ws.pull.resize(geo.out_channels * field_ld);
    ws.packed_grad.resize(out_per_group * padded);
    ws.tap_rows.resize(taps * block_rows * geo.out_width);
    ws.grad_rows.resize(k_size * padded);
    ws.prefilter_tmp.resize(pre.tmp_size());
    ws.line.resize(std::max(geo.out_width, geo.height * geo.width));
    return ws;
  }

  // Valid output columns of tap column j: those reading an input column in [0, W).
  std::pair<int64_t, int64_t> valid_columns(int64_t j) const {
    const int64_t offset = j * conv.dilation[1] - conv.padding[1], s = conv.stride[1];
    const int64_t lo = offset >= 0 ? 0 : (-offset + s - 1) / s;
    const int64_t hi = geo.width - offset <= 0 ? 0 : std::min(geo.out_width, (geo.width - offset + s - 1) / s);
    return {lo, std::max(lo, hi)};
  }

  // im2col of output rows [ho_begin, ho_end) of one input plane, packed: row first_row + i * kw + j, pixel
  // (ho - ho_begin) * Wo + wo holds x[ho * sh + i * dh - ph, wo * sw + j * dw - pw] (0 outside the input).
  // One tap at a time goes through `row` (scratch), so that packing copies whole panels.
  void pack_im2col_plane(const scalar_t* x, int64_t ho_begin, int64_t ho_end, int64_t first_row, scalar_t* packed,
                         scalar_t* row) const {
    const int64_t pixels = (ho_end - ho_begin) * geo.out_width;
    for (int64_t i = 0; i < geo.kernel_h; ++i) {
      for (int64_t j = 0; j < geo.kernel_w; ++j) {
        const auto [lo, hi] = valid_columns(j);
        const int64_t offset = j * conv.dilation[1] - conv.padding[1], s = conv.stride[1];
        std::fill(row, row + pixels, scalar_t(0));
        for (int64_t ho = ho_begin; ho < ho_end; ++ho) {
          const int64_t h = ho * conv.stride[0] + i * conv.dilation[0] - conv.padding[0];
          if (h < 0 || h >= geo.height) continue;
          const scalar_t* x_row = x + h * geo.width + offset;
          scalar_t* out = row + (ho - ho_begin) * geo.out_width;
          for (int64_t wo = lo; wo < hi; ++wo) out[wo] = x_row[wo * s];
        }
        panel::pack_row(row, pixels, k_size, first_row + i * geo.kernel_w + j, packed);
      }
    }
  }

  // Adds the adjoint of pack_im2col_plane: gx[h, w] += the entries of grad (rows i * kw + j, row stride ld)
  // that read (h, w).
  void col2im_plane(const scalar_t* grad, int64_t ld, scalar_t* gx) const {
    for (int64_t i = 0; i < geo.kernel_h; ++i) {
      for (int64_t j = 0; j < geo.kernel_w; ++j) {
        const auto [lo, hi] = valid_columns(j);
        const int64_t offset = j * conv.dilation[1] - conv.padding[1], s = conv.stride[1];
        for (int64_t ho = 0; ho < geo.out_height; ++ho) {
          const int64_t h = ho * conv.stride[0] + i * conv.dilation[0] - conv.padding[0];
          if (h < 0 || h >= geo.height) continue;
          const scalar_t* src = grad + (i * geo.kernel_w + j) * ld + ho * geo.out_width;
          scalar_t* gx_row = gx + h * geo.width + offset;
          for (int64_t wo = lo; wo < hi; ++wo) gx_row[wo * s] += src[wo];
        }
      }
    }
  }

  // The packed im2col and prefilter operands of every group of image n, output rows [ho_begin, ho_end).
  void pack_operands(const scalar_t* x, int64_t n, int64_t ho_begin, int64_t ho_end,
                     ImageWorkspace<scalar_t>& ws) const {
    const int64_t pixels = (ho_end - ho_begin) * geo.out_width;
    for (int64_t c = 0; c < geo.in_channels; ++c) {
      const scalar_t* x_plane = x + (n * geo.in_channels + c) * geo.height * geo.width;
      const int64_t grp = c / in_per_group, first_row = (c % in_per_group) * taps;
      pack_im2col_plane(x_plane, ho_begin, ho_end, first_row, ws.cols.data() + grp * operand_size(),
                        ws.tap_rows.data());
      prefilter_plane(pre, rows, cols, x_plane, ho_begin, ho_end, ws.prefilter_tmp.data(), ws.line.data(),
                      [&](int64_t tap, int64_t ho, const scalar_t* row) {
                        std::copy(row, row + geo.out_width,
                                  ws.tap_rows.data() + tap * pixels + (ho - ho_begin) * geo.out_width);
                      });
      for (int64_t t = 0; t < taps; ++t) {
        panel::pack_row(ws.tap_rows.data() + t * pixels, pixels, k_size, first_row + t,
                        ws.z.data() + grp * operand_size());
      }
    }
  }

  // P0 and R of the packed rows [ho_begin, ho_end) into columns ho_begin * Wo.. of the fields.
  void responses(int64_t ho_begin, int64_t ho_end, ImageWorkspace<scalar_t>& ws) const {
    const int64_t pixels = (ho_end - ho_begin) * geo.out_width, column = ho_begin * geo.out_width;
    for (int64_t grp = 0; grp < geo.groups; ++grp) {
      const int64_t row = grp * out_per_group;
      panel::product(weight_of(grp), k_size, out_per_group, ws.cols.data() + grp * operand_size(), k_size, pixels,
                     ws.push.data() + row * field_ld + column, field_ld);
      panel::product(weight_of(grp), k_size, out_per_group, ws.z.data() + grp * operand_size(), k_size, pixels,
                     ws.pull.data() + row * field_ld + column, field_ld);
    }
  }

  // P0 and R of image n, block by block.
  void image_responses(const scalar_t* x, int64_t n, ImageWorkspace<scalar_t>& ws) const {
    for (int64_t ho = 0; ho < geo.out_height; ho += block_rows) {
      const int64_t end = std::min(ho + block_rows, geo.out_height);
      pack_operands(x, n, ho, end, ws);
      responses(ho, end, ws);
    }
  }

  // The workspace's fields as the epilogues see them (one image: image stride 0).
  PlaneInputs<scalar_t> inputs(const ImageWorkspace<scalar_t>& ws, const scalar_t* bias_in) const {
    return {geo, {ws.push.data(), 0, field_ld}, {ws.pull.data(), 0, field_ld}, nullptr, nullptr, bias_in, plane};
  }

  // Packs rows [row, row + out_per_group) of a [C_out, field_ld] gradient field.
  void pack_group_field(const std::vector<scalar_t>& field, int64_t grp, ImageWorkspace<scalar_t>& ws) const {
    for (int64_t r = 0; r < out_per_group; ++r) {
      panel::pack_row(field.data() + (grp * out_per_group + r) * field_ld, plane, out_per_group, r,
                      ws.packed_grad.data());
    }
  }

  // grad_w[grp rows] += packed gradient (one group) @ operand^T.
  void add_weight_grad(const scalar_t* operand, int64_t grp, const ImageWorkspace<scalar_t>& ws,
                       scalar_t* grad_w) const {
    panel::gram(ws.packed_grad.data(), out_per_group, operand, k_size, plane, grad_w + grp * out_per_group * k_size,
                k_size);
  }

  // W_g^T @ (packed gradient) into ws.grad_rows [K, padded]; weight_t is W_g^T [K, C_out/groups].
  void backproject(const scalar_t* weight_t, ImageWorkspace<scalar_t>& ws) const {
    panel::product(weight_t, out_per_group, k_size, ws.packed_grad.data(), out_per_group, plane, ws.grad_rows.data(),
                   padded);
  }
};

// Below kMinChannelsForPrefilter output channels per group, where the batched matrix product is thin.
// float64 takes it too (so that the float64 tests hold its index math to 1e-9); float where the AVX2
// products run, else the direct pull convolution.
template <typename scalar_t>
bool image_path_runs(const Geometry& geo) {
  if (geo.pull != PullKind::kSeparable || use_prefilter(geo)) return false;
  return std::is_same_v<scalar_t, double> || (std::is_same_v<scalar_t, float> && panel::fast_float_kernels());
}

bool image_path_runs(const Geometry& geo, at::ScalarType dtype) {
  return dtype == at::kDouble ? image_path_runs<double>(geo) : dtype == at::kFloat && image_path_runs<float>(geo);
}

template <typename scalar_t>
void forward_image_path(const ImagePath<scalar_t>& path, const scalar_t* x, const scalar_t* bias_in,
                        const ForwardOutputs<scalar_t>& out) {
  const Geometry& geo = path.geo;
  const int64_t octets = (geo.out_channels + 7) / 8;
  at::parallel_for(0, geo.batch, 1, [&](int64_t begin, int64_t end) {
    auto ws = path.workspace();
    PlaneScratch<scalar_t> scratch(path.plane);
    for (int64_t n = begin; n < end; ++n) {
      path.image_responses(x, n, ws);
      const auto in = path.inputs(ws, bias_in);
      for (int64_t octet = 0; octet < octets; ++octet) forward_epilogue_octet(in, 0, n, octet, out, scratch);
    }
  });
}

// Backward of one image n: gradient fields into the workspace, then the weight gradient of the image
// (grad_w_image, [C_out, K]) and the input gradient planes of the image (grad_x).
template <typename scalar_t>
void backward_image(const ImagePath<scalar_t>& path, const scalar_t* x, int64_t n, const scalar_t* bias_in,
                    const BackwardInputs<scalar_t>& bin, BackwardOutputs<scalar_t> f, const scalar_t* weight_t,
                    scalar_t* grad_w_image, scalar_t* grad_x, ImageWorkspace<scalar_t>& ws,
                    PlaneScratch<scalar_t>& scratch, std::vector<scalar_t>& box_grad) {
  const Geometry& geo = path.geo;
  const bool operands = grad_w_image != nullptr || bin.recompute_pull;
  if (operands) path.pack_operands(x, n, 0, geo.out_height, ws);  // whole planes (the path is not blocked)
  if (bin.recompute_pull) path.responses(0, geo.out_height, ws);
  const auto in = path.inputs(ws, bias_in);
  f.grad_push0 = {ws.push.data(), 0, path.field_ld};  // overwrites P0 channel by channel after reading it
  f.grad_pull0 = {ws.pull.data(), 0, path.field_ld};
  for (int64_t grp = 0; grp < geo.groups; ++grp) backward_epilogue_group(in, 0, n, grp, bin, f, scratch, box_grad);
  const int64_t in_plane = geo.height * geo.width;
  for (int64_t grp = 0; grp < geo.groups; ++grp) {
    const scalar_t* w_t = weight_t ? weight_t + grp * path.k_size * path.out_per_group : nullptr;
    scalar_t* gx_group = grad_x ? grad_x + (n * geo.in_channels + grp * path.in_per_group) * in_plane : nullptr;
    // Pull first: the prefilter adjoint overwrites the input-gradient planes, col2im then adds.
    path.pack_group_field(ws.pull, grp, ws);
    if (grad_w_image) path.add_weight_grad(ws.z.data() + grp * path.operand_size(), grp, ws, grad_w_image);
    if (gx_group) {
      path.backproject(w_t, ws);
      for (int64_t c = 0; c < path.in_per_group; ++c) {
        prefilter_adjoint_plane(path.pre, path.rows, path.cols, ws.grad_rows.data() + c * path.taps * path.padded,
                                path.padded, ws.prefilter_tmp.data(), gx_group + c * in_plane, ws.line.data());
      }
    }
    path.pack_group_field(ws.push, grp, ws);
    if (grad_w_image) path.add_weight_grad(ws.cols.data() + grp * path.operand_size(), grp, ws, grad_w_image);
    if (gx_group) {
      path.backproject(w_t, ws);
      for (int64_t c = 0; c < path.in_per_group; ++c) {
        path.col2im_plane(ws.grad_rows.data() + c * path.taps * path.padded, path.padded, gx_group + c * in_plane);
      }
    }
  }
}

// ---------------------------------------------------------------- upsample at stride 1: the tap path

// At stride 1 the separable pull moves to the output side. The per-tap products
//   Y[o, t] = sum_c k[o, c, t] x[c]            (t = (i, j) a kernel tap; c over o's group)
// are ONE matrix product, [C_out * kh * kw, C_in/groups] by the input's pixels, and give both responses
// by shifts and separable filters of Y (rows / cols are the interpolation matrices, q = -rows k cols^T):
//   P0[o](h, w) = sum_{i,j} Y[o,i,j](h + i dh - ph, w + j dw - pw)
//   R[o](h, w)  = sum_{i,j,a,b} -rows[a,i] cols[b,j] Y[o,i,j](h + a dh - qh, w + b dw - qw)
// Per pixel that is C_out * C_in/groups * kh * kw multiply-adds for BOTH responses (half of the
// prefilter's two products, and no im2col), plus per output channel a horizontal pass (tap row i: the
// sum over j, 2 * kh lines) and a vertical one. Backward runs the transposed maps: the masked gradient
// fields give gY, then dW = gY @ x^T and dx = W^T @ gY.
//
// Layout ("gapped rows"): every plane is stored flat with row stride Ws = max(W, Wo) + G, entry (r, c) at
// (V + r) * Ws + G + c, zero in the gaps between rows, in V margin rows above and below, and in the slack
// at the end. G and V are the largest horizontal and vertical shifts of any pass, so a shifted read past
// a row's end or the plane's edge reads zeros: each pass is ONE 1-D loop over the whole plane with no
// bounds test (tap_kernels::weighted_sum), and the matrix products run over the plane's flat range.

// out[e] += weight * in[e + offset] over a plane: `in` and `out` index lines of the pass's input and output.
template <typename T>
struct ShiftTerm {
  int64_t in, out, offset;
  T weight;
};

template <typename T>
struct TermScratch {
  std::vector<const T*> src;  // the terms of one weighted sum
  std::vector<T> weights;
};

// The gapped layout and what both stride-1 paths do with it.
struct GappedPlanes {
  const Geometry& geo;
  int64_t taps, in_per_group, out_per_group, plane;
  int64_t dh, dw, ph, pw, qh, qw, pull_h, pull_w;
  int64_t gap, margin, ws_stride, plane_size;  // G, V, Ws and the length of one gapped plane

  GappedPlanes(const Geometry& g, const ConvArgs& c, int64_t pull_rows, int64_t pull_cols, int64_t grain)
      : geo(g),
        taps(g.kernel_h * g.kernel_w),
        in_per_group(g.in_channels / g.groups),
        out_per_group(g.out_channels / g.groups),
        plane(g.out_height * g.out_width),
        dh(c.dilation[0]),
        dw(c.dilation[1]),
        ph(c.padding[0]),
        pw(c.padding[1]),
        qh(c.pull_padding[0]),
        qw(c.pull_padding[1]),
        pull_h(pull_rows),
        pull_w(pull_cols) {
    // Forward shifts reach pw / qw left and (kw - 1) dw - pw / (pull_w - 1) dw - qw right; backward the reverse.
    gap = std::max({pw, qw, (g.kernel_w - 1) * dw - pw, (pull_w - 1) * dw - qw, int64_t(0)});
    margin = std::max({ph, qh, (g.kernel_h - 1) * dh - ph, (pull_h - 1) * dh - qh, int64_t(0)});
    ws_stride = std::max(g.width, g.out_width) + gap;
    const int64_t rows_max = std::max(g.height, g.out_height);
    plane_size = tap_kernels::round_up((2 * margin + rows_max) * ws_stride + 2 * gap, grain) + grain;
  }

  int64_t at(int64_t r, int64_t c) const { return (margin + r) * ws_stride + gap + c; }
  // Lengths of the flat ranges from at(0, 0) over the input plane and over the output plane.
  int64_t input_length() const { return (geo.height - 1) * ws_stride + geo.width; }
  int64_t output_length() const { return (geo.out_height - 1) * ws_stride + geo.out_width; }

  // Copies plane(s) [rows, cols] (row stride `cols`) into / out of the gapped layout.
  template <typename T>
  void to_gapped(const T* src, int64_t rows, int64_t cols, T* dst) const {
    for (int64_t r = 0; r < rows; ++r) std::copy(src + r * cols, src + (r + 1) * cols, dst + at(r, 0));
  }
  template <typename T>
  void from_gapped(const T* src, int64_t rows, int64_t cols, T* dst) const {
    for (int64_t r = 0; r < rows; ++r) std::copy(src + at(r, 0), src + at(r, 0) + cols, dst + r * cols);
  }
  template <typename T>
  void load_input(const T* x, int64_t n, T* xg) const {
    const int64_t in_plane = geo.height * geo.width;
    for (int64_t c = 0; c < geo.in_channels; ++c)
      to_gapped(x + (n * geo.in_channels + c) * in_plane, geo.height, geo.width, xg + c * plane_size);
  }

  // Line `line` of out_base (lines plane_size apart), positions [begin, begin + n), from the terms of
  // `terms` writing it; adjoint: from the terms reading it, the shifts reversed.
  template <typename T>
  void apply(const std::vector<ShiftTerm<T>>& terms, int64_t line, bool adjoint, const T* in_base, T* out_base,
             int64_t begin, int64_t n, TermScratch<T>& scratch) const {
    scratch.src.clear(), scratch.weights.clear();
    for (const auto& t : terms) {
      if ((adjoint ? t.in : t.out) != line) continue;
      const int64_t from = adjoint ? t.out : t.in;
      scratch.src.push_back(in_base + from * plane_size + begin + (adjoint ? -t.offset : t.offset));
      scratch.weights.push_back(t.weight);
    }
    tap_kernels::weighted_sum(scratch.src.data(), scratch.weights.data(), static_cast<int64_t>(scratch.src.size()), n,
                              out_base + line * plane_size + begin);
  }

  template <typename T>
  PlaneInputs<T> inputs(const std::vector<T>& push, const std::vector<T>& pull, const T* bias_in) const {
    return {geo, {push.data(), 0, plane}, {pull.data(), 0, plane}, nullptr, nullptr, bias_in, plane};
  }
};

// The interpolation matrices as doubles, [pull_h, kh] and [pull_w, kw].
std::pair<at::Tensor, at::Tensor> interpolation_doubles(const at::Tensor& rows, const at::Tensor& cols) {
  return {rows.contiguous().to(at::kDouble), cols.contiguous().to(at::kDouble)};
}

template <typename T>
struct TapWorkspace {
  std::vector<T> xg;           // the input image [C_in, plane_size], gapped
  std::vector<T> y;            // Y of a block of output channels [block * taps, plane_size] (or gY)
  std::vector<T> lines;        // horizontal pass [block * 2 * kh, plane_size]: push rows, then pull rows
  std::vector<T> resp;         // one channel's two responses [2, plane_size]
  std::vector<T> grad_resp;    // their gradients: written only inside the planes (the rest stays zero)
  std::vector<T> push, pull;   // [C_out, plane]: the responses, then their gradients (as the epilogues read)
  std::vector<T> gx;           // the input gradient [C_in, plane_size], gapped
  std::vector<T> dw;           // a block's weight gradient [block * taps, C_in/groups]
  std::vector<const T*> rows;  // B operand rows of a product
  TermScratch<T> terms;
};

// Bytes of Y and the horizontal lines of one block of output channels: in L2 while the passes read them.
constexpr int64_t kTapBlockBytes = 512 * 1024;

template <typename scalar_t>
struct TapPath : GappedPlanes {
  using T = scalar_t;
  const T* wstack;  // [C_out, taps, C_in/groups]: the A operand of Y
  int64_t block;    // output channels per block
  std::vector<ShiftTerm<T>> horizontal, vertical;

  TapPath(const Geometry& g, const ConvArgs& c, const at::Tensor& rows, const at::Tensor& cols, const T* wstack_)
      : GappedPlanes(g, c, rows.size(0), cols.size(0), tap_kernels::kGrain<T>), wstack(wstack_) {
    const int64_t kh = g.kernel_h, kw = g.kernel_w;
    const auto [r, k] = interpolation_doubles(rows, cols);
    const double *rp = r.const_data_ptr<double>(), *kp = k.const_data_ptr<double>();
    // Horizontal: line i (push) and kh + i (pull) of a channel from its tap rows t = i * kw + j.
    for (int64_t i = 0; i < kh; ++i) {
      for (int64_t j = 0; j < kw; ++j) horizontal.push_back({i * kw + j, i, j * dw - pw, T(1)});
      for (int64_t j = 0; j < kw; ++j)
        for (int64_t b = 0; b < pull_w; ++b)
          if (kp[b * kw + j] != 0)
            horizontal.push_back({i * kw + j, kh + i, b * dw - qw, static_cast<T>(kp[b * kw + j])});
    }
    // Vertical: response 0 (push) and 1 (pull) from the lines, shifted by whole rows.
    for (int64_t i = 0; i < kh; ++i) vertical.push_back({i, 0, (i * dh - ph) * ws_stride, T(1)});
    for (int64_t i = 0; i < kh; ++i)
      for (int64_t a = 0; a < pull_h; ++a)
        if (rp[a * kh + i] != 0)
          vertical.push_back({kh + i, 1, (a * dh - qh) * ws_stride, static_cast<T>(-rp[a * kh + i])});
    const int64_t per_channel = (taps + 2 * kh) * plane_size * static_cast<int64_t>(sizeof(T));
    block = 8;
    while (block > 1 && block * per_channel > kTapBlockBytes) block /= 2;
    block = std::min(block, out_per_group);
  }

  // The flat range of the input rows and their gaps, the matrix products' pixel axis (a multiple of kGrain).
  int64_t product_begin() const { return margin * ws_stride; }
  int64_t product_length() const { return tap_kernels::round_up(geo.height * ws_stride + gap, tap_kernels::kGrain<T>); }

  TapWorkspace<T> workspace(bool backward) const {
    TapWorkspace<T> ws;
    ws.xg.resize(geo.in_channels * plane_size);
    ws.y.resize(block * taps * plane_size);
    ws.lines.resize(block * 2 * geo.kernel_h * plane_size);
    ws.resp.resize(2 * plane_size);
    ws.push.resize(geo.out_channels * plane);
    ws.pull.resize(geo.out_channels * plane);
    if (backward) {
      ws.grad_resp.resize(2 * plane_size);
      ws.gx.resize(geo.in_channels * plane_size);
      ws.dw.resize(block * taps * in_per_group);
    }
    return ws;
  }

  // Pointers to `count` rows of `base` (plane_size apart) at `offset`: a product's B operand.
  const T* const* row_pointers(const T* base, int64_t count, int64_t offset, TapWorkspace<T>& ws) const {
    ws.rows.resize(count);
    for (int64_t k = 0; k < count; ++k) ws.rows[k] = base + k * plane_size + offset;
    return ws.rows.data();
  }

  // P0 and R of image n (its input already in ws.xg) into ws.push / ws.pull.
  void responses(TapWorkspace<T>& ws) const {
    const int64_t kh = geo.kernel_h, lines = 2 * kh, begin = at(0, 0);
    for_each_block([&](int64_t grp, int64_t o0, int64_t count) {
      const auto b = row_pointers(ws.xg.data() + grp * in_per_group * plane_size, in_per_group, product_begin(), ws);
      tap_kernels::gemm(wstack + o0 * taps * in_per_group, in_per_group, count * taps, in_per_group, b,
                        product_length(), ws.y.data() + product_begin(), plane_size, /*accumulate=*/false);
      for (int64_t ol = 0; ol < count; ++ol) {
        const T* y = ws.y.data() + ol * taps * plane_size;
        T* l = ws.lines.data() + ol * lines * plane_size;
        for (int64_t line = 0; line < lines; ++line)
          apply(horizontal, line, false, y, l, begin, output_length_h(), ws.terms);
        for (int64_t r = 0; r < 2; ++r)
          apply(vertical, r, false, static_cast<const T*>(l), ws.resp.data(), begin, output_length(), ws.terms);
        from_gapped(ws.resp.data(), geo.out_height, geo.out_width, ws.push.data() + (o0 + ol) * plane);
        from_gapped(ws.resp.data() + plane_size, geo.out_height, geo.out_width, ws.pull.data() + (o0 + ol) * plane);
      }
    });
  }

  // The horizontal lines cover the input rows at the output's columns.
  int64_t output_length_h() const { return (geo.height - 1) * ws_stride + geo.out_width; }

  // From the gradient fields in ws.push / ws.pull: the weight gradient of the image (grad_w_image,
  // [C_out, C_in/groups * taps], added to) and its input gradient (grad_x, [C_in, H, W]).
  void backward(const T* wt, T* grad_w_image, T* grad_x, TapWorkspace<T>& ws) const {
    const int64_t kh = geo.kernel_h, lines = 2 * kh, begin = at(0, 0);
    if (grad_x) std::fill(ws.gx.begin(), ws.gx.end(), T(0));
    for_each_block([&](int64_t grp, int64_t o0, int64_t count) {
      for (int64_t ol = 0; ol < count; ++ol) {
        T* l = ws.lines.data() + ol * lines * plane_size;
        T* gy = ws.y.data() + ol * taps * plane_size;
        to_gapped(ws.push.data() + (o0 + ol) * plane, geo.out_height, geo.out_width, ws.grad_resp.data());
        to_gapped(ws.pull.data() + (o0 + ol) * plane, geo.out_height, geo.out_width, ws.grad_resp.data() + plane_size);
        for (int64_t line = 0; line < lines; ++line)
          apply(vertical, line, true, static_cast<const T*>(ws.grad_resp.data()), l, begin, output_length_h(),
                ws.terms);
        for (int64_t t = 0; t < taps; ++t) {
          apply(horizontal, t, true, static_cast<const T*>(l), gy, begin, input_length(), ws.terms);
          // The gaps must read zero in the products below (the sums above leave shifted values there).
          for (int64_t r = 0; r + 1 < geo.height; ++r)
            std::fill(gy + t * plane_size + at(r, geo.width), gy + t * plane_size + at(r + 1, 0), T(0));
        }
      }
      const int64_t m_rows = count * taps, first = product_begin(), n = product_length();
      if (grad_w_image) {
        std::fill(ws.dw.begin(), ws.dw.end(), T(0));
        const auto b = row_pointers(ws.xg.data() + grp * in_per_group * plane_size, in_per_group, first, ws);
        tap_kernels::gram(ws.y.data() + first, plane_size, m_rows, b, in_per_group, n, ws.dw.data(), in_per_group);
        for (int64_t ol = 0; ol < count; ++ol)
          for (int64_t c = 0; c < in_per_group; ++c)
            for (int64_t t = 0; t < taps; ++t)
              grad_w_image[((o0 + ol) * in_per_group + c) * taps + t] += ws.dw[(ol * taps + t) * in_per_group + c];
      }
      if (grad_x) {
        const int64_t lda = out_per_group * taps;
        const auto b = row_pointers(ws.y.data(), m_rows, first, ws);
        tap_kernels::gemm(wt + grp * in_per_group * lda + (o0 - grp * out_per_group) * taps, lda, in_per_group, m_rows,
                          b, n, ws.gx.data() + grp * in_per_group * plane_size + first, plane_size,
                          /*accumulate=*/true);
      }
    });
    if (grad_x) {
      for (int64_t c = 0; c < geo.in_channels; ++c)
        from_gapped(ws.gx.data() + c * plane_size, geo.height, geo.width, grad_x + c * geo.height * geo.width);
    }
  }

  // fn(group, first output channel, count) over the blocks of output channels.
  template <typename Fn>
  void for_each_block(Fn fn) const {
    for (int64_t grp = 0; grp < geo.groups; ++grp)
      for (int64_t o0 = grp * out_per_group; o0 < (grp + 1) * out_per_group; o0 += block)
        fn(grp, o0, std::min(block, (grp + 1) * out_per_group - o0));
  }
};

template <typename scalar_t>
void forward_tap_path(const TapPath<scalar_t>& path, const scalar_t* x, const scalar_t* bias_in,
                      const ForwardOutputs<scalar_t>& out) {
  const Geometry& geo = path.geo;
  const int64_t octets = (geo.out_channels + 7) / 8;
  at::parallel_for(0, geo.batch, 1, [&](int64_t begin, int64_t end) {
    auto ws = path.workspace(false);
    PlaneScratch<scalar_t> scratch(path.plane);
    for (int64_t n = begin; n < end; ++n) {
      path.load_input(x, n, ws.xg.data());
      path.responses(ws);
      const auto in = path.inputs(ws.push, ws.pull, bias_in);
      for (int64_t octet = 0; octet < octets; ++octet) forward_epilogue_octet(in, 0, n, octet, out, scratch);
    }
  });
}

// The input-side prefilter at stride 1, on the same gapped layout: z[c, t] = the separable prefilter of
// input plane c for tap t (README.md, "How it is fast"), and one weight matrix W [C_out/groups, K], K = C_in/groups *
// taps, times two operands whose rows are planes: P0 = W @ (x shifted by each tap), R = W @ z. Shifted
// planes are pointers into the gapped input, so there is no im2col. The choice for few input channels
// (the ResNet stems), where filtering each input channel is cheaper than filtering each output one.
// Backward: dW += gP0 @ (shifted x)^T + gR @ z^T; dx = the shifts' adjoint of W^T @ gP0 plus the
// prefilter's adjoint of W^T @ gR.
template <typename T>
struct PrefilterWorkspace {
  std::vector<T> xg;          // the input image [C_in, plane_size], gapped
  std::vector<T> z;           // its prefilter [C_in * taps, plane_size]
  std::vector<T> lines;       // one channel's vertical pass (or its adjoint) [kh, plane_size]
  std::vector<T> resp;        // P0 and R [2, C_out, plane_size] (their gradients, backward: zero outside the planes)
  std::vector<T> push, pull;  // [C_out, plane]: as the epilogues read them
  std::vector<T> grad_cols;   // W^T @ gP0 and W^T @ gR of one group [2, K, plane_size]
  std::vector<T> line;        // one input gradient plane, gapped
  std::vector<const T*> rows;
  TermScratch<T> terms;
};

template <typename scalar_t>
struct PrefilterPath : GappedPlanes {
  using T = scalar_t;
  const T* weight;    // [C_out, K]
  const T* weight_t;  // per group W^T [groups, K, C_out/groups] (backward only)
  int64_t k_size;
  std::vector<ShiftTerm<T>> vertical, horizontal;  // input line -> kh lines -> taps lines
  std::vector<int64_t> shift;                      // tap t's offset in the push operand

  PrefilterPath(const Geometry& g, const ConvArgs& c, const at::Tensor& rows, const at::Tensor& cols, const T* w,
                const T* w_t)
      : GappedPlanes(g, c, rows.size(0), cols.size(0), tap_kernels::kGrain<T>),
        weight(w),
        weight_t(w_t),
        k_size(in_per_group * taps) {
    const int64_t kh = g.kernel_h, kw = g.kernel_w;
    const auto [r, k] = interpolation_doubles(rows, cols);
    const double *rp = r.const_data_ptr<double>(), *kp = k.const_data_ptr<double>();
    for (int64_t i = 0; i < kh; ++i)
      for (int64_t a = 0; a < pull_h; ++a)
        if (rp[a * kh + i] != 0) vertical.push_back({0, i, (a * dh - qh) * ws_stride, static_cast<T>(-rp[a * kh + i])});
    for (int64_t i = 0; i < kh; ++i)
      for (int64_t j = 0; j < kw; ++j) {
        shift.push_back((i * dh - ph) * ws_stride + j * dw - pw);
        for (int64_t b = 0; b < pull_w; ++b)
          if (kp[b * kw + j] != 0) horizontal.push_back({i, i * kw + j, b * dw - qw, static_cast<T>(kp[b * kw + j])});
      }
  }

  int64_t product_length() const { return tap_kernels::round_up(output_length(), tap_kernels::kGrain<T>); }

  PrefilterWorkspace<T> workspace(bool backward) const {
    PrefilterWorkspace<T> ws;
    ws.xg.resize(geo.in_channels * plane_size);
    ws.z.resize(geo.in_channels * taps * plane_size);
    ws.lines.resize(geo.kernel_h * plane_size);
    ws.resp.resize(2 * geo.out_channels * plane_size);
    ws.push.resize(geo.out_channels * plane);
    ws.pull.resize(geo.out_channels * plane);
    if (backward) {
      ws.grad_cols.resize(2 * k_size * plane_size);
      ws.line.resize(plane_size);
    }
    return ws;
  }

  // z of every input channel, from ws.xg. The vertical pass covers whole rows (gaps included: zeros), so
  // that the horizontal one reads zeros past the rows' ends.
  void prefilter(PrefilterWorkspace<T>& ws) const {
    const int64_t rows_begin = margin * ws_stride, rows_length = geo.out_height * ws_stride;
    for (int64_t c = 0; c < geo.in_channels; ++c) {
      for (int64_t i = 0; i < geo.kernel_h; ++i)
        apply(vertical, i, false, static_cast<const T*>(ws.xg.data() + c * plane_size), ws.lines.data(), rows_begin,
              rows_length, ws.terms);
      for (int64_t t = 0; t < taps; ++t)
        apply(horizontal, t, false, static_cast<const T*>(ws.lines.data()), ws.z.data() + c * taps * plane_size,
              at(0, 0), output_length(), ws.terms);
    }
  }

  // B rows of group grp: the shifted input planes (push) or the prefiltered ones (pull), from at(0, 0).
  const T* const* operand(int64_t grp, bool pull, PrefilterWorkspace<T>& ws) const {
    ws.rows.resize(k_size);
    for (int64_t k = 0; k < k_size; ++k) {
      const int64_t c = grp * in_per_group + k / taps, t = k % taps;
      ws.rows[k] = pull ? ws.z.data() + (c * taps + t) * plane_size + at(0, 0)
                        : ws.xg.data() + c * plane_size + at(0, 0) + shift[t];
    }
    return ws.rows.data();
  }

  // P0 and R of the image in ws.xg (prefilter() done) into ws.push / ws.pull.
  void responses(PrefilterWorkspace<T>& ws) const {
    for (int64_t grp = 0; grp < geo.groups; ++grp) {
      const T* a = weight + grp * out_per_group * k_size;
      for (int64_t r = 0; r < 2; ++r) {
        T* c = ws.resp.data() + (r * geo.out_channels + grp * out_per_group) * plane_size + at(0, 0);
        tap_kernels::gemm(a, k_size, out_per_group, k_size, operand(grp, r == 1, ws), product_length(), c, plane_size,
                          false);
      }
    }
    for (int64_t o = 0; o < geo.out_channels; ++o) {
      from_gapped(ws.resp.data() + o * plane_size, geo.out_height, geo.out_width, ws.push.data() + o * plane);
      from_gapped(ws.resp.data() + (geo.out_channels + o) * plane_size, geo.out_height, geo.out_width,
                  ws.pull.data() + o * plane);
    }
  }

  // From the gradient fields in ws.push / ws.pull (ws.xg and ws.z filled when grad_w_image is wanted).
  void backward(T* grad_w_image, T* grad_x, PrefilterWorkspace<T>& ws) const {
    // The gradients in the gapped layout, zero outside the planes (resp may hold responses: clear it).
    std::fill(ws.resp.begin(), ws.resp.end(), T(0));
    for (int64_t o = 0; o < geo.out_channels; ++o) {
      to_gapped(ws.push.data() + o * plane, geo.out_height, geo.out_width, ws.resp.data() + o * plane_size);
      to_gapped(ws.pull.data() + o * plane, geo.out_height, geo.out_width,
                ws.resp.data() + (geo.out_channels + o) * plane_size);
    }
    const int64_t n = product_length(), begin = at(0, 0);
    for (int64_t grp = 0; grp < geo.groups; ++grp) {
      for (int64_t r = 0; r < 2; ++r) {
        const T* g = ws.resp.data() + (r * geo.out_channels + grp * out_per_group) * plane_size + begin;
        if (grad_w_image) {
          tap_kernels::gram(g, plane_size, out_per_group, operand(grp, r == 1, ws), k_size, n,
                            grad_w_image + grp * out_per_group * k_size, k_size);
        }
        if (grad_x) {
          ws.rows.resize(out_per_group);
          for (int64_t o = 0; o < out_per_group; ++o) ws.rows[o] = g + o * plane_size;
          tap_kernels::gemm(weight_t + grp * k_size * out_per_group, out_per_group, k_size, out_per_group,
                            ws.rows.data(), n, ws.grad_cols.data() + r * k_size * plane_size + begin, plane_size,
                            false);
        }
      }
      if (grad_x) {
        for (int64_t c = 0; c < in_per_group; ++c)
          input_gradient(c, grad_x + (grp * in_per_group + c) * geo.height * geo.width, ws);
      }
    }
  }

  // dx of input channel c of the group: the shifts' adjoint of its push rows plus the prefilter's adjoint
  // of its pull rows, ONE weighted sum over the input plane.
  void input_gradient(int64_t c, T* grad_x_plane, PrefilterWorkspace<T>& ws) const {
    const T* push_rows = ws.grad_cols.data() + c * taps * plane_size;
    const T* pull_rows = ws.grad_cols.data() + (k_size + c * taps) * plane_size;
    const int64_t rows_begin = margin * ws_stride, rows_length = geo.out_height * ws_stride;
    for (int64_t i = 0; i < geo.kernel_h; ++i)
      apply(horizontal, i, true, pull_rows, ws.lines.data(), rows_begin, rows_length, ws.terms);
    auto& src = ws.terms.src;
    auto& w = ws.terms.weights;
    src.clear(), w.clear();
    const int64_t begin = at(0, 0);
    for (int64_t t = 0; t < taps; ++t) src.push_back(push_rows + t * plane_size + begin - shift[t]), w.push_back(T(1));
    for (const auto& term : vertical)
      src.push_back(ws.lines.data() + term.out * plane_size + begin - term.offset), w.push_back(term.weight);
    tap_kernels::weighted_sum(src.data(), w.data(), static_cast<int64_t>(src.size()), input_length(),
                              ws.line.data() + begin);
    from_gapped(ws.line.data(), geo.height, geo.width, grad_x_plane);
  }
};

template <typename scalar_t>
void forward_prefilter_path(const PrefilterPath<scalar_t>& path, const scalar_t* x, const scalar_t* bias_in,
                            const ForwardOutputs<scalar_t>& out) {
  const Geometry& geo = path.geo;
  const int64_t octets = (geo.out_channels + 7) / 8;
  at::parallel_for(0, geo.batch, 1, [&](int64_t begin, int64_t end) {
    auto ws = path.workspace(false);
    PlaneScratch<scalar_t> scratch(path.plane);
    for (int64_t n = begin; n < end; ++n) {
      path.load_input(x, n, ws.xg.data());
      path.prefilter(ws);
      path.responses(ws);
      const auto in = path.inputs(ws.push, ws.pull, bias_in);
      for (int64_t octet = 0; octet < octets; ++octet) forward_epilogue_octet(in, 0, n, octet, out, scratch);
    }
  });
}

// Whether the tap path beats the input-side prefilter (ImagePath or the batched product): multiply-adds per
// pixel, a filter term (an unaligned load and a multiply-add) counted as two register-tiled products.
// The tap path filters each OUTPUT channel, the prefilter each INPUT channel and multiplies twice:
// the ResNet stems (3 input channels) keep the prefilter, the 16- and 64-channel blocks take the tap path.
bool tap_path_pays(const Geometry& geo, const at::Tensor& rows, const at::Tensor& cols) {
  const int64_t kh = geo.kernel_h, taps = kh * geo.kernel_w;
  const int64_t rows_nz = rows.ne(0).sum().item<int64_t>(), cols_nz = cols.ne(0).sum().item<int64_t>();
  const int64_t products = geo.out_channels * (geo.in_channels / geo.groups) * taps;
  const int64_t tap_filters = geo.out_channels * (taps + kh * cols_nz + kh + rows_nz);
  const int64_t prefilters = geo.in_channels * (rows_nz + kh * cols_nz);
  return products + 2 * tap_filters <= 2 * products + 2 * prefilters;
}

enum class StrideOnePath { kNone, kTaps, kPrefilter };

// The upsample path at stride 1 (float and double): the tap path where it pays, else the input-side
// prefilter on the gapped layout. PUSHPULL_CPU_TAP_PATH=always / never overrides the cost rule: the tests
// run every stride-1 upsample case both ways.
template <typename scalar_t>
StrideOnePath stride_one_path(const Geometry& geo, const ConvArgs& conv, const OptTensor& rows, const OptTensor& cols) {
  if (geo.pull != PullKind::kSeparable || conv.stride[0] != 1 || conv.stride[1] != 1) return StrideOnePath::kNone;
  if (!std::is_same_v<scalar_t, float> && !std::is_same_v<scalar_t, double>) return StrideOnePath::kNone;
  const char* choice = std::getenv("PUSHPULL_CPU_TAP_PATH");
  const bool taps = choice && std::strcmp(choice, "always") == 0  ? true
                    : choice && std::strcmp(choice, "never") == 0 ? false
                                                                  : tap_path_pays(geo, *rows, *cols);
  return taps ? StrideOnePath::kTaps : StrideOnePath::kPrefilter;
}

StrideOnePath stride_one_path(const Geometry& geo, const ConvArgs& conv, const OptTensor& rows, const OptTensor& cols,
                              at::ScalarType dtype) {
  if (dtype == at::kDouble) return stride_one_path<double>(geo, conv, rows, cols);
  return dtype == at::kFloat ? stride_one_path<float>(geo, conv, rows, cols) : StrideOnePath::kNone;
}

// The A operands: W stacked by tap for Y, [C_out, taps, C_in/groups]; and per group W^T for dx,
// [groups, C_in/groups, C_out/groups, taps].
at::Tensor tap_stacked_weight(const at::Tensor& w) {
  return w.reshape({w.size(0), w.size(1), -1}).transpose(1, 2).contiguous();
}
at::Tensor tap_transposed_weight(const at::Tensor& w, int64_t groups) {
  return w.reshape({groups, w.size(0) / groups, w.size(1), -1}).permute({0, 2, 1, 3}).contiguous();
}

// ---------------------------------------------------------------- the ops

// float16 / bfloat16 run in float32 and are rounded once at the end: the responses P0 and R then
// never round before the bias and the ReLUs (float16/bfloat16 accumulate in float32).
bool runs_in_float(const at::Tensor& t) { return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16; }

at::Tensor to_float(const at::Tensor& t) { return t.to(at::kFloat); }

OptTensor to_float(const OptTensor& t) { return t ? OptTensor(to_float(*t)) : std::nullopt; }

std::tuple<at::Tensor, at::Tensor> forward_cpu(const at::Tensor& input, const at::Tensor& weight,
                                               const OptTensor& pull_shift, const OptTensor& pull_rows,
                                               const OptTensor& pull_cols, const OptTensor& bias_in,
                                               const OptTensor& bias_out, const at::Tensor& alpha,
                                               at::IntArrayRef stride, at::IntArrayRef padding,
                                               at::IntArrayRef pull_padding, at::IntArrayRef dilation, int64_t groups,
                                               int64_t avg_kernel, bool dual_output, bool save_masks) {
  if (runs_in_float(input)) {
    auto [out, masks] = forward_cpu(to_float(input), to_float(weight), to_float(pull_shift), to_float(pull_rows),
                                    to_float(pull_cols), to_float(bias_in), to_float(bias_out), to_float(alpha), stride,
                                    padding, pull_padding, dilation, groups, avg_kernel, dual_output, save_masks);
    return {out.to(input.scalar_type()), masks};
  }
  const Geometry geo = check_forward_args(input, weight, pull_shift, pull_rows, pull_cols, bias_in, bias_out, alpha,
                                          stride, padding, pull_padding, dilation, groups, avg_kernel, dual_output);
  const ConvArgs conv{stride, padding, pull_padding, dilation, groups};
  const auto x = input.contiguous();
  const auto w = weight.contiguous();
  const OptTensor shift = pull_shift ? OptTensor(pull_shift->contiguous()) : std::nullopt;
  const OptTensor b_in = bias_in ? OptTensor(bias_in->contiguous()) : std::nullopt;
  const OptTensor b_out = bias_out ? OptTensor(bias_out->contiguous()) : std::nullopt;
  const auto alpha_c = alpha.contiguous();
  const int64_t out_c = dual_output ? 2 * geo.out_channels : geo.out_channels;
  auto out = at::empty({geo.batch, out_c, geo.out_height, geo.out_width}, x.options());
  auto masks = save_masks ? at::empty(mask_shape(geo), x.options().dtype(at::kByte))
                          : at::empty({0}, x.options().dtype(at::kByte));
  // NaN and Inf propagate as in the formula: such an input takes the exact pull (see exact_pull).
  const bool exact = geo.pull != PullKind::kNegate && !all_finite(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pushpull_forward_cpu", [&] {
    const auto outputs =
        forward_outputs<scalar_t>(b_out, alpha_c, out, save_masks ? masks.data_ptr<uint8_t>() : nullptr);
    const scalar_t* bias_ptr = b_in ? b_in->const_data_ptr<scalar_t>() : nullptr;
    const StrideOnePath stride_one =
        exact ? StrideOnePath::kNone : stride_one_path<scalar_t>(geo, conv, pull_rows, pull_cols);
    if (stride_one == StrideOnePath::kTaps) {
      const auto wstack = tap_stacked_weight(w);
      const TapPath<scalar_t> path(geo, conv, *pull_rows, *pull_cols, wstack.const_data_ptr<scalar_t>());
      forward_tap_path(path, x.const_data_ptr<scalar_t>(), bias_ptr, outputs);
    } else if (stride_one == StrideOnePath::kPrefilter) {
      const PrefilterPath<scalar_t> path(geo, conv, *pull_rows, *pull_cols, w.const_data_ptr<scalar_t>(), nullptr);
      forward_prefilter_path(path, x.const_data_ptr<scalar_t>(), bias_ptr, outputs);
    } else if (!exact && image_path_runs<scalar_t>(geo)) {
      const auto rows = pull_rows->contiguous(), cols = pull_cols->contiguous();
      const ImagePath<scalar_t> path(geo, conv, rows, cols, w, /*blocked=*/true);
      forward_image_path(path, x.const_data_ptr<scalar_t>(), b_in ? b_in->const_data_ptr<scalar_t>() : nullptr,
                         outputs);
    } else {
      const Responses r = compute_responses(CpuBackend(), x, w, shift, pull_rows, pull_cols, geo, conv, exact);
      forward_epilogue<scalar_t>(plane_inputs<scalar_t>(geo, r, shift, b_in), outputs);
    }
  });
  return {out, masks};
}

// Everything the two backward paths read.
struct BackwardRequest {
  const Geometry& geo;
  const ConvArgs& conv;
  const at::Tensor &x, &w, &grad_out, &masks, &alpha;
  const OptTensor &shift, &bias_in, &pull_rows, &pull_cols;
  Needs need;
};

template <typename scalar_t>
BackwardInputs<scalar_t> backward_inputs(const BackwardRequest& req) {
  return {req.grad_out.const_data_ptr<scalar_t>(), req.alpha.const_data_ptr<scalar_t>(),
          req.masks.const_data_ptr<uint8_t>(), req.need.alpha};
}

// Input and weight gradients (undefined when not needed) through ATen's convolution_backward.
std::pair<at::Tensor, at::Tensor> backward_batched(const BackwardRequest& req, BackwardFields& f) {
  const Geometry& geo = req.geo;
  const CpuBackend backend;
  const Responses r = backward_responses(backend, req.x, req.w, req.pull_rows, req.pull_cols, geo, req.conv, req.need);
  f.grads = gradient_fields(geo, req.need, req.x.options());
  AT_DISPATCH_FLOATING_TYPES(req.x.scalar_type(), "pushpull_backward_cpu", [&] {
    backward_epilogue<scalar_t>(plane_inputs<scalar_t>(geo, r, req.shift, req.bias_in), backward_inputs<scalar_t>(req),
                                backward_outputs<scalar_t>(geo, f));
  });
  return input_and_weight_grads(backend, f.grads, req.x, req.w, req.pull_rows, req.pull_cols, geo, req.conv, req.need);
}

// The upsample path one image at a time (see ImagePath).
std::pair<at::Tensor, at::Tensor> backward_image_path(const BackwardRequest& req, BackwardFields& f) {
  const Geometry& geo = req.geo;
  at::Tensor grad_x, grad_w, grad_w_images, weight_t;
  if (req.need.x) {
    grad_x = at::empty({geo.batch, geo.in_channels, geo.height, geo.width}, req.w.options());
    // W_g^T per group: [groups, K, C_out / groups].
    weight_t = grouped_weight(req.w, geo.groups).transpose(1, 2).contiguous();
  }
  // Per-image partial sums, added in a fixed order below: the result does not depend on the threads.
  if (req.need.w) grad_w_images = at::zeros({geo.batch, geo.out_channels, req.w[0].numel()}, req.w.options());
  AT_DISPATCH_FLOATING_TYPES(req.w.scalar_type(), "pushpull_backward_cpu_image", [&] {
    const auto rows = req.pull_rows->contiguous(), cols = req.pull_cols->contiguous();
    const ImagePath<scalar_t> path(geo, req.conv, rows, cols, req.w, /*blocked=*/false);
    const auto bin = backward_inputs<scalar_t>(req);
    const scalar_t* x = (req.need.w || req.need.alpha) ? req.x.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* bias_in = req.bias_in ? req.bias_in->const_data_ptr<scalar_t>() : nullptr;
    const auto outputs = backward_outputs<scalar_t>(geo, f);
    at::parallel_for(0, geo.batch, 1, [&](int64_t begin, int64_t end) {
      auto ws = path.workspace();
      PlaneScratch<scalar_t> scratch(path.plane);
      std::vector<scalar_t> no_box;
      for (int64_t n = begin; n < end; ++n) {
        scalar_t* grad_w_image = req.need.w ? grad_w_images[n].data_ptr<scalar_t>() : nullptr;
        backward_image(path, x, n, bias_in, bin, outputs, req.need.x ? weight_t.const_data_ptr<scalar_t>() : nullptr,
                       grad_w_image, req.need.x ? grad_x.data_ptr<scalar_t>() : nullptr, ws, scratch, no_box);
      }
    });
  });
  if (req.need.w) grad_w = grad_w_images.sum(0).view(req.w.sizes());
  return {grad_x, grad_w};
}

// The input-side prefilter at stride 1 (see PrefilterPath).
std::pair<at::Tensor, at::Tensor> backward_prefilter_path(const BackwardRequest& req, BackwardFields& f) {
  const Geometry& geo = req.geo;
  at::Tensor grad_x, grad_w, grad_w_images, weight_t;
  if (req.need.x) {
    grad_x = at::empty({geo.batch, geo.in_channels, geo.height, geo.width}, req.w.options());
    weight_t = grouped_weight(req.w, geo.groups).transpose(1, 2).contiguous();  // [groups, K, C_out/groups]
  }
  // Per-image partial sums, added in a fixed order below: the result does not depend on the threads.
  if (req.need.w) grad_w_images = at::zeros({geo.batch, geo.out_channels, req.w[0].numel()}, req.w.options());
  AT_DISPATCH_FLOATING_TYPES(req.w.scalar_type(), "pushpull_backward_cpu_prefilter", [&] {
    const PrefilterPath<scalar_t> path(geo, req.conv, *req.pull_rows, *req.pull_cols, req.w.const_data_ptr<scalar_t>(),
                                       req.need.x ? weight_t.const_data_ptr<scalar_t>() : nullptr);
    const auto bin = backward_inputs<scalar_t>(req);
    const bool operands = req.need.w || req.need.alpha;
    const scalar_t* x = operands ? req.x.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* bias_in = req.bias_in ? req.bias_in->const_data_ptr<scalar_t>() : nullptr;
    auto outputs = backward_outputs<scalar_t>(geo, f);
    at::parallel_for(0, geo.batch, 1, [&](int64_t begin, int64_t end) {
      auto ws = path.workspace(true);
      PlaneScratch<scalar_t> scratch(path.plane);
      std::vector<scalar_t> no_box;
      auto fields = outputs;
      fields.grad_push0 = {ws.push.data(), 0, path.plane};  // overwrites P0 channel by channel after reading it
      fields.grad_pull0 = {ws.pull.data(), 0, path.plane};
      for (int64_t n = begin; n < end; ++n) {
        if (operands) path.load_input(x, n, ws.xg.data()), path.prefilter(ws);
        if (bin.recompute_pull) path.responses(ws);
        const auto in = path.inputs(ws.push, ws.pull, bias_in);
        for (int64_t grp = 0; grp < geo.groups; ++grp)
          backward_epilogue_group(in, 0, n, grp, bin, fields, scratch, no_box);
        if (req.need.w || req.need.x) {
          path.backward(req.need.w ? grad_w_images[n].data_ptr<scalar_t>() : nullptr,
                        req.need.x ? grad_x[n].data_ptr<scalar_t>() : nullptr, ws);
        }
      }
    });
  });
  if (req.need.w) grad_w = grad_w_images.sum(0).view(req.w.sizes());
  return {grad_x, grad_w};
}

// The upsample path at stride 1 (see TapPath).
std::pair<at::Tensor, at::Tensor> backward_tap_path(const BackwardRequest& req, BackwardFields& f) {
  const Geometry& geo = req.geo;
  at::Tensor grad_x, grad_w, grad_w_images, weight_t;
  if (req.need.x) {
    grad_x = at::empty({geo.batch, geo.in_channels, geo.height, geo.width}, req.w.options());
    weight_t = tap_transposed_weight(req.w, geo.groups);
  }
  // Per-image partial sums, added in a fixed order below: the result does not depend on the threads.
  if (req.need.w) grad_w_images = at::zeros({geo.batch, geo.out_channels, req.w[0].numel()}, req.w.options());
  const auto wstack = tap_stacked_weight(req.w);
  AT_DISPATCH_FLOATING_TYPES(req.w.scalar_type(), "pushpull_backward_cpu_tap", [&] {
    const TapPath<scalar_t> path(geo, req.conv, *req.pull_rows, *req.pull_cols, wstack.const_data_ptr<scalar_t>());
    const auto bin = backward_inputs<scalar_t>(req);
    const bool read_x = req.need.w || req.need.alpha;
    const scalar_t* x = read_x ? req.x.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* bias_in = req.bias_in ? req.bias_in->const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* wt = req.need.x ? weight_t.const_data_ptr<scalar_t>() : nullptr;
    auto outputs = backward_outputs<scalar_t>(geo, f);
    at::parallel_for(0, geo.batch, 1, [&](int64_t begin, int64_t end) {
      auto ws = path.workspace(true);
      PlaneScratch<scalar_t> scratch(path.plane);
      std::vector<scalar_t> no_box;
      auto fields = outputs;
      fields.grad_push0 = {ws.push.data(), 0, path.plane};  // overwrites P0 channel by channel after reading it
      fields.grad_pull0 = {ws.pull.data(), 0, path.plane};
      for (int64_t n = begin; n < end; ++n) {
        if (read_x) path.load_input(x, n, ws.xg.data());
        if (bin.recompute_pull) path.responses(ws);
        const auto in = path.inputs(ws.push, ws.pull, bias_in);
        for (int64_t grp = 0; grp < geo.groups; ++grp)
          backward_epilogue_group(in, 0, n, grp, bin, fields, scratch, no_box);
        if (req.need.w || req.need.x) {
          path.backward(wt, req.need.w ? grad_w_images[n].data_ptr<scalar_t>() : nullptr,
                        req.need.x ? grad_x[n].data_ptr<scalar_t>() : nullptr, ws);
        }
      }
    });
  });
  if (req.need.w) grad_w = grad_w_images.sum(0).view(req.w.sizes());
  return {grad_x, grad_w};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight, const OptTensor& pull_shift,
    const OptTensor& pull_rows, const OptTensor& pull_cols, const OptTensor& bias_in, const at::Tensor& alpha,
    const at::Tensor& masks, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef pull_padding,
    at::IntArrayRef dilation, int64_t groups, int64_t avg_kernel, bool dual_output, std::array<bool, 6> output_mask) {
  if (runs_in_float(input)) {
    // The input may be a shape-only placeholder (an expanded scalar) when its values are not needed:
    // keep it one rather than allocating it in full.
    const bool read_input = output_mask[1] || output_mask[2] || output_mask[5];
    const auto input_f =
        read_input ? to_float(input) : at::zeros({}, input.options().dtype(at::kFloat)).expand(input.sizes());
    auto grads = backward_cpu(to_float(grad_output), input_f, to_float(weight), to_float(pull_shift),
                              to_float(pull_rows), to_float(pull_cols), to_float(bias_in), to_float(alpha), masks,
                              stride, padding, pull_padding, dilation, groups, avg_kernel, dual_output, output_mask);
    const auto dtype = input.scalar_type();
    return {std::get<0>(grads).to(dtype), std::get<1>(grads).to(dtype), std::get<2>(grads).to(dtype),
            std::get<3>(grads).to(dtype), std::get<4>(grads).to(dtype), std::get<5>(grads).to(dtype)};
  }
  const Geometry geo = check_forward_args(input, weight, pull_shift, pull_rows, pull_cols, bias_in, std::nullopt, alpha,
                                          stride, padding, pull_padding, dilation, groups, avg_kernel, dual_output);
  check_backward_args(geo, grad_output, masks);
  const Needs need = needs(geo, output_mask);
  const ConvArgs conv{stride, padding, pull_padding, dilation, groups};
  // The autograd wrapper passes a shape-only placeholder for an input whose values are not needed.
  const auto x = (need.w || need.shift || need.alpha) ? input.contiguous() : input;
  const auto w = weight.contiguous();
  const auto g = grad_output.contiguous();
  const auto masks_c = masks.contiguous();
  const auto alpha_c = alpha.contiguous();
  const OptTensor shift = pull_shift ? OptTensor(pull_shift->contiguous()) : std::nullopt;
  const OptTensor b_in = bias_in ? OptTensor(bias_in->contiguous()) : std::nullopt;
  const auto acc_options = x.options().dtype(at::toOpMathType(x.scalar_type()));
  const auto partial = [&](bool wanted) {
    return wanted ? at::empty({geo.batch, geo.out_channels}, acc_options) : at::Tensor();
  };

  BackwardFields f;
  f.parts = {partial(need.shift), partial(need.bias), partial(need.alpha)};
  const BackwardRequest req{geo, conv, x, w, g, masks_c, alpha_c, shift, b_in, pull_rows, pull_cols, need};
  const auto none = at::empty({0}, x.options());
  const StrideOnePath stride_one = stride_one_path(geo, conv, pull_rows, pull_cols, x.scalar_type());
  auto [grad_x, grad_w] = stride_one == StrideOnePath::kTaps        ? backward_tap_path(req, f)
                          : stride_one == StrideOnePath::kPrefilter ? backward_prefilter_path(req, f)
                          : image_path_runs(geo, x.scalar_type())   ? backward_image_path(req, f)
                                                                    : backward_batched(req, f);
  const auto [grad_shift, grad_bias_in, grad_bias_out, grad_alpha] =
      vector_grads(f.parts, g, geo, output_mask, x.options());
  return {need.x ? grad_x : none, need.w ? grad_w : none, grad_shift, grad_bias_in, grad_bias_out, grad_alpha};
}

}  // namespace

TORCH_LIBRARY_IMPL(pushpull, CPU, m) {
  m.impl("forward", &forward_cpu);
  m.impl("backward", &backward_cpu);
}

}  // namespace pushpull
