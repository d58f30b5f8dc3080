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

// `t` itself when it has the strides of `like` (same shape), else a copy laid out like `like`,
// so the kernels can walk both with one flat index.
at::Tensor with_layout_of(const at::Tensor& t, const at::Tensor& like);

}  // namespace oqfl
