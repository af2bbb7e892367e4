// How the pull response R (before its bias) is obtained from the push kernel (see ops.py): the one
// spelling of the pull mode for the op checks (pushpull.h), both backends and the CUDA kernels. Plain
// C++ without any header, so that NVRTC compiles it with the kernels (tests/test_cuda_compile.py).
#pragma once

namespace pushpull {

enum class PullKind : int {
  kNegate = 0,    // R = -P0 (2020, scale 1)
  kShift = 1,     // R = pull_shift[o] * S - P0 (2024 invert; S is the per-group box sum of the input)
  kSeparable = 2  // R = conv(x, -rows @ k @ cols^T) (2020 upsample)
};

}  // namespace pushpull
