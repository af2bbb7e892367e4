// The ATen-level algebra of the pushpull ops, shared by the CPU and CUDA backends: the responses the
// epilogues read (P0, the pull response R or the box sum S), the convolution gradients of the masked
// fields the backward epilogues write, and the reductions of the vector gradients. Each backend
// brings its own separable prefilter (and the gradients of a convolution) through AtenBackend.
//
// Neither pull kernel costs a second full convolution (README.md, "How it is fast"):
//   invert:   R = shift[o] * S - P0, with S the per-group box sum of the input (a 1-channel conv);
//   upsample: R = k @ z (shared weight matrix), z = separable prefilter of the input (rows, cols),
//             or conv(x, q) with q = -rows @ k @ cols^T formed where the prefilter does not pay;
//   scale 1:  R = -P0.
#pragma once

#include <array>
#include <tuple>
#include <utility>

#include "../pushpull.h"

namespace pushpull {

struct ConvArgs {
  at::IntArrayRef stride, padding, pull_padding, dilation;
  int64_t groups;
};

// What differs between the backends in the algebra below.
class AtenBackend {
 public:
  virtual ~AtenBackend() = default;
  // Whether R = conv(x, q) goes through the backend's separable prefilter (else q is formed).
  virtual bool prefilter_pays(const Geometry& geo, const ConvArgs& c, const at::Tensor& rows,
                              const at::Tensor& cols) const = 0;
  // R through the prefilter; channel_major: laid out [C_out, N, Ho * Wo] rather than NCHW.
  virtual at::Tensor prefilter_pull(const at::Tensor& x, const at::Tensor& w, const at::Tensor& rows,
                                    const at::Tensor& cols, const Geometry& geo, const ConvArgs& c) const = 0;
  virtual bool prefilter_pull_is_channel_major() const { return false; }
  // The input and weight gradients of prefilter_pull for its gradient field (as prefilter_pull lays it out).
  virtual std::pair<at::Tensor, at::Tensor> prefilter_pull_backward(const at::Tensor& grad_pull, const at::Tensor& x,
                                                                    const at::Tensor& w, const at::Tensor& rows,
                                                                    const at::Tensor& cols, const Geometry& geo,
                                                                    const ConvArgs& c, bool need_x,
                                                                    bool need_w) const = 0;
  // Input and weight gradients (undefined where not needed) of conv(input, w) for the field `grad`.
  virtual std::pair<at::Tensor, at::Tensor> conv_backward(const at::Tensor& grad, const at::Tensor& input,
                                                          const at::Tensor& w, at::IntArrayRef stride,
                                                          at::IntArrayRef padding, at::IntArrayRef dilation,
                                                          int64_t groups, bool need_input, bool need_weight) const;
};

// at::conv2d without bias, contiguous.
at::Tensor conv(const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride, at::IntArrayRef padding,
                at::IntArrayRef dilation, int64_t groups);

// Per-group sum of the input over (C_in/groups, kh, kw) windows: [N, groups, Ho, Wo].
at::Tensor box_sum(const at::Tensor& x, const Geometry& geo, const ConvArgs& c);

// q = -rows @ k @ cols^T, formed in the accumulation type and rounded once (as F.interpolate does).
at::Tensor pull_kernel(const at::Tensor& weight, const at::Tensor& rows, const at::Tensor& cols);

// q, the pull kernel of a pull mode but negate (shift[o] - k or -rows @ k @ cols^T): R = conv(x, q).
at::Tensor exact_pull_kernel(const at::Tensor& w, const OptTensor& shift, const OptTensor& rows, const OptTensor& cols,
                             const Geometry& geo);

// P0 = conv(x, k); pull0 = R (upsample, or any pull computed exactly); box = S for invert. All
// contiguous; pull0 is [C_out, N, plane] when `pull_channel_major` (see AtenBackend), else NCHW.
// algebraic_pull: R is the algebra's (the prefilter's k @ z, or shift * S - P0), which is NaN where
// conv(x, q) is +-Inf for an input with Inf (see compute_responses).
struct Responses {
  at::Tensor push0, pull0, box;
  bool pull_channel_major = false;
  bool algebraic_pull = false;
};

// `exact`: R = conv(x, q) with q formed, for any pull but negate: the route for an input with NaN or
// Inf, where the algebra (shift * S - P0, or k @ z) can give Inf - Inf = NaN where conv(x, q) gives +-Inf.
Responses compute_responses(const AtenBackend& backend, const at::Tensor& x, const at::Tensor& w,
                            const OptTensor& shift, const OptTensor& rows, const OptTensor& cols, const Geometry& geo,
                            const ConvArgs& c, bool exact = false);

// The gradients an op call asks for (output_mask of the backward schema).
struct Needs {
  bool x, w, shift, bias, alpha, bias_out;  // bias_out: not with the dual output (it has none)
};
Needs needs(const Geometry& geo, std::array<bool, 6> output_mask);

// What the backward epilogue reads besides the masks: only a trainable alpha needs the responses
// again; the pull_shift gradient needs only S.
Responses backward_responses(const AtenBackend& backend, const at::Tensor& x, const at::Tensor& w,
                             const OptTensor& rows, const OptTensor& cols, const Geometry& geo, const ConvArgs& c,
                             const Needs& need);

// Masked gradient fields, [N, channels, Ho, Wo] (grad_pull0 laid out as the backend's pull0):
//   grad_push0: dL/dP0 through the push conv (and through R = -P0 for negate and invert);
//   grad_pull0: dL/dR for upsample; grad_box: dL/dS for invert, sum_o shift[o] * gQ[o].
struct GradientFields {
  at::Tensor grad_push0, grad_pull0, grad_box;
};
GradientFields gradient_fields(const Geometry& geo, const Needs& need, const at::TensorOptions& options);

// The input and weight gradients of the op from the gradient fields (undefined where not needed).
std::pair<at::Tensor, at::Tensor> input_and_weight_grads(const AtenBackend& backend, const GradientFields& f,
                                                         const at::Tensor& x, const at::Tensor& w,
                                                         const OptTensor& rows, const OptTensor& cols,
                                                         const Geometry& geo, const ConvArgs& c, const Needs& need);

// Per-(row, channel) partial sums of the vector gradients, [rows, C_out] in the accumulation type.
// bias_out: the output gradient's sums, where the backend's epilogue forms them (else undefined: a
// reduction of grad_out).
struct VectorParts {
  at::Tensor shift, bias, alpha, bias_out;
};

// The gradients of pull_shift, bias_in, bias_out and alpha, in `options`' dtype: the partial sums
// reduced, zeros where a gradient is asked for that the op does not have, empty where not asked for.
std::array<at::Tensor, 4> vector_grads(const VectorParts& parts, const at::Tensor& grad_out, const Geometry& geo,
                                       std::array<bool, 6> output_mask, const at::TensorOptions& options);

}  // namespace pushpull
