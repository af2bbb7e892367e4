// Registration of the CUDA backend: pushpull::forward / pushpull::backward for CUDA tensors run
// pushpull_cuda_ops.cpp on the input's device and its current stream.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "pushpull_cuda_ops.h"

namespace pushpull {
namespace {

ForwardResult forward_cuda(const ForwardArgs& a) {
  const Geometry geo = check_args(a);
  TORCH_CHECK(!a.save_pull, "save_pull is a CPU option: the CUDA backward recomputes the pull response");
  const c10::cuda::CUDAGuard guard(a.input.device());
  return cuda::forward(geo, a.input, a.weight, a.pull_shift, a.pull_rows, a.pull_cols, a.bias_in, a.bias_out, a.alpha,
                       a.stride, a.padding, a.pull_padding, a.dilation, a.save_masks,
                       c10::cuda::getCurrentCUDAStream().stream());
}

BackwardResult backward_cuda(const BackwardArgs& a) {
  const Geometry geo = check_args(a);
  TORCH_CHECK(a.grad_output.device() == a.input.device() && a.masks.device() == a.input.device(),
              "grad_output and masks must be on the input's device");
  const c10::cuda::CUDAGuard guard(a.input.device());
  return cuda::backward(geo, a.grad_output, a.input, a.weight, a.pull_shift, a.pull_rows, a.pull_cols, a.bias_in,
                        a.alpha, a.masks, a.stride, a.padding, a.pull_padding, a.dilation, a.output_mask,
                        c10::cuda::getCurrentCUDAStream().stream());
}

}  // namespace

TORCH_LIBRARY_IMPL(pushpull, CUDA, m) {
  m.impl("forward", &forward_op<forward_cuda>);
  m.impl("backward", &backward_op<backward_cuda>);
}

}  // namespace pushpull
