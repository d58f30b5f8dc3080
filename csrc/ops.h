// Backend entry points of the oqfl ops; schemas are in registration.cpp.
#pragma once

#include <array>
#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace oqfl {

at::Tensor fake_quant_cpu(const at::Tensor& x, const at::Tensor& scale,
                          const std::optional<at::Tensor>& zero_point, int64_t quant_min,
                          int64_t quant_max, std::optional<int64_t> axis, double grad_factor);

std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quant_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& x, const at::Tensor& scale,
    const std::optional<at::Tensor>& zero_point, int64_t quant_min, int64_t quant_max,
    std::optional<int64_t> axis, double grad_factor, std::array<bool, 3> output_mask);

#ifdef OQFL_WITH_CUDA
at::Tensor fake_quant_cuda(const at::Tensor& x, const at::Tensor& scale,
                           const std::optional<at::Tensor>& zero_point, int64_t quant_min,
                           int64_t quant_max, std::optional<int64_t> axis, double grad_factor);

std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quant_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& x, const at::Tensor& scale,
    const std::optional<at::Tensor>& zero_point, int64_t quant_min, int64_t quant_max,
    std::optional<int64_t> axis, double grad_factor, std::array<bool, 3> output_mask);
#endif

}  // namespace oqfl
