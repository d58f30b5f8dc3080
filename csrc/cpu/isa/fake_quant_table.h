// The CPU fake-quant kernels of one instruction set, as plain function pointers on raw memory.
// Each instruction set is compiled in its own translation unit (fake_quant_isa_*.cpp) and the
// torch side (cpu/fake_quant_cpu.cpp) picks a table at run time, so the package runs on any
// x86-64 CPU and still uses AVX-512 where it exists.
//
// Shapes: a "span" is n contiguous elements sharing one step size s and offset z. A "tile" is
// `rows` rows of `width` contiguous elements, row starts `stride` elements apart, where column j
// has its own step size s[j] and offset z[j] (per-channel quantization along a fast axis).
#pragma once

#include <cstdint>

#include "isa/simd_types.h"

namespace oqfl {
namespace cpu {

// `stream`: write the output with non-temporal stores (for outputs larger than the cache).
template <typename T>
struct FakeQuantKernels {
  void (*forward)(const T* x, T* y, int64_t n, float s, float z, float qmin, float qmax,
                  bool stream);
  void (*forward_tile)(const T* x, T* y, int64_t rows, int64_t width, int64_t stride,
                       const float* s, const float* z, float qmin, float qmax);
  // dx may be null (not needed). sums may be null; else sums[0] = sum of ds terms and
  // sums[1] = sum of dy over clamped elements, both over this span, before grad_factor.
  void (*backward)(const T* dy, const T* x, T* dx, int64_t n, float s, float z, float qmin,
                   float qmax, float* sums, bool stream);
  // As backward, per column: ds_acc[j] and dz_acc[j] are accumulated into (+=); both null
  // when the scale and offset gradients are not needed.
  void (*backward_tile)(const T* dy, const T* x, T* dx, int64_t rows, int64_t width,
                        int64_t stride, const float* s, const float* z, float qmin, float qmax,
                        float* ds_acc, float* dz_acc);
};

struct FakeQuantKernelTable {
  const char* name;
  FakeQuantKernels<float> f32;
  FakeQuantKernels<BF16> bf16;
  FakeQuantKernels<F16> f16;
};

// Defined by the instruction-set translation units; avx512/avx2 exist on x86-64 only.
const FakeQuantKernelTable& fake_quant_kernels_default();
#if defined(__x86_64__) || defined(_M_X64)
const FakeQuantKernelTable& fake_quant_kernels_avx2();
const FakeQuantKernelTable& fake_quant_kernels_avx512();
#endif

}  // namespace cpu
}  // namespace oqfl
