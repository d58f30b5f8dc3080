// CPU kernels of the packing ops (oqfl::pack, unpack, quantize_pack, unpack_dequantize). The
// byte layout is in common/bitpack.h. The work is cut into fixed chunks of output bytes; chunks
// never depend on the thread count, and neither do the results. pack / unpack are plain loops
// (which the compiler vectorizes); quantize_pack / unpack_dequantize call the kernels of the
// active instruction set (cpu/isa/packing_*: AVX-512, or the portable scalar path), which give
// the same bits.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <type_traits>
#include <vector>

#include "common/bitpack.h"
#include "common/checks.h"
#include "common/dispatch.h"
#include "common/quant_math.h"
#include "cpu/cpu_capability.h"
#include "fake_quant_args.h"
#include "ops.h"
#include "packing_args.h"

namespace oqfl {
namespace {

// Bytes per parallel task.
constexpr int64_t kChunkBytes = 16384;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Runs body(first_byte, end_byte, first_element, end_element) on fixed chunks of the output.
template <typename F>
void for_byte_chunks(int64_t bytes, int64_t numel, int bits, const F& body) {
  const int per = codes_per_byte(bits);
  at::parallel_for(0, ceil_div(bytes, kChunkBytes), 1, [&](int64_t b, int64_t e) {
    for (int64_t chunk = b; chunk < e; ++chunk) {
      const int64_t j0 = chunk * kChunkBytes, j1 = std::min(bytes, j0 + kChunkBytes);
      body(j0, j1, j0 * per, std::min(numel, j1 * per));
    }
  });
}

cpu::PackingSteps packing_steps(const FakeQuantLayout& l, const Steps& st) {
  return {l.channels, l.inner, st.s(),
          st.zero_point.defined() ? st.zero_point.const_data_ptr<float>() : nullptr};
}

template <typename T>
const cpu::QuantizePackKernel<T>& kernel_of(const cpu::PackingKernelTable& t);
template <>
const cpu::QuantizePackKernel<float>& kernel_of(const cpu::PackingKernelTable& t) { return t.f32; }
template <>
const cpu::QuantizePackKernel<cpu::BF16>& kernel_of(const cpu::PackingKernelTable& t) {
  return t.bf16;
}
template <>
const cpu::QuantizePackKernel<cpu::F16>& kernel_of(const cpu::PackingKernelTable& t) {
  return t.f16;
}

// The storage type the kernels see for a torch scalar type (same layout).
template <typename T> struct KernelType { using type = T; };
template <> struct KernelType<at::BFloat16> { using type = cpu::BF16; };
template <> struct KernelType<at::Half> { using type = cpu::F16; };

template <typename T>
void quantize_pack_impl(const T* x, uint8_t* out, int64_t numel, int bits,
                        const FakeQuantLayout& l, const Steps& st, const int64_t* seed) {
  using K = typename KernelType<T>::type;
  static_assert(sizeof(K) == sizeof(T), "storage types must match");
  const auto& kernel = kernel_of<K>(cpu::active_packing_kernels());
  const K* xk = reinterpret_cast<const K*>(x);
  const cpu::PackingSteps ps = packing_steps(l, st);
  const float qmin = static_cast<float>(code_min(bits, true));
  const float qmax = static_cast<float>(code_max(bits, true));
  const uint64_t s = seed ? static_cast<uint64_t>(*seed) : 0;
  for_byte_chunks(packed_bytes(numel, bits), numel, bits,
                  [&](int64_t j0, int64_t, int64_t i0, int64_t i1) {
    kernel.run(xk, out + j0, i0, i1, bits, ps, qmin, qmax, seed != nullptr, s);
  });
}

}  // namespace

at::Tensor pack_cpu(const at::Tensor& q, int64_t bits) {
  const char* op = "pack";
  const at::Tensor qc = check_codes(op, q, bits);
  const int64_t numel = qc.numel();
  const int b = static_cast<int>(bits);
  at::Tensor out = at::empty({packed_bytes(numel, b)}, qc.options().dtype(at::kByte));
  if (numel == 0) return out;
  const bool is_signed = qc.scalar_type() == at::kChar;
  uint8_t* o = out.mutable_data_ptr<uint8_t>();
  // First out-of-range element of each chunk (or -1): the error names the first in the tensor.
  std::vector<int64_t> bad(ceil_div(out.numel(), kChunkBytes), -1);
  const auto run = [&](auto* codes) {
    for_byte_chunks(out.numel(), numel, b, [&](int64_t j0, int64_t j1, int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i)
        if (!code_fits(codes[i], b, is_signed)) {
          bad[j0 / kChunkBytes] = i;
          return;
        }
      for (int64_t j = j0; j < j1; ++j)
        o[j] = pack_byte(j, numel, b, [codes](int64_t i) { return int32_t(codes[i]); });
    });
    for (int64_t i : bad)
      OQFL_CHECK_ARG(i < 0, op, "q",
                     "int" + std::to_string(bits) + " codes in [" +
                         std::to_string(code_min(b, is_signed)) + ", " +
                         std::to_string(code_max(b, is_signed)) + "]",
                     int32_t(codes[i]), " at index ", i);
  };
  if (is_signed)
    run(qc.const_data_ptr<int8_t>());
  else
    run(qc.const_data_ptr<uint8_t>());
  return out;
}

at::Tensor unpack_cpu(const at::Tensor& packed, int64_t bits, int64_t numel, bool is_signed) {
  const at::Tensor p = check_packed("unpack", packed, bits, numel);
  at::Tensor out = at::empty({numel}, p.options().dtype(is_signed ? at::kChar : at::kByte));
  if (numel == 0) return out;
  const uint8_t* in = p.const_data_ptr<uint8_t>();
  const int b = static_cast<int>(bits);
  const auto run = [&](auto* o) {
    using C = std::remove_pointer_t<decltype(o)>;
    for_byte_chunks(p.numel(), numel, b, [&](int64_t, int64_t, int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) o[i] = static_cast<C>(unpack_code(in, i, b, is_signed));
    });
  };
  if (is_signed)
    run(out.mutable_data_ptr<int8_t>());
  else
    run(out.mutable_data_ptr<uint8_t>());
  return out;
}

at::Tensor quantize_pack_cpu(const at::Tensor& x, const at::Tensor& scale,
                             const std::optional<at::Tensor>& zero_point, int64_t bits,
                             std::optional<int64_t> axis, bool stochastic,
                             const std::optional<at::Generator>& generator) {
  const char* op = "quantize_pack";
  check_bits(op, bits);
  const int b = static_cast<int>(bits);
  // Packed in row-major order of x's logical layout, whatever its strides.
  const at::Tensor xc = check_fake_quant_args(op, x, scale, zero_point, code_min(b, true),
                                              code_max(b, true), axis)
                            .contiguous();
  const Steps st = checked_steps(op, scale, zero_point);
  const at::Tensor seed = stochastic ? draw_seed(op, generator, xc.device()) : at::Tensor();
  at::Tensor out = at::empty({packed_bytes(xc.numel(), b)}, xc.options().dtype(at::kByte));
  if (xc.numel() == 0) return out;
  const FakeQuantLayout layout = fake_quant_layout(xc, axis);
  OQFL_DISPATCH_FLOAT_TYPES(xc.scalar_type(), "quantize_pack_cpu", [&] {
    quantize_pack_impl<scalar_t>(xc.const_data_ptr<scalar_t>(), out.mutable_data_ptr<uint8_t>(),
                                 xc.numel(), b, layout, st,
                                 stochastic ? seed.const_data_ptr<int64_t>() : nullptr);
  });
  return out;
}

at::Tensor unpack_dequantize_cpu(const at::Tensor& packed, const at::Tensor& scale,
                                 const std::optional<at::Tensor>& zero_point, int64_t bits,
                                 at::IntArrayRef shape, std::optional<int64_t> axis) {
  const char* op = "unpack_dequantize";
  const at::Tensor p = check_unpack_dequantize_args(op, packed, scale, zero_point, bits, shape, axis);
  const Steps st = checked_steps(op, scale, zero_point);
  at::Tensor y = at::empty(shape, scale.options().device(packed.device()));
  if (y.numel() == 0) return y;
  const FakeQuantLayout layout = fake_quant_layout(y, axis);
  const uint8_t* in = p.const_data_ptr<uint8_t>();
  float* o = y.mutable_data_ptr<float>();
  const int b = static_cast<int>(bits);
  const cpu::PackingSteps ps = packing_steps(layout, st);
  const auto kernel = cpu::active_packing_kernels().unpack_dequantize;
  for_byte_chunks(p.numel(), y.numel(), b, [&](int64_t, int64_t, int64_t i0, int64_t i1) {
    kernel(in, o, i0, i1, b, ps);
  });
  return y;
}

// The largest of v[0..n) with bit 31 cleared. Compiled for AVX-512, AVX2 and the baseline,
// picked at load time (GCC/Clang function multiversioning): the unsigned max needs SSE4.1 at
// least, which the baseline x86-64 target lacks.
#if defined(__x86_64__) && defined(__GLIBC__) && defined(__has_attribute)
#if __has_attribute(target_clones)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
#endif
uint32_t abs_pattern_max(const uint32_t* v, int64_t n) {
  uint32_t lane[16] = {0};  // 16 independent maxima: one vector register
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; ++j) {
      const uint32_t a = v[i + j] & 0x7fffffffu;
      lane[j] = a > lane[j] ? a : lane[j];
    }
  uint32_t m = 0;
  for (; i < n; ++i) {
    const uint32_t a = v[i] & 0x7fffffffu;
    m = a > m ? a : m;
  }
  for (int j = 0; j < 16; ++j) m = lane[j] > m ? lane[j] : m;
  return m;
}

// max |x| over each slice along axis 0 of a float32 tensor (the codec's per-channel steps), in
// one pass: the largest bit pattern with the sign bit cleared. Non-negative floats order like
// their patterns, so that is max |x| exactly for finite slices, and a slice holding a NaN or an
// infinity comes out NaN or infinite (the codec refuses it). An unsigned max the compiler
// vectorizes, where amax and amin took two passes.
at::Tensor row_absmax_cpu(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, "_row_absmax: x expected dtype float32, got ",
              x.scalar_type());
  TORCH_CHECK(x.dim() >= 1, "_row_absmax: x expected at least one dimension, got a scalar");
  const at::Tensor xc = x.contiguous();
  const int64_t rows = xc.size(0), len = rows > 0 ? xc.numel() / rows : 0;
  at::Tensor out = at::empty({rows}, xc.options());
  if (rows == 0) return out;
  const uint32_t* src = reinterpret_cast<const uint32_t*>(xc.const_data_ptr<float>());
  uint32_t* dst = reinterpret_cast<uint32_t*>(out.mutable_data_ptr<float>());
  const int64_t grain = std::max<int64_t>(1, kChunkBytes / 4 / std::max<int64_t>(len, 1));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      dst[r] = abs_pattern_max(src + r * len, len);
    }
  });
  return out;
}

TORCH_LIBRARY_IMPL(oqfl, CPU, m) {
  m.impl("_row_absmax", &row_absmax_cpu);
  m.impl("pack", &pack_cpu);
  m.impl("unpack", &unpack_cpu);
  m.impl("quantize_pack", &quantize_pack_cpu);
  m.impl("unpack_dequantize", &unpack_dequantize_cpu);
}

}  // namespace oqfl
