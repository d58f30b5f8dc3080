#include "packing_args.h"

#include <limits>
#include <string>

#include <ATen/ATen.h>

#include "common/bitpack.h"
#include "common/checks.h"
#include "fake_quant_args.h"

namespace oqfl {

void check_bits(const char* op, int64_t bits) {
  OQFL_CHECK_ARG(bits == 4 || bits == 8, op, "bits", "4 or 8", bits);
}

at::Tensor check_codes(const char* op, const at::Tensor& q, int64_t bits) {
  OQFL_CHECK_DTYPE(q.scalar_type() == at::kChar || q.scalar_type() == at::kByte, op, "q",
                   "dtype int8 (signed codes) or uint8 (unsigned codes)", q.scalar_type());
  check_bits(op, bits);
  return q.contiguous();
}

at::Tensor check_packed(const char* op, const at::Tensor& packed, int64_t bits, int64_t numel) {
  check_bits(op, bits);
  OQFL_CHECK_ARG(numel >= 0, op, "numel", "a non-negative count", numel);
  // packed_bytes computes numel * bits + 7: refuse counts where that would wrap around.
  const int64_t max_numel = (std::numeric_limits<int64_t>::max() - 7) / bits;
  OQFL_CHECK_ARG(numel <= max_numel, op, "numel",
                 "at most " + std::to_string(max_numel) + " codes of " + std::to_string(bits) +
                     " bits",
                 numel);
  OQFL_CHECK_DTYPE(packed.scalar_type() == at::kByte, op, "packed", "dtype uint8",
                   packed.scalar_type());
  const int64_t bytes = packed_bytes(numel, static_cast<int>(bits));
  OQFL_CHECK_ARG(packed.dim() == 1 && packed.size(0) == bytes, op, "packed",
                 "shape [" + std::to_string(bytes) + "] (" + std::to_string(numel) +
                     " codes of " + std::to_string(bits) + " bits)",
                 "shape ", packed.sizes());
  return packed.contiguous();
}

at::Tensor check_unpack_dequantize_args(const char* op, const at::Tensor& packed,
                                        const at::Tensor& scale,
                                        const std::optional<at::Tensor>& zero_point,
                                        int64_t bits, at::IntArrayRef shape,
                                        std::optional<int64_t> axis) {
  int64_t numel = 1;
  for (int64_t d : shape) OQFL_CHECK_ARG(d >= 0, op, "shape", "non-negative sizes", shape);
  for (int64_t d : shape) {
    OQFL_CHECK_ARG(!__builtin_mul_overflow(numel, d, &numel), op, "shape",
                   "sizes whose product fits in int64", shape);
  }
  const at::Tensor p = check_packed(op, packed, bits, numel);
  check_step_args(op, StepTarget{shape, packed.device(), "packed", "shape"}, scale, zero_point,
                  axis);
  return p;
}

at::Tensor draw_seed(const char* op, const std::optional<at::Generator>& generator,
                     const at::Device& device) {
  at::Device from = device;
  if (generator.has_value() && generator->defined()) {
    from = generator->device();
    OQFL_CHECK_ARG(from.is_cpu() || from == device, op, "generator",
                   "a CPU generator or one on " + device.str(), "a generator on ", from.str());
  }
  // randint rather than reading the generator's state: the draw advances the generator like any
  // other random op (CUDA: its Philox offset), so successive calls differ and graphs capture it.
  const at::Tensor seed = at::randint(std::numeric_limits<int64_t>::max(), {1}, generator,
                                      at::TensorOptions().dtype(at::kLong).device(from));
  return seed.to(device);
}

}  // namespace oqfl
