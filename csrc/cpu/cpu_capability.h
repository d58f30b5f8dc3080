// Which instruction set the CPU kernels use, chosen once from the CPU and the environment.
#pragma once

#include <string>

#include "isa/fake_quant_table.h"
#include "isa/packing_table.h"
#include "isa/qconv2d_table.h"

namespace oqfl {
namespace cpu {

// The kernel table of the active instruction set.
const FakeQuantKernelTable& active_fake_quant_kernels();

// The qconv2d kernel table of the active instruction set: under "avx512" the AVX-512 VNNI
// kernels when the CPU has AVX-512 VNNI (under "amx" the AMX conv_row, the rest VNNI), else
// (and under "avx2") the AVX2 ones; under
// "default" the portable ones.
const QConvKernelTable& active_qconv_kernels();

// The packing kernel table (quantize_pack / unpack_dequantize) of the active instruction set:
// AVX-512 under "avx512", AVX2 under "avx2", else the portable scalar ones.
const PackingKernelTable& active_packing_kernels();

// "amx", "avx512", "avx2" or "default".
std::string cpu_capability();

// Switches the active instruction set (for tests and benchmarks); returns the previous one.
// Raises ValueError for an unknown name or one this CPU does not support.
std::string set_cpu_capability(const std::string& name);

}  // namespace cpu
}  // namespace oqfl
