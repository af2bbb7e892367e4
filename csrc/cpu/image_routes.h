// The upsample routes that run one image per task, everything in cache: the choice among them and ONE
// per-image driver, forward and backward, shared by the three (image_routes.cpp).
#pragma once

#include <ATen/ATen.h>

#include <utility>

#include "epilogues.h"

namespace pushpull {
namespace cpu {

enum class ImageRoute {
  kBatched,   // none: ATen's products on the whole batch (upsample from 32 channels per group, wide invert)
  kBlocks,    // ImagePath: strided upsample, thin invert/negate; panel-packed operands in blocks of rows
  kTaps,      // TapPath: stride 1, filters per output channel on the gapped layout
  kPrefilter  // PrefilterPath: stride 1, filters per input channel on the gapped layout
};

ImageRoute image_route(const Geometry& geo, const ConvArgs& conv, const OptTensor& rows, const OptTensor& cols,
                       at::ScalarType dtype);

// The pull's operands: interpolation matrices (upsample) or pull_shift (invert); the others absent.
struct PullOperands {
  const OptTensor &shift, &rows, &cols;
};

// Output and masks of every image by `route` (not kBatched); float and double. With check_finite, each
// image's input is tested first: false when one holds NaN or +-Inf (the outputs are then incomplete).
template <typename scalar_t>
bool forward_by_image(ImageRoute route, const Geometry& geo, const ConvArgs& conv, const at::Tensor& x,
                      const at::Tensor& w, const PullOperands& pull, const scalar_t* bias_in,
                      const ForwardOutputs<scalar_t>& out, bool check_finite);

// Input and weight gradients (undefined when not needed) by `route`, and the partial sums f.parts.
std::pair<at::Tensor, at::Tensor> backward_by_image(ImageRoute route, const BackwardRequest& req, BackwardFields& f);

}  // namespace cpu
}  // namespace pushpull
