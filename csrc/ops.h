// Backend entry points of the oqfl ops; schemas are in registration.cpp.
// qconv2d/qlinear's trailing arguments are the fused epilogue (docs/DESIGN.md section 7).
#pragma once

#include <array>
#include <optional>
#include <tuple>

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

namespace oqfl {

at::Tensor fake_quant_cpu(const at::Tensor& x, const at::Tensor& scale,
                          const std::optional<at::Tensor>& zero_point, int64_t quant_min,
                          int64_t quant_max, std::optional<int64_t> axis, double grad_factor);

std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quant_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& x, const at::Tensor& scale,
    const std::optional<at::Tensor>& zero_point, int64_t quant_min, int64_t quant_max,
    std::optional<int64_t> axis, double grad_factor, std::array<bool, 3> output_mask);

at::Tensor pack_cpu(const at::Tensor& q, int64_t bits);
at::Tensor unpack_cpu(const at::Tensor& packed, int64_t bits, int64_t numel, bool is_signed);
at::Tensor quantize_pack_cpu(const at::Tensor& x, const at::Tensor& scale,
                             const std::optional<at::Tensor>& zero_point, int64_t bits,
                             std::optional<int64_t> axis, bool stochastic,
                             const std::optional<at::Generator>& generator);
at::Tensor unpack_dequantize_cpu(const at::Tensor& packed, const at::Tensor& scale,
                                 const std::optional<at::Tensor>& zero_point, int64_t bits,
                                 at::IntArrayRef shape, std::optional<int64_t> axis);

at::Tensor qconv2d_cpu(const at::Tensor& x, const at::Tensor& x_scale,
                        const at::Tensor& x_zero_point, const at::Tensor& w_packed,
                        const at::Tensor& w_scale, const std::optional<at::Tensor>& bias,
                        int64_t w_bits, at::IntArrayRef stride, at::IntArrayRef padding,
                        at::IntArrayRef dilation, int64_t groups, bool relu, int64_t x_quant_min,
                        int64_t x_quant_max, const std::optional<at::Tensor>& residual,
                        std::optional<double> clamp_max, const std::optional<at::Tensor>& out_scale,
                        const std::optional<at::Tensor>& out_zero_point, int64_t out_quant_min,
                        int64_t out_quant_max);
at::Tensor qlinear_cpu(const at::Tensor& x, const at::Tensor& x_scale,
                        const at::Tensor& x_zero_point, const at::Tensor& w_packed,
                        const at::Tensor& w_scale, const std::optional<at::Tensor>& bias,
                        int64_t w_bits, bool relu, int64_t x_quant_min, int64_t x_quant_max,
                        const std::optional<at::Tensor>& residual, std::optional<double> clamp_max,
                        const std::optional<at::Tensor>& out_scale,
                        const std::optional<at::Tensor>& out_zero_point, int64_t out_quant_min,
                        int64_t out_quant_max);

#ifdef OQFL_WITH_CUDA
at::Tensor fake_quant_cuda(const at::Tensor& x, const at::Tensor& scale,
                           const std::optional<at::Tensor>& zero_point, int64_t quant_min,
                           int64_t quant_max, std::optional<int64_t> axis, double grad_factor);

std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quant_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& x, const at::Tensor& scale,
    const std::optional<at::Tensor>& zero_point, int64_t quant_min, int64_t quant_max,
    std::optional<int64_t> axis, double grad_factor, std::array<bool, 3> output_mask);

at::Tensor pack_cuda(const at::Tensor& q, int64_t bits);
at::Tensor unpack_cuda(const at::Tensor& packed, int64_t bits, int64_t numel, bool is_signed);
at::Tensor quantize_pack_cuda(const at::Tensor& x, const at::Tensor& scale,
                             const std::optional<at::Tensor>& zero_point, int64_t bits,
                             std::optional<int64_t> axis, bool stochastic,
                             const std::optional<at::Generator>& generator);
at::Tensor unpack_dequantize_cuda(const at::Tensor& packed, const at::Tensor& scale,
                                 const std::optional<at::Tensor>& zero_point, int64_t bits,
                                 at::IntArrayRef shape, std::optional<int64_t> axis);
at::Tensor qconv2d_cuda(const at::Tensor& x, const at::Tensor& x_scale,
                        const at::Tensor& x_zero_point, const at::Tensor& w_packed,
                        const at::Tensor& w_scale, const std::optional<at::Tensor>& bias,
                        int64_t w_bits, at::IntArrayRef stride, at::IntArrayRef padding,
                        at::IntArrayRef dilation, int64_t groups, bool relu, int64_t x_quant_min,
                        int64_t x_quant_max, const std::optional<at::Tensor>& residual,
                        std::optional<double> clamp_max, const std::optional<at::Tensor>& out_scale,
                        const std::optional<at::Tensor>& out_zero_point, int64_t out_quant_min,
                        int64_t out_quant_max);
at::Tensor qlinear_cuda(const at::Tensor& x, const at::Tensor& x_scale,
                        const at::Tensor& x_zero_point, const at::Tensor& w_packed,
                        const at::Tensor& w_scale, const std::optional<at::Tensor>& bias,
                        int64_t w_bits, bool relu, int64_t x_quant_min, int64_t x_quant_max,
                        const std::optional<at::Tensor>& residual, std::optional<double> clamp_max,
                        const std::optional<at::Tensor>& out_scale,
                        const std::optional<at::Tensor>& out_zero_point, int64_t out_quant_min,
                        int64_t out_quant_max);
#endif

}  // namespace oqfl
