// Registration of the CUDA backend: pushpull::forward / pushpull::backward for CUDA tensors run
// pushpull_cuda_ops.cpp on the input's device and its current stream.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "pushpull_cuda_ops.h"

namespace pushpull {
namespace {

std::tuple<at::Tensor, at::Tensor> forward_cuda(const at::Tensor& input, const at::Tensor& weight,
                                                const OptTensor& pull_shift, const OptTensor& pull_rows,
                                                const OptTensor& pull_cols, const OptTensor& bias_in,
                                                const OptTensor& bias_out, const at::Tensor& alpha,
                                                at::IntArrayRef stride, at::IntArrayRef padding,
                                                at::IntArrayRef pull_padding, at::IntArrayRef dilation, int64_t groups,
                                                int64_t avg_kernel, bool dual_output, bool save_masks) {
  const Geometry geo = check_forward_args(input, weight, pull_shift, pull_rows, pull_cols, bias_in, bias_out, alpha,
                                          stride, padding, pull_padding, dilation, groups, avg_kernel, dual_output);
  const c10::cuda::CUDAGuard guard(input.device());
  return cuda::forward(geo, input, weight, pull_shift, pull_rows, pull_cols, bias_in, bias_out, alpha, stride, padding,
                       pull_padding, dilation, save_masks, c10::cuda::getCurrentCUDAStream().stream());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight, const OptTensor& pull_shift,
    const OptTensor& pull_rows, const OptTensor& pull_cols, const OptTensor& bias_in, const at::Tensor& alpha,
    const at::Tensor& masks, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef pull_padding,
    at::IntArrayRef dilation, int64_t groups, int64_t avg_kernel, bool dual_output, std::array<bool, 6> output_mask) {
  const Geometry geo = check_forward_args(input, weight, pull_shift, pull_rows, pull_cols, bias_in, std::nullopt, alpha,
                                          stride, padding, pull_padding, dilation, groups, avg_kernel, dual_output);
  check_backward_args(geo, grad_output, masks);
  TORCH_CHECK(grad_output.device() == input.device() && masks.device() == input.device(),
              "grad_output and masks must be on the input's device");
  const c10::cuda::CUDAGuard guard(input.device());
  return cuda::backward(geo, grad_output, input, weight, pull_shift, pull_rows, pull_cols, bias_in, alpha, masks,
                        stride, padding, pull_padding, dilation, output_mask,
                        c10::cuda::getCurrentCUDAStream().stream());
}

}  // namespace

TORCH_LIBRARY_IMPL(pushpull, CUDA, m) {
  m.impl("forward", &forward_cuda);
  m.impl("backward", &backward_cuda);
}

}  // namespace pushpull
