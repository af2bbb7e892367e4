// The pushpull op schemas (written once) and the argument checks shared by every backend.
#include "pushpull.h"

#include <ATen/OpMathType.h>
#include <Python.h>
#include <torch/library.h>

namespace pushpull {
namespace {

// The offset of the last window's start in the padded input: the output size is span / stride + 1.
int64_t conv_span(int64_t size, int64_t kernel, int64_t pad, int64_t dilation) {
  return size + 2 * pad - dilation * (kernel - 1) - 1;
}

void check_vector(const OptTensor& t, const at::Tensor& input, int64_t length, const char* name) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->dim() == 1 && t->size(0) == length, name, " must have shape [", length, "], got ", t->sizes());
  TORCH_CHECK(t->scalar_type() == input.scalar_type(), name, " must have the input's dtype");
  TORCH_CHECK(t->device() == input.device(), name, " must be on the input's device");
}

void check_pair(at::IntArrayRef v, const char* name, int64_t min_value) {
  TORCH_CHECK(v.size() == 2, name, " must have 2 elements");
  TORCH_CHECK(v[0] >= min_value && v[1] >= min_value, name, " must be >= ", min_value, ", got ", v);
}

void check_interpolation(const OptTensor& m, const at::Tensor& input, int64_t size, const char* name) {
  TORCH_CHECK(m->dim() == 2 && m->size(1) == size && m->size(0) >= size, name, " must have shape [q, ", size,
              "] with q >= ", size, ", got ", m->sizes());
  TORCH_CHECK(m->scalar_type() == input.scalar_type() && m->device() == input.device(), name,
              " must have the input's dtype and device");
}

}  // namespace

Geometry check_forward_args(const at::Tensor& input, const at::Tensor& weight, const OptTensor& pull_shift,
                            const OptTensor& pull_rows, const OptTensor& pull_cols, const OptTensor& bias_in,
                            const OptTensor& bias_out, const at::Tensor& alpha, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef pull_padding, at::IntArrayRef dilation,
                            int64_t groups, int64_t avg_kernel, bool dual_output) {
  TORCH_CHECK(input.dim() == 4, "input must be 4-D [N, C_in, H, W], got ", input.sizes());
  TORCH_CHECK(weight.dim() == 4, "weight must be 4-D [C_out, C_in/groups, kh, kw], got ", weight.sizes());
  TORCH_CHECK(at::isFloatingType(input.scalar_type()), "input must be floating point, got ", input.scalar_type());
  TORCH_CHECK(weight.scalar_type() == input.scalar_type(), "weight must have the input's dtype");
  TORCH_CHECK(weight.device() == input.device(), "weight must be on the input's device");
  check_pair(stride, "stride", 1);
  check_pair(dilation, "dilation", 1);
  check_pair(padding, "padding", 0);
  check_pair(pull_padding, "pull_padding", 0);
  TORCH_CHECK(groups >= 1, "groups must be positive");
  TORCH_CHECK(avg_kernel >= 0 && (avg_kernel <= 1 || avg_kernel % 2 == 1), "avg_kernel must be 0, 1 or odd");
  TORCH_CHECK(!(pull_shift.has_value() && pull_rows.has_value()), "give pull_shift or pull_rows/cols, not both");
  TORCH_CHECK(pull_rows.has_value() == pull_cols.has_value(), "pull_rows and pull_cols go together");
  TORCH_CHECK(!(dual_output && bias_out.has_value()), "bias_out cannot be used with dual_output");

  Geometry g{};
  g.batch = input.size(0);
  g.in_channels = input.size(1);
  g.out_channels = weight.size(0);
  g.groups = groups;
  g.height = input.size(2);
  g.width = input.size(3);
  g.kernel_h = weight.size(2);
  g.kernel_w = weight.size(3);
  g.avg_kernel = avg_kernel;
  g.dual_output = dual_output;
  g.pull = pull_rows.has_value() ? PullKind::kSeparable : pull_shift.has_value() ? PullKind::kShift : PullKind::kNegate;
  TORCH_CHECK(g.out_channels > 0 && g.kernel_h > 0 && g.kernel_w > 0, "weight must not be empty");
  TORCH_CHECK(g.in_channels % groups == 0 && g.out_channels % groups == 0 && weight.size(1) * groups == g.in_channels,
              "input channels ", g.in_channels, ", weight ", weight.sizes(), " and groups ", groups, " do not match");
  g.out_height = conv_out(g.height, g.kernel_h, stride[0], padding[0], dilation[0]);
  g.out_width = conv_out(g.width, g.kernel_w, stride[1], padding[1], dilation[1]);
  TORCH_CHECK(g.out_height > 0 && g.out_width > 0, "kernel is larger than the padded input");
  check_vector(pull_shift, input, g.out_channels, "pull_shift");
  check_vector(bias_in, input, g.out_channels, "bias_in");
  check_vector(bias_out, input, g.out_channels, "bias_out");
  check_vector(alpha, input, g.out_channels, "alpha");
  if (g.pull == PullKind::kSeparable) {
    check_interpolation(pull_rows, input, g.kernel_h, "pull_rows");
    check_interpolation(pull_cols, input, g.kernel_w, "pull_cols");
    TORCH_CHECK(conv_out(g.height, pull_rows->size(0), stride[0], pull_padding[0], dilation[0]) == g.out_height &&
                    conv_out(g.width, pull_cols->size(0), stride[1], pull_padding[1], dilation[1]) == g.out_width,
                "pull and push responses would have different shapes");
  }
  return g;
}

void check_backward_args(const Geometry& geo, const at::Tensor& grad_output, const at::Tensor& masks) {
  const int64_t channels = geo.dual_output ? 2 * geo.out_channels : geo.out_channels;
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef({geo.batch, channels, geo.out_height, geo.out_width}),
              "grad_output has shape ", grad_output.sizes(), ", expected the output's shape");
  const auto masks_only = mask_shape(geo), with_pull = saved_shape(geo, true, grad_output.scalar_type());
  TORCH_CHECK(masks.scalar_type() == at::kByte && masks.dim() == 1 &&
                  (masks.size(0) == masks_only[0] || masks.size(0) == with_pull[0]),
              "masks must be the uint8 tensor saved by pushpull::forward(save_masks=True)");
}

Geometry check_args(const ForwardArgs& a) {
  TORCH_CHECK(!a.save_pull || (a.save_masks && !a.dual_output),
              "save_pull needs save_masks=True and dual_output=False (the pull response is saved for alpha's "
              "gradient, which the dual output does not have)");
  return check_forward_args(a.input, a.weight, a.pull_shift, a.pull_rows, a.pull_cols, a.bias_in, a.bias_out, a.alpha,
                            a.stride, a.padding, a.pull_padding, a.dilation, a.groups, a.avg_kernel, a.dual_output);
}

Geometry check_args(const BackwardArgs& a) {
  const Geometry geo =
      check_forward_args(a.input, a.weight, a.pull_shift, a.pull_rows, a.pull_cols, a.bias_in, std::nullopt, a.alpha,
                         a.stride, a.padding, a.pull_padding, a.dilation, a.groups, a.avg_kernel, a.dual_output);
  check_backward_args(geo, a.grad_output, a.masks);
  return geo;
}

int64_t conv_out(int64_t size, int64_t kernel, int64_t stride, int64_t pad, int64_t dilation) {
  return conv_span(size, kernel, pad, dilation) / stride + 1;
}

int64_t conv_dropped(int64_t size, int64_t kernel, int64_t stride, int64_t pad, int64_t dilation) {
  return conv_span(size, kernel, pad, dilation) % stride;
}

std::array<int64_t, 1> mask_shape(const Geometry& geo) {
  return {2 * geo.batch * ((geo.out_channels + 7) / 8) * geo.out_height * geo.out_width};
}

int64_t saved_pull_offset(const Geometry& geo) { return (mask_shape(geo)[0] + 63) / 64 * 64; }

std::array<int64_t, 1> saved_shape(const Geometry& geo, bool save_pull, at::ScalarType dtype) {
  if (!save_pull) return mask_shape(geo);
  const int64_t values = geo.batch * geo.out_channels * geo.out_height * geo.out_width;
  return {saved_pull_offset(geo) + values * static_cast<int64_t>(at::elementSize(at::toOpMathType(dtype)))};
}

}  // namespace pushpull

// The emulation of the CUDA kernels (tests/cuda_emulation) compiles this file for the checks only.
#ifndef PUSHPULL_CHECKS_ONLY
TORCH_LIBRARY(pushpull, m) {
  m.def(
      "forward(Tensor input, Tensor weight, Tensor? pull_shift, Tensor? pull_rows, Tensor? pull_cols, "
      "Tensor? bias_in, Tensor? bias_out, Tensor alpha, int[2] stride, int[2] padding, int[2] pull_padding, "
      "int[2] dilation, int groups, int avg_kernel, bool dual_output, bool save_masks, bool save_pull=False) "
      "-> (Tensor, Tensor)");
  m.def(
      "backward(Tensor grad_output, Tensor input, Tensor weight, Tensor? pull_shift, Tensor? pull_rows, "
      "Tensor? pull_cols, Tensor? bias_in, Tensor alpha, Tensor masks, int[2] stride, int[2] padding, "
      "int[2] pull_padding, int[2] dilation, int groups, int avg_kernel, bool dual_output, bool[6] output_mask) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

// `import pushpull_ext._C` loads this library, which registers the ops above; it has no Python API.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
#endif  // PUSHPULL_CHECKS_ONLY
