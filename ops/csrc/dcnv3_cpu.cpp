// DCNv3 core on the CPU: forward and backward, OpenMP through at::parallel_for.
//
// The official release has no CPU kernel at all. This one follows the same sampling math (see
// ops/reference.py) and is laid out for NHWC tensors: the innermost loop always runs over the D
// contiguous channels of one group, so that the compiler vectorises it, and every sampling location
// is computed once per (pixel, group, point) and reused for all D channels.
//
// Parallelism:
// - forward: over output pixels (n, ho, wo); each writes only its own output row.
// - backward: over (n, g) pairs. A pair reads only image n and channels [g*D, (g+1)*D), so it owns
//   that slice of grad_input exclusively: no atomics, no per-thread copies of grad_input, and the
//   result is deterministic.
// Reduced-precision inputs (bfloat16, half) are computed in float32 and their gradients accumulated
// in float32 buffers, then cast back.
#include <torch/extension.h>

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

namespace {

struct Geometry {
  int64_t batch, height, width, out_h, out_w;
  int64_t kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;
  int64_t group, group_channels, points;
  double offset_scale;
  bool remove_center;

  int64_t channels() const { return group * group_channels; }
};

// Bilinear corners of one sampling location. Corners outside the image get weight zero and an index
// clamped into the image, so the channel loops need no branches.
template <typename acc_t>
struct Corners {
  int64_t index[4];  // pixel index h*W + w of (low,low), (low,high), (high,low), (high,high)
  acc_t weight[4];   // bilinear weight, zero for a corner outside the image
  acc_t valid[4];    // 1 inside the image, 0 outside
  acc_t lh, lw;      // fractional parts, needed for the location gradient

  // Returns false when the location lies wholly outside (-1, H) x (-1, W): no corner contributes.
  bool locate(acc_t h, acc_t w, int64_t height, int64_t width) {
    if (!(h > acc_t(-1) && w > acc_t(-1) && h < acc_t(height) && w < acc_t(width))) return false;
    const acc_t h_floor = std::floor(h), w_floor = std::floor(w);
    const int64_t h0 = static_cast<int64_t>(h_floor), w0 = static_cast<int64_t>(w_floor);
    lh = h - h_floor;
    lw = w - w_floor;
    const acc_t hh = acc_t(1) - lh, hw = acc_t(1) - lw;
    const bool h_low_in = h0 >= 0, h_high_in = h0 + 1 <= height - 1;
    const bool w_low_in = w0 >= 0, w_high_in = w0 + 1 <= width - 1;
    const int64_t hl = std::max<int64_t>(h0, 0), hu = std::min<int64_t>(h0 + 1, height - 1);
    const int64_t wl = std::max<int64_t>(w0, 0), wu = std::min<int64_t>(w0 + 1, width - 1);
    index[0] = hl * width + wl;
    index[1] = hl * width + wu;
    index[2] = hu * width + wl;
    index[3] = hu * width + wu;
    valid[0] = (h_low_in && w_low_in) ? acc_t(1) : acc_t(0);
    valid[1] = (h_low_in && w_high_in) ? acc_t(1) : acc_t(0);
    valid[2] = (h_high_in && w_low_in) ? acc_t(1) : acc_t(0);
    valid[3] = (h_high_in && w_high_in) ? acc_t(1) : acc_t(0);
    weight[0] = hh * hw * valid[0];
    weight[1] = hh * lw * valid[1];
    weight[2] = lh * hw * valid[2];
    weight[3] = lh * lw * valid[3];
    return true;
  }
};

// Locates all P points of one (pixel, group) before any channel work: the points are independent, so
// their floor/clamp/index chains overlap here, and the channel loops that follow find their addresses
// ready instead of each point's loads waiting on its own chain.
template <typename acc_t>
struct PointLocator {
  const Geometry& geo;
  std::vector<acc_t> px, py;  // the fixed kernel grid relative to its centre, before offset_scale
  acc_t scale;
  int64_t center_w, center_h;

  explicit PointLocator(const Geometry& geometry)
      : geo(geometry), scale(static_cast<acc_t>(geometry.offset_scale)),
        center_w(geometry.dilation_w * (geometry.kernel_w - 1) / 2),
        center_h(geometry.dilation_h * (geometry.kernel_h - 1) / 2) {
    for (int64_t i = 0; i < geo.kernel_w; ++i) {  // x-major: the kernel's column index is the outer loop
      for (int64_t j = 0; j < geo.kernel_h; ++j) {
        if (geo.remove_center && i == geo.kernel_w / 2 && j == geo.kernel_h / 2) continue;
        px.push_back(static_cast<acc_t>(i * geo.dilation_w - center_w));
        py.push_back(static_cast<acc_t>(j * geo.dilation_h - center_h));
      }
    }
  }

  template <typename scalar_t>
  void locate(int64_t ho, int64_t wo, const scalar_t* off, Corners<acc_t>* corners, char* inside) const {
    const acc_t base_w = static_cast<acc_t>(wo * geo.stride_w - geo.pad_w + center_w);
    const acc_t base_h = static_cast<acc_t>(ho * geo.stride_h - geo.pad_h + center_h);
    for (int64_t p = 0; p < geo.points; ++p) {
      const acc_t w = base_w + (px[p] + static_cast<acc_t>(off[2 * p])) * scale;
      const acc_t h = base_h + (py[p] + static_cast<acc_t>(off[2 * p + 1])) * scale;
      inside[p] = corners[p].locate(h, w, geo.height, geo.width);
    }
  }
};

// Calls f with the group width as a compile-time constant for the common widths (InternImage uses 16 and
// 32), so the channel loops become a fixed number of vector instructions with no remainder or alias checks;
// 0 means "any width, read at run time".
template <typename F>
void with_static_group_channels(int64_t group_channels, F&& f) {
  switch (group_channels) {
    case 8: f(std::integral_constant<int64_t, 8>{}); break;
    case 16: f(std::integral_constant<int64_t, 16>{}); break;
    case 32: f(std::integral_constant<int64_t, 32>{}); break;
    case 64: f(std::integral_constant<int64_t, 64>{}); break;
    default: f(std::integral_constant<int64_t, 0>{});
  }
}

// The four weighted taps of every point of one (pixel, group), as structure-of-arrays so that one
// vectorised pass locates all P points. The mask is folded into the bilinear weights; a point or corner
// outside the image gets weight zero and an index clamped into the image, so the channel loop that
// follows has no branches at all.
template <typename acc_t>
struct PointTaps {
  std::vector<acc_t> weight[4];
  std::vector<int64_t> offset[4];  // element offset of the corner pixel in the image: (h*W + w)*C

  explicit PointTaps(int64_t points) {
    for (int k = 0; k < 4; ++k) {
      weight[k].resize(points);
      offset[k].resize(points);
    }
  }

  template <typename scalar_t>
  void locate(const PointLocator<acc_t>& loc, int64_t ho, int64_t wo, const scalar_t* off, const scalar_t* msk) {
    const Geometry& geo = loc.geo;
    const acc_t base_w = static_cast<acc_t>(wo * geo.stride_w - geo.pad_w + loc.center_w);
    const acc_t base_h = static_cast<acc_t>(ho * geo.stride_h - geo.pad_h + loc.center_h);
    const acc_t height = static_cast<acc_t>(geo.height), width = static_cast<acc_t>(geo.width);
    const int64_t H = geo.height, W = geo.width, C = geo.channels();
    const acc_t* px = loc.px.data();
    const acc_t* py = loc.py.data();
    acc_t *w0 = weight[0].data(), *w1 = weight[1].data(), *w2 = weight[2].data(), *w3 = weight[3].data();
    int64_t *o0 = offset[0].data(), *o1 = offset[1].data(), *o2 = offset[2].data(), *o3 = offset[3].data();
#pragma omp simd
    for (int64_t p = 0; p < geo.points; ++p) {
      acc_t w = base_w + (px[p] + static_cast<acc_t>(off[2 * p])) * loc.scale;
      acc_t h = base_h + (py[p] + static_cast<acc_t>(off[2 * p + 1])) * loc.scale;
      // Outside (-1, H) x (-1, W) (or NaN) no corner contributes; park it at (-1, -1) for safe indices.
      const bool inside = h > acc_t(-1) && w > acc_t(-1) && h < height && w < width;
      h = inside ? h : acc_t(-1);
      w = inside ? w : acc_t(-1);
      const acc_t m = inside ? static_cast<acc_t>(msk[p]) : acc_t(0);
      const acc_t h_floor = std::floor(h), w_floor = std::floor(w);
      const int64_t h0 = static_cast<int64_t>(h_floor), w0i = static_cast<int64_t>(w_floor);
      const acc_t lh = h - h_floor, lw = w - w_floor;
      const acc_t h_low = h0 >= 0 ? (acc_t(1) - lh) * m : acc_t(0);
      const acc_t h_high = h0 + 1 <= H - 1 ? lh * m : acc_t(0);
      const acc_t w_low = w0i >= 0 ? acc_t(1) - lw : acc_t(0);
      const acc_t w_high = w0i + 1 <= W - 1 ? lw : acc_t(0);
      const int64_t hl = std::max<int64_t>(h0, 0), hu = std::min<int64_t>(h0 + 1, H - 1);
      const int64_t wl = std::max<int64_t>(w0i, 0), wu = std::min<int64_t>(w0i + 1, W - 1);
      w0[p] = h_low * w_low;
      w1[p] = h_low * w_high;
      w2[p] = h_high * w_low;
      w3[p] = h_high * w_high;
      o0[p] = (hl * W + wl) * C;
      o1[p] = (hl * W + wu) * C;
      o2[p] = (hu * W + wl) * C;
      o3[p] = (hu * W + wu) * C;
    }
  }
};

template <typename scalar_t, int64_t kD>
void forward_kernel(const Geometry& geo, const scalar_t* input, const scalar_t* offset, const scalar_t* mask,
                    scalar_t* output) {
  using acc_t = at::opmath_type<scalar_t>;
  const PointLocator<acc_t> locator(geo);
  const int64_t C = geo.channels(), D = kD > 0 ? kD : geo.group_channels, P = geo.points;
  const int64_t pixels = geo.batch * geo.out_h * geo.out_w;

  at::parallel_for(0, pixels, 16, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(D);
    PointTaps<acc_t> taps(P);
    for (int64_t pixel = begin; pixel < end; ++pixel) {
      const int64_t wo = pixel % geo.out_w;
      const int64_t ho = (pixel / geo.out_w) % geo.out_h;
      const int64_t n = pixel / (geo.out_w * geo.out_h);
      const scalar_t* image = input + n * geo.height * geo.width * C;
      for (int64_t g = 0; g < geo.group; ++g) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        taps.locate(locator, ho, wo, offset + (pixel * geo.group + g) * P * 2, mask + (pixel * geo.group + g) * P);
        const scalar_t* group_image = image + g * D;
        for (int64_t p = 0; p < P; ++p) {
          const acc_t w0 = taps.weight[0][p], w1 = taps.weight[1][p], w2 = taps.weight[2][p], w3 = taps.weight[3][p];
          const scalar_t* v0 = group_image + taps.offset[0][p];
          const scalar_t* v1 = group_image + taps.offset[1][p];
          const scalar_t* v2 = group_image + taps.offset[2][p];
          const scalar_t* v3 = group_image + taps.offset[3][p];
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) {
            // Two independent pairs, then one add into acc: the chain carried from point to point is a
            // single add instead of four dependent multiply-adds.
            const acc_t upper = w0 * static_cast<acc_t>(v0[d]) + w1 * static_cast<acc_t>(v1[d]);
            const acc_t lower = w2 * static_cast<acc_t>(v2[d]) + w3 * static_cast<acc_t>(v3[d]);
            acc[d] += upper + lower;
          }
        }
        scalar_t* out = output + pixel * C + g * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) out[d] = static_cast<scalar_t>(acc[d]);
      }
    }
  });
}

// grad_* pointers are acc_t buffers (the gradients themselves for float/double).
template <typename scalar_t, int64_t kD>
void backward_kernel(const Geometry& geo, const scalar_t* input, const scalar_t* offset, const scalar_t* mask,
                     const scalar_t* grad_output, at::opmath_type<scalar_t>* grad_input,
                     at::opmath_type<scalar_t>* grad_offset, at::opmath_type<scalar_t>* grad_mask) {
  using acc_t = at::opmath_type<scalar_t>;
  const PointLocator<acc_t> locator(geo);
  const int64_t C = geo.channels(), D = kD > 0 ? kD : geo.group_channels, P = geo.points;
  const int64_t out_pixels = geo.out_h * geo.out_w;
  const acc_t scale = locator.scale;

  at::parallel_for(0, geo.batch * geo.group, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> top(D);
    std::vector<Corners<acc_t>> corners(P);
    std::vector<char> inside(P);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / geo.group, g = task % geo.group;
      const scalar_t* image = input + n * geo.height * geo.width * C + g * D;
      acc_t* grad_image = grad_input + n * geo.height * geo.width * C + g * D;
      for (int64_t q = 0; q < out_pixels; ++q) {
        const int64_t pixel = n * out_pixels + q;
        const int64_t wo = q % geo.out_w, ho = q / geo.out_w;
        const scalar_t* grad_out = grad_output + pixel * C + g * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) top[d] = static_cast<acc_t>(grad_out[d]);
        const int64_t point_base = (pixel * geo.group + g) * P;
        const scalar_t* off = offset + point_base * 2;
        const scalar_t* msk = mask + point_base;
        locator.locate(ho, wo, off, corners.data(), inside.data());
        for (int64_t p = 0; p < P; ++p) {
          const Corners<acc_t>& c = corners[p];
          if (!inside[p]) {  // no corner contributes: zero gradients
            grad_mask[point_base + p] = acc_t(0);
            grad_offset[(point_base + p) * 2] = acc_t(0);
            grad_offset[(point_base + p) * 2 + 1] = acc_t(0);
            continue;
          }
          const acc_t m = static_cast<acc_t>(msk[p]);
          const acc_t hh = acc_t(1) - c.lh, hw = acc_t(1) - c.lw;
          // d(value)/dw and d(value)/dh per corner, zero for corners outside the image.
          const acc_t dw0 = -hh * c.valid[0], dw1 = hh * c.valid[1], dw2 = -c.lh * c.valid[2], dw3 = c.lh * c.valid[3];
          const acc_t dh0 = -hw * c.valid[0], dh1 = -c.lw * c.valid[1], dh2 = hw * c.valid[2], dh3 = c.lw * c.valid[3];
          const acc_t a0 = c.weight[0], a1 = c.weight[1], a2 = c.weight[2], a3 = c.weight[3];
          const acc_t m0 = a0 * m, m1 = a1 * m, m2 = a2 * m, m3 = a3 * m;
          const scalar_t* v0 = image + c.index[0] * C;
          const scalar_t* v1 = image + c.index[1] * C;
          const scalar_t* v2 = image + c.index[2] * C;
          const scalar_t* v3 = image + c.index[3] * C;
          acc_t* g0 = grad_image + c.index[0] * C;
          acc_t* g1 = grad_image + c.index[1] * C;
          acc_t* g2 = grad_image + c.index[2] * C;
          acc_t* g3 = grad_image + c.index[3] * C;
          // Four dot products of the upstream gradient with the corner values give the mask and location
          // gradients by linearity: 4 multiply-adds per channel instead of one sum per gradient.
          acc_t dot0 = 0, dot1 = 0, dot2 = 0, dot3 = 0;
#pragma omp simd reduction(+ : dot0, dot1, dot2, dot3)
          for (int64_t d = 0; d < D; ++d) {
            const acc_t t = top[d];
            dot0 += t * static_cast<acc_t>(v0[d]);
            dot1 += t * static_cast<acc_t>(v1[d]);
            dot2 += t * static_cast<acc_t>(v2[d]);
            dot3 += t * static_cast<acc_t>(v3[d]);
          }
          const acc_t sum_value = a0 * dot0 + a1 * dot1 + a2 * dot2 + a3 * dot3;
          const acc_t sum_dw = dw0 * dot0 + dw1 * dot1 + dw2 * dot2 + dw3 * dot3;
          const acc_t sum_dh = dh0 * dot0 + dh1 * dot1 + dh2 * dot2 + dh3 * dot3;
          // Corners may coincide after clamping (only with weight zero), so the scatter is four loops
          // rather than one that could write a location twice in one vector; `omp simd` tells the compiler
          // that each loop on its own has no dependence between channels.
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) g0[d] += m0 * top[d];
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) g1[d] += m1 * top[d];
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) g2[d] += m2 * top[d];
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) g3[d] += m3 * top[d];
          grad_mask[point_base + p] = sum_value;
          grad_offset[(point_base + p) * 2] = sum_dw * m * scale;
          grad_offset[(point_base + p) * 2 + 1] = sum_dh * m * scale;
        }
      }
    }
  });
}

Geometry make_geometry(const at::Tensor& input, const at::Tensor& offset, int64_t kernel_h, int64_t kernel_w,
                       int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dilation_h,
                       int64_t dilation_w, int64_t group, int64_t group_channels, double offset_scale,
                       bool remove_center) {
  Geometry geo{input.size(0), input.size(1), input.size(2), offset.size(1), offset.size(2),
               kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w,
               group, group_channels, kernel_h * kernel_w - (remove_center ? 1 : 0),
               offset_scale, remove_center};
  return geo;
}

void check_inputs(const Geometry& geo, const at::Tensor& input, const at::Tensor& offset, const at::Tensor& mask) {
  TORCH_CHECK(input.device().is_cpu() && offset.device().is_cpu() && mask.device().is_cpu(),
              "dcnv3 cpu kernel: all tensors must be on the CPU");
  TORCH_CHECK(input.dim() == 4 && offset.dim() == 4 && mask.dim() == 4, "dcnv3 cpu kernel: expected 4-D tensors");
  TORCH_CHECK(input.size(3) == geo.channels(), "dcnv3 cpu kernel: input has ", input.size(3),
              " channels, expected group*group_channels = ", geo.channels());
  TORCH_CHECK(offset.size(3) == geo.group * geo.points * 2 && mask.size(3) == geo.group * geo.points,
              "dcnv3 cpu kernel: offset/mask channels do not match group*points");
  TORCH_CHECK(input.scalar_type() == offset.scalar_type() && input.scalar_type() == mask.scalar_type(),
              "dcnv3 cpu kernel: input, offset and mask must share one dtype");
}

}  // namespace

at::Tensor dcnv3_forward(const at::Tensor& input_, const at::Tensor& offset_, const at::Tensor& mask_,
                         int64_t kernel_h, int64_t kernel_w, int64_t stride_h, int64_t stride_w, int64_t pad_h,
                         int64_t pad_w, int64_t dilation_h, int64_t dilation_w, int64_t group,
                         int64_t group_channels, double offset_scale, bool remove_center) {
  const Geometry geo = make_geometry(input_, offset_, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                                     dilation_h, dilation_w, group, group_channels, offset_scale, remove_center);
  check_inputs(geo, input_, offset_, mask_);
  const at::Tensor input = input_.contiguous(), offset = offset_.contiguous(), mask = mask_.contiguous();
  at::Tensor output = at::empty({geo.batch, geo.out_h, geo.out_w, geo.channels()}, input.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::BFloat16, at::ScalarType::Half, input.scalar_type(),
                                  "dcnv3_forward_cpu", [&] {
    with_static_group_channels(geo.group_channels, [&](auto static_d) {
      forward_kernel<scalar_t, decltype(static_d)::value>(geo, input.data_ptr<scalar_t>(), offset.data_ptr<scalar_t>(),
                                                         mask.data_ptr<scalar_t>(), output.data_ptr<scalar_t>());
    });
  });
  return output;
}

std::vector<at::Tensor> dcnv3_backward(const at::Tensor& input_, const at::Tensor& offset_, const at::Tensor& mask_,
                                       const at::Tensor& grad_output_, int64_t kernel_h, int64_t kernel_w,
                                       int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w,
                                       int64_t dilation_h, int64_t dilation_w, int64_t group, int64_t group_channels,
                                       double offset_scale, bool remove_center) {
  const Geometry geo = make_geometry(input_, offset_, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                                     dilation_h, dilation_w, group, group_channels, offset_scale, remove_center);
  check_inputs(geo, input_, offset_, mask_);
  const at::Tensor input = input_.contiguous(), offset = offset_.contiguous(), mask = mask_.contiguous();
  const at::Tensor grad_output = grad_output_.to(input.scalar_type()).contiguous();
  const auto acc_type = at::toOpMathType(input.scalar_type());
  const auto acc_options = input.options().dtype(acc_type);
  // grad_input is accumulated into; every slot of grad_offset and grad_mask is written by the kernel.
  at::Tensor grad_input = at::zeros(input.sizes(), acc_options);
  at::Tensor grad_offset = at::empty(offset.sizes(), acc_options);
  at::Tensor grad_mask = at::empty(mask.sizes(), acc_options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::BFloat16, at::ScalarType::Half, input.scalar_type(),
                                  "dcnv3_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_static_group_channels(geo.group_channels, [&](auto static_d) {
      backward_kernel<scalar_t, decltype(static_d)::value>(
          geo, input.data_ptr<scalar_t>(), offset.data_ptr<scalar_t>(), mask.data_ptr<scalar_t>(),
          grad_output.data_ptr<scalar_t>(), grad_input.data_ptr<acc_t>(), grad_offset.data_ptr<acc_t>(),
          grad_mask.data_ptr<acc_t>());
    });
  });
  const auto dtype = input.scalar_type();
  return {grad_input.to(dtype), grad_offset.to(dtype), grad_mask.to(dtype)};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "DCNv3 core, CPU kernel (forward and backward)";
  m.def("forward", &dcnv3_forward, "DCNv3 forward (CPU)");
  m.def("backward", &dcnv3_backward, "DCNv3 backward: grad_input, grad_offset, grad_mask (CPU)");
}
