// The CUDA backend of the pushpull ops (see pushpull_cuda_ops.h).
//
// What cuDNN/cuBLAS do (through ATen) and what our kernels do:
//   forward   P0 = conv(x, k)                                   ATen convolution
//             invert:   S = conv(x, ones) (per-group box sum)   ATen convolution (1 output channel per group)
//             upsample: z = prefilter(x), R = conv1x1(z, k)     our prefilter kernel + ATen 1x1 convolution
//             scale 1:  nothing (R = -P0)
//             pooling, ReLUs, alpha, biases, dual output, packed masks: one pass, our epilogue kernel.
//   backward  masked gradient fields, pooling adjoint, box-sum gradient, per-channel reductions for
//             b_in / alpha / pull_shift: one pass, our fields kernel; then the input and weight
//             gradients are ATen convolution backward calls on those fields (one for the push kernel,
//             shared with the pull for invert and scale 1; the 1x1 convolution's backward and our
//             prefilter adjoint for upsample; a transposed box sum for invert).
// Neither pull kernel costs a second full convolution (README.md, "How it is fast"). Where the
// algebra's pull response comes out NaN or +-Inf (an input with NaN or Inf in its window: Inf - Inf in
// z or in m_o * S - P0), our kernels compute it as conv(x, q) with q formed (ExactPull), so that NaN and
// Inf propagate as in the formula without a test of the input on the host (no synchronization).
// Everything runs in the accumulation type, float32 (float64 for float64): float16 / bfloat16 inputs
// are converted once, so that the responses never round to 16 bits before the biases, the ReLUs and
// the invert algebra's difference m * S - P0 (rounding them there doubled eager PyTorch's error). Our
// kernels write the output and read grad_output in the input's own dtype.
#include "pushpull_cuda_ops.h"

#include <ATen/ATen.h>

#include "../common/aten_algebra.h"

namespace pushpull {
namespace cuda {
namespace {

at::ScalarType acc_dtype(at::ScalarType dtype) { return dtype == at::kDouble ? at::kDouble : at::kFloat; }

// [C_out] vectors (and the interpolation matrices) in the accumulation type, contiguous: alpha may be
// an expanded scalar.
at::Tensor to_acc(const at::Tensor& t) { return t.to(acc_dtype(t.scalar_type())).contiguous(); }
OptTensor to_acc(const OptTensor& t) { return t ? OptTensor(to_acc(*t)) : std::nullopt; }

// Calls fn(scalar_t{}) with the kernels' storage type of `dtype` (the input's: output, grad_output).
template <typename Fn>
void dispatch_storage(at::ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case at::kFloat:
      return fn(float{});
    case at::kDouble:
      return fn(double{});
    case at::kHalf:
      return fn(HalfBits{});
    case at::kBFloat16:
      return fn(BFloat16Bits{});
    default:
      TORCH_CHECK(false, "pushpull CUDA backend: unsupported dtype ", dtype);
  }
}

// Calls fn(acc_t{}) for a tensor in the accumulation type (float or double).
template <typename Fn>
void dispatch_acc(at::ScalarType dtype, Fn&& fn) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "pushpull CUDA backend: expected float32/64, got ", dtype);
  if (dtype == at::kDouble) return fn(double{});
  return fn(float{});
}

// The input (or weight) in the accumulation type; a shape-only placeholder stays one.
at::Tensor acc_operand(const at::Tensor& t, bool values_needed) {
  const auto acc = acc_dtype(t.scalar_type());
  if (!values_needed) return at::empty({}, t.options().dtype(acc)).expand(t.sizes());
  return t.to(acc).contiguous();
}

template <typename T>
const T* ptr(const at::Tensor& t) {
  return t.defined() ? static_cast<const T*>(t.const_data_ptr()) : nullptr;
}
template <typename T>
const T* ptr(const OptTensor& t) {
  return t ? ptr<T>(*t) : nullptr;
}
template <typename T>
T* mutable_ptr(at::Tensor& t) {
  return t.defined() ? static_cast<T*>(t.data_ptr()) : nullptr;
}

void check_launch(const char* error) { TORCH_CHECK(error == nullptr, "pushpull CUDA kernel launch failed: ", error); }

// ---------------------------------------------------------------- geometry for the kernels

FieldGeometry field_geometry(const Geometry& geo) {
  FieldGeometry g;
  g.batch = geo.batch;
  g.channels = geo.out_channels;
  g.groups = geo.groups;
  g.height = geo.out_height;
  g.width = geo.out_width;
  g.radius = geo.avg_kernel > 1 ? int((geo.avg_kernel - 1) / 2) : 0;
  g.dual_output = geo.dual_output;
  g.pull = geo.pull;
  return g;
}

void check_pooling_fits(const FieldGeometry& g, at::ScalarType dtype) {
  const int64_t acc_size = at::elementSize(acc_dtype(dtype));
  TORCH_CHECK(
      fields_shared_bytes(g, acc_size) <= kMaxSharedBytes && epilogue_shared_bytes(g, acc_size) <= kMaxSharedBytes,
      "pushpull CUDA backend: avg_kernel ", 2 * g.radius + 1,
      " is too large for its pooling tiles; use "
      "backend='reference' for it");
}

PrefilterGeometry prefilter_geometry(const Geometry& geo, const ConvArgs& c, const at::Tensor& rows,
                                     const at::Tensor& cols) {
  PrefilterGeometry g;
  g.planes = geo.batch * geo.in_channels;
  g.height = geo.height;
  g.width = geo.width;
  g.out_height = geo.out_height;
  g.out_width = geo.out_width;
  g.kernel_h = int(geo.kernel_h);
  g.kernel_w = int(geo.kernel_w);
  g.pull_h = int(rows.size(0));
  g.pull_w = int(cols.size(0));
  g.stride_h = int(c.stride[0]);
  g.stride_w = int(c.stride[1]);
  g.dil_h = int(c.dilation[0]);
  g.dil_w = int(c.dilation[1]);
  g.pad_h = int(c.pull_padding[0]);
  g.pad_w = int(c.pull_padding[1]);
  return g;
}

// The prefilter's tiles fit in shared memory for every kernel of the papers; a huge kernel or stride
// takes the direct path (the pull kernel formed and convolved by cuDNN) instead.
bool use_prefilter(const Geometry& geo, const ConvArgs& c, const at::Tensor& rows, const at::Tensor& cols) {
  return prefilter_shared_bytes(prefilter_geometry(geo, c, rows, cols),
                                at::elementSize(acc_dtype(rows.scalar_type()))) <= kMaxSharedBytes;
}

// ---------------------------------------------------------------- upsample: prefilter or direct

// z [N, C_in * kh * kw, Ho, Wo] (see PrefilterArgs); x is in the accumulation type.
at::Tensor prefilter(const at::Tensor& x, const at::Tensor& rows, const at::Tensor& cols, const Geometry& geo,
                     const ConvArgs& c, cudaStream_t stream) {
  auto z =
      at::empty({geo.batch, geo.in_channels * geo.kernel_h * geo.kernel_w, geo.out_height, geo.out_width}, x.options());
  const auto r = to_acc(rows), k = to_acc(cols);
  dispatch_acc(x.scalar_type(), [&](auto tag) {
    using acc_t = decltype(tag);
    const PrefilterArgs<acc_t> args{prefilter_geometry(geo, c, rows, cols), ptr<acc_t>(r), ptr<acc_t>(k), ptr<acc_t>(x),
                                    mutable_ptr<acc_t>(z)};
    check_launch(launch_prefilter(args, stream));
  });
  return z;
}

// Adjoint of prefilter: grad_z [N, C_in * kh * kw, Ho, Wo] -> grad_x [N, C_in, H, W].
at::Tensor prefilter_adjoint(const at::Tensor& grad_z, const at::Tensor& rows, const at::Tensor& cols,
                             const Geometry& geo, const ConvArgs& c, cudaStream_t stream) {
  const auto gz = grad_z.contiguous();
  auto gx = at::empty({geo.batch, geo.in_channels, geo.height, geo.width}, gz.options());
  const auto r = to_acc(rows), k = to_acc(cols);
  dispatch_acc(gz.scalar_type(), [&](auto tag) {
    using acc_t = decltype(tag);
    const PrefilterArgs<acc_t> args{prefilter_geometry(geo, c, rows, cols), ptr<acc_t>(r), ptr<acc_t>(k),
                                    ptr<acc_t>(gz), mutable_ptr<acc_t>(gx)};
    check_launch(launch_prefilter_adjoint(args, stream));
  });
  return gx;
}

// The responses and [C_out] vectors both kernels read, in the accumulation type.
template <typename Args>
void set_responses(Args& args, const Responses& r, const OptTensor& shift, const OptTensor& bias_in,
                   const at::Tensor& alpha) {
  using acc_t = typename Args::acc_t;
  args.push0 = ptr<acc_t>(r.push0), args.pull0 = ptr<acc_t>(r.pull0), args.box = ptr<acc_t>(r.box);
  args.shift = ptr<acc_t>(shift), args.bias_in = ptr<acc_t>(bias_in), args.alpha = ptr<acc_t>(alpha);
}

// q of ExactPull where R is the algebra's (r.algebraic_pull), else undefined; it must outlive the launch.
at::Tensor exact_pull_q(const Responses& r, const at::Tensor& w, const OptTensor& shift, const OptTensor& rows,
                        const OptTensor& cols, const Geometry& geo) {
  return r.algebraic_pull ? exact_pull_kernel(w, shift, rows, cols, geo).contiguous() : at::Tensor();
}

// R = conv(x, q) for the kernels, where the algebra's R is not finite (see ExactPull); empty (x null)
// without q.
template <typename acc_t>
ExactPull<acc_t> exact_pull(const at::Tensor& x, const at::Tensor& q, const Geometry& geo, const ConvArgs& c) {
  ExactPull<acc_t> e{};
  if (!q.defined()) return e;
  e.x = ptr<acc_t>(x), e.q = ptr<acc_t>(q);
  e.in_channels = geo.in_channels, e.in_height = int(geo.height), e.in_width = int(geo.width);
  e.in_per_group = int(geo.in_channels / geo.groups), e.out_per_group = int(geo.out_channels / geo.groups);
  e.q_h = int(q.size(2)), e.q_w = int(q.size(3));
  e.stride_h = int(c.stride[0]), e.stride_w = int(c.stride[1]);
  e.dil_h = int(c.dilation[0]), e.dil_w = int(c.dilation[1]);
  e.pad_h = int(c.pull_padding[0]), e.pad_w = int(c.pull_padding[1]);
  return e;
}

// The push weight as the 1x1 convolution over z: [C_out, C_in/groups * kh * kw, 1, 1].
at::Tensor weight_1x1(const at::Tensor& weight) { return weight.reshape({weight.size(0), -1, 1, 1}); }

// The CUDA side of the shared algebra: our prefilter kernels and a 1x1 convolution over z.
class CudaBackend : public AtenBackend {
 public:
  explicit CudaBackend(cudaStream_t stream) : stream_(stream) {}

  bool prefilter_pays(const Geometry& geo, const ConvArgs& c, const at::Tensor& rows,
                      const at::Tensor& cols) const override {
    return use_prefilter(geo, c, rows, cols);
  }

  at::Tensor prefilter_pull(const at::Tensor& x, const at::Tensor& w, const at::Tensor& rows, const at::Tensor& cols,
                            const Geometry& geo, const ConvArgs& c) const override {
    return conv(prefilter(x, rows, cols, geo, c, stream_), weight_1x1(w), {1, 1}, {0, 0}, {1, 1}, c.groups);
  }

  // R = conv1x1(z, k): the 1x1 convolution's backward gives dz and dk; dx = prefilter^T(dz).
  std::pair<at::Tensor, at::Tensor> prefilter_pull_backward(const at::Tensor& grad_pull, const at::Tensor& x,
                                                            const at::Tensor& w, const at::Tensor& rows,
                                                            const at::Tensor& cols, const Geometry& geo,
                                                            const ConvArgs& c, bool need_x,
                                                            bool need_w) const override {
    const auto z =
        need_w ? prefilter(x, rows, cols, geo, c, stream_)
               : at::empty({}, x.options())
                     .expand({geo.batch, geo.in_channels * geo.kernel_h * geo.kernel_w, geo.out_height, geo.out_width});
    auto [grad_z, grad_w_1x1] =
        conv_backward(grad_pull, z, weight_1x1(w), {1, 1}, {0, 0}, {1, 1}, geo.groups, need_x, need_w);
    return {need_x ? prefilter_adjoint(grad_z, rows, cols, geo, c, stream_) : at::Tensor(),
            need_w ? grad_w_1x1.view(w.sizes()) : at::Tensor()};
  }

  // Without the weight gradient `input` may be a shape-only placeholder (the autograd wrapper's, for a
  // weight without gradient): then only its sizes are used, through a transposed convolution.
  std::pair<at::Tensor, at::Tensor> conv_backward(const at::Tensor& grad, const at::Tensor& input, const at::Tensor& w,
                                                  at::IntArrayRef stride, at::IntArrayRef padding,
                                                  at::IntArrayRef dilation, int64_t groups, bool need_input,
                                                  bool need_weight) const override {
    if (need_weight) {
      return AtenBackend::conv_backward(grad, input, w, stride, padding, dilation, groups, need_input, need_weight);
    }
    if (!need_input) return {};
    std::array<int64_t, 2> output_padding{};
    for (int d = 0; d < 2; ++d) {
      output_padding[d] = conv_dropped(input.size(2 + d), w.size(2 + d), stride[d], padding[d], dilation[d]);
    }
    return {at::conv_transpose2d(grad, w, std::nullopt, stride, padding, output_padding, groups, dilation), {}};
  }

 private:
  cudaStream_t stream_;
};

}  // namespace

std::tuple<at::Tensor, at::Tensor> forward(const Geometry& geo, const at::Tensor& input, const at::Tensor& weight,
                                           const OptTensor& pull_shift, const OptTensor& pull_rows,
                                           const OptTensor& pull_cols, const OptTensor& bias_in,
                                           const OptTensor& bias_out, const at::Tensor& alpha, at::IntArrayRef stride,
                                           at::IntArrayRef padding, at::IntArrayRef pull_padding,
                                           at::IntArrayRef dilation, bool save_masks, cudaStream_t stream) {
  const FieldGeometry fg = field_geometry(geo);
  check_pooling_fits(fg, input.scalar_type());
  const ConvArgs c{stride, padding, pull_padding, dilation, geo.groups};
  const auto x = acc_operand(input, true), w = acc_operand(weight, true);
  const OptTensor shift = to_acc(pull_shift), rows = to_acc(pull_rows), cols = to_acc(pull_cols);
  const Responses r = compute_responses(CudaBackend(stream), x, w, std::nullopt, rows, cols, geo, c);
  const at::Tensor q = exact_pull_q(r, w, shift, rows, cols, geo);
  const OptTensor b_in = to_acc(bias_in), b_out = to_acc(bias_out);
  const at::Tensor alpha_acc = to_acc(alpha);
  const int64_t out_channels = geo.dual_output ? 2 * geo.out_channels : geo.out_channels;
  auto out = at::empty({geo.batch, out_channels, geo.out_height, geo.out_width}, input.options());
  const auto mask_options = input.options().dtype(at::kByte);
  auto masks = save_masks ? at::empty(mask_shape(geo), mask_options) : at::empty({0}, mask_options);
  dispatch_storage(input.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = acc_of<scalar_t>;
    EpilogueArgs<scalar_t> args{fg};
    set_responses(args, r, shift, b_in, alpha_acc);
    args.exact = exact_pull<acc_t>(x, q, geo, c);
    args.bias_out = ptr<acc_t>(b_out);
    args.out = mutable_ptr<scalar_t>(out);
    args.masks = save_masks ? mutable_ptr<uint8_t>(masks) : nullptr;
    check_launch(launch_forward_epilogue(args, stream));
  });
  return {out, masks};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const Geometry& geo, const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const OptTensor& pull_shift, const OptTensor& pull_rows, const OptTensor& pull_cols, const OptTensor& bias_in,
    const at::Tensor& alpha, const at::Tensor& masks, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef pull_padding, at::IntArrayRef dilation, std::array<bool, 6> output_mask, cudaStream_t stream) {
  const FieldGeometry fg = field_geometry(geo);
  check_pooling_fits(fg, input.scalar_type());
  const Needs need = needs(geo, output_mask);
  const ConvArgs c{stride, padding, pull_padding, dilation, geo.groups};
  const CudaBackend backend(stream);
  // The autograd wrapper passes shape-only placeholders for tensors whose values are not needed.
  const auto x = acc_operand(input, need.w || need.shift || need.alpha);
  const auto w = acc_operand(weight, need.x || need.alpha);
  const OptTensor rows = to_acc(pull_rows), cols = to_acc(pull_cols);
  const Responses r = backward_responses(backend, x, w, rows, cols, geo, c, need);
  const OptTensor shift = to_acc(pull_shift), b_in = to_acc(bias_in);
  const at::Tensor q = exact_pull_q(r, w, shift, rows, cols, geo);
  GradientFields f = gradient_fields(geo, need, x.options());
  const auto partial = [&](bool wanted) {
    return wanted ? at::empty({fields_partial_rows(fg), geo.out_channels}, x.options()) : at::Tensor();
  };
  VectorParts parts{partial(need.shift), partial(need.bias), partial(need.alpha)};
  const at::Tensor alpha_acc = to_acc(alpha), g = grad_output.contiguous(), masks_c = masks.contiguous();
  dispatch_storage(input.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = acc_of<scalar_t>;
    FieldsArgs<scalar_t> args{fg, ptr<scalar_t>(g), ptr<uint8_t>(masks_c)};
    set_responses(args, r, shift, b_in, alpha_acc);
    args.exact = exact_pull<acc_t>(x, q, geo, c);
    args.grad_push0 = mutable_ptr<acc_t>(f.grad_push0);
    args.grad_pull0 = mutable_ptr<acc_t>(f.grad_pull0);
    args.grad_box = mutable_ptr<acc_t>(f.grad_box);
    args.bias_part = mutable_ptr<acc_t>(parts.bias);
    args.shift_part = mutable_ptr<acc_t>(parts.shift);
    args.alpha_part = mutable_ptr<acc_t>(parts.alpha);
    check_launch(launch_backward_fields(args, stream));
  });
  const auto [grad_x, grad_w] = input_and_weight_grads(backend, f, x, w, rows, cols, geo, c, need);
  const auto dtype = input.scalar_type();
  const auto none = at::empty({0}, input.options());
  const auto [grad_shift, grad_bias_in, grad_bias_out, grad_alpha] =
      vector_grads(parts, g, geo, output_mask, input.options());
  return {need.x ? grad_x.to(dtype) : none,
          need.w ? grad_w.to(dtype) : none,
          grad_shift,
          grad_bias_in,
          grad_bias_out,
          grad_alpha};
}

}  // namespace cuda
}  // namespace pushpull
