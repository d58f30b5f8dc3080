// Portable instance of the fake-quant kernels (one lane, no target pragma): the fallback on
// CPUs without AVX2 and on other architectures.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include <c10/util/Half.h>

#include "common/quant_math.h"
#include "isa/fake_quant_table.h"

namespace oqfl {
namespace cpu {
namespace portable {
namespace {
#include "isa/simd_scalar.h"
#include "isa/fake_quant_kernels.inc"
}  // namespace
}  // namespace portable

const FakeQuantKernelTable& fake_quant_kernels_default() { return portable::table("default"); }

}  // namespace cpu
}  // namespace oqfl
