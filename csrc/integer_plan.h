// A converted network's forward run in C++: the steps of an IntegerGraph (oqfl_ext/nn/plan.py
// lowers it) executed one after another, so a forward is one call from Python instead of one
// per layer (at batch 1 the Python between the layers took 40-86 % of the time). Each step
// calls the same registered op or ATen function the graph's Python forward calls, with the
// same arguments, or (max pooling) a loop that computes what that function computes, so the
// result is the same bit for bit.
#pragma once

#include <ATen/ATen.h>
#include <torch/custom_class.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace oqfl {

class IntegerPlan : public torch::CustomClassHolder {
 public:
  // Every add_* reads slot `x` (and `residual` when >= 0) and writes slot `out`; slot 0 is the
  // network's input. The int lists follow the op schemas (docs in integer_plan.cpp).
  void add_qconv(int64_t out, int64_t x, int64_t residual, at::Tensor x_scale,
                 at::Tensor x_zero_point, at::Tensor w_packed, at::Tensor w_scale,
                 std::optional<at::Tensor> bias, std::optional<at::Tensor> out_scale,
                 std::optional<at::Tensor> out_zero_point, std::vector<int64_t> ints,
                 std::optional<double> clamp_max);
  void add_qlinear(int64_t out, int64_t x, int64_t residual, at::Tensor x_scale,
                   at::Tensor x_zero_point, at::Tensor w_packed, at::Tensor w_scale,
                   std::optional<at::Tensor> bias, std::optional<at::Tensor> out_scale,
                   std::optional<at::Tensor> out_zero_point, std::vector<int64_t> ints,
                   std::optional<double> clamp_max);
  void add_max_pool(int64_t out, int64_t x, std::vector<int64_t> ints);
  void add_adaptive_avg_pool(int64_t out, int64_t x, std::vector<int64_t> size);
  void add_flatten(int64_t out, int64_t x, int64_t start_dim, int64_t end_dim);
  // The slot the forward returns; no step may be added after it.
  void finish(int64_t output);
  at::Tensor run(const at::Tensor& x) const;
  // run() with a steady clock around each step: float64 [num_steps + 1], seconds per step,
  // then the whole run (the benchmark's split of a forward without the profiler's cost)
  at::Tensor step_seconds(const at::Tensor& x) const;
  // "qconv", "qlinear", "max_pool", "adaptive_avg_pool" or "flatten" per step
  std::vector<std::string> step_kinds() const;
  int64_t num_steps() const { return static_cast<int64_t>(steps_.size()); }

 private:
  enum class Kind { kQConv, kQLinear, kMaxPool, kAdaptiveAvgPool, kFlatten };
  struct Step {
    Kind kind;
    int64_t out, x, residual = -1;
    std::vector<at::Tensor> t;                  // x_scale, x_zero_point, w_packed, w_scale
    std::optional<at::Tensor> bias, out_scale, out_zero_point;
    std::vector<int64_t> ints;
    std::optional<double> clamp_max;
    std::vector<int64_t> release;               // slots last read by this step
  };
  void add(Step s);
  at::Tensor run_steps(const at::Tensor& x, double* seconds) const;
  std::vector<Step> steps_;
  int64_t slots_ = 1;
  int64_t output_ = -1;
};

}  // namespace oqfl
