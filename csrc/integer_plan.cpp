// IntegerPlan (integer_plan.h): the steps of a converted network, run in C++.
//
// Int lists, in order (oqfl_ext/nn/plan.py writes them):
//   qconv:    w_bits, stride h/w, padding h/w, dilation h/w, groups, relu, x_quant_min,
//             x_quant_max, out_quant_min, out_quant_max, input_codes
//   qlinear:  w_bits, relu, x_quant_min, x_quant_max, out_quant_min, out_quant_max, input_codes
//   max pool: kernel h/w, stride h/w, padding h/w, dilation h/w, ceil_mode, codes
#include "integer_plan.h"

#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <chrono>
#include <limits>

namespace oqfl {
namespace {

using QConvFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                           int64_t, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t,
                           bool, int64_t, int64_t, const std::optional<at::Tensor>&,
                           std::optional<double>, const std::optional<at::Tensor>&,
                           const std::optional<at::Tensor>&, int64_t, int64_t);
using QLinearFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const at::Tensor&, const at::Tensor&,
                             const std::optional<at::Tensor>&, int64_t, bool, int64_t, int64_t,
                             const std::optional<at::Tensor>&, std::optional<double>,
                             const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                             int64_t, int64_t);

// The registered ops, through the dispatcher (any backend, profiler events as from Python).
const c10::TypedOperatorHandle<QConvFn>& qconv_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("oqfl::qconv2d", "").typed<QConvFn>();
  return op;
}
const c10::TypedOperatorHandle<QLinearFn>& qlinear_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("oqfl::qlinear", "").typed<QLinearFn>();
  return op;
}

// Output size of one max-pooling dimension, as F.max_pool2d computes it.
int64_t pool_out(int64_t n, int64_t k, int64_t s, int64_t p, int64_t d, bool ceil) {
  const int64_t span = n + 2 * p - d * (k - 1) - 1 + (ceil ? s - 1 : 0);
  // floor division (span may be negative), as ATen and max_pool2d_codes divide
  int64_t o = (span >= 0 ? span / s : -((-span + s - 1) / s)) + 1;
  if (ceil && (o - 1) * s >= n + p) --o;  // the last window must start inside
  return o;
}

// The empty channels_last output of a max pooling of `in` [N, C, H, W] (pool_out's sizes).
at::Tensor pooled_like(const at::Tensor& in, const std::vector<int64_t>& a) {
  return at::empty({in.size(0), in.size(1), pool_out(in.size(2), a[0], a[2], a[4], a[6], a[8] != 0),
                    pool_out(in.size(3), a[1], a[3], a[5], a[7], a[8] != 0)},
                   in.options(), at::MemoryFormat::ChannelsLast);
}

// The windows of a max pooling over a channels_last [N, C, H, W] buffer: each output pixel's
// C values start at `lowest` and take `combine(out, in)` of every window element inside the
// input (padding never takes part), then `finish(out)`.
template <typename T, typename Combine, typename Finish>
void pool_windows(const T* in, T* out, int64_t N, int64_t C, int64_t H, int64_t W, int64_t OH,
                  int64_t OW, const std::vector<int64_t>& a, T lowest, Combine combine,
                  Finish finish) {
  const int64_t kh = a[0], kw = a[1], sh = a[2], sw = a[3], ph = a[4], pw = a[5], dh = a[6],
                dw = a[7];
  const int64_t grain = std::max<int64_t>(
      1, 32768 / std::max<int64_t>(1, OW * C * kh * kw * static_cast<int64_t>(sizeof(T))));
  at::parallel_for(0, N * OH, grain, [&](int64_t r0, int64_t r1) {
    // locals: a store may alias anything read through the closure (byte stores alias
    // everything), and a bound read through it keeps the channel loop from vectorizing
    const int64_t nc = C;
    const T low = lowest;
    const T* const src = in;
    T* const dst = out;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / OH, oh = r % OH;
      for (int64_t ow = 0; ow < OW; ++ow) {
        T* __restrict__ o = dst + ((n * OH + oh) * OW + ow) * nc;
        std::fill(o, o + nc, low);
        for (int64_t i = 0; i < kh; ++i) {
          const int64_t h = oh * sh - ph + i * dh;
          if (h < 0 || h >= H) continue;
          for (int64_t j = 0; j < kw; ++j) {
            const int64_t w = ow * sw - pw + j * dw;
            if (w < 0 || w >= W) continue;
            const T* __restrict__ v = src + ((n * H + h) * W + w) * nc;
            for (int64_t c = 0; c < nc; ++c) o[c] = combine(o[c], v[c]);
          }
        }
        finish(o, nc);
      }
    }
  });
}

// Max pooling on codes (uint8 / int8), the same as oqfl_ext.nn.graph.max_pool2d_codes: the
// maximum over each window's elements inside the input, channels_last. int8 codes are compared
// as uint8 with the sign bit flipped (an order-preserving map), so one byte loop serves both
// and vectorizes with the baseline ISA (unsigned byte max is SSE2).
void max_pool_codes(const uint8_t* in, uint8_t* out, uint8_t flip, int64_t N, int64_t C,
                    int64_t H, int64_t W, int64_t OH, int64_t OW, const std::vector<int64_t>& a) {
  if (flip == 0) {
    pool_windows<uint8_t>(
        in, out, N, C, H, W, OH, OW, a, uint8_t{0},
        [](uint8_t o, uint8_t u) { return o > u ? o : u; }, [](uint8_t*, int64_t) {});
    return;
  }
  pool_windows<uint8_t>(
      in, out, N, C, H, W, OH, OW, a, uint8_t{0},
      [](uint8_t o, uint8_t u) {
        const uint8_t f = u ^ uint8_t{0x80};
        return o > f ? o : f;
      },
      [](uint8_t* o, int64_t nc) {
        for (int64_t c = 0; c < nc; ++c) o[c] ^= uint8_t{0x80};
      });
}

// Whether ATen accepts the pooling (padding at most half the dilated kernel, an output of at
// least one pixel); otherwise at::max_pool2d runs and raises its own error.
bool float_pool_ok(const at::Tensor& in, const std::vector<int64_t>& a) {
  for (int i = 0; i < 2; ++i)
    if (a[4 + i] * 2 > (a[i] - 1) * a[6 + i] + 1) return false;
  return pool_out(in.size(2), a[0], a[2], a[4], a[6], a[8] != 0) >= 1 &&
         pool_out(in.size(3), a[1], a[3], a[5], a[7], a[8] != 0) >= 1;
}

// Float max pooling of a channels_last float32 CPU tensor, as ATen's kernel computes it (start
// at -inf; a window element replaces the maximum when larger or NaN): at::max_pool2d also
// computes the indices, which made it 10 % of resnet18's forward at batch 32.
at::Tensor max_pool2d_float(const at::Tensor& in, const std::vector<int64_t>& a) {
  at::Tensor out = pooled_like(in, a);
  pool_windows<float>(
      in.const_data_ptr<float>(), out.mutable_data_ptr<float>(), in.size(0), in.size(1),
      in.size(2), in.size(3), out.size(2), out.size(3), a,
      -std::numeric_limits<float>::infinity(),
      [](float o, float u) { return (u > o || u != u) ? u : o; }, [](float*, int64_t) {});
  return out;
}

at::Tensor max_pool2d_codes(const at::Tensor& x, const std::vector<int64_t>& a) {
  TORCH_CHECK(x.dim() == 4 && x.device().is_cpu(),
              "IntegerPlan: max pooling on codes expected a 4-D CPU tensor, got ", x.dim(),
              "-D on ", x.device());
  const at::Tensor in = x.contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_CHECK(in.scalar_type() == at::kByte || in.scalar_type() == at::kChar,
              "IntegerPlan: max pooling on codes expected uint8 or int8, got ",
              in.scalar_type());
  at::Tensor out = pooled_like(in, a);
  const uint8_t flip = in.scalar_type() == at::kChar ? 0x80 : 0;
  max_pool_codes(static_cast<const uint8_t*>(in.const_data_ptr()),
                 static_cast<uint8_t*>(out.mutable_data_ptr()), flip, in.size(0), in.size(1),
                 in.size(2), in.size(3), out.size(2), out.size(3), a);
  return out;
}

void check_slot(const char* what, int64_t slot, int64_t slots) {
  TORCH_CHECK(slot >= 0 && slot < slots, "IntegerPlan.", what, ": slot ", slot,
              " is not written by an earlier step (", slots, " slots)");
}

}  // namespace

void IntegerPlan::add(Step s) {
  TORCH_CHECK(output_ < 0, "IntegerPlan: no step may be added after finish()");
  check_slot("x", s.x, slots_);
  if (s.residual >= 0) check_slot("residual", s.residual, slots_);
  TORCH_CHECK(s.out == slots_, "IntegerPlan: out expected the next free slot ", slots_,
              ", got ", s.out);
  ++slots_;
  steps_.push_back(std::move(s));
}

void IntegerPlan::add_qconv(int64_t out, int64_t x, int64_t residual, at::Tensor x_scale,
                            at::Tensor x_zero_point, at::Tensor w_packed, at::Tensor w_scale,
                            std::optional<at::Tensor> bias, std::optional<at::Tensor> out_scale,
                            std::optional<at::Tensor> out_zero_point, std::vector<int64_t> ints,
                            std::optional<double> clamp_max) {
  TORCH_CHECK(ints.size() == 14, "IntegerPlan.add_qconv: ints expected 14 values, got ",
              ints.size());
  add(Step{Kind::kQConv, out, x, residual, {x_scale, x_zero_point, w_packed, w_scale},
           std::move(bias), std::move(out_scale), std::move(out_zero_point), std::move(ints),
           clamp_max, {}});
}

void IntegerPlan::add_qlinear(int64_t out, int64_t x, int64_t residual, at::Tensor x_scale,
                              at::Tensor x_zero_point, at::Tensor w_packed, at::Tensor w_scale,
                              std::optional<at::Tensor> bias,
                              std::optional<at::Tensor> out_scale,
                              std::optional<at::Tensor> out_zero_point,
                              std::vector<int64_t> ints, std::optional<double> clamp_max) {
  TORCH_CHECK(ints.size() == 7, "IntegerPlan.add_qlinear: ints expected 7 values, got ",
              ints.size());
  add(Step{Kind::kQLinear, out, x, residual, {x_scale, x_zero_point, w_packed, w_scale},
           std::move(bias), std::move(out_scale), std::move(out_zero_point), std::move(ints),
           clamp_max, {}});
}

void IntegerPlan::add_max_pool(int64_t out, int64_t x, std::vector<int64_t> ints) {
  TORCH_CHECK(ints.size() == 10, "IntegerPlan.add_max_pool: ints expected 10 values, got ",
              ints.size());
  for (int i = 0; i < 8; ++i)
    TORCH_CHECK(ints[i] >= (i >= 4 && i < 6 ? 0 : 1),
                "IntegerPlan.add_max_pool: kernel, stride and dilation expected >= 1, "
                "padding >= 0");
  add(Step{Kind::kMaxPool, out, x, -1, {}, {}, {}, {}, std::move(ints), {}, {}});
}

void IntegerPlan::add_adaptive_avg_pool(int64_t out, int64_t x, std::vector<int64_t> size) {
  TORCH_CHECK(size.size() == 2, "IntegerPlan.add_adaptive_avg_pool: size expected 2 values");
  add(Step{Kind::kAdaptiveAvgPool, out, x, -1, {}, {}, {}, {}, std::move(size), {}, {}});
}

void IntegerPlan::add_flatten(int64_t out, int64_t x, int64_t start_dim, int64_t end_dim) {
  add(Step{Kind::kFlatten, out, x, -1, {}, {}, {}, {}, {start_dim, end_dim}, {}, {}});
}

void IntegerPlan::finish(int64_t output) {
  TORCH_CHECK(output_ < 0, "IntegerPlan.finish: called twice");
  check_slot("finish", output, slots_);
  output_ = output;
  // each slot is released after the last step that reads it (never the output)
  std::vector<int64_t> last(slots_, -1);
  for (size_t i = 0; i < steps_.size(); ++i) {
    last[steps_[i].x] = static_cast<int64_t>(i);
    if (steps_[i].residual >= 0) last[steps_[i].residual] = static_cast<int64_t>(i);
  }
  for (int64_t s = 0; s < slots_; ++s)
    if (last[s] >= 0 && s != output) steps_[last[s]].release.push_back(s);
}

at::Tensor IntegerPlan::run(const at::Tensor& x) const { return run_steps(x, nullptr); }

at::Tensor IntegerPlan::step_seconds(const at::Tensor& x) const {
  at::Tensor t = at::zeros({num_steps() + 1}, at::kDouble);
  const auto start = std::chrono::steady_clock::now();
  run_steps(x, t.mutable_data_ptr<double>());
  t.mutable_data_ptr<double>()[num_steps()] =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return t;
}

std::vector<std::string> IntegerPlan::step_kinds() const {
  std::vector<std::string> out;
  for (const Step& s : steps_) {
    switch (s.kind) {
      case Kind::kQConv: out.emplace_back("qconv"); break;
      case Kind::kQLinear: out.emplace_back("qlinear"); break;
      case Kind::kMaxPool: out.emplace_back("max_pool"); break;
      case Kind::kAdaptiveAvgPool: out.emplace_back("adaptive_avg_pool"); break;
      case Kind::kFlatten: out.emplace_back("flatten"); break;
    }
  }
  return out;
}

// Runs the steps; with `seconds`, writes each step's wall time there.
at::Tensor IntegerPlan::run_steps(const at::Tensor& x, double* seconds) const {
  TORCH_CHECK(output_ >= 0, "IntegerPlan.run: the plan is not finished");
  std::vector<at::Tensor> v(slots_);
  v[0] = x;
  for (size_t i = 0; i < steps_.size(); ++i) {
    const Step& s = steps_[i];
    const auto start = seconds ? std::chrono::steady_clock::now()
                               : std::chrono::steady_clock::time_point{};
    const at::Tensor& in = v[s.x];
    const std::vector<int64_t>& a = s.ints;
    std::optional<at::Tensor> residual;
    if (s.residual >= 0) residual = v[s.residual];
    at::Tensor y;
    switch (s.kind) {
      case Kind::kQConv: {
        // as QConv2dInt.forward: a float input is made channels_last (the op writes its
        // output in its input's memory format)
        const bool codes = a[13] != 0;
        const at::Tensor xin = !codes && in.dim() == 4 &&
                                       !in.is_contiguous(at::MemoryFormat::ChannelsLast)
                                   ? in.contiguous(at::MemoryFormat::ChannelsLast)
                                   : in;
        y = qconv_op().call(xin, s.t[0], s.t[1], s.t[2], s.t[3], s.bias, a[0], {a[1], a[2]},
                            {a[3], a[4]}, {a[5], a[6]}, a[7], a[8] != 0, a[9], a[10], residual,
                            s.clamp_max, s.out_scale, s.out_zero_point, a[11], a[12]);
        break;
      }
      case Kind::kQLinear:
        y = qlinear_op().call(in, s.t[0], s.t[1], s.t[2], s.t[3], s.bias, a[0], a[1] != 0,
                              a[2], a[3], residual, s.clamp_max, s.out_scale,
                              s.out_zero_point, a[4], a[5]);
        break;
      case Kind::kMaxPool:
        if (a[9] != 0) {
          y = max_pool2d_codes(in, a);
        } else {
          y = in.device().is_cpu() && in.scalar_type() == at::kFloat && in.dim() == 4 &&
                      in.is_contiguous(at::MemoryFormat::ChannelsLast) && float_pool_ok(in, a)
                  ? max_pool2d_float(in, a)
                  : at::max_pool2d(in, {a[0], a[1]}, {a[2], a[3]}, {a[4], a[5]}, {a[6], a[7]},
                             a[8] != 0);
        }
        break;
      case Kind::kAdaptiveAvgPool:
        y = at::adaptive_avg_pool2d(in, {a[0], a[1]});
        break;
      case Kind::kFlatten:
        y = at::flatten(in, a[0], a[1]);
        break;
    }
    v[s.out] = std::move(y);
    for (int64_t r : s.release) v[r].reset();
    if (seconds)
      seconds[i] =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  }
  return v[output_];
}

}  // namespace oqfl
