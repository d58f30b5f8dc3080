// AVX-512 instance of the packing kernels; compiled for x86-64 only, used only when the CPU
// reports AVX-512 F/BW/VL/DQ (see cpu/cpu_capability.cpp).
#if defined(__x86_64__) || defined(_M_X64)

#include <immintrin.h>

#include <cstdint>

#include "isa/packing_table.h"

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#endif

namespace oqfl {
namespace cpu {
namespace avx512 {
namespace {
#include "isa/packing_kernels_avx512.inc"
}  // namespace
}  // namespace avx512

const PackingKernelTable& packing_kernels_avx512() { return avx512::table("avx512"); }

}  // namespace cpu
}  // namespace oqfl

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#endif
