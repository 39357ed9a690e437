// CUDA forward and backward of the DCNv3 core (InternImage semantics) on channels-last tensors.
//
// Layout, and why:
// * One thread owns CPT consecutive channels of one (n, ho, wo, g). Flattened thread t therefore owns
//   output elements [t*CPT, t*CPT + CPT): neighbouring threads touch neighbouring memory, the
//   input gathers of a group are contiguous vectors, and the offset/mask values of a point are read
//   once per thread (the threads of a group read the same address, which the cache broadcasts).
// * CPT is a template parameter picked on the host from D and pointer alignment, so the per-channel
//   loops unroll into registers and loads become 16-byte vectors; misaligned tensors fall back to a
//   smaller CPT instead of needing a second code path.
// * grad_offset / grad_mask need a sum over the D channels of a group. When a group's threads form an
//   aligned power-of-two slice of a warp, xor-shuffles finish the sum and its first lane writes the
//   result (deterministic, no atomics, no shared memory). Otherwise partial sums go to zeroed
//   float/double buffers with atomicAdd (after a full-warp shuffle when the warp lies inside one group).
// * grad_input is a scatter, so it always uses atomicAdd into a float (double for double) buffer;
//   half/bfloat16 atomics would be slow and lose precision.
// * All flattened indices are int64 and the grids are grid-stride loops, so there is no batch chunking
//   and no limit on N, G or D.

#include <torch/extension.h>

#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
// c10's stream header rather than ATen/cuda/CUDAContext.h (whose at::cuda::getCurrentCUDAStream forwards to
// the same function): CUDAContext.h pulls in cuSPARSE/cuBLAS/cuSOLVER headers, which minimal toolkits lack.
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

constexpr int kThreads = 256;
constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// Everything the kernels need besides the pointers; passed by value as a kernel argument.
struct Dcnv3Shape {
  int64_t n;
  int height, width;          // input H, W
  int out_h, out_w;           // Ho, Wo
  int group, group_channels;  // G, D
  int points;                 // P
  int kernel_h, kernel_w;
  int stride_h, stride_w;
  int pad_h, pad_w;
  int dilation_h, dilation_w;
  int center_h, center_w;     // Kh, Kw: the kernel centre's distance from its first tap
  int skip_i, skip_j;         // kernel tap left out by remove_center, -1 when none
  double offset_scale;
};

__device__ __forceinline__ float floor_op(float x) { return floorf(x); }
__device__ __forceinline__ double floor_op(double x) { return ::floor(x); }

// A CPT-channel slice viewed as aligned vectors of at most 16 bytes (the widest single load).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename scalar_t, int CPT>
struct VecTraits {
  static constexpr int kBytes = static_cast<int>(sizeof(scalar_t)) * CPT;
  static constexpr int kElems = kBytes <= 16 ? CPT : 16 / static_cast<int>(sizeof(scalar_t));
  static constexpr int kCount = CPT / kElems;
  static_assert(CPT % kElems == 0, "CPT must be a multiple of the vector width");
};

template <typename scalar_t, int CPT, typename acc_t>
__device__ __forceinline__ void load_channels(const scalar_t* __restrict__ src, acc_t (&dst)[CPT]) {
  using Tr = VecTraits<scalar_t, CPT>;
  using P = Pack<scalar_t, Tr::kElems>;
#pragma unroll
  for (int k = 0; k < Tr::kCount; ++k) {
    const P pk = reinterpret_cast<const P*>(src)[k];
#pragma unroll
    for (int e = 0; e < Tr::kElems; ++e) dst[k * Tr::kElems + e] = static_cast<acc_t>(pk.v[e]);
  }
}

template <typename scalar_t, int CPT, typename acc_t>
__device__ __forceinline__ void store_channels(scalar_t* __restrict__ dst, const acc_t (&src)[CPT]) {
  using Tr = VecTraits<scalar_t, CPT>;
  using P = Pack<scalar_t, Tr::kElems>;
#pragma unroll
  for (int k = 0; k < Tr::kCount; ++k) {
    P pk;
#pragma unroll
    for (int e = 0; e < Tr::kElems; ++e) pk.v[e] = static_cast<scalar_t>(src[k * Tr::kElems + e]);
    reinterpret_cast<P*>(dst)[k] = pk;
  }
}

// dst[c] += coef * val[c]. Hopper has native float2/float4 atomics, which cut the atomic count of the
// grad_input scatter by up to 4x; elsewhere (and for double) it is one atomic per channel.
template <int CPT, typename acc_t>
__device__ __forceinline__ void atomic_add_channels(acc_t* dst, const acc_t (&val)[CPT], acc_t coef) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if constexpr (std::is_same<acc_t, float>::value && CPT % 4 == 0) {
#pragma unroll
    for (int k = 0; k < CPT / 4; ++k) {
      atomicAdd(reinterpret_cast<float4*>(dst) + k,
                make_float4(coef * val[4 * k], coef * val[4 * k + 1], coef * val[4 * k + 2], coef * val[4 * k + 3]));
    }
  } else if constexpr (std::is_same<acc_t, float>::value && CPT == 2) {
    atomicAdd(reinterpret_cast<float2*>(dst), make_float2(coef * val[0], coef * val[1]));
  } else
#endif
  {
#pragma unroll
    for (int c = 0; c < CPT; ++c) atomicAdd(dst + c, coef * val[c]);
  }
}

// Bilinear footprint of one sampling location: element offsets of the four corners relative to the
// group's channel slice at pixel (0, 0), their weights, and which of them lie inside the image.
// Corner order: 0 = (h_low, w_low), 1 = (h_low, w_high), 2 = (h_high, w_low), 3 = (h_high, w_high).
template <typename acc_t>
struct Footprint {
  int64_t off[4];
  acc_t wt[4];
  bool ok[4];
  acc_t lh, lw, hh, hw;
};

// Callers guarantee -1 < h < height and -1 < w < width, so the floors fit in int.
template <typename acc_t>
__device__ __forceinline__ Footprint<acc_t> make_footprint(acc_t h, acc_t w, int height, int width,
                                                           int64_t row_stride, int64_t pixel_stride) {
  Footprint<acc_t> f;
  const int h_low = static_cast<int>(floor_op(h));
  const int w_low = static_cast<int>(floor_op(w));
  f.lh = h - static_cast<acc_t>(h_low);
  f.lw = w - static_cast<acc_t>(w_low);
  f.hh = acc_t(1) - f.lh;
  f.hw = acc_t(1) - f.lw;
  const bool top = h_low >= 0;
  const bool bottom = h_low + 1 <= height - 1;
  const bool left = w_low >= 0;
  const bool right = w_low + 1 <= width - 1;
  f.ok[0] = top && left;
  f.ok[1] = top && right;
  f.ok[2] = bottom && left;
  f.ok[3] = bottom && right;
  // May be negative for h_low or w_low == -1; only used for corners marked ok.
  const int64_t base = static_cast<int64_t>(h_low) * row_stride + static_cast<int64_t>(w_low) * pixel_stride;
  f.off[0] = base;
  f.off[1] = base + pixel_stride;
  f.off[2] = base + row_stride;
  f.off[3] = base + row_stride + pixel_stride;
  f.wt[0] = f.hh * f.hw;
  f.wt[1] = f.hh * f.lw;
  f.wt[2] = f.lh * f.hw;
  f.wt[3] = f.lh * f.lw;
  return f;
}

// Decomposition of a group index q = ((n*Ho + ho)*Wo + wo)*G + g.
struct GroupPos {
  int64_t n;
  int ho, wo, g;
};

__device__ __forceinline__ GroupPos decompose(int64_t q, const Dcnv3Shape& s) {
  GroupPos r;
  r.g = static_cast<int>(q % s.group);
  const int64_t pix = q / s.group;
  r.wo = static_cast<int>(pix % s.out_w);
  const int64_t nh = pix / s.out_w;
  r.ho = static_cast<int>(nh % s.out_h);
  r.n = nh / s.out_h;
  return r;
}

template <typename scalar_t, int CPT>
__global__ void __launch_bounds__(kThreads)
dcnv3_forward_kernel(const scalar_t* __restrict__ input, const scalar_t* __restrict__ offset,
                     const scalar_t* __restrict__ mask, scalar_t* __restrict__ output, const Dcnv3Shape s,
                     const int64_t total) {
  using acc_t = at::opmath_type<scalar_t>;
  const int threads_per_group = s.group_channels / CPT;
  const acc_t scale = static_cast<acc_t>(s.offset_scale);
  const int64_t pixel_stride = static_cast<int64_t>(s.group) * s.group_channels;
  const int64_t row_stride = pixel_stride * s.width;
  const int64_t batch_stride = row_stride * s.height;
  const acc_t height_f = static_cast<acc_t>(s.height);
  const acc_t width_f = static_cast<acc_t>(s.width);
  const int64_t grid_stride = static_cast<int64_t>(gridDim.x) * blockDim.x;

  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total; t += grid_stride) {
    const int64_t q = t / threads_per_group;
    const int c0 = static_cast<int>(t - q * threads_per_group) * CPT;
    const GroupPos pos = decompose(q, s);

    const scalar_t* __restrict__ image = input + pos.n * batch_stride + static_cast<int64_t>(pos.g) * s.group_channels + c0;
    const scalar_t* __restrict__ off_q = offset + q * s.points * 2;
    const scalar_t* __restrict__ mask_q = mask + q * s.points;
    const acc_t base_w = static_cast<acc_t>(pos.wo * s.stride_w - s.pad_w + s.center_w);
    const acc_t base_h = static_cast<acc_t>(pos.ho * s.stride_h - s.pad_h + s.center_h);

    acc_t acc[CPT];
#pragma unroll
    for (int c = 0; c < CPT; ++c) acc[c] = acc_t(0);

    int p = 0;
    for (int i = 0; i < s.kernel_w; ++i) {
      for (int j = 0; j < s.kernel_h; ++j) {
        if (i == s.skip_i && j == s.skip_j) continue;
        const acc_t dx = static_cast<acc_t>(off_q[2 * p]);
        const acc_t dy = static_cast<acc_t>(off_q[2 * p + 1]);
        const acc_t m = static_cast<acc_t>(mask_q[p]);
        ++p;
        const acc_t w = base_w + (static_cast<acc_t>(i * s.dilation_w - s.center_w) + dx) * scale;
        const acc_t h = base_h + (static_cast<acc_t>(j * s.dilation_h - s.center_h) + dy) * scale;
        // Written so that NaN locations fail the test and are skipped.
        if (!(h > acc_t(-1) && w > acc_t(-1) && h < height_f && w < width_f)) continue;
        const Footprint<acc_t> f = make_footprint(h, w, s.height, s.width, row_stride, pixel_stride);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          if (!f.ok[k]) continue;
          acc_t v[CPT];
          load_channels<scalar_t, CPT>(image + f.off[k], v);
          const acc_t coef = m * f.wt[k];
#pragma unroll
          for (int c = 0; c < CPT; ++c) acc[c] += coef * v[c];
        }
      }
    }
    store_channels<scalar_t, CPT>(output + t * CPT, acc);
  }
}

// ATOMIC_REDUCE == false: threads_per_group == reduce_width, a power of two <= 32; the group's first
//   lane writes grad_offset / grad_mask (type scalar_t) directly, every entry exactly once.
// ATOMIC_REDUCE == true: reduce_width is 32 (threads_per_group is a multiple of 32, so every warp lies
//   inside one group) or 1; each reduce_width-slice atomically adds its partial sum into zeroed
//   acc_t buffers.
template <typename scalar_t, int CPT, bool ATOMIC_REDUCE>
__global__ void __launch_bounds__(kThreads)
dcnv3_backward_kernel(const scalar_t* __restrict__ input, const scalar_t* __restrict__ offset,
                      const scalar_t* __restrict__ mask, const scalar_t* __restrict__ grad_output,
                      at::opmath_type<scalar_t>* __restrict__ grad_input,
                      std::conditional_t<ATOMIC_REDUCE, at::opmath_type<scalar_t>, scalar_t>* __restrict__ grad_offset,
                      std::conditional_t<ATOMIC_REDUCE, at::opmath_type<scalar_t>, scalar_t>* __restrict__ grad_mask,
                      const Dcnv3Shape s, const int64_t total, const int reduce_width) {
  using acc_t = at::opmath_type<scalar_t>;
  using red_t = std::conditional_t<ATOMIC_REDUCE, acc_t, scalar_t>;
  const int threads_per_group = s.group_channels / CPT;
  const acc_t scale = static_cast<acc_t>(s.offset_scale);
  const int64_t pixel_stride = static_cast<int64_t>(s.group) * s.group_channels;
  const int64_t row_stride = pixel_stride * s.width;
  const int64_t batch_stride = row_stride * s.height;
  const acc_t height_f = static_cast<acc_t>(s.height);
  const acc_t width_f = static_cast<acc_t>(s.width);
  // A multiple of 32, so every lane of a warp sees the same warp start on every iteration.
  const int64_t grid_stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int lane_in_warp = static_cast<int>(threadIdx.x) & (kWarpSize - 1);
  const bool leader = (lane_in_warp & (reduce_width - 1)) == 0;

  // The loop runs while the warp's first thread is in range, so that all 32 lanes reach the shuffles;
  // lanes past the end stay in with active == false and contribute zeros.
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t - lane_in_warp < total;
       t += grid_stride) {
    const bool active = t < total;
    const int64_t tc = active ? t : total - 1;  // keeps the index arithmetic of idle lanes in range
    const int64_t q = tc / threads_per_group;
    const int c0 = static_cast<int>(tc - q * threads_per_group) * CPT;
    const GroupPos pos = decompose(q, s);

    const int64_t image_base = pos.n * batch_stride + static_cast<int64_t>(pos.g) * s.group_channels + c0;
    const scalar_t* __restrict__ image = input + image_base;
    acc_t* grad_image = grad_input + image_base;
    const scalar_t* __restrict__ off_q = offset + q * s.points * 2;
    const scalar_t* __restrict__ mask_q = mask + q * s.points;
    red_t* grad_off_q = grad_offset + q * s.points * 2;
    red_t* grad_mask_q = grad_mask + q * s.points;
    const acc_t base_w = static_cast<acc_t>(pos.wo * s.stride_w - s.pad_w + s.center_w);
    const acc_t base_h = static_cast<acc_t>(pos.ho * s.stride_h - s.pad_h + s.center_h);

    acc_t go[CPT];
    if (active) {
      load_channels<scalar_t, CPT>(grad_output + tc * CPT, go);
    } else {
#pragma unroll
      for (int c = 0; c < CPT; ++c) go[c] = acc_t(0);
    }

    int p = 0;
    for (int i = 0; i < s.kernel_w; ++i) {
      for (int j = 0; j < s.kernel_h; ++j) {
        if (i == s.skip_i && j == s.skip_j) continue;  // uniform across the grid, so safe before shuffles
        // Per-thread partial sums over its CPT channels: d/dmask, d/dw and d/dh (before mask * scale).
        acc_t g_mask = acc_t(0), g_w = acc_t(0), g_h = acc_t(0);
        acc_t m = acc_t(0);
        bool valid = false;
        if (active) {
          const acc_t dx = static_cast<acc_t>(off_q[2 * p]);
          const acc_t dy = static_cast<acc_t>(off_q[2 * p + 1]);
          m = static_cast<acc_t>(mask_q[p]);
          const acc_t w = base_w + (static_cast<acc_t>(i * s.dilation_w - s.center_w) + dx) * scale;
          const acc_t h = base_h + (static_cast<acc_t>(j * s.dilation_h - s.center_h) + dy) * scale;
          valid = h > acc_t(-1) && w > acc_t(-1) && h < height_f && w < width_f;
          if (valid) {
            const Footprint<acc_t> f = make_footprint(h, w, s.height, s.width, row_stride, pixel_stride);
            // dot[k] = sum_c grad_out[c] * corner_k[c]; the three gradients are linear in these.
            acc_t dot[4];
#pragma unroll
            for (int k = 0; k < 4; ++k) {
              dot[k] = acc_t(0);
              if (!f.ok[k]) continue;
              acc_t v[CPT];
              load_channels<scalar_t, CPT>(image + f.off[k], v);
#pragma unroll
              for (int c = 0; c < CPT; ++c) dot[k] += go[c] * v[c];
              atomic_add_channels<CPT, acc_t>(grad_image + f.off[k], go, m * f.wt[k]);
            }
            g_mask = f.wt[0] * dot[0] + f.wt[1] * dot[1] + f.wt[2] * dot[2] + f.wt[3] * dot[3];
            g_w = f.hh * (dot[1] - dot[0]) + f.lh * (dot[3] - dot[2]);
            g_h = f.hw * (dot[2] - dot[0]) + f.lw * (dot[3] - dot[1]);
          }
        }
        // Executed by all 32 lanes; xor offsets below reduce_width stay inside aligned reduce_width-slices.
        for (int o = reduce_width >> 1; o > 0; o >>= 1) {
          g_mask += __shfl_xor_sync(kFullMask, g_mask, o);
          g_w += __shfl_xor_sync(kFullMask, g_w, o);
          g_h += __shfl_xor_sync(kFullMask, g_h, o);
        }
        if (active && leader) {
          const acc_t coef = scale * m;
          if constexpr (ATOMIC_REDUCE) {
            if (valid) {
              atomicAdd(grad_off_q + 2 * p, coef * g_w);
              atomicAdd(grad_off_q + 2 * p + 1, coef * g_h);
              atomicAdd(grad_mask_q + p, g_mask);
            }
          } else {
            // Skipped points write explicit zeros: these outputs are not pre-zeroed.
            grad_off_q[2 * p] = static_cast<scalar_t>(valid ? coef * g_w : acc_t(0));
            grad_off_q[2 * p + 1] = static_cast<scalar_t>(valid ? coef * g_h : acc_t(0));
            grad_mask_q[p] = static_cast<scalar_t>(valid ? g_mask : acc_t(0));
          }
        }
        ++p;
      }
    }
  }
}

// ----------------------------------------------------------------------------------------------------
// Host side

bool is_aligned(const void* ptr, int64_t bytes) {
  return reinterpret_cast<std::uintptr_t>(ptr) % static_cast<std::uintptr_t>(bytes) == 0;
}

// Largest of 8/4/2/1 that divides D and for which every pointer is aligned to its vector width
// (min(CPT * element size, 16) bytes). Element offsets are always multiples of CPT, so the base
// pointer's alignment is the only thing that can break vector accesses.
int pick_channels_per_thread(int64_t group_channels, const std::vector<std::pair<const void*, int64_t>>& ptrs) {
  for (int cpt : {8, 4, 2}) {
    if (group_channels % cpt != 0) continue;
    bool ok = true;
    for (const auto& pe : ptrs) ok = ok && is_aligned(pe.first, std::min<int64_t>(cpt * pe.second, 16));
    if (ok) return cpt;
  }
  return 1;
}

int64_t grid_size(int64_t total) {
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  return std::min<int64_t>(blocks, std::numeric_limits<int32_t>::max());
}

bool fits_int(int64_t v) {
  return v >= 0 && v <= std::numeric_limits<int32_t>::max();
}

void check_tensor(const at::Tensor& t, const at::Tensor& input, const char* name) {
  TORCH_CHECK(t.is_cuda(), "dcnv3: ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == input.device(), "dcnv3: ", name, " must be on the same device as input");
  TORCH_CHECK(t.scalar_type() == input.scalar_type(), "dcnv3: ", name, " has dtype ", t.scalar_type(),
              " but input has dtype ", input.scalar_type());
  TORCH_CHECK(t.dim() == 4, "dcnv3: ", name, " must be 4-D (channels last), got ", t.dim(), " dims");
}

Dcnv3Shape make_shape(const at::Tensor& input, const at::Tensor& offset, const at::Tensor& mask, int64_t kernel_h,
                      int64_t kernel_w, int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w,
                      int64_t dilation_h, int64_t dilation_w, int64_t group, int64_t group_channels,
                      double offset_scale, bool remove_center) {
  TORCH_CHECK(input.is_cuda(), "dcnv3: input must be a CUDA tensor");
  TORCH_CHECK(input.dim() == 4, "dcnv3: input must be 4-D (N, H, W, G*D), got ", input.dim(), " dims");
  check_tensor(offset, input, "offset");
  check_tensor(mask, input, "mask");
  TORCH_CHECK(kernel_h > 0 && kernel_w > 0, "dcnv3: kernel size must be positive");
  TORCH_CHECK(stride_h > 0 && stride_w > 0, "dcnv3: stride must be positive");
  TORCH_CHECK(dilation_h > 0 && dilation_w > 0, "dcnv3: dilation must be positive");
  TORCH_CHECK(group > 0 && group_channels > 0, "dcnv3: group and group_channels must be positive");
  TORCH_CHECK(fits_int(kernel_h) && fits_int(kernel_w) && fits_int(stride_h) && fits_int(stride_w) &&
                  fits_int(dilation_h) && fits_int(dilation_w) && fits_int(pad_h) && fits_int(pad_w),
              "dcnv3: kernel/stride/dilation/padding out of range");

  const int64_t n = input.size(0), height = input.size(1), width = input.size(2);
  TORCH_CHECK(input.size(3) == group * group_channels, "dcnv3: input has ", input.size(3),
              " channels, expected group * group_channels = ", group * group_channels);
  const int64_t points = kernel_h * kernel_w - (remove_center ? 1 : 0);
  const int64_t span_h = dilation_h * (kernel_h - 1) + 1, span_w = dilation_w * (kernel_w - 1) + 1;
  TORCH_CHECK(height + 2 * pad_h >= span_h && width + 2 * pad_w >= span_w,
              "dcnv3: the padded input is smaller than the dilated kernel");
  const int64_t out_h = (height + 2 * pad_h - span_h) / stride_h + 1;
  const int64_t out_w = (width + 2 * pad_w - span_w) / stride_w + 1;
  TORCH_CHECK(offset.size(0) == n && offset.size(1) == out_h && offset.size(2) == out_w &&
                  offset.size(3) == group * points * 2,
              "dcnv3: offset has shape ", offset.sizes(), ", expected (", n, ", ", out_h, ", ", out_w, ", ",
              group * points * 2, ")");
  TORCH_CHECK(mask.size(0) == n && mask.size(1) == out_h && mask.size(2) == out_w && mask.size(3) == group * points,
              "dcnv3: mask has shape ", mask.sizes(), ", expected (", n, ", ", out_h, ", ", out_w, ", ",
              group * points, ")");
  // Per-pixel quantities are kept in int inside the kernels; everything flattened is int64.
  TORCH_CHECK(fits_int(height) && fits_int(width) && fits_int(out_h) && fits_int(out_w) &&
                  fits_int(group * group_channels) && fits_int(group * points * 2) &&
                  fits_int(out_h * stride_h + kernel_h * dilation_h + pad_h) &&
                  fits_int(out_w * stride_w + kernel_w * dilation_w + pad_w),
              "dcnv3: sizes exceed the int32 range used for per-pixel indices");

  Dcnv3Shape s;
  s.n = n;
  s.height = static_cast<int>(height);
  s.width = static_cast<int>(width);
  s.out_h = static_cast<int>(out_h);
  s.out_w = static_cast<int>(out_w);
  s.group = static_cast<int>(group);
  s.group_channels = static_cast<int>(group_channels);
  s.points = static_cast<int>(points);
  s.kernel_h = static_cast<int>(kernel_h);
  s.kernel_w = static_cast<int>(kernel_w);
  s.stride_h = static_cast<int>(stride_h);
  s.stride_w = static_cast<int>(stride_w);
  s.pad_h = static_cast<int>(pad_h);
  s.pad_w = static_cast<int>(pad_w);
  s.dilation_h = static_cast<int>(dilation_h);
  s.dilation_w = static_cast<int>(dilation_w);
  s.center_h = static_cast<int>(dilation_h * (kernel_h - 1) / 2);
  s.center_w = static_cast<int>(dilation_w * (kernel_w - 1) / 2);
  s.skip_i = remove_center ? static_cast<int>(kernel_w / 2) : -1;
  s.skip_j = remove_center ? static_cast<int>(kernel_h / 2) : -1;
  s.offset_scale = offset_scale;
  return s;
}

int64_t num_threads(const Dcnv3Shape& s, int cpt) {
  return s.n * s.out_h * s.out_w * s.group * (s.group_channels / cpt);
}

template <typename scalar_t, int CPT>
void launch_forward(const at::Tensor& input, const at::Tensor& offset, const at::Tensor& mask, at::Tensor& output,
                    const Dcnv3Shape& s) {
  const int64_t total = num_threads(s, CPT);
  if (total == 0) return;
  dcnv3_forward_kernel<scalar_t, CPT>
      <<<static_cast<unsigned>(grid_size(total)), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          input.data_ptr<scalar_t>(), offset.data_ptr<scalar_t>(), mask.data_ptr<scalar_t>(),
          output.data_ptr<scalar_t>(), s, total);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, int CPT, bool ATOMIC_REDUCE>
void launch_backward(const at::Tensor& input, const at::Tensor& offset, const at::Tensor& mask,
                     const at::Tensor& grad_output, at::Tensor& grad_input_acc, at::Tensor& grad_offset_out,
                     at::Tensor& grad_mask_out, const Dcnv3Shape& s, int reduce_width) {
  using acc_t = at::opmath_type<scalar_t>;
  using red_t = std::conditional_t<ATOMIC_REDUCE, acc_t, scalar_t>;
  const int64_t total = num_threads(s, CPT);
  if (total == 0) return;
  dcnv3_backward_kernel<scalar_t, CPT, ATOMIC_REDUCE>
      <<<static_cast<unsigned>(grid_size(total)), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          input.data_ptr<scalar_t>(), offset.data_ptr<scalar_t>(), mask.data_ptr<scalar_t>(),
          grad_output.data_ptr<scalar_t>(), grad_input_acc.data_ptr<acc_t>(), grad_offset_out.data_ptr<red_t>(),
          grad_mask_out.data_ptr<red_t>(), s, total, reduce_width);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor dcnv3_forward(const at::Tensor& input_, const at::Tensor& offset_, const at::Tensor& mask_,
                         int64_t kernel_h, int64_t kernel_w, int64_t stride_h, int64_t stride_w, int64_t pad_h,
                         int64_t pad_w, int64_t dilation_h, int64_t dilation_w, int64_t group,
                         int64_t group_channels, double offset_scale, bool remove_center) {
  const Dcnv3Shape s = make_shape(input_, offset_, mask_, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                                  dilation_h, dilation_w, group, group_channels, offset_scale, remove_center);
  const at::cuda::OptionalCUDAGuard device_guard(device_of(input_));
  const at::Tensor input = input_.contiguous();
  const at::Tensor offset = offset_.contiguous();
  const at::Tensor mask = mask_.contiguous();
  at::Tensor output = at::empty({s.n, s.out_h, s.out_w, group * group_channels}, input.options());
  if (output.numel() == 0) return output;

  const int64_t elem = input.element_size();
  const int cpt = pick_channels_per_thread(group_channels, {{input.data_ptr(), elem}, {output.data_ptr(), elem}});

  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, input.scalar_type(),
                                  "dcnv3_forward", [&] {
    switch (cpt) {
      case 8: launch_forward<scalar_t, 8>(input, offset, mask, output, s); break;
      case 4: launch_forward<scalar_t, 4>(input, offset, mask, output, s); break;
      case 2: launch_forward<scalar_t, 2>(input, offset, mask, output, s); break;
      default: launch_forward<scalar_t, 1>(input, offset, mask, output, s); break;
    }
  });
  return output;
}

std::vector<at::Tensor> dcnv3_backward(const at::Tensor& input_, const at::Tensor& offset_, const at::Tensor& mask_,
                                       const at::Tensor& grad_output_, int64_t kernel_h, int64_t kernel_w,
                                       int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w,
                                       int64_t dilation_h, int64_t dilation_w, int64_t group,
                                       int64_t group_channels, double offset_scale, bool remove_center) {
  const Dcnv3Shape s = make_shape(input_, offset_, mask_, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                                  dilation_h, dilation_w, group, group_channels, offset_scale, remove_center);
  check_tensor(grad_output_, input_, "grad_output");
  TORCH_CHECK(grad_output_.size(0) == s.n && grad_output_.size(1) == s.out_h && grad_output_.size(2) == s.out_w &&
                  grad_output_.size(3) == group * group_channels,
              "dcnv3: grad_output has shape ", grad_output_.sizes(), ", expected the output shape");
  const at::cuda::OptionalCUDAGuard device_guard(device_of(input_));
  const at::Tensor input = input_.contiguous();
  const at::Tensor offset = offset_.contiguous();
  const at::Tensor mask = mask_.contiguous();
  const at::Tensor grad_output = grad_output_.contiguous();

  const at::ScalarType dtype = input.scalar_type();
  const bool low_precision = dtype == at::kHalf || dtype == at::kBFloat16;
  const at::ScalarType acc_dtype = dtype == at::kDouble ? at::kDouble : at::kFloat;
  const at::TensorOptions acc_options = input.options().dtype(acc_dtype);

  // For float/double the accumulation buffer already has the output dtype and is returned as is.
  at::Tensor grad_input_acc = at::zeros(input.sizes(), acc_options);

  const int64_t elem = input.element_size();
  const int64_t acc_elem = grad_input_acc.element_size();
  const int cpt = pick_channels_per_thread(
      group_channels, {{input.data_ptr(), elem}, {grad_output.data_ptr(), elem}, {grad_input_acc.data_ptr(), acc_elem}});
  const int64_t threads_per_group = group_channels / cpt;
  const bool pow2 = (threads_per_group & (threads_per_group - 1)) == 0;
  const bool atomic_reduce = !(pow2 && threads_per_group <= kWarpSize);
  const int reduce_width = !atomic_reduce ? static_cast<int>(threads_per_group)
                                          : (threads_per_group % kWarpSize == 0 ? kWarpSize : 1);

  at::Tensor grad_offset_out, grad_mask_out;
  if (atomic_reduce) {
    grad_offset_out = at::zeros(offset.sizes(), acc_options);
    grad_mask_out = at::zeros(mask.sizes(), acc_options);
  } else {
    // Every entry is written by exactly one thread.
    grad_offset_out = at::empty(offset.sizes(), offset.options());
    grad_mask_out = at::empty(mask.sizes(), mask.options());
  }

  if (grad_output.numel() > 0 && offset.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, dtype, "dcnv3_backward", [&] {
      if (atomic_reduce) {
        switch (cpt) {
          case 8: launch_backward<scalar_t, 8, true>(input, offset, mask, grad_output, grad_input_acc, grad_offset_out, grad_mask_out, s, reduce_width); break;
          case 4: launch_backward<scalar_t, 4, true>(input, offset, mask, grad_output, grad_input_acc, grad_offset_out, grad_mask_out, s, reduce_width); break;
          case 2: launch_backward<scalar_t, 2, true>(input, offset, mask, grad_output, grad_input_acc, grad_offset_out, grad_mask_out, s, reduce_width); break;
          default: launch_backward<scalar_t, 1, true>(input, offset, mask, grad_output, grad_input_acc, grad_offset_out, grad_mask_out, s, reduce_width); break;
        }
      } else {
        switch (cpt) {
          case 8: launch_backward<scalar_t, 8, false>(input, offset, mask, grad_output, grad_input_acc, grad_offset_out, grad_mask_out, s, reduce_width); break;
          case 4: launch_backward<scalar_t, 4, false>(input, offset, mask, grad_output, grad_input_acc, grad_offset_out, grad_mask_out, s, reduce_width); break;
          case 2: launch_backward<scalar_t, 2, false>(input, offset, mask, grad_output, grad_input_acc, grad_offset_out, grad_mask_out, s, reduce_width); break;
          default: launch_backward<scalar_t, 1, false>(input, offset, mask, grad_output, grad_input_acc, grad_offset_out, grad_mask_out, s, reduce_width); break;
        }
      }
    });
  } else if (!atomic_reduce) {
    // The kernel did not run (P == 0 or an empty batch), so the uninitialised outputs must be cleared.
    grad_offset_out.zero_();
    grad_mask_out.zero_();
  }

  at::Tensor grad_input = low_precision ? grad_input_acc.to(dtype) : grad_input_acc;
  at::Tensor grad_offset = grad_offset_out.scalar_type() == dtype ? grad_offset_out : grad_offset_out.to(dtype);
  at::Tensor grad_mask = grad_mask_out.scalar_type() == dtype ? grad_mask_out : grad_mask_out.to(dtype);
  return {grad_input, grad_offset, grad_mask};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "DCNv3 core (InternImage semantics), CUDA, channels-last";
  m.def("forward", &dcnv3_forward, "DCNv3 core forward", py::arg("input"), py::arg("offset"), py::arg("mask"),
        py::arg("kernel_h"), py::arg("kernel_w"), py::arg("stride_h"), py::arg("stride_w"), py::arg("pad_h"),
        py::arg("pad_w"), py::arg("dilation_h"), py::arg("dilation_w"), py::arg("group"), py::arg("group_channels"),
        py::arg("offset_scale"), py::arg("remove_center"));
  m.def("backward", &dcnv3_backward, "DCNv3 core backward: returns (grad_input, grad_offset, grad_mask)",
        py::arg("input"), py::arg("offset"), py::arg("mask"), py::arg("grad_output"), py::arg("kernel_h"),
        py::arg("kernel_w"), py::arg("stride_h"), py::arg("stride_w"), py::arg("pad_h"), py::arg("pad_w"),
        py::arg("dilation_h"), py::arg("dilation_w"), py::arg("group"), py::arg("group_channels"),
        py::arg("offset_scale"), py::arg("remove_center"));
}
