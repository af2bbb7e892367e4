// The per-image upsample routes (see image_routes.h). Each route (ImagePath, TapPath, PrefilterPath)
// offers the same steps to the driver below:
//   workspace(backward)          per-thread buffers;
//   image_responses / load_operands + responses   P0 and R of image n into ws.push / ws.pull;
//   inputs(ws, bias_in), field_stride()           the fields as the epilogues see them;
//   backward(grad_w_image, grad_x_image, ws)      the transposed maps of image n's gradient fields.
#include "image_routes.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "image_path.h"
#include "panel_gemm.h"
#include "prefilter_path.h"
#include "tap_path.h"

namespace pushpull {
namespace cpu {
namespace {

// The nonzero entries of a small interpolation matrix (float or double), in a loop: ATen's ne / sum / item
// would be six operator calls, ~20 us of a layer's call on a small image.
int64_t nonzeros(const at::Tensor& m) {
  const auto c = m.contiguous();
  int64_t count = 0;
  AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "pushpull_nonzeros", [&] {
    const scalar_t* v = c.const_data_ptr<scalar_t>();
    count = std::count_if(v, v + c.numel(), [](scalar_t e) { return e != scalar_t(0); });
  });
  return count;
}

// Whether the tap path beats the input-side prefilter (ImagePath or the batched product): multiply-adds per
// pixel, a filter term (an unaligned load and a multiply-add) counted as two register-tiled products.
// The tap path filters each OUTPUT channel, the prefilter each INPUT channel and multiplies twice:
// the ResNet stems (3 input channels) keep the prefilter, the 16- and 64-channel blocks take the tap path.
bool tap_path_pays(const Geometry& geo, const at::Tensor& rows, const at::Tensor& cols) {
  const int64_t kh = geo.kernel_h, taps = kh * geo.kernel_w;
  const int64_t rows_nz = nonzeros(rows), cols_nz = nonzeros(cols);
  const int64_t products = geo.out_channels * (geo.in_channels / geo.groups) * taps;
  const int64_t tap_filters = geo.out_channels * (taps + kh * cols_nz + kh + rows_nz);
  const int64_t prefilters = geo.in_channels * (rows_nz + kh * cols_nz);
  return products + 2 * tap_filters <= 2 * products + 2 * prefilters;
}

// The stride-1 routes (float and double): the tap path where it pays, else the input-side prefilter on
// the gapped layout. PUSHPULL_CPU_TAP_PATH=always / never overrides the cost rule: the tests run every
// stride-1 upsample case both ways.
ImageRoute stride_one_route(const Geometry& geo, const OptTensor& rows, const OptTensor& cols) {
  const char* choice = std::getenv("PUSHPULL_CPU_TAP_PATH");
  const bool taps = choice && std::strcmp(choice, "always") == 0  ? true
                    : choice && std::strcmp(choice, "never") == 0 ? false
                                                                  : tap_path_pays(geo, *rows, *cols);
  return taps ? ImageRoute::kTaps : ImageRoute::kPrefilter;
}

// The A operands: W stacked by tap for Y, [C_out, taps, C_in/groups]; and per group W^T for dx,
// [groups, C_in/groups, C_out/groups, taps].
at::Tensor tap_stacked_weight(const at::Tensor& w) {
  return w.reshape({w.size(0), w.size(1), -1}).transpose(1, 2).contiguous();
}
at::Tensor tap_transposed_weight(const at::Tensor& w, int64_t groups) {
  return w.reshape({groups, w.size(0) / groups, w.size(1), -1}).permute({0, 2, 1, 3}).contiguous();
}

// Per group W_g^T, [groups, K, C_out/groups]: the A operand of dx (ImagePath, PrefilterPath).
at::Tensor grouped_transposed_weight(const at::Tensor& w, int64_t groups) {
  return grouped_weight(w, groups).transpose(1, 2).contiguous();
}

// ImagePath (P0, R or S per image, the epilogue in cache) where the operands are thin: the stems (K = 27,
// 147), whose batched route spends most of its time outside the convolution, going through memory between
// the passes. Wide layers keep oneDNN's convolution (and, strided upsample, the batched prefilter product).
// ResNet-50's 2020 stem (7x7, stride 2, 3 -> 64, batch 8 at 112 px, two threads on the 2-core AMD EPYC):
// inference 10.4 -> 9.5 ms, forward + weight gradient 22.5 -> 21.6 ms over the batched route.
constexpr int64_t kMaxImagePathK = 256;
bool thin_operands(const Geometry& geo) {
  return geo.in_channels / geo.groups * geo.kernel_h * geo.kernel_w <= kMaxImagePathK;
}

template <typename T>
const T* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

at::Tensor contiguous_or_undefined(const OptTensor& t) { return t ? t->contiguous() : at::Tensor(); }

// fn(the route of `kind`), built for the forward or the backward (need_x: with W^T for dx; blocked_backward:
// an ImagePath backward whose operands only the weight gradient reads, packed block by block). The tensors
// its raw pointers read live until fn returns.
template <typename scalar_t, typename Fn>
void with_route(ImageRoute kind, const Geometry& geo, const ConvArgs& conv, const at::Tensor& w,
                const PullOperands& pull, bool backward, bool need_x, Fn fn, bool blocked_backward = false,
                const scalar_t* batched_push = nullptr) {
  if (kind == ImageRoute::kTaps) {
    const auto stacked = tap_stacked_weight(w);
    const auto w_t = need_x ? tap_transposed_weight(w, geo.groups) : at::Tensor();
    fn(TapPath<scalar_t>(geo, conv, *pull.rows, *pull.cols, stacked.const_data_ptr<scalar_t>(),
                         data_or_null<scalar_t>(w_t)));
    return;
  }
  const auto w_t = need_x ? grouped_transposed_weight(w, geo.groups) : at::Tensor();
  if (kind == ImageRoute::kPrefilter) {
    fn(PrefilterPath<scalar_t>(geo, conv, *pull.rows, *pull.cols, w.const_data_ptr<scalar_t>(),
                               data_or_null<scalar_t>(w_t)));
    return;
  }
  TORCH_CHECK(kind == ImageRoute::kBlocks, "pushpull CPU: no per-image route");
  const auto rows_c = contiguous_or_undefined(pull.rows), cols_c = contiguous_or_undefined(pull.cols);
  const auto shift = contiguous_or_undefined(pull.shift);
  fn(ImagePath<scalar_t>(geo, conv, rows_c, cols_c, data_or_null<scalar_t>(shift), w, data_or_null<scalar_t>(w_t),
                         !backward ? kOperandBlockBytes : (blocked_backward ? kBackwardBlockBytes : 0), batched_push));
}

template <typename Route>
struct IsImagePath : std::false_type {};
template <typename T>
struct IsImagePath<ImagePath<T>> : std::true_type {};

// P0 and R of image n: ImagePath packs blocks of rows; the gapped routes load the whole image. With
// check_finite, false (and no responses) for an image with NaN or +-Inf; the gapped routes test it as they
// load it, ImagePath just before (in cache for its own loads just after).
template <typename Route, typename Workspace>
bool image_responses(const Route& route, const typename Route::T* x, int64_t n, Workspace& ws, bool check_finite) {
  if constexpr (IsImagePath<Route>::value) {
    const int64_t image = route.geo.in_channels * route.geo.height * route.geo.width;
    if (check_finite && !values_finite(x + n * image, image)) return false;
    route.image_responses(x, n, ws);
  } else {
    if (!route.load_operands(x, n, ws, check_finite)) return false;
    route.responses(ws);
  }
  return true;
}

// The images are shared out dynamically: each of `image_workers` tasks (one per intra-op thread) builds its
// workspace, then takes the next image from a shared counter (ImageCounter::take) until none is left, rather
// than a fixed equal range. A thread slowed down (another process on its core) then leaves the others
// less to wait for at the end: cifar-b1-2020's forward on the 2-core EPYC spent 14 % of its thread time
// in OpenMP's barrier with equal ranges, oneDNN's convolution 10 %. Each image's results go to its own
// slots, so they do not depend on which thread ran it.
int64_t image_workers(int64_t batch) { return std::min<int64_t>(batch, at::get_num_threads()); }

struct ImageCounter {
  std::atomic<int64_t> next{0};
  const int64_t batch;
  bool take(int64_t& n) { return (n = next++) < batch; }
};

// Image n's outputs as fused_product.h writes them.
template <typename T>
dense::ResponseEpilogue<T> image_epilogue(const Geometry& geo, const ForwardOutputs<T>& out, const T* bias_in,
                                          int64_t n) {
  const int64_t plane = geo.out_height * geo.out_width, octets = geo.out_channels / 8;
  uint8_t* mask_p = out.masks ? out.masks + n * octets * plane : nullptr;
  return {bias_in,
          out.alpha,
          out.bias_out,
          out.y + n * geo.out_channels * plane,
          out.saved_pull ? out.saved_pull + n * geo.out_channels * plane : nullptr,
          mask_p,
          mask_p ? mask_p + geo.batch * octets * plane : nullptr};  // masks[1]
}

// Returns false when check_finite finds an image with NaN or +-Inf (the images after it are skipped).
template <typename Route>
bool forward_images(const Route& route, const typename Route::T* x, const typename Route::T* bias_in,
                    const ForwardOutputs<typename Route::T>& out, bool check_finite) {
  using T = typename Route::T;
  const Geometry& geo = route.geo;
  const int64_t octets = (geo.out_channels + 7) / 8;
  std::atomic<bool> finite{true};
  bool fused = false;
  if constexpr (std::is_same_v<Route, PrefilterPath<float>>) fused = route.fuses_epilogue();
  ImageCounter images{{}, geo.batch};
  at::parallel_for(0, image_workers(geo.batch), 1, [&](int64_t, int64_t) {
    auto ws = route.workspace(false);
    PlaneScratch<T> scratch(geo);
    for (int64_t n; finite && images.take(n);) {
      if constexpr (std::is_same_v<Route, PrefilterPath<float>>) {
        if (fused) {
          if (!route.load_operands(x, n, ws, check_finite)) {
            finite = false;
            break;
          }
          route.fused_responses(ws, image_epilogue(geo, out, bias_in, n));
          continue;
        }
      }
      if (!image_responses(route, x, n, ws, check_finite)) {
        finite = false;
        break;
      }
      const auto in = route.inputs(ws, bias_in);
      for (int64_t octet = 0; octet < octets; ++octet) forward_epilogue_octet(in, 0, n, octet, out, scratch);
    }
  });
  return finite;
}

// Per image n: the gradient fields into the workspace (over P0 and R, channel by channel after reading
// them), then the weight gradient of the image (a row of grad_w_images) and its input gradient.
template <typename Route>
void backward_images(const Route& route, const BackwardRequest& req, BackwardFields& f, at::Tensor& grad_x,
                     at::Tensor& grad_w_images) {
  using T = typename Route::T;
  const Geometry& geo = req.geo;
  const auto bin = backward_inputs<T>(req);
  const bool operands = req.need.w || bin.recompute_pull || req.need.shift;
  const T* x = operands ? req.x.const_data_ptr<T>() : nullptr;
  const T* bias_in = req.bias_in ? req.bias_in->const_data_ptr<T>() : nullptr;
  const auto outputs = backward_outputs<T>(geo, f);
  ImageCounter images{{}, geo.batch};
  at::parallel_for(0, image_workers(geo.batch), 1, [&](int64_t, int64_t) {
    auto ws = route.workspace(true);
    PlaneScratch<T> scratch(geo);
    auto fields = outputs;
    fields.grad_push0 = {ws.push.data(), 0, route.field_stride()};
    fields.grad_pull0 = {ws.pull.data(), 0, route.field_stride()};
    if constexpr (IsImagePath<Route>::value) fields.grad_box = req.need.x ? route.grad_box_field(ws) : nullptr;
    ScratchVector<at::opmath_type<T>> box_grad(fields.grad_box ? route.plane : 0);
    for (int64_t n; images.take(n);) {
      if (operands) route.load_operands(x, n, ws);
      if (bin.recompute_pull) route.responses(ws);
      const auto in = route.inputs(ws, bias_in);
      for (int64_t grp = 0; grp < geo.groups; ++grp)
        backward_epilogue_group(in, 0, n, grp, bin, fields, scratch, box_grad);
      if constexpr (IsImagePath<Route>::value) {
        if (route.blocked) {  // no dx: the weight gradient alone, block by block
          if (req.need.w) route.blocked_weight_grad(x, n, grad_w_images[n].data_ptr<T>(), ws);
          continue;
        }
      }
      if (req.need.w || req.need.x) {
        route.backward(req.need.w ? grad_w_images[n].data_ptr<T>() : nullptr,
                       req.need.x ? grad_x[n].data_ptr<T>() : nullptr, ws);
      }
    }
  });
}

}  // namespace

ImageRoute image_route(const Geometry& geo, const ConvArgs& conv, const OptTensor& rows, const OptTensor& cols,
                       at::ScalarType dtype) {
  if (dtype != at::kFloat && dtype != at::kDouble) return ImageRoute::kBatched;
  if (geo.pull != PullKind::kSeparable) return thin_operands(geo) ? ImageRoute::kBlocks : ImageRoute::kBatched;
  if (conv.stride[0] == 1 && conv.stride[1] == 1) return stride_one_route(geo, rows, cols);
  // Strided upsample: ImagePath also below kMinChannelsForPrefilter output channels per group, where the
  // batched product is thin.
  return thin_operands(geo) || !use_prefilter(geo) ? ImageRoute::kBlocks : ImageRoute::kBatched;
}

// Whether an ImagePath forward takes P0 from ATen's convolution of the whole batch (oneDNN) and multiplies
// only the prefiltered operand itself: float32 upsample, where oneDNN's product runs at least as fast as
// the packed one (90 % of the multiply-add peak against 84 % on the stem below) and no im2col is packed.
// ResNet-50's 2020 stem (7x7, stride 2, 3 -> 64, batch 8 at 112 px, two threads on the 2-core AMD EPYC
// with AVX-512, medians of 3 and 2 alternated runs): inference 7.8-7.9 -> 6.6-6.8 ms, forward with the
// masks saved 7.8-9.1 -> 7.1-7.4 ms. The backward packs its own operands, as before.
bool batched_push_pays(ImageRoute route, const Geometry& geo, at::ScalarType dtype) {
  return route == ImageRoute::kBlocks && geo.pull == PullKind::kSeparable && dtype == at::kFloat;
}

template <typename scalar_t>
bool forward_by_image(ImageRoute route, const Geometry& geo, const ConvArgs& conv, const at::Tensor& x,
                      const at::Tensor& w, const PullOperands& pull, const scalar_t* bias_in,
                      const ForwardOutputs<scalar_t>& out, bool check_finite) {
  const at::Tensor push =
      batched_push_pays(route, geo, x.scalar_type())
          ? at::convolution(x, w, {}, conv.stride, conv.padding, conv.dilation, false, {0, 0}, conv.groups).contiguous()
          : at::Tensor();
  bool finite = true;
  with_route<scalar_t>(
      route, geo, conv, w, pull, /*backward=*/false, /*need_x=*/false,
      [&](const auto& r) { finite = forward_images(r, x.const_data_ptr<scalar_t>(), bias_in, out, check_finite); },
      /*blocked_backward=*/false, data_or_null<scalar_t>(push));
  return finite;
}
template bool forward_by_image<float>(ImageRoute, const Geometry&, const ConvArgs&, const at::Tensor&,
                                      const at::Tensor&, const PullOperands&, const float*,
                                      const ForwardOutputs<float>&, bool);
template bool forward_by_image<double>(ImageRoute, const Geometry&, const ConvArgs&, const at::Tensor&,
                                       const at::Tensor&, const PullOperands&, const double*,
                                       const ForwardOutputs<double>&, bool);

std::pair<at::Tensor, at::Tensor> backward_by_image(ImageRoute route, const BackwardRequest& req, BackwardFields& f) {
  const Geometry& geo = req.geo;
  at::Tensor grad_x, grad_w, grad_w_images;
  if (req.need.x) grad_x = at::empty({geo.batch, geo.in_channels, geo.height, geo.width}, req.w.options());
  // Per-image partial sums, added in a fixed order below: the result does not depend on the threads.
  if (req.need.w) grad_w_images = at::zeros({geo.batch, geo.out_channels, req.w[0].numel()}, req.w.options());
  AT_DISPATCH_FLOATING_TYPES(req.w.scalar_type(), "pushpull_backward_cpu_by_image", [&] {
    // ImagePath packs blocks of rows (in cache) where only the weight gradient reads its operands: no dx, and
    // the pull response is not recomputed (the epilogue would read P0 and R of the whole plane).
    const bool blocked = !req.need.x && !backward_inputs<scalar_t>(req).recompute_pull;
    with_route<scalar_t>(
        route, geo, req.conv, req.w, {req.shift, req.pull_rows, req.pull_cols}, /*backward=*/true, req.need.x,
        [&](const auto& r) { backward_images(r, req, f, grad_x, grad_w_images); }, blocked);
  });
  if (req.need.w) grad_w = grad_w_images.sum(0).view(req.w.sizes());
  return {grad_x, grad_w};
}

}  // namespace cpu
}  // namespace pushpull
