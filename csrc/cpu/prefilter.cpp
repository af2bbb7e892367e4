// The batched separable prefilter of the upsample pull and CpuBackend (see prefilter.h).
#include "prefilter.h"
#include "scratch.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>


namespace pushpull {
namespace cpu {
namespace {

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
    ScratchVector<acc_t> tmp(g.tmp_size()), scratch(scratch_size);
    for (int64_t plane = begin; plane < end; ++plane) {
      plane_fn(plane, r.template data_ptr<acc_t>(), k.template data_ptr<acc_t>(), tmp.data(), scratch.data());
    }
  });
}

// conv(x, q) = W_g @ z_g per group: [C_out, N, Ho * Wo] ("channel-major"; see pull_field, epilogues.h).
at::Tensor pull_from_prefilter(const at::Tensor& z, const at::Tensor& weight, const Geometry& geo) {
  const auto w_g = grouped_weight(weight, geo.groups);  // explicit sizes: -1 is ambiguous for an empty batch
  return at::matmul(w_g, z.view({geo.groups, w_g.size(2), geo.batch * geo.out_height * geo.out_width}))
      .view({geo.out_channels, geo.batch, geo.out_height * geo.out_width});
}

}  // namespace

at::Tensor prefilter(const at::Tensor& x, const at::Tensor& rows, const at::Tensor& cols, const Geometry& geo,
                     const ConvArgs& c) {
  const auto g = prefilter_geometry(geo, c, rows, cols);
  const auto layout = prefilter_layout(geo);
  auto z = at::empty({geo.in_channels * layout.taps, geo.batch, layout.out_plane}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pushpull_prefilter", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* zp = z.data_ptr<scalar_t>();
    for_each_input_plane<scalar_t>(
        geo, g, rows, cols, 0, [&](int64_t plane, auto r, auto k, auto tmp, auto /*scratch*/) {
          scalar_t* z_plane = zp + layout.offset(plane);
          prefilter_plane(g, r, k, xp + plane * geo.height * geo.width, 0, geo.out_height, tmp,
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

// The prefilter and matrix product beat oneDNN's direct convolution with the larger pull kernel only
// when the product has enough rows: on the 2-core AMD EPYC of benchmarks/results/cpu-2core, 64 output
// channels per group won (imagenet-b1-2020) and 16 lost (cifar-b1-2020). Below the threshold the pull
// kernel q = -rows @ k @ cols^T is formed and convolved directly.
constexpr int64_t kMinChannelsForPrefilter = 32;

bool use_prefilter(const Geometry& geo) {
  return geo.pull == PullKind::kSeparable && geo.out_channels / geo.groups >= kMinChannelsForPrefilter;
}

at::Tensor CpuBackend::prefilter_pull(const at::Tensor& x, const at::Tensor& w, const at::Tensor& rows,
                                      const at::Tensor& cols, const Geometry& geo, const ConvArgs& c) const {
  return pull_from_prefilter(prefilter(x, rows, cols, geo, c), w, geo);
}

// R = W_g @ z per group, so dW += gR @ z^T and dz = W_g^T @ gR (then the prefilter's adjoint).
std::pair<at::Tensor, at::Tensor> CpuBackend::prefilter_pull_backward(const at::Tensor& grad_pull, const at::Tensor& x,
                                                                      const at::Tensor& w, const at::Tensor& rows,
                                                                      const at::Tensor& cols, const Geometry& geo,
                                                                      const ConvArgs& c, bool need_x,
                                                                      bool need_w) const {
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

}  // namespace cpu
}  // namespace pushpull
