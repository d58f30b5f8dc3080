// Argument validation shared by the CPU and CUDA entry points of the packing ops (pack, unpack,
// quantize_pack, unpack_dequantize). Every check raises ValueError/TypeError naming `op` and the
// argument, and reads metadata only (never values: on CUDA that would need a host sync).
#pragma once

#include <cstdint>
#include <optional>

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

namespace oqfl {

// bits is 4 or 8.
void check_bits(const char* op, int64_t bits);

// q holds codes (int8: signed, uint8: unsigned); returns it contiguous (row-major order).
at::Tensor check_codes(const char* op, const at::Tensor& q, int64_t bits);

// packed is a uint8 vector of exactly ceil(numel * bits / 8) bytes; returns it contiguous.
at::Tensor check_packed(const char* op, const at::Tensor& packed, int64_t bits, int64_t numel);

// The arguments of unpack_dequantize: shape (non-negative sizes), packed (as check_packed,
// for prod(shape) codes) and scale/zero_point/axis against shape. Returns packed contiguous.
at::Tensor check_unpack_dequantize_args(const char* op, const at::Tensor& packed,
                                        const at::Tensor& scale,
                                        const std::optional<at::Tensor>& zero_point,
                                        int64_t bits, at::IntArrayRef shape,
                                        std::optional<int64_t> axis);

// One int64 seed for stochastic rounding, drawn from `generator` (or the default generator of
// `device`) as torch.randint(2**63 - 1, (1,), generator=generator) would, and returned as a
// one-element int64 tensor on `device`. The kernels read it there, so CUDA never syncs for it.
// The generator may be a CPU generator or one on `device`.
at::Tensor draw_seed(const char* op, const std::optional<at::Generator>& generator,
                     const at::Device& device);

}  // namespace oqfl
