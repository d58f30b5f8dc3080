// AVX2 instance of the packing kernels; compiled for x86-64 only, used only when the CPU
// reports AVX2, FMA and F16C (see cpu/cpu_capability.cpp).
#if defined(__x86_64__) || defined(_M_X64)

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "isa/packing_table.h"

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif

namespace oqfl {
namespace cpu {
namespace avx2 {
namespace {
#include "isa/packing_kernels_avx2.inc"
}  // namespace
}  // namespace avx2

const PackingKernelTable& packing_kernels_avx2() { return avx2::table("avx2"); }

}  // namespace cpu
}  // namespace oqfl

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#endif
