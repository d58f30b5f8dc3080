// CUDA kernels of the packing ops (oqfl::pack, unpack, quantize_pack, unpack_dequantize). The
// byte layout is in common/bitpack.h; the per-element math (rounding, counter-based uniforms)
// in common/quant_math.h, shared with the CPU kernels, so both give the same bits.
//
// Grid-stride loops, one output byte (pack, quantize_pack) or one element (unpack,
// unpack_dequantize) per thread step. Nothing is read on the host: step sizes and the
// stochastic-rounding seed are read by the kernels, an invalid step size gives code 0 /
// NaN outputs instead of an error, and pack does not range-check codes (it keeps their low
// bits), since either would need a host sync.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "common/bitpack.h"
#include "common/dispatch.h"
#include "common/quant_math.h"
#include "fake_quant_args.h"
#include "ops.h"
#include "packing_args.h"

namespace oqfl {
namespace {

constexpr int kThreads = 256;
// Enough blocks to fill any current GPU several times over; the loops stride past the rest.
constexpr int64_t kMaxBlocks = 4096;

unsigned blocks_for(int64_t n) {
  return static_cast<unsigned>(std::min<int64_t>(std::max<int64_t>((n + kThreads - 1) / kThreads, 1), kMaxBlocks));
}

#define OQFL_GRID_STRIDE(i, n)                                                       \
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < (n);          \
       i += int64_t(gridDim.x) * blockDim.x)

__device__ __forceinline__ int64_t channel_of(int64_t i, int64_t channels, int64_t inner) {
  return channels == 1 ? 0 : (i / inner) % channels;
}

template <typename C>
__global__ void pack_kernel(const C* __restrict__ q, uint8_t* __restrict__ out, int64_t numel,
                            int64_t bytes, int bits) {
  OQFL_GRID_STRIDE(j, bytes) {
    out[j] = pack_byte(j, numel, bits, [q](int64_t i) { return int32_t(q[i]); });
  }
}

template <typename C>
__global__ void unpack_kernel(const uint8_t* __restrict__ packed, C* __restrict__ out,
                              int64_t numel, int bits, bool is_signed) {
  OQFL_GRID_STRIDE(i, numel) { out[i] = static_cast<C>(unpack_code(packed, i, bits, is_signed)); }
}

template <typename T>
__global__ void quantize_pack_kernel(const T* __restrict__ x, uint8_t* __restrict__ out,
                                     int64_t numel, int64_t bytes, int bits, int64_t channels,
                                     int64_t inner, const float* __restrict__ scale,
                                     const float* __restrict__ zp,
                                     const int64_t* __restrict__ seed) {
  const float qmin = static_cast<float>(code_min(bits, true));
  const float qmax = static_cast<float>(code_max(bits, true));
  const uint64_t key = seed ? static_cast<uint64_t>(*seed) : 0;
  const auto code = [&](int64_t i) {
    const int64_t c = channel_of(i, channels, inner);
    return quantize_code(static_cast<float>(x[i]), step_or_nan(scale[c]), zp ? zp[c] : 0.f,
                         qmin, qmax, seed != nullptr, key, static_cast<uint64_t>(i));
  };
  OQFL_GRID_STRIDE(j, bytes) { out[j] = pack_byte(j, numel, bits, code); }
}

__global__ void unpack_dequantize_kernel(const uint8_t* __restrict__ packed, float* __restrict__ y,
                                         int64_t numel, int bits, int64_t channels, int64_t inner,
                                         const float* __restrict__ scale,
                                         const float* __restrict__ zp) {
  OQFL_GRID_STRIDE(i, numel) {
    const int64_t c = channel_of(i, channels, inner);
    y[i] = dequantize_code(unpack_code(packed, i, bits, true), step_or_nan(scale[c]),
                           zp ? zp[c] : 0.f);
  }
}

const float* zero_point_ptr(const at::Tensor& z) {
  return z.defined() ? z.const_data_ptr<float>() : nullptr;
}

}  // namespace

at::Tensor pack_cuda(const at::Tensor& q, int64_t bits) {
  const at::Tensor qc = check_codes("pack", q, bits);
  const c10::cuda::CUDAGuard guard(qc.device());
  const int b = static_cast<int>(bits);
  const int64_t numel = qc.numel();
  at::Tensor out = at::empty({packed_bytes(numel, b)}, qc.options().dtype(at::kByte));
  if (numel == 0) return out;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const unsigned blocks = blocks_for(out.numel());
  if (qc.scalar_type() == at::kChar)
    pack_kernel<<<blocks, kThreads, 0, stream>>>(qc.const_data_ptr<int8_t>(),
                                                 out.mutable_data_ptr<uint8_t>(), numel,
                                                 out.numel(), b);
  else
    pack_kernel<<<blocks, kThreads, 0, stream>>>(qc.const_data_ptr<uint8_t>(),
                                                 out.mutable_data_ptr<uint8_t>(), numel,
                                                 out.numel(), b);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor unpack_cuda(const at::Tensor& packed, int64_t bits, int64_t numel, bool is_signed) {
  const at::Tensor p = check_packed("unpack", packed, bits, numel);
  const c10::cuda::CUDAGuard guard(p.device());
  at::Tensor out = at::empty({numel}, p.options().dtype(is_signed ? at::kChar : at::kByte));
  if (numel == 0) return out;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int b = static_cast<int>(bits);
  if (is_signed)
    unpack_kernel<<<blocks_for(numel), kThreads, 0, stream>>>(
        p.const_data_ptr<uint8_t>(), out.mutable_data_ptr<int8_t>(), numel, b, true);
  else
    unpack_kernel<<<blocks_for(numel), kThreads, 0, stream>>>(
        p.const_data_ptr<uint8_t>(), out.mutable_data_ptr<uint8_t>(), numel, b, false);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor quantize_pack_cuda(const at::Tensor& x, const at::Tensor& scale,
                              const std::optional<at::Tensor>& zero_point, int64_t bits,
                              std::optional<int64_t> axis, bool stochastic,
                              const std::optional<at::Generator>& generator) {
  const char* op = "quantize_pack";
  check_bits(op, bits);
  const int b = static_cast<int>(bits);
  const c10::cuda::CUDAGuard guard(x.device());
  // Packed in row-major order of x's logical layout, whatever its strides.
  const at::Tensor xc = check_fake_quant_args(op, x, scale, zero_point, code_min(b, true),
                                              code_max(b, true), axis)
                            .contiguous();
  const at::Tensor seed = stochastic ? draw_seed(op, generator, xc.device()) : at::Tensor();
  at::Tensor out = at::empty({packed_bytes(xc.numel(), b)}, xc.options().dtype(at::kByte));
  if (xc.numel() == 0) return out;
  const FakeQuantLayout l = fake_quant_layout(xc, axis);
  const at::Tensor s = scale.contiguous();
  const at::Tensor z = zero_point ? zero_point->contiguous() : at::Tensor();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  OQFL_DISPATCH_FLOAT_TYPES(xc.scalar_type(), "quantize_pack_cuda", [&] {
    quantize_pack_kernel<scalar_t><<<blocks_for(out.numel()), kThreads, 0, stream>>>(
        xc.const_data_ptr<scalar_t>(), out.mutable_data_ptr<uint8_t>(), xc.numel(), out.numel(),
        b, l.channels, l.inner, s.const_data_ptr<float>(), zero_point_ptr(z),
        stochastic ? seed.const_data_ptr<int64_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor unpack_dequantize_cuda(const at::Tensor& packed, const at::Tensor& scale,
                                  const std::optional<at::Tensor>& zero_point, int64_t bits,
                                  at::IntArrayRef shape, std::optional<int64_t> axis) {
  const char* op = "unpack_dequantize";
  const at::Tensor p = check_unpack_dequantize_args(op, packed, scale, zero_point, bits, shape, axis);
  const c10::cuda::CUDAGuard guard(p.device());
  at::Tensor y = at::empty(shape, scale.options().device(p.device()));
  if (y.numel() == 0) return y;
  const FakeQuantLayout l = fake_quant_layout(y, axis);
  const at::Tensor s = scale.contiguous();
  const at::Tensor z = zero_point ? zero_point->contiguous() : at::Tensor();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  unpack_dequantize_kernel<<<blocks_for(y.numel()), kThreads, 0, stream>>>(
      p.const_data_ptr<uint8_t>(), y.mutable_data_ptr<float>(), y.numel(),
      static_cast<int>(bits), l.channels, l.inner, s.const_data_ptr<float>(), zero_point_ptr(z));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

TORCH_LIBRARY_IMPL(oqfl, CUDA, m) {
  m.impl("pack", &pack_cuda);
  m.impl("unpack", &unpack_cuda);
  m.impl("quantize_pack", &quantize_pack_cuda);
  m.impl("unpack_dequantize", &unpack_dequantize_cuda);
}

}  // namespace oqfl
