// Shared declarations of the pushpull ops: the checks every backend runs once, and the geometry.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <tuple>

#include "common/pull_kind.h"

namespace pushpull {

using OptTensor = std::optional<at::Tensor>;

struct Geometry {
  int64_t batch, in_channels, out_channels, groups;
  int64_t height, width, out_height, out_width;
  int64_t kernel_h, kernel_w;
  int64_t avg_kernel;
  bool dual_output;
  PullKind pull;
};

// The ops' arguments by name, in the order of the schemas (pushpull.cpp).
struct ForwardArgs {
  const at::Tensor &input, &weight;
  const OptTensor &pull_shift, &pull_rows, &pull_cols, &bias_in, &bias_out;
  const at::Tensor& alpha;
  at::IntArrayRef stride, padding, pull_padding, dilation;
  int64_t groups, avg_kernel;
  bool dual_output, save_masks, save_pull;
};
struct BackwardArgs {
  const at::Tensor &grad_output, &input, &weight;
  const OptTensor &pull_shift, &pull_rows, &pull_cols, &bias_in;
  const at::Tensor &alpha, &masks;
  at::IntArrayRef stride, padding, pull_padding, dilation;
  int64_t groups, avg_kernel;
  bool dual_output;
  std::array<bool, 6> output_mask;
};
using ForwardResult = std::tuple<at::Tensor, at::Tensor>;
using BackwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The schemas' flat signatures over a backend's implementation on named arguments, written once for
// every backend: TORCH_LIBRARY_IMPL registers forward_op<impl> and backward_op<impl>.
template <ForwardResult (*impl)(const ForwardArgs&)>
ForwardResult forward_op(const at::Tensor& input, const at::Tensor& weight, const OptTensor& pull_shift,
                         const OptTensor& pull_rows, const OptTensor& pull_cols, const OptTensor& bias_in,
                         const OptTensor& bias_out, const at::Tensor& alpha, at::IntArrayRef stride,
                         at::IntArrayRef padding, at::IntArrayRef pull_padding, at::IntArrayRef dilation,
                         int64_t groups, int64_t avg_kernel, bool dual_output, bool save_masks, bool save_pull) {
  return impl({input, weight, pull_shift, pull_rows, pull_cols, bias_in, bias_out, alpha, stride, padding, pull_padding,
               dilation, groups, avg_kernel, dual_output, save_masks, save_pull});
}
template <BackwardResult (*impl)(const BackwardArgs&)>
BackwardResult backward_op(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
                           const OptTensor& pull_shift, const OptTensor& pull_rows, const OptTensor& pull_cols,
                           const OptTensor& bias_in, const at::Tensor& alpha, const at::Tensor& masks,
                           at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef pull_padding,
                           at::IntArrayRef dilation, int64_t groups, int64_t avg_kernel, bool dual_output,
                           std::array<bool, 6> output_mask) {
  return impl({grad_output, input, weight, pull_shift, pull_rows, pull_cols, bias_in, alpha, masks, stride, padding,
               pull_padding, dilation, groups, avg_kernel, dual_output, output_mask});
}

// Checks that the arguments of pushpull::forward / pushpull::backward are consistent (so that no
// kernel reads out of bounds) and returns the geometry. The public Python API checks the same
// things first with friendlier messages; this guards direct calls of torch.ops.pushpull.*.
Geometry check_forward_args(const at::Tensor& input, const at::Tensor& weight, const OptTensor& pull_shift,
                            const OptTensor& pull_rows, const OptTensor& pull_cols, const OptTensor& bias_in,
                            const OptTensor& bias_out, const at::Tensor& alpha, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef pull_padding, at::IntArrayRef dilation,
                            int64_t groups, int64_t avg_kernel, bool dual_output);

void check_backward_args(const Geometry& geo, const at::Tensor& grad_output, const at::Tensor& masks);

// Both checks above on an op call's arguments; the geometry.
Geometry check_args(const ForwardArgs& a);
Geometry check_args(const BackwardArgs& a);

// Output size of a convolution along one axis (torch's floor division), and the input rows or columns
// that division drops at the end (what a transposed convolution must add back as output_padding).
int64_t conv_out(int64_t size, int64_t kernel, int64_t stride, int64_t pad, int64_t dilation);
int64_t conv_dropped(int64_t size, int64_t kernel, int64_t stride, int64_t pad, int64_t dilation);

// Shape of the packed ReLU masks: one flat uint8 buffer holding [2, N, ceil(C_out / 8), Ho, Wo] in that
// order, bit (o % 8) of byte o / 8. Flat, because only the backward reads it: a saved activation of
// rank 1 has one layout, whatever a compiler (torch.compile) decides about the forward's outputs.
std::array<int64_t, 1> mask_shape(const Geometry& geo);

// With save_pull (CPU only), the same buffer goes on after the masks, from byte saved_pull_offset (64-byte
// aligned), with ReLU(Q') [N, C_out, Ho, Wo] in the input's accumulation type (float, or double for
// float64), which a trainable alpha's gradient reads instead of recomputing the pull response.
int64_t saved_pull_offset(const Geometry& geo);
std::array<int64_t, 1> saved_shape(const Geometry& geo, bool save_pull, at::ScalarType dtype);

}  // namespace pushpull
