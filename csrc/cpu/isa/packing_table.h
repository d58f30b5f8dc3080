// The CPU kernels of quantize_pack / unpack_dequantize of one instruction set, as plain function
// pointers on raw memory (see fake_quant_table.h for the scheme). The torch side
// (cpu/packing_cpu.cpp) cuts the work into chunks of whole output bytes and calls one kernel
// per chunk; every element's result depends only on its value, its step size and offset and
// (stochastic rounding) its flat index, never on the chunking or the thread count.
//
// Element i of the flattened (row-major) tensor has channel (i / inner) % channels: its step
// size is s[channel] and its offset z[channel] (z null: all offsets 0). Per-tensor:
// channels = 1, inner = numel.
#pragma once

#include <algorithm>
#include <cstdint>

#include "isa/simd_types.h"

namespace oqfl {
namespace cpu {

struct PackingSteps {
  int64_t channels, inner;
  const float* s;
  const float* z;  // null: no offsets
};

template <typename T>
struct QuantizePackKernel {
  // Codes of elements [i0, i1) of x (x points at element 0) packed into out (out points at the
  // byte of element i0; for int4 i0 is even). stochastic: round stochastically with the counter
  // uniform of each element under `seed` (see counter_uniform in common/quant_math.h).
  void (*run)(const T* x, uint8_t* out, int64_t i0, int64_t i1, int bits,
              const PackingSteps& st, float qmin, float qmax, bool stochastic, uint64_t seed);
};

// Calls f(a, b, high) for the pieces [a, b) of [i0, i1) within one block of 2^32 indices (high:
// their common index >> 32), so the vector kernels keep one counter key per piece (see
// counter_key in common/quant_math.h) and count the index's low half in 32-bit lanes. The
// pieces start at multiples of 2^32 after the first: int4 output bytes stay whole.
template <typename F>
inline void for_each_counter_block(int64_t i0, int64_t i1, F&& f) {
  for (int64_t a = i0; a < i1;) {
    const int64_t b = std::min(i1, ((a >> 32) + 1) << 32);
    f(a, b, static_cast<uint32_t>(a >> 32));
    a = b;
  }
}

struct PackingKernelTable {
  const char* name;
  QuantizePackKernel<float> f32;
  QuantizePackKernel<BF16> bf16;
  QuantizePackKernel<F16> f16;
  // Signed codes of elements [i0, i1) of in (in points at byte 0; for int4 i0 is even)
  // dequantized into y (y points at element 0).
  void (*unpack_dequantize)(const uint8_t* in, float* y, int64_t i0, int64_t i1, int bits,
                            const PackingSteps& st);
};

// Defined by the instruction-set translation units; avx512/avx2 exist on x86-64 only.
const PackingKernelTable& packing_kernels_default();
#if defined(__x86_64__) || defined(_M_X64)
const PackingKernelTable& packing_kernels_avx2();
const PackingKernelTable& packing_kernels_avx512();
#endif

}  // namespace cpu
}  // namespace oqfl
