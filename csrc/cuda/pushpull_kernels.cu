// The pushpull CUDA kernels: the block bodies of pushpull_kernels.cuh run by kThreads CUDA threads,
// and their launchers (pushpull_launch.h). No torch headers: tests/test_cuda_compile.py compiles this
// file with nvcc 12 for sm_70, sm_80 and sm_90 on a machine without a GPU or a CUDA torch.
//
// Nothing here needs more than sm_70: the 16-bit conversions are the cuda_fp16.h / cuda_bf16.h
// intrinsics, which exist on every architecture (bfloat16 in software below sm_80); no atomics, no
// warp-level primitives; shared memory stays within the 48 KiB every architecture grants unasked.
#include "pushpull_kernels.cuh"

#if !defined(__CUDACC_RTC__)
#include <cuda_runtime.h>

#include <climits>
#endif

namespace pushpull {
namespace cuda {

// A block of kThreads CUDA threads: each runs the phase for its own threadIdx.x, then all meet at
// the barrier, so the next phase sees every write of this one (global and shared memory).
template <typename StateT>
struct DeviceBlock {
  using State = StateT;
  State state;
  template <class PhaseFn>
  __device__ __forceinline__ void phase(PhaseFn&& fn) {
    fn(int(threadIdx.x), state);
    __syncthreads();
  }
};

// Dynamic shared memory, aligned for double.
template <typename acc_t>
__device__ __forceinline__ acc_t* shared_memory() {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  return reinterpret_cast<acc_t*>(shared_bytes);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) forward_epilogue_kernel(EpilogueArgs<scalar_t> args, Tiling tl) {
  DeviceBlock<EpilogueState> blk{};
  forward_epilogue_block(blk, args, tl, int64_t(blockIdx.x), shared_memory<acc_of<scalar_t>>());
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) backward_fields_kernel(FieldsArgs<scalar_t> args, Tiling tl) {
  DeviceBlock<FieldsState<acc_of<scalar_t>>> blk{};
  backward_fields_block(blk, args, tl, int64_t(blockIdx.x), shared_memory<acc_of<scalar_t>>());
}

template <typename acc_t>
__global__ void __launch_bounds__(kThreads) prefilter_kernel(PrefilterArgs<acc_t> args, Tiling tl) {
  DeviceBlock<NoState> blk{};
  prefilter_block(blk, args, tl, int64_t(blockIdx.x), shared_memory<acc_t>());
}

template <typename acc_t>
__global__ void __launch_bounds__(kThreads) prefilter_adjoint_kernel(PrefilterArgs<acc_t> args, Tiling tl) {
  DeviceBlock<NoState> blk{};
  prefilter_adjoint_block(blk, args, tl, int64_t(blockIdx.x), shared_memory<acc_t>());
}

#if defined(__CUDACC_RTC__)
// NVRTC compiles device code only (tests/test_cuda_compile.py): instantiate the kernels directly.
#define PUSHPULL_INSTANTIATE_KERNELS(scalar_t)                                                \
  template __global__ void forward_epilogue_kernel<scalar_t>(EpilogueArgs<scalar_t>, Tiling); \
  template __global__ void backward_fields_kernel<scalar_t>(FieldsArgs<scalar_t>, Tiling);
#define PUSHPULL_INSTANTIATE_PREFILTER_KERNELS(acc_t)                             \
  template __global__ void prefilter_kernel<acc_t>(PrefilterArgs<acc_t>, Tiling); \
  template __global__ void prefilter_adjoint_kernel<acc_t>(PrefilterArgs<acc_t>, Tiling);

PUSHPULL_INSTANTIATE_KERNELS(float)
PUSHPULL_INSTANTIATE_KERNELS(double)
PUSHPULL_INSTANTIATE_KERNELS(HalfBits)
PUSHPULL_INSTANTIATE_KERNELS(BFloat16Bits)
PUSHPULL_INSTANTIATE_PREFILTER_KERNELS(float)
PUSHPULL_INSTANTIATE_PREFILTER_KERNELS(double)
#else
namespace {

// Launches kernel<<<blocks, kThreads, shared_bytes, stream>>>(args, tl) after the checks a launch
// cannot do itself; returns nullptr or the reason it failed.
template <typename Args>
const char* launch(void (*kernel)(Args, Tiling), const Args& args, const Tiling& tl, int64_t blocks,
                   int64_t shared_bytes, cudaStream_t stream) {
  if (blocks == 0) return nullptr;  // empty batch or no channels: nothing to do
  if (blocks > INT_MAX) return "pushpull CUDA kernel: too many blocks for a 1-D grid";
  if (shared_bytes > kMaxSharedBytes) return "pushpull CUDA kernel: needs more than 48 KiB of shared memory";
  kernel<<<unsigned(blocks), kThreads, size_t(shared_bytes), stream>>>(args, tl);
  const cudaError_t error = cudaGetLastError();
  return error == cudaSuccess ? nullptr : cudaGetErrorString(error);
}

}  // namespace

template <typename scalar_t>
const char* launch_forward_epilogue(const EpilogueArgs<scalar_t>& args, cudaStream_t stream) {
  const Tiling tl = tiling(args.geo.height, args.geo.width);
  return launch(forward_epilogue_kernel<scalar_t>, args, tl, epilogue_blocks(args.geo, tl),
                epilogue_shared_bytes(args.geo, sizeof(acc_of<scalar_t>)), stream);
}

template <typename scalar_t>
const char* launch_backward_fields(const FieldsArgs<scalar_t>& args, cudaStream_t stream) {
  const Tiling tl = tiling(args.geo.height, args.geo.width);
  return launch(backward_fields_kernel<scalar_t>, args, tl, fields_blocks(args.geo, tl),
                fields_shared_bytes(args.geo, sizeof(acc_of<scalar_t>)), stream);
}

template <typename acc_t>
const char* launch_prefilter(const PrefilterArgs<acc_t>& args, cudaStream_t stream) {
  const Tiling tl = tiling(args.geo.out_height, args.geo.out_width);
  return launch(prefilter_kernel<acc_t>, args, tl, prefilter_blocks(args.geo, tl),
                prefilter_shared_bytes(args.geo, sizeof(acc_t)), stream);
}

template <typename acc_t>
const char* launch_prefilter_adjoint(const PrefilterArgs<acc_t>& args, cudaStream_t stream) {
  const Tiling tl = tiling(args.geo.height, args.geo.width);
  return launch(prefilter_adjoint_kernel<acc_t>, args, tl, prefilter_blocks(args.geo, tl),
                prefilter_shared_bytes(args.geo, sizeof(acc_t)), stream);
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
#endif  // __CUDACC_RTC__

}  // namespace cuda
}  // namespace pushpull
