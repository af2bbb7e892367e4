// Shared declarations of the pushpull ops: the checks every backend runs once, and the geometry.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>

namespace pushpull {

using OptTensor = std::optional<at::Tensor>;

// How the pull response R (before its bias) is obtained from the push kernel; see ops.py.
enum class PullKind {
  kNegate,    // R = -P0 (2020, scale 1)
  kShift,     // R = pull_shift[o] * S - P0 (2024 invert; S is the per-group box sum of the input)
  kSeparable  // R = conv(x, -rows @ k @ cols^T) (2020 upsample)
};

struct Geometry {
  int64_t batch, in_channels, out_channels, groups;
  int64_t height, width, out_height, out_width;
  int64_t kernel_h, kernel_w;
  int64_t avg_kernel;
  bool dual_output;
  PullKind pull;
};

// Checks that the arguments of pushpull::forward / pushpull::backward are consistent (so that no
// kernel reads out of bounds) and returns the geometry. The public Python API checks the same
// things first with friendlier messages; this guards direct calls of torch.ops.pushpull.*.
Geometry check_forward_args(const at::Tensor& input, const at::Tensor& weight, const OptTensor& pull_shift,
                            const OptTensor& pull_rows, const OptTensor& pull_cols, const OptTensor& bias_in,
                            const OptTensor& bias_out, const at::Tensor& alpha, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef pull_padding, at::IntArrayRef dilation,
                            int64_t groups, int64_t avg_kernel, bool dual_output);

void check_backward_args(const Geometry& geo, const at::Tensor& grad_output, const at::Tensor& masks);

// Shape of the packed ReLU masks: [2, N, ceil(C_out / 8), Ho, Wo], bit (o % 8) of byte o / 8.
std::array<int64_t, 5> mask_shape(const Geometry& geo);

}  // namespace pushpull
