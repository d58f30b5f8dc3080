// CUDA kernels of oqfl::fake_quant and oqfl::fake_quant_backward.
//
// The dense input is walked as [outer, channels, inner] (fake_quant_args.h): blockIdx.y picks
// the channel, blockIdx.x and the threads stride over that channel's outer * inner elements,
// VEC elements (16 bytes) at a time when rows and pointers allow. Step sizes are read on the
// device, never on the host, so nothing synchronizes; a step size that is not positive and
// finite turns its channel's outputs and gradients into NaN instead of raising.
// The backward writes one (ds, dz) partial per block and a second kernel adds them per channel
// in a fixed order, so the gradients are deterministic here too.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "common/dispatch.h"
#include "common/quant_math.h"
#include "fake_quant_args.h"
#include "ops.h"

namespace oqfl {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxGridY = 65535;

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

struct Walk {
  int64_t outer, channels, inner;
  int64_t units_per_row;  // inner / VEC
};

__device__ __forceinline__ int64_t element_offset(const Walk& w, int64_t c, int64_t unit, int vec) {
  const int64_t o = unit / w.units_per_row;
  const int64_t k = (unit - o * w.units_per_row) * vec;
  return (o * w.channels + c) * w.inner + k;
}

__device__ __forceinline__ float checked_step(const float* scale, int64_t c) {
  return step_or_nan(scale[c]);
}

template <typename T, int VEC>
__global__ void forward_kernel(const T* __restrict__ x, T* __restrict__ y,
                               const float* __restrict__ scale, const float* __restrict__ zp,
                               Walk w, float qmin, float qmax) {
  const int64_t units = w.outer * w.units_per_row;
  for (int64_t c = blockIdx.y; c < w.channels; c += gridDim.y) {
    const float s = checked_step(scale, c);
    const float z = zp ? zp[c] : 0.f;
    for (int64_t u = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; u < units;
         u += int64_t(gridDim.x) * blockDim.x) {
      const int64_t off = element_offset(w, c, u, VEC);
      const Pack<T, VEC> in = *reinterpret_cast<const Pack<T, VEC>*>(x + off);
      Pack<T, VEC> out;
#pragma unroll
      for (int i = 0; i < VEC; ++i)
        out.v[i] = static_cast<T>(fq_forward(static_cast<float>(in.v[i]), s, z, qmin, qmax));
      *reinterpret_cast<Pack<T, VEC>*>(y + off) = out;
    }
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int d = 16; d > 0; d /= 2) v += __shfl_down_sync(0xffffffffu, v, d);
  return v;
}

// Sum of v over the block, valid in thread 0; fixed order, so deterministic.
__device__ float block_sum(float v, float* shared) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  v = warp_sum(v);
  __syncthreads();  // `shared` may still be read by a previous call
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = threadIdx.x < blockDim.x / 32 ? shared[threadIdx.x] : 0.f;
  return warp == 0 ? warp_sum(v) : 0.f;
}

template <typename T, int VEC, bool kDx, bool kSums>
__global__ void backward_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                T* __restrict__ dx, const float* __restrict__ scale,
                                const float* __restrict__ zp, Walk w, float qmin, float qmax,
                                float2* __restrict__ partial) {
  __shared__ float shared[kThreads / 32];
  const int64_t units = w.outer * w.units_per_row;
  for (int64_t c = blockIdx.y; c < w.channels; c += gridDim.y) {
    const float s = checked_step(scale, c);
    const float z = zp ? zp[c] : 0.f;
    const bool valid = s == s;
    float ds = 0.f, dz = 0.f;
    for (int64_t u = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; u < units;
         u += int64_t(gridDim.x) * blockDim.x) {
      const int64_t off = element_offset(w, c, u, VEC);
      const Pack<T, VEC> g = *reinterpret_cast<const Pack<T, VEC>*>(dy + off);
      const Pack<T, VEC> in = *reinterpret_cast<const Pack<T, VEC>*>(x + off);
      Pack<T, VEC> out;
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const FqGrad r = fq_backward(static_cast<float>(g.v[i]), static_cast<float>(in.v[i]), s,
                                     z, qmin, qmax);
        out.v[i] = static_cast<T>(valid ? r.dx : __int_as_float(0x7fc00000));
        ds += r.ds_term;
        dz += r.dz_term;
      }
      if (kDx) *reinterpret_cast<Pack<T, VEC>*>(dx + off) = out;
    }
    if (kSums) {
      ds = block_sum(ds, shared);
      dz = block_sum(dz, shared);
      if (threadIdx.x == 0) partial[c * gridDim.x + blockIdx.x] = make_float2(ds, dz);
    }
  }
}

// One thread per channel adds its blocks' partials in order and applies grad_factor (and -s
// for the offset).
__global__ void finish_sums_kernel(const float2* __restrict__ partial, int64_t blocks,
                                   int64_t channels, const float* __restrict__ scale,
                                   double grad_factor, float* grad_scale, float* grad_zp) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= channels) return;
  double ds = 0.0, dz = 0.0;
  for (int64_t b = 0; b < blocks; ++b) {
    ds += partial[c * blocks + b].x;
    dz += partial[c * blocks + b].y;
  }
  if (grad_scale) grad_scale[c] = static_cast<float>(grad_factor * ds);
  if (grad_zp) grad_zp[c] = static_cast<float>(-static_cast<double>(scale[c]) * grad_factor * dz);
}

int multiprocessors(int device) {
  static int cache[64] = {};
  if (device < 0 || device >= 64) return 108;
  if (cache[device] == 0) {
    int n = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    cache[device] = n;
  }
  return cache[device];
}

// Elements per 16-byte access when every row start and base pointer is 16-byte aligned.
template <typename T>
int vector_width(const FakeQuantLayout& l, std::initializer_list<const void*> ptrs) {
  constexpr int kVec = 16 / sizeof(T);
  if (l.inner % kVec != 0) return 1;
  for (const void* p : ptrs)
    if (p && reinterpret_cast<uintptr_t>(p) % 16 != 0) return 1;
  return kVec;
}

struct Launch {
  Walk walk;
  dim3 grid;
};

Launch plan(const FakeQuantLayout& l, int vec, int device) {
  Launch p;
  p.walk = {l.outer, l.channels, l.inner, l.inner / vec};
  const int64_t units = l.outer * p.walk.units_per_row;
  const int64_t gy = std::min<int64_t>(l.channels, kMaxGridY);
  const int64_t wanted = std::max<int64_t>(1, int64_t(multiprocessors(device)) * 8 / gy);
  const int64_t gx = std::min<int64_t>((units + kThreads - 1) / kThreads, wanted);
  p.grid = dim3(static_cast<unsigned>(std::max<int64_t>(gx, 1)), static_cast<unsigned>(gy));
  return p;
}

const float* zero_point_ptr(const at::Tensor& z) {
  return z.defined() ? z.const_data_ptr<float>() : nullptr;
}

}  // namespace

at::Tensor fake_quant_cuda(const at::Tensor& x, const at::Tensor& scale,
                           const std::optional<at::Tensor>& zero_point, int64_t quant_min,
                           int64_t quant_max, std::optional<int64_t> axis, double grad_factor) {
  (void)grad_factor;  // only the backward uses it
  const at::Tensor xd =
      check_fake_quant_args("fake_quant", x, scale, zero_point, quant_min, quant_max, axis);
  const c10::cuda::CUDAGuard guard(xd.device());
  at::Tensor y = at::empty_like(xd);
  if (xd.numel() == 0) return y;
  const FakeQuantLayout layout = fake_quant_layout(xd, axis);
  const at::Tensor s = scale.contiguous();
  const at::Tensor z = zero_point ? zero_point->contiguous() : at::Tensor();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  OQFL_DISPATCH_FLOAT_TYPES(xd.scalar_type(), "fake_quant_cuda", [&] {
    const auto* xp = xd.const_data_ptr<scalar_t>();
    auto* yp = y.mutable_data_ptr<scalar_t>();
    const int vec = vector_width<scalar_t>(layout, {xp, yp});
    const Launch p = plan(layout, vec, xd.get_device());
    const float qmin = static_cast<float>(quant_min), qmax = static_cast<float>(quant_max);
    if (vec == 1) {
      forward_kernel<scalar_t, 1><<<p.grid, kThreads, 0, stream>>>(
          xp, yp, s.const_data_ptr<float>(), zero_point_ptr(z), p.walk, qmin, qmax);
    } else {
      forward_kernel<scalar_t, 16 / sizeof(scalar_t)><<<p.grid, kThreads, 0, stream>>>(
          xp, yp, s.const_data_ptr<float>(), zero_point_ptr(z), p.walk, qmin, qmax);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

namespace {

template <typename T, int VEC>
void launch_backward(const Launch& p, cudaStream_t stream, const T* dy, const T* x, T* dx,
                     const float* s, const float* z, float qmin, float qmax, float2* partial) {
  if (dx && partial)
    backward_kernel<T, VEC, true, true><<<p.grid, kThreads, 0, stream>>>(dy, x, dx, s, z, p.walk, qmin, qmax, partial);
  else if (dx)
    backward_kernel<T, VEC, true, false><<<p.grid, kThreads, 0, stream>>>(dy, x, dx, s, z, p.walk, qmin, qmax, partial);
  else
    backward_kernel<T, VEC, false, true><<<p.grid, kThreads, 0, stream>>>(dy, x, dx, s, z, p.walk, qmin, qmax, partial);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quant_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& x, const at::Tensor& scale,
    const std::optional<at::Tensor>& zero_point, int64_t quant_min, int64_t quant_max,
    std::optional<int64_t> axis, double grad_factor, std::array<bool, 3> output_mask) {
  const char* op = "fake_quant_backward";
  const at::Tensor xd = check_fake_quant_args(op, x, scale, zero_point, quant_min, quant_max, axis);
  check_grad_output(op, grad_output, x);
  const c10::cuda::CUDAGuard guard(xd.device());
  const bool want_dx = output_mask[0];
  const bool want_ds = output_mask[1];
  const bool want_dz = output_mask[2] && zero_point.has_value();
  const bool want_sums = want_ds || want_dz;

  const at::Tensor s = scale.contiguous();
  const at::Tensor z = zero_point ? zero_point->contiguous() : at::Tensor();
  at::Tensor grad_x = want_dx ? at::empty_like(xd) : at::empty({0}, x.options());
  at::Tensor grad_scale = want_ds ? at::zeros(scale.sizes(), scale.options()) : at::empty({0}, scale.options());
  at::Tensor grad_zp = want_dz ? at::zeros(z.sizes(), scale.options()) : at::empty({0}, scale.options());
  if (xd.numel() == 0 || !(want_dx || want_sums)) return {grad_x, grad_scale, grad_zp};

  const FakeQuantLayout layout = fake_quant_layout(xd, axis);
  const at::Tensor dy = with_layout_of(grad_output, xd);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  OQFL_DISPATCH_FLOAT_TYPES(xd.scalar_type(), "fake_quant_backward_cuda", [&] {
    const auto* dyp = dy.const_data_ptr<scalar_t>();
    const auto* xp = xd.const_data_ptr<scalar_t>();
    auto* dxp = want_dx ? grad_x.mutable_data_ptr<scalar_t>() : nullptr;
    const int vec = vector_width<scalar_t>(layout, {dyp, xp, dxp});
    const Launch p = plan(layout, vec, xd.get_device());
    at::Tensor partial;
    if (want_sums)
      partial = at::empty({layout.channels * int64_t(p.grid.x) * 2}, scale.options());
    auto* pp = want_sums ? reinterpret_cast<float2*>(partial.mutable_data_ptr<float>()) : nullptr;
    const float qmin = static_cast<float>(quant_min), qmax = static_cast<float>(quant_max);
    if (vec == 1)
      launch_backward<scalar_t, 1>(p, stream, dyp, xp, dxp, s.const_data_ptr<float>(), zero_point_ptr(z), qmin, qmax, pp);
    else
      launch_backward<scalar_t, 16 / sizeof(scalar_t)>(p, stream, dyp, xp, dxp, s.const_data_ptr<float>(), zero_point_ptr(z), qmin, qmax, pp);
    if (want_sums) {
      const int threads = 128;
      const auto blocks = static_cast<unsigned>((layout.channels + threads - 1) / threads);
      finish_sums_kernel<<<blocks, threads, 0, stream>>>(
          pp, p.grid.x, layout.channels, s.const_data_ptr<float>(), grad_factor,
          want_ds ? grad_scale.mutable_data_ptr<float>() : nullptr,
          want_dz ? grad_zp.mutable_data_ptr<float>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {grad_x, grad_scale, grad_zp};
}

TORCH_LIBRARY_IMPL(oqfl, CUDA, m) {
  m.impl("fake_quant", &fake_quant_cuda);
  m.impl("fake_quant_backward", &fake_quant_backward_cuda);
}

}  // namespace oqfl
