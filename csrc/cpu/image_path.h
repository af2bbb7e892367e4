// One image per task, everything in cache (ImagePath): the upsample pull with the prefilter algebra, or the
// pulls read off the push response (invert: R = shift * S - P0; negate: R = -P0).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "epilogues.h"
#include "panel_gemm.h"
#include "prefilter.h"
#include "scratch.h"

namespace pushpull {
namespace cpu {

// The upsample pull with the prefilter algebra, one image per task, everything in cache: for each group
// the input's im2col and its prefilter z are packed as panels (panel_gemm.h), and ONE weight matrix
// W_g [C_out/groups, K], K = C_in/groups * kh * kw, multiplies both: P0 = W_g @ im2col, R = W_g @ z. The
// epilogue then reads P0 and R from the workspace. Backward, per image: dW += gP @ im2col^T + gR @ z^T
// (partial sums per image, added in a fixed order), dx = col2im(W_g^T @ gP) + prefilter^T(W_g^T @ gR).
// Invert and negate take only the im2col and P0; invert's box sum S is the column sum of the packed
// im2col, and the adjoint of S joins the im2col adjoint: dx = col2im(W_g^T @ gP + 1 (x) gS).
// A float32 upsample forward may take P0 of the whole batch from ATen's convolution instead (batched_push,
// see batched_push_pays in image_routes.cpp): then only z is packed and multiplied here.
template <typename scalar_t>
struct ImageWorkspace {
  ScratchVector<scalar_t> cols, z;              // packed operands of a block of rows, group g at g * operand_size
  ScratchVector<scalar_t> push, pull;           // [C_out, field_ld]: responses, then their gradients
  ScratchVector<scalar_t> packed_grad;          // one group's gradient field, packed
  ScratchVector<scalar_t> tap_rows;             // one channel's im2col or prefilter [taps, block pixels]
  ScratchVector<scalar_t> grad_rows;            // W_g^T @ (a gradient field) [K, padded]
  ScratchVector<scalar_t> prefilter_tmp, line;  // line: one input plane (the prefilter's adjoint, for dx)
  ScratchVector<scalar_t> box, grad_box;        // invert: S and its gradient, [groups, plane]
  int64_t image = 0;                            // the image whose responses the fields hold
};

// Packed operands of this many bytes per block of output rows (both of them) stay in the 512 KiB L2 of
// the CPU the path was tuned on (benchmarks/results/cpu-2core) while the products read them.
constexpr int64_t kOperandBlockBytes = 256 * 1024;
// The blocked backward's blocks (blocked_weight_grad): larger, since each block of the Gram product ends in
// horizontal sums of its register tiles (256 KiB: 3 rows of the 112-wide imagenet stem, 7 panels a tile).
// Backward of imagenet-stem-2024, batch 4, one thread, on the 2-core Xeon (2 MiB L2), min of 3-4 runs:
// whole planes 34.7 ms, 256 KiB 31.0, 1 MiB 27.6, 4 MiB 30.3.
constexpr int64_t kBackwardBlockBytes = 1024 * 1024;

template <typename scalar_t>
struct ImagePath {
  using T = scalar_t;
  const Geometry& geo;
  const ConvArgs& conv;
  PrefilterGeometry pre;
  const scalar_t *rows, *cols;  // interpolation matrices, contiguous (upsample; else null)
  const scalar_t* shift;        // pull_shift (invert; else null)
  bool separable;               // upsample: the prefilter operand z and the pull field R
  const scalar_t* weight;       // [C_out, K]
  const scalar_t* weight_t;     // per group W_g^T [groups, K, C_out/groups] (backward, for dx; else null)
  int64_t plane, padded, taps, in_per_group, out_per_group, k_size;
  int64_t block_rows;  // output rows packed at a time (blocked; else whole planes)
  int64_t field_ld;    // row stride of the push/pull fields: a block's product may write kPanel - 1 past it
  bool blocked;
  // The batch's P0 [N, C_out, plane], computed beforehand (a forward of the upsample pull: see
  // batched_push_pays); then no im2col is packed and only R is multiplied here. Else null.
  const scalar_t* batched_push = nullptr;

  // block_bytes: pack blocks of rows of about this many operand bytes (0: whole planes): the forward, and a
  // backward in which only the weight gradient reads the packed operands (blocked_weight_grad).
  // r, k: the contiguous interpolation matrices (upsample; else undefined); s: pull_shift or null.
  ImagePath(const Geometry& g, const ConvArgs& c, const at::Tensor& r, const at::Tensor& k, const scalar_t* s,
            const at::Tensor& w, const scalar_t* w_t, int64_t block_bytes, const scalar_t* push = nullptr)
      : geo(g),
        conv(c),
        pre(g.pull == PullKind::kSeparable ? prefilter_geometry(g, c, r, k) : PrefilterGeometry{}),
        rows(r.defined() ? r.const_data_ptr<scalar_t>() : nullptr),
        cols(k.defined() ? k.const_data_ptr<scalar_t>() : nullptr),
        shift(s),
        separable(g.pull == PullKind::kSeparable),
        weight(w.const_data_ptr<scalar_t>()),
        weight_t(w_t),
        plane(g.out_height * g.out_width),
        padded(panel::padded(plane)),
        taps(g.kernel_h * g.kernel_w),
        in_per_group(g.in_channels / g.groups),
        out_per_group(g.out_channels / g.groups),
        k_size(in_per_group * taps),
        field_ld(plane + panel::kPanel),
        blocked(block_bytes > 0),
        batched_push(push) {
    const int64_t operands = (separable ? 1 : 0) + (batched_push ? 0 : 1);
    const int64_t row_bytes = operands * g.groups * k_size * g.out_width * static_cast<int64_t>(sizeof(scalar_t));
    block_rows =
        blocked ? rows_per_block(std::clamp<int64_t>(block_bytes / std::max<int64_t>(row_bytes, 1), 1, g.out_height))
                : g.out_height;
  }

  // Of the block heights from most_rows / 2 to most_rows, the one with the fewest packed columns over the
  // plane (a block's last panel is padded to kPanel pixels, and its products run over the padding): on
  // ResNet-50's stem (56 columns) 6 rows make 7 whole panels where 7 rows made 8 and a sixth. Ties: the
  // taller.
  int64_t rows_per_block(int64_t most_rows) const {
    const int64_t wo = geo.out_width, ho = geo.out_height;
    auto columns = [&](int64_t rows) { return ho / rows * panel::padded(rows * wo) + panel::padded(ho % rows * wo); };
    int64_t best = most_rows;
    for (int64_t rows = most_rows - 1; rows >= std::max<int64_t>(1, most_rows / 2); --rows)
      if (columns(rows) < columns(best)) best = rows;
    return best;
  }

  int64_t operand_size() const { return k_size * panel::padded(block_rows * geo.out_width); }
  const scalar_t* weight_of(int64_t grp) const { return weight + grp * out_per_group * k_size; }

  // The forward's buffers, and the backward's where it runs: those of dx only where dx is wanted (grad_rows
  // alone is 147 x the plane on a 7x7 stem, and a ScratchVector zeroes what it allocates).
  ImageWorkspace<scalar_t> workspace(bool backward) const {
    ImageWorkspace<scalar_t> ws;
    const int64_t pulls = separable ? 1 : 0, boxes = geo.pull == PullKind::kShift ? geo.groups * plane : 0;
    const int64_t pushes = batched_push ? 0 : 1;
    ws.cols.resize(pushes * geo.groups * operand_size());
    ws.z.resize(pulls * geo.groups * operand_size());
    ws.push.resize(pushes * geo.out_channels * field_ld);
    ws.pull.resize(pulls * geo.out_channels * field_ld);
    ws.box.resize(boxes);
    ws.tap_rows.resize(taps * block_rows * geo.out_width);
    ws.prefilter_tmp.resize(pre.tmp_size());
    if (backward) ws.packed_grad.resize(out_per_group * padded);
    if (backward && weight_t) {  // dx wanted (weight_t is W^T, given only then)
      ws.grad_box.resize(boxes);
      ws.grad_rows.resize(k_size * padded);
      ws.line.resize(geo.height * geo.width);
    }
    return ws;
  }

  // Valid output columns of tap column j: those reading an input column in [0, W).
  std::pair<int64_t, int64_t> valid_columns(int64_t j) const {
    return valid_range(j * conv.dilation[1] - conv.padding[1], conv.stride[1], geo.width, geo.out_width);
  }

  // im2col of output rows [ho_begin, ho_end) of one input plane, packed: row first_row + i * kw + j, pixel
  // (ho - ho_begin) * Wo + wo holds x[ho * sh + i * dh - ph, wo * sw + j * dw - pw] (0 outside the input).
  // One tap at a time goes through `row` (scratch), so that packing copies whole panels.
  void pack_im2col_plane(const scalar_t* x, int64_t ho_begin, int64_t ho_end, int64_t first_row, scalar_t* packed,
                         scalar_t* row) const {
    const int64_t pixels = (ho_end - ho_begin) * geo.out_width;
    for (int64_t i = 0; i < geo.kernel_h; ++i) {
      for (int64_t j = 0; j < geo.kernel_w; ++j) {
        const auto [lo, hi] = valid_columns(j);
        const int64_t offset = j * conv.dilation[1] - conv.padding[1], s = conv.stride[1];
        for (int64_t ho = ho_begin; ho < ho_end; ++ho) {
          const int64_t h = ho * conv.stride[0] + i * conv.dilation[0] - conv.padding[0];
          scalar_t* out = row + (ho - ho_begin) * geo.out_width;
          if (h < 0 || h >= geo.height) {
            std::fill(out, out + geo.out_width, scalar_t(0));
            continue;
          }
          // Zeros only where the tap reads the padding: columns [0, lo) and [hi, Wo).
          std::fill(out, out + lo, scalar_t(0));
          strided_copy(x + h * geo.width + offset, s, lo, hi, out);
          std::fill(out + hi, out + geo.out_width, scalar_t(0));
        }
        panel::pack_row(row, pixels, k_size, first_row + i * geo.kernel_w + j, packed);
      }
    }
  }

  // Adds the adjoint of pack_im2col_plane: gx[h, w] += the entries of grad (rows i * kw + j, row stride ld)
  // that read (h, w).
  void col2im_plane(const scalar_t* grad, int64_t ld, scalar_t* gx) const {
    for (int64_t i = 0; i < geo.kernel_h; ++i) {
      for (int64_t j = 0; j < geo.kernel_w; ++j) {
        const auto [lo, hi] = valid_columns(j);
        const int64_t offset = j * conv.dilation[1] - conv.padding[1], s = conv.stride[1];
        for (int64_t ho = 0; ho < geo.out_height; ++ho) {
          const int64_t h = ho * conv.stride[0] + i * conv.dilation[0] - conv.padding[0];
          if (h < 0 || h >= geo.height) continue;
          const scalar_t* src = grad + (i * geo.kernel_w + j) * ld + ho * geo.out_width;
          scalar_t* gx_row = gx + h * geo.width + offset;
          for (int64_t wo = lo; wo < hi; ++wo) gx_row[wo * s] += src[wo];
        }
      }
    }
  }

  // Invert: S of the packed rows (pixels from `column` of the plane) = each group's im2col column sums.
  void box_sums(int64_t pixels, int64_t column, ImageWorkspace<scalar_t>& ws) const {
    for (int64_t grp = 0; grp < geo.groups; ++grp) {
      const scalar_t* packed = ws.cols.data() + grp * operand_size();
      scalar_t* box = ws.box.data() + grp * plane + column;
      for (int64_t p = 0; p < panel::panels(pixels); ++p) {
        scalar_t acc[panel::kPanel] = {};
        for (int64_t k = 0; k < k_size; ++k)
          for (int64_t l = 0; l < panel::kPanel; ++l) acc[l] += packed[(p * k_size + k) * panel::kPanel + l];
        std::copy_n(acc, std::min(panel::kPanel, pixels - p * panel::kPanel), box + p * panel::kPanel);
      }
    }
  }

  // The packed im2col (and prefilter) operands of every group of image n, output rows [ho_begin, ho_end);
  // invert: their box sums.
  void pack_operands(const scalar_t* x, int64_t n, int64_t ho_begin, int64_t ho_end,
                     ImageWorkspace<scalar_t>& ws) const {
    const int64_t pixels = (ho_end - ho_begin) * geo.out_width;
    for (int64_t c = 0; c < geo.in_channels; ++c) {
      const scalar_t* x_plane = x + (n * geo.in_channels + c) * geo.height * geo.width;
      const int64_t grp = c / in_per_group, first_row = (c % in_per_group) * taps;
      if (!batched_push) {
        pack_im2col_plane(x_plane, ho_begin, ho_end, first_row, ws.cols.data() + grp * operand_size(),
                          ws.tap_rows.data());
      }
      if (separable) pack_prefilter_plane(x_plane, ho_begin, ho_end, grp, first_row, ws);
    }
    if (geo.pull == PullKind::kShift) box_sums(pixels, ho_begin * geo.out_width, ws);
  }

  // The packed prefilter operand z of one input plane (channel row first_row of group grp).
  void pack_prefilter_plane(const scalar_t* x_plane, int64_t ho_begin, int64_t ho_end, int64_t grp, int64_t first_row,
                            ImageWorkspace<scalar_t>& ws) const {
    const int64_t pixels = (ho_end - ho_begin) * geo.out_width;
    prefilter_plane(pre, rows, cols, x_plane, ho_begin, ho_end, ws.prefilter_tmp.data(),
                    [&](int64_t tap, int64_t ho, const scalar_t* row) {
                      std::copy(row, row + geo.out_width,
                                ws.tap_rows.data() + tap * pixels + (ho - ho_begin) * geo.out_width);
                    });
    for (int64_t t = 0; t < taps; ++t) {
      panel::pack_row(ws.tap_rows.data() + t * pixels, pixels, k_size, first_row + t,
                      ws.z.data() + grp * operand_size());
    }
  }

  // P0 and R of the packed rows [ho_begin, ho_end) into columns ho_begin * Wo.. of the fields.
  void responses(int64_t ho_begin, int64_t ho_end, ImageWorkspace<scalar_t>& ws) const {
    const int64_t pixels = (ho_end - ho_begin) * geo.out_width, column = ho_begin * geo.out_width;
    for (int64_t grp = 0; grp < geo.groups; ++grp) {
      const int64_t row = grp * out_per_group;
      if (!batched_push) {
        panel::product(weight_of(grp), k_size, out_per_group, ws.cols.data() + grp * operand_size(), k_size, pixels,
                       ws.push.data() + row * field_ld + column, field_ld);
      }
      if (!separable) continue;
      panel::product(weight_of(grp), k_size, out_per_group, ws.z.data() + grp * operand_size(), k_size, pixels,
                     ws.pull.data() + row * field_ld + column, field_ld);
    }
  }

  // Backward: the operands of image n (and S), then P0 and R from them; blocked, S alone (invert: the
  // epilogue reads it), the operands are packed block by block by blocked_weight_grad.
  void load_operands(const scalar_t* x, int64_t n, ImageWorkspace<scalar_t>& ws) const {
    if (!blocked) {
      pack_operands(x, n, 0, geo.out_height, ws);
    } else if (geo.pull == PullKind::kShift) {
      input_box_sums(x, n, ws);
    }
  }

  // Invert: S of image n straight from its input planes (what box_sums reads off the packed im2col): per
  // group, the channels' sum plane, then its kw taps along each row, then the kh taps down each column.
  void input_box_sums(const scalar_t* x, int64_t n, ImageWorkspace<scalar_t>& ws) const {
    const int64_t in_plane = geo.height * geo.width, wo_count = geo.out_width;
    ScratchVector<scalar_t> sum(in_plane), along(geo.height * wo_count);
    for (int64_t grp = 0; grp < geo.groups; ++grp) {
      std::fill(sum.begin(), sum.end(), scalar_t(0));
      for (int64_t c = grp * in_per_group; c < (grp + 1) * in_per_group; ++c) {
        const scalar_t* __restrict__ x_plane = x + (n * geo.in_channels + c) * in_plane;
        for (int64_t i = 0; i < in_plane; ++i) sum[i] += x_plane[i];
      }
      std::fill(along.begin(), along.end(), scalar_t(0));
      for (int64_t j = 0; j < geo.kernel_w; ++j) {  // along[h, wo] = sum_j sum[h, wo * sw + j * dw - pw]
        const auto [lo, hi] = valid_columns(j);
        const int64_t offset = j * conv.dilation[1] - conv.padding[1], s = conv.stride[1];
        for (int64_t h = 0; h < geo.height; ++h) {
          const scalar_t* src = sum.data() + h * geo.width + offset;
          scalar_t* out = along.data() + h * wo_count;
          for (int64_t wo = lo; wo < hi; ++wo) out[wo] += src[wo * s];
        }
      }
      scalar_t* box = ws.box.data() + grp * plane;  // S[ho, wo] = sum_i along[ho * sh + i * dh - ph, wo]
      std::fill(box, box + plane, scalar_t(0));
      for (int64_t ho = 0; ho < geo.out_height; ++ho) {
        for (int64_t i = 0; i < geo.kernel_h; ++i) {
          const int64_t h = ho * conv.stride[0] + i * conv.dilation[0] - conv.padding[0];
          if (h < 0 || h >= geo.height) continue;
          const scalar_t* src = along.data() + h * wo_count;
          for (int64_t wo = 0; wo < wo_count; ++wo) box[ho * wo_count + wo] += src[wo];
        }
      }
    }
  }
  void responses(ImageWorkspace<scalar_t>& ws) const { responses(0, geo.out_height, ws); }

  // Forward: P0 and R of image n, block by block.
  void image_responses(const scalar_t* x, int64_t n, ImageWorkspace<scalar_t>& ws) const {
    ws.image = n;
    for (int64_t ho = 0; ho < geo.out_height; ho += block_rows) {
      const int64_t end = std::min(ho + block_rows, geo.out_height);
      pack_operands(x, n, ho, end, ws);
      responses(ho, end, ws);
    }
  }

  // The workspace's fields as the epilogues see them (one image: image stride 0).
  int64_t field_stride() const { return field_ld; }
  PlaneInputs<scalar_t> inputs(const ImageWorkspace<scalar_t>& ws, const scalar_t* bias_in) const {
    const FieldView<const scalar_t> pull =
        separable ? FieldView<const scalar_t>{ws.pull.data(), 0, field_ld} : FieldView<const scalar_t>{};
    const scalar_t* box = shift ? ws.box.data() : nullptr;
    const FieldView<const scalar_t> push =
        batched_push ? FieldView<const scalar_t>{batched_push + ws.image * geo.out_channels * plane, 0, plane}
                     : FieldView<const scalar_t>{ws.push.data(), 0, field_ld};
    return {geo, push, pull, box, shift, bias_in, plane};
  }

  // Invert: where the backward epilogue writes dL/dS of the image (when dx is wanted).
  scalar_t* grad_box_field(ImageWorkspace<scalar_t>& ws) const {
    return ws.grad_box.empty() ? nullptr : ws.grad_box.data();
  }

  // Packs rows [row, row + out_per_group) of a [C_out, field_ld] gradient field, pixels [column, column +
  // pixels) (the whole plane by default).
  void pack_group_field(const ScratchVector<scalar_t>& field, int64_t grp, ImageWorkspace<scalar_t>& ws,
                        int64_t column = 0, int64_t pixels = -1) const {
    if (pixels < 0) pixels = plane;
    for (int64_t r = 0; r < out_per_group; ++r) {
      panel::pack_row(field.data() + (grp * out_per_group + r) * field_ld + column, pixels, out_per_group, r,
                      ws.packed_grad.data());
    }
  }

  // grad_w[grp rows] += packed gradient (one group) @ operand^T, over `pixels` packed pixels.
  void add_weight_grad(const scalar_t* operand, int64_t grp, const ImageWorkspace<scalar_t>& ws, scalar_t* grad_w,
                       int64_t pixels = -1) const {
    panel::gram(ws.packed_grad.data(), out_per_group, operand, k_size, pixels < 0 ? plane : pixels,
                grad_w + grp * out_per_group * k_size, k_size);
  }

  // Blocked backward (no dx): the weight gradient of image n block by block of output rows, each block's
  // operands packed again (in cache) and its rows of the gradient fields (ws.push / ws.pull) packed beside.
  void blocked_weight_grad(const scalar_t* x, int64_t n, scalar_t* grad_w_image, ImageWorkspace<scalar_t>& ws) const {
    for (int64_t ho = 0; ho < geo.out_height; ho += block_rows) {
      const int64_t end = std::min(ho + block_rows, geo.out_height);
      const int64_t pixels = (end - ho) * geo.out_width, column = ho * geo.out_width;
      pack_operands(x, n, ho, end, ws);
      for (int64_t grp = 0; grp < geo.groups; ++grp) {
        pack_group_field(ws.push, grp, ws, column, pixels);
        add_weight_grad(ws.cols.data() + grp * operand_size(), grp, ws, grad_w_image, pixels);
        if (!separable) continue;
        pack_group_field(ws.pull, grp, ws, column, pixels);
        add_weight_grad(ws.z.data() + grp * operand_size(), grp, ws, grad_w_image, pixels);
      }
    }
  }

  // W_g^T @ (packed gradient) into ws.grad_rows [K, padded]; weight_t is W_g^T [K, C_out/groups].
  void backproject(const scalar_t* weight_t, ImageWorkspace<scalar_t>& ws) const {
    panel::product(weight_t, out_per_group, k_size, ws.packed_grad.data(), out_per_group, plane, ws.grad_rows.data(),
                   padded);
  }

  // The pull field's share of the weight gradient and of dx (overwrites the group's dx planes).
  void backward_pull(int64_t grp, const scalar_t* w_t, scalar_t* grad_w_image, scalar_t* gx_group,
                     ImageWorkspace<scalar_t>& ws) const {
    const int64_t in_plane = geo.height * geo.width;
    pack_group_field(ws.pull, grp, ws);
    if (grad_w_image) add_weight_grad(ws.z.data() + grp * operand_size(), grp, ws, grad_w_image);
    if (!gx_group) return;
    backproject(w_t, ws);
    for (int64_t c = 0; c < in_per_group; ++c) {
      prefilter_adjoint_plane(pre, rows, cols, ws.grad_rows.data() + c * taps * padded, padded, ws.prefilter_tmp.data(),
                              gx_group + c * in_plane, ws.line.data());
    }
  }

  // Invert: adds dL/dS of group grp to every im2col row of ws.grad_rows (S sums them all).
  void add_box_gradient(int64_t grp, ImageWorkspace<scalar_t>& ws) const {
    const scalar_t* __restrict__ gs = ws.grad_box.data() + grp * plane;
    for (int64_t k = 0; k < k_size; ++k) {
      scalar_t* __restrict__ row = ws.grad_rows.data() + k * padded;
      for (int64_t p = 0; p < plane; ++p) row[p] += gs[p];
    }
  }

  // From the gradient fields in ws.push / ws.pull (the operands packed when grad_w_image is wanted): the
  // weight gradient of the image (grad_w_image, [C_out, K], added to) and its input gradient planes
  // (grad_x_image, [C_in, H, W]).
  void backward(scalar_t* grad_w_image, scalar_t* grad_x_image, ImageWorkspace<scalar_t>& ws) const {
    TORCH_CHECK(!blocked, "pushpull CPU: a blocked ImagePath backward goes through blocked_weight_grad");
    const int64_t in_plane = geo.height * geo.width;
    for (int64_t grp = 0; grp < geo.groups; ++grp) {
      const scalar_t* w_t = grad_x_image ? weight_t + grp * k_size * out_per_group : nullptr;
      scalar_t* gx_group = grad_x_image ? grad_x_image + grp * in_per_group * in_plane : nullptr;
      // Pull first: the prefilter adjoint overwrites the input-gradient planes, col2im then adds.
      if (separable) {
        backward_pull(grp, w_t, grad_w_image, gx_group, ws);
      } else if (gx_group) {
        std::fill(gx_group, gx_group + in_per_group * in_plane, scalar_t(0));
      }
      pack_group_field(ws.push, grp, ws);
      if (grad_w_image) add_weight_grad(ws.cols.data() + grp * operand_size(), grp, ws, grad_w_image);
      if (gx_group) {
        backproject(w_t, ws);
        if (grad_box_field(ws)) add_box_gradient(grp, ws);
        for (int64_t c = 0; c < in_per_group; ++c) {
          col2im_plane(ws.grad_rows.data() + c * taps * padded, padded, gx_group + c * in_plane);
        }
      }
    }
  }
};

}  // namespace cpu
}  // namespace pushpull
