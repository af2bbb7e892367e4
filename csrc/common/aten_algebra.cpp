// The ATen-level algebra shared by the CPU and CUDA backends (see aten_algebra.h).
#include "aten_algebra.h"

#include <ATen/OpMathType.h>

namespace pushpull {
namespace {

at::Tensor box_ones(const Geometry& geo, const at::TensorOptions& options) {
  return at::ones({geo.groups, geo.in_channels / geo.groups, geo.kernel_h, geo.kernel_w}, options);
}

// R = conv(x, q) with q formed explicitly (see compute_responses).
at::Tensor direct_pull(const at::Tensor& x, const at::Tensor& w, const OptTensor& shift, const OptTensor& rows,
                       const OptTensor& cols, const Geometry& geo, const ConvArgs& c) {
  return conv(x, exact_pull_kernel(w, shift, rows, cols, geo), c.stride, c.pull_padding, c.dilation, geo.groups);
}

at::Tensor sum_terms(const at::Tensor& sum, const at::Tensor& term) { return sum.defined() ? sum + term : term; }

}  // namespace

std::pair<at::Tensor, at::Tensor> AtenBackend::conv_backward(const at::Tensor& grad, const at::Tensor& input,
                                                             const at::Tensor& w, at::IntArrayRef stride,
                                                             at::IntArrayRef padding, at::IntArrayRef dilation,
                                                             int64_t groups, bool need_input, bool need_weight) const {
  auto grads = at::convolution_backward(grad, input, w, std::nullopt, stride, padding, dilation, false, {0, 0}, groups,
                                        {need_input, need_weight, false});
  return {std::get<0>(grads), std::get<1>(grads)};
}

at::Tensor conv(const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride, at::IntArrayRef padding,
                at::IntArrayRef dilation, int64_t groups) {
  return at::conv2d(x, w, std::nullopt, stride, padding, dilation, groups).contiguous();
}

at::Tensor box_sum(const at::Tensor& x, const Geometry& geo, const ConvArgs& c) {
  return conv(x, box_ones(geo, x.options()), c.stride, c.padding, c.dilation, geo.groups);
}

at::Tensor pull_kernel(const at::Tensor& weight, const at::Tensor& rows, const at::Tensor& cols) {
  const auto acc = at::toOpMathType(weight.scalar_type());
  return (-at::matmul(rows.to(acc), at::matmul(weight.to(acc), cols.to(acc).t()))).to(weight.scalar_type());
}

at::Tensor exact_pull_kernel(const at::Tensor& w, const OptTensor& shift, const OptTensor& rows, const OptTensor& cols,
                             const Geometry& geo) {
  return geo.pull == PullKind::kShift ? shift->view({-1, 1, 1, 1}) - w : pull_kernel(w, *rows, *cols);
}

Responses compute_responses(const AtenBackend& backend, const at::Tensor& x, const at::Tensor& w,
                            const OptTensor& shift, const OptTensor& rows, const OptTensor& cols, const Geometry& geo,
                            const ConvArgs& c, bool exact) {
  Responses r;
  r.push0 = conv(x, w, c.stride, c.padding, c.dilation, geo.groups);
  if (exact && geo.pull != PullKind::kNegate) {
    r.pull0 = direct_pull(x, w, shift, rows, cols, geo, c);
  } else if (geo.pull == PullKind::kSeparable && backend.prefilter_pays(geo, c, *rows, *cols)) {
    r.pull0 = backend.prefilter_pull(x, w, *rows, *cols, geo, c);
    r.pull_channel_major = backend.prefilter_pull_is_channel_major();
    r.algebraic_pull = true;
  } else if (geo.pull == PullKind::kSeparable) {
    r.pull0 = direct_pull(x, w, shift, rows, cols, geo, c);
  } else if (geo.pull == PullKind::kShift) {
    r.box = box_sum(x, geo, c);
    r.algebraic_pull = true;
  }
  return r;
}

Needs needs(const Geometry& geo, std::array<bool, 6> output_mask) {
  return {output_mask[0],
          output_mask[1],
          output_mask[2] && geo.pull == PullKind::kShift,
          output_mask[3],
          output_mask[5] && !geo.dual_output,
          output_mask[4] && !geo.dual_output};
}

Responses backward_responses(const AtenBackend& backend, const at::Tensor& x, const at::Tensor& w,
                             const OptTensor& rows, const OptTensor& cols, const Geometry& geo, const ConvArgs& c,
                             const Needs& need) {
  Responses r;
  if (need.alpha)
    r = compute_responses(backend, x, w, std::nullopt, rows, cols, geo, c);
  else if (need.shift)
    r.box = box_sum(x, geo, c);
  return r;
}

GradientFields gradient_fields(const Geometry& geo, const Needs& need, const at::TensorOptions& options) {
  const auto field = [&](int64_t channels) {
    return at::empty({geo.batch, channels, geo.out_height, geo.out_width}, options);
  };
  GradientFields f;
  if (need.x || need.w) {
    f.grad_push0 = field(geo.out_channels);
    if (geo.pull == PullKind::kSeparable) f.grad_pull0 = field(geo.out_channels);
    if (geo.pull == PullKind::kShift && need.x) f.grad_box = field(geo.groups);
  }
  return f;
}

std::pair<at::Tensor, at::Tensor> input_and_weight_grads(const AtenBackend& backend, const GradientFields& f,
                                                         const at::Tensor& x, const at::Tensor& w,
                                                         const OptTensor& rows, const OptTensor& cols,
                                                         const Geometry& geo, const ConvArgs& c, const Needs& need) {
  at::Tensor grad_x, grad_w;
  if (need.x || need.w) {
    std::tie(grad_x, grad_w) =
        backend.conv_backward(f.grad_push0, x, w, c.stride, c.padding, c.dilation, geo.groups, need.x, need.w);
  }
  if (f.grad_pull0.defined() && backend.prefilter_pays(geo, c, *rows, *cols)) {
    auto [gx, gw] = backend.prefilter_pull_backward(f.grad_pull0, x, w, *rows, *cols, geo, c, need.x, need.w);
    if (need.x) grad_x = sum_terms(grad_x, gx);
    if (need.w) grad_w = sum_terms(grad_w, gw);
  } else if (f.grad_pull0.defined()) {
    // Direct pull convolution with q = -rows @ k @ cols^T, so dk = -rows^T @ dq @ cols.
    auto [gx, grad_q] = backend.conv_backward(f.grad_pull0, x, pull_kernel(w, *rows, *cols), c.stride, c.pull_padding,
                                              c.dilation, geo.groups, need.x, need.w);
    if (need.x) grad_x = sum_terms(grad_x, gx);
    if (need.w) grad_w = sum_terms(grad_w, -at::matmul(rows->t(), at::matmul(grad_q, *cols)));
  }
  if (f.grad_box.defined()) {
    const auto gx = backend.conv_backward(f.grad_box, x, box_ones(geo, x.options()), c.stride, c.padding, c.dilation,
                                          geo.groups, true, false);
    grad_x = sum_terms(grad_x, gx.first);
  }
  return {grad_x, grad_w};
}

std::array<at::Tensor, 4> vector_grads(const VectorParts& parts, const at::Tensor& grad_out, const Geometry& geo,
                                       std::array<bool, 6> output_mask, const at::TensorOptions& options) {
  const Needs need = needs(geo, output_mask);
  const auto dtype = options.dtype().toScalarType();
  const auto none = at::empty({0}, options);
  const auto zeros = [&] { return at::zeros({geo.out_channels}, options); };
  const auto reduce = [&](const at::Tensor& part) { return part.sum(0).to(dtype); };
  const auto grad_shift = need.shift ? reduce(parts.shift) : output_mask[2] ? zeros() : none;
  const auto grad_alpha = need.alpha ? reduce(parts.alpha) : output_mask[5] ? zeros() : none;
  // bias_out does not exist with the dual output (its gradient, if asked for, is zero).
  const auto grad_bias_out = !output_mask[4]   ? none
                             : geo.dual_output ? zeros()
                             : parts.bias_out.defined()
                                 ? reduce(parts.bias_out)
                                 : grad_out.sum({0, 2, 3}, false, at::toOpMathType(dtype)).to(dtype);
  return {grad_shift, need.bias ? reduce(parts.bias) : none, grad_bias_out, grad_alpha};
}

}  // namespace pushpull
