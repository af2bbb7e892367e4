// Host emulation of the pushpull CUDA backend, for tests/test_cuda_emulation.py on machines without
// a GPU. The launchers of csrc/cuda/pushpull_launch.h get a host implementation that runs the same
// kernel bodies (csrc/cuda/pushpull_kernels.cuh) block by block: each phase for thread 0..kThreads-1
// in turn, which is what __syncthreads() guarantees on the GPU. Shared memory is filled with NaN
// before every block, so a phase that reads shared memory no earlier phase wrote shows up as NaN.
// csrc/cuda/pushpull_cuda_ops.cpp (the ATen orchestration of the CUDA backend) is compiled into this
// module unchanged and runs on CPU tensors.
#include <torch/extension.h>

#include <limits>
#include <vector>

#include "../../csrc/cuda/pushpull_cuda_ops.h"
#include "../../csrc/cuda/pushpull_kernels.cuh"

namespace pushpull {
namespace cuda {
namespace {

template <typename StateT>
struct HostBlock {
  using State = StateT;
  std::vector<State> states = std::vector<State>(kThreads);
  template <class PhaseFn>
  void phase(PhaseFn&& fn) {
    for (int t = 0; t < kThreads; ++t) fn(t, states[t]);
  }
};

// Runs body(block, blk, smem) for every block, like launch() in pushpull_kernels.cu (same checks).
template <typename acc_t, typename State, typename Body>
const char* emulate(int64_t blocks, int64_t shared_bytes, Body body) {
  if (shared_bytes > kMaxSharedBytes) return "pushpull CUDA kernel: needs more than 48 KiB of shared memory";
  std::vector<acc_t> smem(shared_bytes / sizeof(acc_t) + 1);
  for (int64_t block = 0; block < blocks; ++block) {
    std::fill(smem.begin(), smem.end(), std::numeric_limits<acc_t>::quiet_NaN());
    HostBlock<State> blk;
    body(block, blk, smem.data());
  }
  return nullptr;
}

// The prefilter and its adjoint: the same blocks and shared memory, over the tiling `tl`.
template <typename acc_t, typename BlockFn>
const char* emulate_prefilter(const PrefilterArgs<acc_t>& args, const Tiling& tl, BlockFn block_fn) {
  return emulate<acc_t, NoState>(prefilter_blocks(args.geo, tl), prefilter_shared_bytes(args.geo, sizeof(acc_t)),
                                 block_fn);
}

}  // namespace

template <typename scalar_t>
const char* launch_forward_epilogue(const EpilogueArgs<scalar_t>& args, cudaStream_t) {
  using acc_t = acc_of<scalar_t>;
  const Tiling tl = tiling(args.geo.height, args.geo.width);
  return emulate<acc_t, EpilogueState>(
      epilogue_blocks(args.geo, tl), epilogue_shared_bytes(args.geo, sizeof(acc_t)),
      [&](int64_t block, auto& blk, acc_t* smem) { forward_epilogue_block(blk, args, tl, block, smem); });
}

template <typename scalar_t>
const char* launch_backward_fields(const FieldsArgs<scalar_t>& args, cudaStream_t) {
  using acc_t = acc_of<scalar_t>;
  const Tiling tl = tiling(args.geo.height, args.geo.width);
  return emulate<acc_t, FieldsState<acc_t>>(
      fields_blocks(args.geo, tl), fields_shared_bytes(args.geo, sizeof(acc_t)),
      [&](int64_t block, auto& blk, acc_t* smem) { backward_fields_block(blk, args, tl, block, smem); });
}

template <typename acc_t>
const char* launch_prefilter(const PrefilterArgs<acc_t>& args, cudaStream_t) {
  const Tiling tl = tiling(args.geo.out_height, args.geo.out_width);
  return emulate_prefilter(args, tl,
                           [&](int64_t block, auto& blk, acc_t* smem) { prefilter_block(blk, args, tl, block, smem); });
}

template <typename acc_t>
const char* launch_prefilter_adjoint(const PrefilterArgs<acc_t>& args, cudaStream_t) {
  const Tiling tl = tiling(args.geo.height, args.geo.width);
  return emulate_prefilter(
      args, tl, [&](int64_t block, auto& blk, acc_t* smem) { prefilter_adjoint_block(blk, args, tl, block, smem); });
}

#define PUSHPULL_INSTANTIATE(scalar_t)                                                                 \
  template const char* launch_forward_epilogue<scalar_t>(const EpilogueArgs<scalar_t>&, cudaStream_t); \
  template const char* launch_backward_fields<scalar_t>(const FieldsArgs<scalar_t>&, cudaStream_t);
#define PUSHPULL_INSTANTIATE_PREFILTER(acc_t)                                              \
  template const char* launch_prefilter<acc_t>(const PrefilterArgs<acc_t>&, cudaStream_t); \
  template const char* launch_prefilter_adjoint<acc_t>(const PrefilterArgs<acc_t>&, cudaStream_t);

PUSHPULL_INSTANTIATE(float)
PUSHPULL_INSTANTIATE(double)
PUSHPULL_INSTANTIATE(HalfBits)
PUSHPULL_INSTANTIATE(BFloat16Bits)
PUSHPULL_INSTANTIATE_PREFILTER(float)
PUSHPULL_INSTANTIATE_PREFILTER(double)

}  // namespace cuda

namespace {

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& input, const at::Tensor& weight,
                                           const OptTensor& pull_shift, const OptTensor& pull_rows,
                                           const OptTensor& pull_cols, const OptTensor& bias_in,
                                           const OptTensor& bias_out, const at::Tensor& alpha,
                                           std::vector<int64_t> stride, std::vector<int64_t> padding,
                                           std::vector<int64_t> pull_padding, std::vector<int64_t> dilation,
                                           int64_t groups, int64_t avg_kernel, bool dual_output, bool save_masks) {
  const Geometry geo = check_forward_args(input, weight, pull_shift, pull_rows, pull_cols, bias_in, bias_out, alpha,
                                          stride, padding, pull_padding, dilation, groups, avg_kernel, dual_output);
  return cuda::forward(geo, input, weight, pull_shift, pull_rows, pull_cols, bias_in, bias_out, alpha, stride, padding,
                       pull_padding, dilation, save_masks, nullptr);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight, const OptTensor& pull_shift,
    const OptTensor& pull_rows, const OptTensor& pull_cols, const OptTensor& bias_in, const at::Tensor& alpha,
    const at::Tensor& masks, std::vector<int64_t> stride, std::vector<int64_t> padding,
    std::vector<int64_t> pull_padding, std::vector<int64_t> dilation, int64_t groups, int64_t avg_kernel,
    bool dual_output, std::vector<bool> output_mask) {
  const Geometry geo = check_forward_args(input, weight, pull_shift, pull_rows, pull_cols, bias_in, std::nullopt, alpha,
                                          stride, padding, pull_padding, dilation, groups, avg_kernel, dual_output);
  check_backward_args(geo, grad_output, masks);
  TORCH_CHECK(output_mask.size() == 6, "output_mask must have 6 entries");
  std::array<bool, 6> mask{};
  std::copy(output_mask.begin(), output_mask.end(), mask.begin());
  return cuda::backward(geo, grad_output, input, weight, pull_shift, pull_rows, pull_cols, bias_in, alpha, masks,
                        stride, padding, pull_padding, dilation, mask, nullptr);
}

// The bit-exact host conversions of the 16-bit types, over a tensor of bit patterns / floats.
at::Tensor half_bits_to_float(const at::Tensor& bits) {
  auto b = bits.contiguous();
  auto out = at::empty(b.sizes(), b.options().dtype(at::kFloat));
  for (int64_t i = 0; i < b.numel(); ++i) {
    out.data_ptr<float>()[i] = cuda::half_bits_to_float(uint16_t(b.data_ptr<int32_t>()[i]));
  }
  return out;
}

at::Tensor float_to_16bit(const at::Tensor& values, bool bfloat16) {
  auto v = values.contiguous();
  auto out = at::empty(v.sizes(), v.options().dtype(at::kInt));
  for (int64_t i = 0; i < v.numel(); ++i) {
    const float f = v.data_ptr<float>()[i];
    out.data_ptr<int32_t>()[i] = bfloat16 ? cuda::float_to_bfloat16_bits(f) : cuda::float_to_half_bits(f);
  }
  return out;
}

}  // namespace
}  // namespace pushpull

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &pushpull::forward, "pushpull::forward of the CUDA backend, kernels emulated on the CPU");
  m.def("backward", &pushpull::backward, "pushpull::backward of the CUDA backend, kernels emulated on the CPU");
  m.def("half_bits_to_float", &pushpull::half_bits_to_float);
  m.def("float_to_16bit", &pushpull::float_to_16bit);
}
