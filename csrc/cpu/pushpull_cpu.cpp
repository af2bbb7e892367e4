// The CPU entry points of pushpull::forward / pushpull::backward, and the batched route.
//
// Every pull goes through the shared ATen algebra (csrc/common/aten_algebra.h) or, for upsample, one
// of the per-image routes (image_routes.h): at stride 1 on a "gapped" layout (gapped_planes.h) with the
// dense loops of dense_kernels.h, by one of two routes chosen by cost: the tap path (tap_path.h: Y = W @ x
// per kernel tap, then shifts and separable filters per OUTPUT channel) or the input-side prefilter
// (prefilter_path.h: per INPUT channel). Strided upsample runs ImagePath (image_path.h: per image,
// panel-packed operands) or, from 32 output channels per group, ATen's products on the batch
// (prefilter.h); invert and negate use ATen's convolutions.
// The fused per-plane passes (epilogues.h) then do the pooling, ReLUs, alpha, biases and pack the ReLU
// masks 8 channels per byte; the stems' float32 forward on the prefilter route does the same in the
// products' registers (fused_product.h). Backward reads only the masks, forms the masked gradient fields in one
// pass and runs the transposed maps; a trainable alpha reads ReLU(Q') saved by the forward (save_pull) or
// recomputes the pull response.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <atomic>
#include <tuple>

#include "../common/aten_algebra.h"
#include "../pushpull.h"
#include "epilogues.h"
#include "image_routes.h"
#include "prefilter.h"

namespace pushpull {
namespace cpu {
namespace {

// Whether every value of t is finite (values_finite on chunks of it, in parallel).
template <typename T>
bool all_finite(const T* values, int64_t count) {
  std::atomic<bool> finite{true};
  at::parallel_for(0, count, 1 << 16, [&](int64_t begin, int64_t end) {
    if (!values_finite(values + begin, end - begin)) finite = false;
  });
  return finite;
}

bool all_finite(const at::Tensor& t) {
  bool finite = true;
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "pushpull_all_finite",
                             [&] { finite = all_finite(t.const_data_ptr<scalar_t>(), t.numel()); });
  return finite;
}

// float16 / bfloat16 run in float32 and are rounded once at the end: the responses P0 and R then
// never round before the bias and the ReLUs (float16/bfloat16 accumulate in float32).
bool runs_in_float(const at::Tensor& t) { return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16; }

at::Tensor to_float(const at::Tensor& t) { return t.to(at::kFloat); }

OptTensor to_float(const OptTensor& t) { return t ? OptTensor(to_float(*t)) : std::nullopt; }

OptTensor contiguous(const OptTensor& t) { return t ? OptTensor(t->contiguous()) : std::nullopt; }

ForwardResult forward_cpu(const ForwardArgs& a) {
  if (runs_in_float(a.input)) {
    auto [out, masks] = forward_cpu({to_float(a.input), to_float(a.weight), to_float(a.pull_shift),
                                     to_float(a.pull_rows), to_float(a.pull_cols), to_float(a.bias_in),
                                     to_float(a.bias_out), to_float(a.alpha), a.stride, a.padding, a.pull_padding,
                                     a.dilation, a.groups, a.avg_kernel, a.dual_output, a.save_masks, a.save_pull});
    return {out.to(a.input.scalar_type()), masks};
  }
  const Geometry geo = check_args(a);
  const ConvArgs conv{a.stride, a.padding, a.pull_padding, a.dilation, a.groups};
  const auto x = a.input.contiguous();
  const auto w = a.weight.contiguous();
  const OptTensor shift = contiguous(a.pull_shift), b_in = contiguous(a.bias_in), b_out = contiguous(a.bias_out);
  const auto alpha_c = a.alpha.contiguous();
  const int64_t out_c = a.dual_output ? 2 * geo.out_channels : geo.out_channels;
  auto out = at::empty({geo.batch, out_c, geo.out_height, geo.out_width}, x.options());
  auto masks = a.save_masks ? at::empty(saved_shape(geo, a.save_pull, x.scalar_type()), x.options().dtype(at::kByte))
                            : at::empty({0}, x.options().dtype(at::kByte));
  // NaN and Inf propagate as in the formula: such an input takes the exact pull (see compute_responses).
  // The per-image routes test each image as they load it (in cache) and report a non-finite one; the
  // whole batch is then done again on the exact route.
  const bool exact_if_nonfinite = geo.pull != PullKind::kNegate;
  const OptTensor &rows = a.pull_rows, &cols = a.pull_cols;
  const ImageRoute route = image_route(geo, conv, rows, cols, x.scalar_type());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pushpull_forward_cpu", [&] {
    uint8_t* saved = a.save_masks ? masks.data_ptr<uint8_t>() : nullptr;
    scalar_t* pull = a.save_pull ? reinterpret_cast<scalar_t*>(saved + saved_pull_offset(geo)) : nullptr;
    const auto outputs = forward_outputs<scalar_t>(b_out, alpha_c, out, saved, pull);
    const scalar_t* bias_ptr = b_in ? b_in->const_data_ptr<scalar_t>() : nullptr;
    const bool by_image = route != ImageRoute::kBatched &&
                          forward_by_image(route, geo, conv, x, w, {shift, rows, cols}, bias_ptr, outputs,
                                           /*check_finite=*/exact_if_nonfinite);
    if (!by_image) {
      const bool exact = exact_if_nonfinite && (route != ImageRoute::kBatched || !all_finite(x));
      const Responses r = compute_responses(CpuBackend(), x, w, shift, rows, cols, geo, conv, exact);
      forward_epilogue<scalar_t>(plane_inputs<scalar_t>(geo, r, shift, b_in), outputs);
    }
  });
  return {out, masks};
}

// Input and weight gradients (undefined when not needed) through ATen's convolution_backward.
std::pair<at::Tensor, at::Tensor> backward_batched(const BackwardRequest& req, BackwardFields& f) {
  const Geometry& geo = req.geo;
  const CpuBackend backend;
  Needs recompute = req.need;  // the responses again only for an alpha gradient without a saved ReLU(Q')
  recompute.alpha = req.need.alpha && !pull_saved(geo, req.masks);
  const Responses r = backward_responses(backend, req.x, req.w, req.pull_rows, req.pull_cols, geo, req.conv, recompute);
  f.grads = gradient_fields(geo, req.need, req.x.options());
  AT_DISPATCH_FLOATING_TYPES(req.x.scalar_type(), "pushpull_backward_cpu", [&] {
    backward_epilogue<scalar_t>(plane_inputs<scalar_t>(geo, r, req.shift, req.bias_in), backward_inputs<scalar_t>(req),
                                backward_outputs<scalar_t>(geo, f));
  });
  return input_and_weight_grads(backend, f.grads, req.x, req.w, req.pull_rows, req.pull_cols, geo, req.conv, req.need);
}

BackwardResult backward_cpu(const BackwardArgs& a) {
  if (runs_in_float(a.input)) {
    // The input may be a shape-only placeholder (an expanded scalar) when its values are not needed:
    // keep it one rather than allocating it in full.
    const bool read_input =
        a.output_mask[1] || a.output_mask[2] || (a.output_mask[5] && !pull_saved(check_args(a), a.masks));
    const auto input_f =
        read_input ? to_float(a.input) : at::zeros({}, a.input.options().dtype(at::kFloat)).expand(a.input.sizes());
    auto grads = backward_cpu({to_float(a.grad_output), input_f, to_float(a.weight), to_float(a.pull_shift),
                               to_float(a.pull_rows), to_float(a.pull_cols), to_float(a.bias_in), to_float(a.alpha),
                               a.masks, a.stride, a.padding, a.pull_padding, a.dilation, a.groups, a.avg_kernel,
                               a.dual_output, a.output_mask});
    const auto dtype = a.input.scalar_type();
    return {std::get<0>(grads).to(dtype), std::get<1>(grads).to(dtype), std::get<2>(grads).to(dtype),
            std::get<3>(grads).to(dtype), std::get<4>(grads).to(dtype), std::get<5>(grads).to(dtype)};
  }
  const Geometry geo = check_args(a);
  const Needs need = needs(geo, a.output_mask);
  const ConvArgs conv{a.stride, a.padding, a.pull_padding, a.dilation, a.groups};
  // The autograd wrapper passes a shape-only placeholder for an input whose values are not needed.
  const auto x = (need.w || need.shift || (need.alpha && !pull_saved(geo, a.masks))) ? a.input.contiguous() : a.input;
  const auto w = a.weight.contiguous();
  const auto g = a.grad_output.contiguous();
  const auto masks_c = a.masks.contiguous();
  const auto alpha_c = a.alpha.contiguous();
  const OptTensor shift = contiguous(a.pull_shift), b_in = contiguous(a.bias_in);
  const auto acc_options = x.options().dtype(at::toOpMathType(x.scalar_type()));
  const auto partial = [&](bool wanted) {
    return wanted ? at::empty({geo.batch, geo.out_channels}, acc_options) : at::Tensor();
  };

  BackwardFields f;
  // b_out's gradient: the epilogue sums the output gradient as it reads it (no pass of its own over it).
  f.parts = {partial(need.shift), partial(need.bias), partial(need.alpha), partial(need.bias_out)};
  const BackwardRequest req{geo, conv, x, w, g, masks_c, alpha_c, shift, b_in, a.pull_rows, a.pull_cols, need};
  const auto none = at::empty({0}, x.options());
  const ImageRoute route = image_route(geo, conv, a.pull_rows, a.pull_cols, x.scalar_type());
  auto [grad_x, grad_w] = route != ImageRoute::kBatched ? backward_by_image(route, req, f) : backward_batched(req, f);
  const auto [grad_shift, grad_bias_in, grad_bias_out, grad_alpha] =
      vector_grads(f.parts, g, geo, a.output_mask, x.options());
  return {need.x ? grad_x : none, need.w ? grad_w : none, grad_shift, grad_bias_in, grad_bias_out, grad_alpha};
}

}  // namespace

TORCH_LIBRARY_IMPL(pushpull, CPU, m) {
  m.impl("forward", &forward_op<forward_cpu>);
  m.impl("backward", &backward_op<backward_cpu>);
}

}  // namespace cpu
}  // namespace pushpull
