// Storage types seen by the torch-free SIMD kernels. They have the layout of c10::BFloat16 and
// c10::Half (one uint16_t of raw bits), so the torch side can pass data_ptr()s straight in.
#pragma once

#include <cstdint>

namespace oqfl {
namespace cpu {

struct BF16 { uint16_t bits; };
struct F16 { uint16_t bits; };

}  // namespace cpu
}  // namespace oqfl
