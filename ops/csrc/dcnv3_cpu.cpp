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
#include <cstdint>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace {

struct Geometry {
  int64_t batch, height, width, out_h, out_w;
  int64_t kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;
  int64_t group, group_channels, points;
  double offset_scale;
  bool remove_center;

  int64_t channels() const { return group * group_channels; }
};

// The fixed kernel grid of a configuration, shared by the forward's and the backward's location passes
// (PointTaps, BackwardTaps), which locate all P points of a (pixel, group) before any channel work.
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

// The backward's view of all P points of one (pixel, group), as structure-of-arrays so that one vectorised
// pass locates them all, one pass computes their gradients, and the channel loops in between read ready
// addresses and weights. A point outside the image gets zero weights and validities and an index clamped
// into the image, so no loop has a branch.
template <typename acc_t>
struct BackwardTaps {
  static constexpr int64_t kLanes = 8;  // arrays are padded to a multiple of this, for whole-vector access
  int64_t points, padded;
  bool int32_indices;              // pixel indices h*W + w fit in int32 (the AVX2 path computes them so)
  int64_t stride = 0;              // elements from one pixel to the next in the image the offsets address
  // When >= 0, the image has 4*padded spare rows from this pixel index on, and a corner outside the image
  // gets its own spare row, 4*p + k, instead of a clamped index: a point partly or wholly outside the image
  // would otherwise send up to four read-modify-writes of the gradient to one row in a row, each waiting
  // for the one before.
  int64_t spare_rows_at = -1;
  std::vector<acc_t> px, py;       // the locator's kernel grid, padded with zeros
  std::vector<int64_t> offset[4];  // element offset of each corner pixel in the image: (h*W + w)*stride
  std::vector<acc_t> scatter[4];   // mask * bilinear weight: the corner's share of the upstream gradient
  std::vector<acc_t> valid[4];     // 1 for a corner inside the image (of a point inside), else 0
  std::vector<acc_t> dot[4];       // <grad_out, corner value> over the group's channels
  std::vector<acc_t> lh, lw;       // fractional parts of the location
  std::vector<acc_t> mask_scale;   // mask * offset_scale, the factor of the location gradient

  explicit BackwardTaps(const PointLocator<acc_t>& loc)
      : points(loc.geo.points), padded((points + kLanes - 1) / kLanes * kLanes),
        int32_indices(loc.geo.height * loc.geo.width + 4 * padded <= INT32_MAX && loc.geo.channels() <= INT32_MAX),
        px(loc.px), py(loc.py) {
    px.resize(padded, acc_t(0));
    py.resize(padded, acc_t(0));
    for (int k = 0; k < 4; ++k) {
      offset[k].resize(padded);
      scatter[k].resize(padded);
      valid[k].resize(padded);
      dot[k].resize(padded);
    }
    lh.resize(padded);
    lw.resize(padded);
    mask_scale.resize(padded);
  }

  template <typename scalar_t>
  void locate(const PointLocator<acc_t>& loc, int64_t ho, int64_t wo, const scalar_t* off, const scalar_t* msk) {
#if defined(__AVX2__) && defined(__FMA__)
    if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
      if (int32_indices) {
        locate_avx2(loc, ho, wo, off, msk);
        return;
      }
    }
#endif
    const Geometry& geo = loc.geo;
    const acc_t base_w = static_cast<acc_t>(wo * geo.stride_w - geo.pad_w + loc.center_w);
    const acc_t base_h = static_cast<acc_t>(ho * geo.stride_h - geo.pad_h + loc.center_h);
    const acc_t height = static_cast<acc_t>(geo.height), width = static_cast<acc_t>(geo.width);
    const int64_t H = geo.height, W = geo.width, C = stride;
    const acc_t scale = loc.scale;
    const acc_t *gx = px.data(), *gy = py.data();
    int64_t *o0 = offset[0].data(), *o1 = offset[1].data(), *o2 = offset[2].data(), *o3 = offset[3].data();
    acc_t *s0 = scatter[0].data(), *s1 = scatter[1].data(), *s2 = scatter[2].data(), *s3 = scatter[3].data();
    acc_t *v0 = valid[0].data(), *v1 = valid[1].data(), *v2 = valid[2].data(), *v3 = valid[3].data();
    acc_t *lh_out = lh.data(), *lw_out = lw.data(), *ms = mask_scale.data();
    // (GCC vectorises this loop only with -fno-trapping-math, which ops/build.py passes; the AVX2 version
    // above for float does not depend on that flag.)
#pragma omp simd
    for (int64_t p = 0; p < points; ++p) {
      acc_t w = base_w + (gx[p] + static_cast<acc_t>(off[2 * p])) * scale;
      acc_t h = base_h + (gy[p] + static_cast<acc_t>(off[2 * p + 1])) * scale;
      // Outside (-1, H) x (-1, W) (or NaN) no corner contributes; park it at (-1, -1) for safe indices.
      const bool inside = h > acc_t(-1) && w > acc_t(-1) && h < height && w < width;
      h = inside ? h : acc_t(-1);
      w = inside ? w : acc_t(-1);
      const acc_t m = inside ? static_cast<acc_t>(msk[p]) : acc_t(0);
      const acc_t h_floor = std::floor(h), w_floor = std::floor(w);
      const int64_t h0 = static_cast<int64_t>(h_floor), w0 = static_cast<int64_t>(w_floor);
      const acc_t fh = h - h_floor, fw = w - w_floor;
      const bool h_low_in = inside && h0 >= 0, h_high_in = inside && h0 + 1 <= H - 1;
      const bool w_low_in = w0 >= 0, w_high_in = w0 + 1 <= W - 1;
      const acc_t valid0 = (h_low_in && w_low_in) ? acc_t(1) : acc_t(0);
      const acc_t valid1 = (h_low_in && w_high_in) ? acc_t(1) : acc_t(0);
      const acc_t valid2 = (h_high_in && w_low_in) ? acc_t(1) : acc_t(0);
      const acc_t valid3 = (h_high_in && w_high_in) ? acc_t(1) : acc_t(0);
      const acc_t mh_low = (acc_t(1) - fh) * m, mh_high = fh * m;
      const acc_t w_low = acc_t(1) - fw, w_high = fw;
      const int64_t hl = std::max<int64_t>(h0, 0), hu = std::min<int64_t>(h0 + 1, H - 1);
      const int64_t wl = std::max<int64_t>(w0, 0), wu = std::min<int64_t>(w0 + 1, W - 1);
      const bool spare = spare_rows_at >= 0;
      const int64_t spare_row = spare_rows_at + 4 * p;
      o0[p] = (valid0 == acc_t(0) && spare ? spare_row : hl * W + wl) * C;
      o1[p] = (valid1 == acc_t(0) && spare ? spare_row + 1 : hl * W + wu) * C;
      o2[p] = (valid2 == acc_t(0) && spare ? spare_row + 2 : hu * W + wl) * C;
      o3[p] = (valid3 == acc_t(0) && spare ? spare_row + 3 : hu * W + wu) * C;
      s0[p] = mh_low * w_low * valid0;
      s1[p] = mh_low * w_high * valid1;
      s2[p] = mh_high * w_low * valid2;
      s3[p] = mh_high * w_high * valid3;
      v0[p] = valid0;
      v1[p] = valid1;
      v2[p] = valid2;
      v3[p] = valid3;
      lh_out[p] = fh;
      lw_out[p] = fw;
      ms[p] = m * scale;
    }
  }

#if defined(__AVX2__) && defined(__FMA__)
  // The first n (0..7) floats at p, zeros in the other lanes; reads nothing past p[n-1].
  static __m256 load_first(const float* p, int n) {
#if defined(__AVX512VL__)
    return _mm256_maskz_loadu_ps(static_cast<__mmask8>((1u << n) - 1), p);
#else
    // (AVX2's vmaskmovps measured slow on AMD Zen 4: a copy through the stack instead.)
    alignas(32) float buffer[8] = {};
    for (int i = 0; i < n; ++i) buffer[i] = p[i];
    return _mm256_load_ps(buffer);
#endif
  }

  // The same as the loop above, eight points at a time; the lanes past the last point read zeros and
  // fill the padding.
  void locate_avx2(const PointLocator<float>& loc, int64_t ho, int64_t wo, const float* off, const float* msk) {
    const Geometry& geo = loc.geo;
    const __m256 base_w = _mm256_set1_ps(static_cast<float>(wo * geo.stride_w - geo.pad_w + loc.center_w));
    const __m256 base_h = _mm256_set1_ps(static_cast<float>(ho * geo.stride_h - geo.pad_h + loc.center_h));
    const __m256 height = _mm256_set1_ps(static_cast<float>(geo.height));
    const __m256 width = _mm256_set1_ps(static_cast<float>(geo.width));
    const __m256 scale = _mm256_set1_ps(loc.scale), minus_one = _mm256_set1_ps(-1.0f), one = _mm256_set1_ps(1.0f);
    const __m256i last_row = _mm256_set1_epi32(static_cast<int32_t>(geo.height - 1));
    const __m256i last_col = _mm256_set1_epi32(static_cast<int32_t>(geo.width - 1));
    const __m256i row = _mm256_set1_epi32(static_cast<int32_t>(geo.width));
    const __m256i minus_one_i = _mm256_set1_epi32(-1), zero_i = _mm256_setzero_si256(), one_i = _mm256_set1_epi32(1);
    const __m256i channels = _mm256_set1_epi64x(stride);
    for (int64_t p = 0; p < points; p += 8) {
      const int32_t left = static_cast<int32_t>(std::min<int64_t>(points - p, 8));
      __m256 off_a, off_b, m_raw;  // off_a/off_b: (w, h) pairs of points p..p+3 / p+4..p+7
      if (left == 8) {
        off_a = _mm256_loadu_ps(off + 2 * p);
        off_b = _mm256_loadu_ps(off + 2 * p + 8);
        m_raw = _mm256_loadu_ps(msk + p);
      } else {
        off_a = load_first(off + 2 * p, std::min(2 * left, 8));
        off_b = load_first(off + 2 * p + 8, std::max(2 * left - 8, 0));
        m_raw = load_first(msk + p, left);
      }
      // De-interleave: shuffle gives [a0 a2 b0 b2 | a4 a6 b4 b6]; the 64-bit permute restores point order.
      const __m256 off_w = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(off_a, off_b, 0x88)), 0xD8));
      const __m256 off_h = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(off_a, off_b, 0xDD)), 0xD8));
      __m256 w = _mm256_fmadd_ps(_mm256_add_ps(_mm256_loadu_ps(px.data() + p), off_w), scale, base_w);
      __m256 h = _mm256_fmadd_ps(_mm256_add_ps(_mm256_loadu_ps(py.data() + p), off_h), scale, base_h);
      const __m256 inside = _mm256_and_ps(
          _mm256_and_ps(_mm256_cmp_ps(h, minus_one, _CMP_GT_OQ), _mm256_cmp_ps(w, minus_one, _CMP_GT_OQ)),
          _mm256_and_ps(_mm256_cmp_ps(h, height, _CMP_LT_OQ), _mm256_cmp_ps(w, width, _CMP_LT_OQ)));
      h = _mm256_blendv_ps(minus_one, h, inside);
      w = _mm256_blendv_ps(minus_one, w, inside);
      const __m256 m = _mm256_and_ps(m_raw, inside);
      const __m256 h_floor = _mm256_floor_ps(h), w_floor = _mm256_floor_ps(w);
      const __m256i h0 = _mm256_cvttps_epi32(h_floor), w0 = _mm256_cvttps_epi32(w_floor);
      const __m256 fh = _mm256_sub_ps(h, h_floor), fw = _mm256_sub_ps(w, w_floor);
      const __m256 h_low_in = _mm256_and_ps(inside, _mm256_castsi256_ps(_mm256_cmpgt_epi32(h0, minus_one_i)));
      const __m256 h_high_in = _mm256_and_ps(inside, _mm256_castsi256_ps(_mm256_cmpgt_epi32(last_row, h0)));
      const __m256 w_low_in = _mm256_castsi256_ps(_mm256_cmpgt_epi32(w0, minus_one_i));
      const __m256 w_high_in = _mm256_castsi256_ps(_mm256_cmpgt_epi32(last_col, w0));
      const __m256 in0 = _mm256_and_ps(h_low_in, w_low_in), in1 = _mm256_and_ps(h_low_in, w_high_in);
      const __m256 in2 = _mm256_and_ps(h_high_in, w_low_in), in3 = _mm256_and_ps(h_high_in, w_high_in);
      const __m256 mh_low = _mm256_mul_ps(_mm256_sub_ps(one, fh), m), mh_high = _mm256_mul_ps(fh, m);
      const __m256 w_low = _mm256_sub_ps(one, fw);
      _mm256_storeu_ps(scatter[0].data() + p, _mm256_and_ps(in0, _mm256_mul_ps(mh_low, w_low)));
      _mm256_storeu_ps(scatter[1].data() + p, _mm256_and_ps(in1, _mm256_mul_ps(mh_low, fw)));
      _mm256_storeu_ps(scatter[2].data() + p, _mm256_and_ps(in2, _mm256_mul_ps(mh_high, w_low)));
      _mm256_storeu_ps(scatter[3].data() + p, _mm256_and_ps(in3, _mm256_mul_ps(mh_high, fw)));
      _mm256_storeu_ps(valid[0].data() + p, _mm256_and_ps(in0, one));
      _mm256_storeu_ps(valid[1].data() + p, _mm256_and_ps(in1, one));
      _mm256_storeu_ps(valid[2].data() + p, _mm256_and_ps(in2, one));
      _mm256_storeu_ps(valid[3].data() + p, _mm256_and_ps(in3, one));
      _mm256_storeu_ps(lh.data() + p, fh);
      _mm256_storeu_ps(lw.data() + p, fw);
      _mm256_storeu_ps(mask_scale.data() + p, _mm256_mul_ps(m, scale));
      const __m256i row_low = _mm256_mullo_epi32(_mm256_max_epi32(h0, zero_i), row);
      const __m256i row_high = _mm256_mullo_epi32(_mm256_min_epi32(_mm256_add_epi32(h0, one_i), last_row), row);
      const __m256i col_low = _mm256_max_epi32(w0, zero_i);
      const __m256i col_high = _mm256_min_epi32(_mm256_add_epi32(w0, one_i), last_col);
      __m256i index[4] = {_mm256_add_epi32(row_low, col_low), _mm256_add_epi32(row_low, col_high),
                          _mm256_add_epi32(row_high, col_low), _mm256_add_epi32(row_high, col_high)};
      if (spare_rows_at >= 0) {
        const __m256i spare = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int32_t>(spare_rows_at + 4 * p)),
                                               _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28));
        const __m256 in[4] = {in0, in1, in2, in3};
        for (int k = 0; k < 4; ++k) {
          index[k] = _mm256_castps_si256(_mm256_blendv_ps(
              _mm256_castsi256_ps(_mm256_add_epi32(spare, _mm256_set1_epi32(k))), _mm256_castsi256_ps(index[k]), in[k]));
        }
      }
      for (int k = 0; k < 4; ++k) {
        const __m256i lo = _mm256_mul_epi32(_mm256_cvtepi32_epi64(_mm256_castsi256_si128(index[k])), channels);
        const __m256i hi = _mm256_mul_epi32(_mm256_cvtepi32_epi64(_mm256_extracti128_si256(index[k], 1)), channels);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(offset[k].data() + p), lo);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(offset[k].data() + p + 4), hi);
      }
    }
  }
#endif

  // Mask and location gradients of every point from the four dot products, by linearity of the bilinear
  // sample in its corner values. An invalid corner is selected away rather than multiplied by zero, so a
  // non-finite value at a clamped index cannot leak into the gradient.
  void gradients(int64_t points, acc_t* grad_offset, acc_t* grad_mask) const {
    const acc_t *d0 = dot[0].data(), *d1 = dot[1].data(), *d2 = dot[2].data(), *d3 = dot[3].data();
    const acc_t *v0 = valid[0].data(), *v1 = valid[1].data(), *v2 = valid[2].data(), *v3 = valid[3].data();
    const acc_t *fh = lh.data(), *fw = lw.data(), *ms = mask_scale.data();
#pragma omp simd
    for (int64_t p = 0; p < points; ++p) {
      const acc_t e0 = v0[p] != acc_t(0) ? d0[p] : acc_t(0);
      const acc_t e1 = v1[p] != acc_t(0) ? d1[p] : acc_t(0);
      const acc_t e2 = v2[p] != acc_t(0) ? d2[p] : acc_t(0);
      const acc_t e3 = v3[p] != acc_t(0) ? d3[p] : acc_t(0);
      const acc_t h_low = acc_t(1) - fh[p], h_high = fh[p];
      const acc_t w_low = acc_t(1) - fw[p], w_high = fw[p];
      grad_mask[p] = h_low * (w_low * e0 + w_high * e1) + h_high * (w_low * e2 + w_high * e3);
      grad_offset[2 * p] = ms[p] * (h_low * (e1 - e0) + h_high * (e3 - e2));
      grad_offset[2 * p + 1] = ms[p] * (w_low * (e2 - e0) + w_high * (e3 - e1));
    }
  }
};

#if defined(__AVX2__) && defined(__FMA__)
// lane j = the sum of the 8 lanes of v[j]: a transpose-and-add tree, 9 instructions for 8 horizontal sums.
inline __m256 horizontal_sums8(const __m256* v) {
  const __m256 t0 = _mm256_hadd_ps(v[0], v[1]), t1 = _mm256_hadd_ps(v[2], v[3]);
  const __m256 t2 = _mm256_hadd_ps(v[4], v[5]), t3 = _mm256_hadd_ps(v[6], v[7]);
  // u0 = [v0..v3 sums of their low halves | v0..v3 sums of their high halves], u1 likewise for v4..v7
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// lane j = the sum of the 8 lanes of v[j], for 4 vectors.
inline __m128 horizontal_sums4(const __m256* v) {
  const __m256 u = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  return _mm_add_ps(_mm256_castps256_ps128(u), _mm256_extractf128_ps(u, 1));
}

// The float backward's channel work with AVX2 for a group width that is a multiple of 8: each dot product
// is left as a vector of partial sums, and eight of them are reduced together.
template <int64_t kD>
struct BackwardChannelsAvx2 {
  static constexpr int kV = static_cast<int>(kD / 8);
  __m256 top[kV];

  explicit BackwardChannelsAvx2(int64_t /*group_channels*/) {}

  void load_top(const float* grad_out) {
    for (int c = 0; c < kV; ++c) top[c] = _mm256_loadu_ps(grad_out + 8 * c);
  }

  __m256 partial_dot(const float* v) const {
    __m256 s = _mm256_mul_ps(top[0], _mm256_loadu_ps(v));
    for (int c = 1; c < kV; ++c) s = _mm256_fmadd_ps(top[c], _mm256_loadu_ps(v + 8 * c), s);
    return s;
  }

  void dots(BackwardTaps<float>& taps, int64_t points, const float* image) const {
    int64_t p0 = 0;
    for (; p0 + 8 <= points; p0 += 8) {
      for (int k = 0; k < 4; ++k) {
        const int64_t* off = taps.offset[k].data() + p0;
        __m256 partial[8];
        for (int j = 0; j < 8; ++j) partial[j] = partial_dot(image + off[j]);
        _mm256_storeu_ps(taps.dot[k].data() + p0, horizontal_sums8(partial));
      }
    }
    for (int64_t p = p0; p < points; ++p) {
      __m256 partial[4];
      for (int k = 0; k < 4; ++k) partial[k] = partial_dot(image + taps.offset[k][p]);
      alignas(16) float sums[4];
      _mm_store_ps(sums, horizontal_sums4(partial));
      for (int k = 0; k < 4; ++k) taps.dot[k][p] = sums[k];
    }
  }

  // Corners may coincide after clamping (only with weight zero); each corner's read-modify-write completes
  // before the next one starts, so that is harmless.
  void scatter(const BackwardTaps<float>& taps, int64_t points, float* grad_image) const {
    for (int64_t p = 0; p < points; ++p) {
      for (int k = 0; k < 4; ++k) {
        const __m256 s = _mm256_set1_ps(taps.scatter[k][p]);
        float* g = grad_image + taps.offset[k][p];
        for (int c = 0; c < kV; ++c) _mm256_storeu_ps(g + 8 * c, _mm256_fmadd_ps(s, top[c], _mm256_loadu_ps(g + 8 * c)));
      }
    }
  }
};
#endif

// The portable channel work: any dtype, any group width.
template <typename scalar_t, int64_t kD>
struct BackwardChannels {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<acc_t> top;
  int64_t D;

  explicit BackwardChannels(int64_t group_channels) : top(group_channels), D(kD > 0 ? kD : group_channels) {}

  void load_top(const scalar_t* grad_out) {
    acc_t* t = top.data();
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) t[d] = static_cast<acc_t>(grad_out[d]);
  }

  template <typename image_t>
  void dots(BackwardTaps<acc_t>& taps, int64_t points, const image_t* image) const {
    const acc_t* t = top.data();
    for (int64_t p = 0; p < points; ++p) {
      const image_t* v0 = image + taps.offset[0][p];
      const image_t* v1 = image + taps.offset[1][p];
      const image_t* v2 = image + taps.offset[2][p];
      const image_t* v3 = image + taps.offset[3][p];
      acc_t dot0 = 0, dot1 = 0, dot2 = 0, dot3 = 0;
#pragma omp simd reduction(+ : dot0, dot1, dot2, dot3)
      for (int64_t d = 0; d < D; ++d) {
        dot0 += t[d] * static_cast<acc_t>(v0[d]);
        dot1 += t[d] * static_cast<acc_t>(v1[d]);
        dot2 += t[d] * static_cast<acc_t>(v2[d]);
        dot3 += t[d] * static_cast<acc_t>(v3[d]);
      }
      taps.dot[0][p] = dot0;
      taps.dot[1][p] = dot1;
      taps.dot[2][p] = dot2;
      taps.dot[3][p] = dot3;
    }
  }

  // Four loops rather than one, since corners may coincide after clamping (only with weight zero) and one
  // loop could then write a location twice in one vector; `omp simd` tells the compiler that each loop on
  // its own has no dependence between channels.
  void scatter(const BackwardTaps<acc_t>& taps, int64_t points, acc_t* grad_image) const {
    const acc_t* t = top.data();
    for (int64_t p = 0; p < points; ++p) {
      for (int k = 0; k < 4; ++k) {
        const acc_t s = taps.scatter[k][p];
        acc_t* g = grad_image + taps.offset[k][p];
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) g[d] += s * t[d];
      }
    }
  }
};

template <typename scalar_t, int64_t kD>
struct BackwardChannelsFor {
  using type = BackwardChannels<scalar_t, kD>;
};
#if defined(__AVX2__) && defined(__FMA__)
template <int64_t kD>
struct BackwardChannelsFor<float, kD> {
  using type = std::conditional_t<(kD > 0 && kD % 8 == 0), BackwardChannelsAvx2<kD>, BackwardChannels<float, kD>>;
};
#endif

// Largest (n, g) slice, in bytes, that backward_kernel copies into a compact per-thread buffer (one for the
// image, one for its gradient); larger slices are worked on in place, with the pixel stride of the tensors,
// so that the buffers never take more than 32 MiB per thread. (InternImage at 224x224 has slices of at most
// 200 KiB; tests/test_dcnv3.py has one case above the limit.)
constexpr int64_t kCompactSliceBytes = int64_t(16) << 20;

// grad_input is an acc_t buffer whose every slot the kernel writes, as it does grad_offset's and grad_mask's
// (these are the gradients themselves for float/double).
//
// Each task first copies its (n, g) slice of the input into a compact buffer, D channels per pixel, and
// accumulates the slice's gradient into another, which it copies to grad_input at the end. The scatter is a
// read-modify-write of D channels at each of 4*P corners per output pixel; at the tensors' pixel stride of
// C = G*D channels (2 KiB at InternImage's stage 4) the rows lie a multiple of 4 KiB apart, so every load
// looks as if it might depend on every pending store to the other rows (4K aliasing), which made the
// scatter about 4x slower than in the compact buffer. The copies cost two passes over the slice, against
// the 4*P reads and read-modify-writes per output pixel that follow.
template <typename scalar_t, int64_t kD>
void backward_kernel(const Geometry& geo, const scalar_t* input, const scalar_t* offset, const scalar_t* mask,
                     const scalar_t* grad_output, at::opmath_type<scalar_t>* grad_input,
                     at::opmath_type<scalar_t>* grad_offset, at::opmath_type<scalar_t>* grad_mask,
                     int64_t compact_slice_bytes = kCompactSliceBytes) {
  using acc_t = at::opmath_type<scalar_t>;
  using Channels = typename BackwardChannelsFor<scalar_t, kD>::type;
  const PointLocator<acc_t> locator(geo);
  const int64_t C = geo.channels(), D = kD > 0 ? kD : geo.group_channels, P = geo.points;
  const int64_t in_pixels = geo.height * geo.width, out_pixels = geo.out_h * geo.out_w;
  const bool compact = in_pixels * D * static_cast<int64_t>(sizeof(acc_t)) <= compact_slice_bytes;

  at::parallel_for(0, geo.batch * geo.group, 1, [&](int64_t begin, int64_t end) {
    BackwardTaps<acc_t> taps(locator);
    taps.stride = compact ? D : C;
    taps.spare_rows_at = compact ? in_pixels : -1;
    Channels channels(D);
    // Spare rows past the image (see BackwardTaps::spare_rows_at): zeros in the image, ignored in the gradient.
    const int64_t rows = compact ? in_pixels + 4 * taps.padded : 0;
    std::vector<acc_t> image_buffer(rows * D, acc_t(0)), grad_buffer(rows * D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / geo.group, g = task % geo.group;
      const scalar_t* image = input + n * in_pixels * C + g * D;
      acc_t* grad_image = grad_input + n * in_pixels * C + g * D;
      auto run = [&](const auto* image_rows, acc_t* grad_rows) {
        for (int64_t q = 0; q < out_pixels; ++q) {
          const int64_t pixel = n * out_pixels + q;
          const int64_t wo = q % geo.out_w, ho = q / geo.out_w;
          const int64_t point_base = (pixel * geo.group + g) * P;
          channels.load_top(grad_output + pixel * C + g * D);
          taps.locate(locator, ho, wo, offset + point_base * 2, mask + point_base);
          channels.dots(taps, P, image_rows);
          taps.gradients(P, grad_offset + point_base * 2, grad_mask + point_base);
          channels.scatter(taps, P, grad_rows);
        }
      };
      if (compact) {
        acc_t* image_rows = image_buffer.data();
        for (int64_t i = 0; i < in_pixels; ++i) {
          const scalar_t* src = image + i * C;
          acc_t* dst = image_rows + i * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<acc_t>(src[d]);
        }
        std::fill_n(grad_buffer.begin(), in_pixels * D, acc_t(0));
        run(static_cast<const acc_t*>(image_rows), grad_buffer.data());
        for (int64_t i = 0; i < in_pixels; ++i) std::copy_n(grad_buffer.data() + i * D, D, grad_image + i * C);
      } else {
        for (int64_t i = 0; i < in_pixels; ++i) std::fill_n(grad_image + i * C, D, acc_t(0));
        run(image, grad_image);
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
  // The kernel writes every slot of all three (grad_input included: it accumulates in its own buffers).
  at::Tensor grad_input = at::empty(input.sizes(), acc_options);
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
