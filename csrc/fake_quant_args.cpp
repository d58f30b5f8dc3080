#include "fake_quant_args.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include <ATen/ATen.h>

#include "common/checks.h"
#include "common/quant_math.h"

namespace oqfl {
namespace {

// Codes are handled as float32, which holds every integer up to 2^24 exactly.
constexpr int64_t kMaxCode = int64_t{1} << 24;

bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

void check_step_tensor(const char* op, const char* arg, const at::Tensor& t,
                       const StepTarget& target, std::optional<int64_t> axis) {
  OQFL_CHECK_DTYPE(t.scalar_type() == at::kFloat, op, arg, "dtype float32", t.scalar_type());
  OQFL_CHECK_ARG(t.device() == target.device, op, arg,
                 std::string("to be on the device of ") + target.device_name + " (" +
                     target.device.str() + ")",
                 t.device().str());
  if (!axis.has_value()) {
    OQFL_CHECK_ARG(t.numel() == 1 && t.dim() <= 1, op, arg,
                   "a single value (shape [] or [1]) when axis is None", "shape ", t.sizes());
  } else {
    const int64_t channels = target.sizes[*axis];
    OQFL_CHECK_ARG(t.dim() == 1 && t.size(0) == channels, op, arg,
                   "shape [" + std::to_string(channels) + "] (" + target.shape_name + "[" +
                       std::to_string(*axis) + "] values)",
                   "shape ", t.sizes());
  }
}

}  // namespace

std::optional<int64_t> check_step_args(const char* op, const StepTarget& target,
                                       const at::Tensor& scale,
                                       const std::optional<at::Tensor>& zero_point,
                                       std::optional<int64_t> axis) {
  std::optional<int64_t> dim;
  if (axis.has_value()) {
    const int64_t d = static_cast<int64_t>(target.sizes.size());
    OQFL_CHECK_ARG(d > 0 && *axis >= -d && *axis < d, op, "axis",
                   "an integer in [" + std::to_string(-d) + ", " + std::to_string(d) + ") for " +
                       target.shape_name + " " + c10::str(target.sizes),
                   *axis);
    dim = *axis < 0 ? *axis + d : *axis;
  }
  check_step_tensor(op, "scale", scale, target, dim);
  if (zero_point.has_value()) check_step_tensor(op, "zero_point", *zero_point, target, dim);
  return dim;
}

Steps checked_steps(const char* op, const at::Tensor& scale,
                    const std::optional<at::Tensor>& zero_point) {
  Steps st{scale.contiguous(), zero_point ? zero_point->contiguous() : at::Tensor()};
  const float* s = st.s();
  for (int64_t i = 0; i < st.scale.numel(); ++i)
    OQFL_CHECK_ARG(step_is_valid(s[i]), op, "scale", "positive finite step sizes", s[i],
                   " at index ", i);
  if (st.zero_point.defined()) {
    const float* z = st.zero_point.const_data_ptr<float>();
    for (int64_t i = 0; i < st.zero_point.numel(); ++i)
      OQFL_CHECK_ARG(std::isfinite(z[i]), op, "zero_point", "finite values", z[i], " at index ", i);
  }
  return st;
}

at::Tensor check_fake_quant_args(const char* op, const at::Tensor& x, const at::Tensor& scale,
                                 const std::optional<at::Tensor>& zero_point, int64_t quant_min,
                                 int64_t quant_max, std::optional<int64_t> axis) {
  OQFL_CHECK_DTYPE(is_float_type(x.scalar_type()), op, "x", "dtype float32, float16 or bfloat16",
                   x.scalar_type());
  OQFL_CHECK_ARG(quant_min < quant_max, op, "quant_min",
                 "less than quant_max (" + std::to_string(quant_max) + ")", quant_min);
  OQFL_CHECK_ARG(quant_min >= -kMaxCode, op, "quant_min", ">= -2^24", quant_min);
  OQFL_CHECK_ARG(quant_max <= kMaxCode, op, "quant_max", "<= 2^24", quant_max);
  check_step_args(op, StepTarget{x.sizes(), x.device(), "x", "x.shape"}, scale, zero_point,
                  axis);
  return x.is_non_overlapping_and_dense() ? x : x.contiguous();
}

void check_grad_output(const char* op, const at::Tensor& grad_output, const at::Tensor& x) {
  OQFL_CHECK_ARG(grad_output.sizes() == x.sizes(), op, "grad_output",
                 "the shape of x " + c10::str(x.sizes()), grad_output.sizes());
  OQFL_CHECK_DTYPE(grad_output.scalar_type() == x.scalar_type(), op, "grad_output",
                   "the dtype of x (" + std::string(c10::toString(x.scalar_type())) + ")",
                   grad_output.scalar_type());
  OQFL_CHECK_ARG(grad_output.device() == x.device(), op, "grad_output",
                 "to be on the device of x (" + x.device().str() + ")",
                 grad_output.device().str());
}

FakeQuantLayout fake_quant_layout(const at::Tensor& dense_x, std::optional<int64_t> axis) {
  FakeQuantLayout layout;
  layout.inner = dense_x.numel();
  if (!axis.has_value()) return layout;
  const int64_t d = dense_x.dim();
  const int64_t a = *axis < 0 ? *axis + d : *axis;
  const int64_t channels = dense_x.size(a);
  if (dense_x.numel() == 0) {  // nothing to walk; keep the channel count for zero gradients
    layout.outer = 0;
    layout.channels = channels;
    return layout;
  }
  if (channels == 1) return layout;  // one step size for everything: per-tensor
  // Dimensions of size > 1 sorted by stride give the memory order (size-1 dimensions have
  // arbitrary strides and do not move anything).
  std::vector<int64_t> dims;
  for (int64_t i = 0; i < d; ++i)
    if (dense_x.size(i) > 1) dims.push_back(i);
  std::stable_sort(dims.begin(), dims.end(), [&](int64_t p, int64_t q) {
    return dense_x.stride(p) > dense_x.stride(q);
  });
  layout.outer = 1;
  layout.inner = 1;
  bool after = false;
  for (int64_t i : dims) {
    if (i == a) {
      after = true;
    } else {
      (after ? layout.inner : layout.outer) *= dense_x.size(i);
    }
  }
  layout.channels = channels;
  TORCH_INTERNAL_ASSERT(dense_x.stride(a) == layout.inner, "unexpected layout of a dense tensor");
  return layout;
}

at::Tensor with_layout_of(const at::Tensor& t, const at::Tensor& like) {
  if (t.strides() == like.strides()) return t;
  return at::empty_like(like).copy_(t);
}

}  // namespace oqfl
