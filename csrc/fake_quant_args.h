// Argument validation and memory layout shared by the CPU and CUDA fake-quant entry points.
#pragma once

#include <cstdint>
#include <optional>

#include <ATen/core/Tensor.h>

namespace oqfl {

// A dense tensor seen in memory order as [outer, channels, inner] around the quantization
// axis: element (o, c, i) sits at offset (o * channels + c) * inner + i from data_ptr().
// Per-tensor quantization (and an axis of size 1) is channels == 1, outer == 1.
struct FakeQuantLayout {
  int64_t outer = 1;
  int64_t channels = 1;
  int64_t inner = 0;
};

// What scale and zero_point are checked against: the sizes and device of the quantized values
// and the names the messages give them ("x" and "x.shape" for x itself; "packed" and "shape"
// when the values are packed codes and the logical shape is an argument).
struct StepTarget {
  at::IntArrayRef sizes;
  at::Device device;
  const char* device_name;
  const char* shape_name;
};

// Checks axis against target.sizes and the dtypes, devices and shapes of scale and zero_point
// (not their values). Returns the axis in [0, dim), or nothing for per-tensor.
std::optional<int64_t> check_step_args(const char* op, const StepTarget& target,
                                       const at::Tensor& scale,
                                       const std::optional<at::Tensor>& zero_point,
                                       std::optional<int64_t> axis);

// Checks dtypes, devices, bounds, axis, and the shapes of scale and zero_point (not their
// values: on CUDA that would need a host sync). Raises ValueError/TypeError naming `op` and
// the argument. Returns x if it is non-overlapping and dense (any dimension order, so
// channels_last stays zero-copy), else a contiguous copy.
at::Tensor check_fake_quant_args(const char* op, const at::Tensor& x, const at::Tensor& scale,
                                 const std::optional<at::Tensor>& zero_point, int64_t quant_min,
                                 int64_t quant_max, std::optional<int64_t> axis);

// Extra checks of the backward: grad_output matches x in shape, dtype and device.
void check_grad_output(const char* op, const at::Tensor& grad_output, const at::Tensor& x);

// Memory-order layout of a dense tensor (the result of check_fake_quant_args) around `axis`.
FakeQuantLayout fake_quant_layout(const at::Tensor& dense_x, std::optional<int64_t> axis);

// Step sizes and offsets of a CPU op as contiguous float vectors, their values checked (the CPU
// reads them for free; the CUDA kernels cannot without a host sync and turn bad ones into NaN).
struct Steps {
  at::Tensor scale, zero_point;  // contiguous; zero_point undefined when absent
  const float* s() const { return scale.const_data_ptr<float>(); }
  float z(int64_t c) const {
    return zero_point.defined() ? zero_point.const_data_ptr<float>()[c] : 0.f;
  }
};

// Raises ValueError naming `op` and the argument for a step size that is not positive and
// finite or an offset that is not finite.
Steps checked_steps(const char* op, const at::Tensor& scale,
                    const std::optional<at::Tensor>& zero_point);

// `t` itself when it has the strides of `like` (same shape), else a copy laid out like `like`,
// so the kernels can walk both with one flat index.
at::Tensor with_layout_of(const at::Tensor& t, const at::Tensor& like);

}  // namespace oqfl
