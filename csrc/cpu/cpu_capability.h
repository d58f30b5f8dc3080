// Which instruction set the CPU kernels use, chosen once from the CPU and the environment.
#pragma once

#include <string>

#include "isa/fake_quant_table.h"

namespace oqfl {
namespace cpu {

// The kernel table of the active instruction set.
const FakeQuantKernelTable& active_fake_quant_kernels();

// "avx512", "avx2" or "default".
std::string cpu_capability();

// Switches the active instruction set (for tests and benchmarks); returns the previous one.
// Raises ValueError for an unknown name or one this CPU does not support.
std::string set_cpu_capability(const std::string& name);

}  // namespace cpu
}  // namespace oqfl
