// The CUDA backend of pushpull::forward / pushpull::backward, apart from its registration
// (pushpull_cuda.cpp): ATen/cuDNN convolutions for the GEMM-shaped work, the kernels of
// pushpull_launch.h for everything else. Device-generic ATen code: tests/cuda_emulation builds it
// with host implementations of the launchers and runs it on CPU tensors.
#pragma once

#include <tuple>

#include "../pushpull.h"
#include "pushpull_launch.h"

namespace pushpull {
namespace cuda {

// Arguments as in the op schema; `geo` is what check_forward_args returned for them.
std::tuple<at::Tensor, at::Tensor> forward(const Geometry& geo, const at::Tensor& input, const at::Tensor& weight,
                                           const OptTensor& pull_shift, const OptTensor& pull_rows,
                                           const OptTensor& pull_cols, const OptTensor& bias_in,
                                           const OptTensor& bias_out, const at::Tensor& alpha, at::IntArrayRef stride,
                                           at::IntArrayRef padding, at::IntArrayRef pull_padding,
                                           at::IntArrayRef dilation, bool save_masks, cudaStream_t stream);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const Geometry& geo, const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const OptTensor& pull_shift, const OptTensor& pull_rows, const OptTensor& pull_cols, const OptTensor& bias_in,
    const at::Tensor& alpha, const at::Tensor& masks, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef pull_padding, at::IntArrayRef dilation, std::array<bool, 6> output_mask, cudaStream_t stream);

}  // namespace cuda
}  // namespace pushpull
