// Unit tests of the torch-free scalar LSQ math (csrc/common/quant_math.h) against long double
// arithmetic written out independently. Run by ctest (see CMakeLists.txt).
#include <cmath>
#include <cstdio>
#include <initializer_list>
#include <limits>

#include "tests/expect.h"
#include "common/quant_math.h"

namespace {

// Round half to even written out without rint: floor, then settle exact halves by parity.
long double reference_round(long double v) {
  const long double f = std::floor(v);
  const long double frac = v - f;
  if (frac < 0.5L) return f;
  if (frac > 0.5L) return f + 1;
  return std::fmod(f, 2.0L) == 0 ? f : f + 1;
}

long double reference_forward(float x, float s, float z, float qmin, float qmax) {
  // The kernel computes v in float32 (x / s, then + z); do the same roundings, the rest exactly.
  const float v = x / s + z;
  long double q = reference_round(v);
  q = q < qmin ? qmin : (q > qmax ? qmax : q);
  return (q - z) * static_cast<long double>(s);
}

void test_rounding() {
  const float ties[][2] = {{0.5f, 0.f}, {1.5f, 2.f}, {2.5f, 2.f}, {-0.5f, -0.f},
                           {-1.5f, -2.f}, {-2.5f, -2.f}, {7.5f, 8.f}, {1e7f + 0.5f, 1e7f}};
  for (const auto& t : ties) EXPECT(oqfl::round_half_even(t[0]) == t[1]);
  EXPECT(oqfl::round_half_even(2.4999998f) == 2.f);
  EXPECT(oqfl::round_half_even(2.5000002f) == 3.f);
}

void test_forward_grid() {
  const float scales[] = {0.125f, 0.3f, 1.f, 0.0137f};
  const float offsets[] = {0.f, 3.f, -2.f, 0.25f};
  const float bounds[][2] = {{-8, 7}, {0, 15}, {-128, 127}, {0, 3}, {-2, 1}};
  for (float s : scales)
    for (float z : offsets)
      for (const auto& b : bounds)
        for (int i = -4000; i <= 4000; ++i) {
          const float x = i * 0.001953125f;  // multiples of 2^-9 hit many exact ties
          const float y = oqfl::fq_forward(x, s, z, b[0], b[1]);
          EXPECT(static_cast<float>(reference_forward(x, s, z, b[0], b[1])) == y);
        }
}

void test_bounds_are_in_range() {
  // x exactly on qmin/qmax (times s) is in range: gradient passes, ds term is q - v = 0.
  const float s = 0.5f;
  for (float q : {-8.f, 7.f}) {
    const oqfl::FqGrad g = oqfl::fq_backward(2.f, q * s, s, 0.f, -8.f, 7.f);
    EXPECT(g.dx == 2.f);
    EXPECT(g.ds_term == 0.f);
    EXPECT(g.dz_term == 0.f);
  }
  // Rounds onto qmax from below: still in range.
  const oqfl::FqGrad up = oqfl::fq_backward(1.f, 7.4f * s, s, 0.f, -8.f, 7.f);
  EXPECT(up.dx == 1.f);
}

void test_backward_cases() {
  const float s = 0.25f, z = 2.f, qmin = 0.f, qmax = 15.f, dy = 3.f;
  // In range: x = 1.3 -> v = 7.2, q = 7: ds term dy * (q - v).
  oqfl::FqGrad g = oqfl::fq_backward(dy, 1.3f, s, z, qmin, qmax);
  const float v = 1.3f / s + z;
  EXPECT(g.dx == dy);
  EXPECT(g.ds_term == dy * (7.f - v));
  EXPECT(g.dz_term == 0.f);
  // Below: v = -2 -> clamped to 0: dx 0, ds term dy * (qmin - z), dz term dy.
  g = oqfl::fq_backward(dy, -1.f, s, z, qmin, qmax);
  EXPECT(g.dx == 0.f);
  EXPECT(g.ds_term == dy * (qmin - z));
  EXPECT(g.dz_term == dy);
  // Above.
  g = oqfl::fq_backward(dy, 100.f, s, z, qmin, qmax);
  EXPECT(g.dx == 0.f);
  EXPECT(g.ds_term == dy * (qmax - z));
  EXPECT(g.dz_term == dy);
  // Rounds to qmin - 1 (r < qmin) although v > qmin - 1: out of range.
  g = oqfl::fq_backward(dy, (-0.6f - z) * s, s, z, qmin, qmax);
  EXPECT(g.dx == 0.f);
}

void test_special_values() {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  EXPECT(std::isnan(oqfl::fq_forward(nan, 0.5f, 0.f, -8.f, 7.f)));
  EXPECT(oqfl::fq_forward(inf, 0.5f, 0.f, -8.f, 7.f) == 3.5f);
  EXPECT(oqfl::fq_forward(-inf, 0.5f, 0.f, -8.f, 7.f) == -4.f);
  EXPECT(std::isnan(oqfl::fq_backward(1.f, nan, 0.5f, 0.f, -8.f, 7.f).ds_term));
  EXPECT(oqfl::step_is_valid(1e-30f));
  EXPECT(!oqfl::step_is_valid(0.f));
  EXPECT(!oqfl::step_is_valid(-1.f));
  EXPECT(!oqfl::step_is_valid(nan));
  EXPECT(!oqfl::step_is_valid(inf));
}

}  // namespace

void test_stochastic_rounding() {
  const float below_one = 1.f - 5.9604644775390625e-8f;  // the largest uniform, 1 - 2^-24
  const float values[] = {-2.75f, -0.5f, -0.3f, 0.f, 1.f, 2.25f, 7.9f};
  for (float v : values) {
    const float f = std::floor(v);
    EXPECT(oqfl::round_stochastic(v, 0.f) == (v == f ? f : f + 1.f));  // u < frac unless exact
    EXPECT(oqfl::round_stochastic(v, below_one) == f);                  // u >= frac
  }
  EXPECT(oqfl::round_stochastic(0.25f, 0.2f) == 1.f && oqfl::round_stochastic(0.25f, 0.25f) == 0.f);
  // uniforms: in [0, 1) on the 2^-24 grid, a pure function of (seed, index), seed-dependent
  double sum = 0;
  for (uint64_t i = 0; i < 4096; ++i) {
    const float u = oqfl::counter_uniform(42, i);
    EXPECT(u >= 0.f && u < 1.f && std::ldexp(u, 24) == std::floor(std::ldexp(u, 24)));
    EXPECT(u == oqfl::counter_uniform(42, i));
    sum += u;
  }
  EXPECT(std::fabs(sum / 4096 - 0.5) < 0.03);  // sd of the mean: 1 / sqrt(12 * 4096) = 0.0045
  EXPECT(oqfl::counter_uniform(42, 0) != oqfl::counter_uniform(43, 0));
  // known answers, also pinned by python_tests/ops/test_packing.py (its Python reference)
  EXPECT(std::ldexp(oqfl::counter_uniform(42, 0), 24) == 7713660.f);
  EXPECT(std::ldexp(oqfl::counter_uniform(42, 3), 24) == 7925663.f);
  EXPECT(std::ldexp(oqfl::counter_uniform(42, (1ull << 32) - 2), 24) == 5170073.f);
  EXPECT(std::ldexp(oqfl::counter_uniform(42, (1ull << 32) + 2), 24) == 16032029.f);
  // the index's high half counts: blocks of 2^32 indices differ (equal u by chance: 2^-24 each)
  int same_block = 0;
  for (uint64_t i = 0; i < 4096; ++i)
    same_block += oqfl::counter_uniform(42, i) == oqfl::counter_uniform(42, i + (1ull << 32));
  EXPECT(same_block <= 1);
  // quantize_code: the q of fq_forward as an integer, NaN as 0
  EXPECT(oqfl::quantize_code(1.25f, 0.5f, 0.f, -8, 7, false, 0, 0) == 2);   // tie to even
  EXPECT(oqfl::quantize_code(-9.f, 1.f, 0.f, -8, 7, false, 0, 0) == -8);
  EXPECT(oqfl::quantize_code(std::nanf(""), 1.f, 0.f, -8, 7, false, 0, 0) == 0);
  EXPECT(oqfl::quantize_code(1.f, oqfl::step_or_nan(0.f), 0.f, -8, 7, true, 1, 2) == 0);
  EXPECT(oqfl::dequantize_code(-3, 0.5f, 1.f) == -2.f);
}

int main() {
  test_stochastic_rounding();
  test_rounding();
  test_forward_grid();
  test_bounds_are_in_range();
  test_backward_cases();
  test_special_values();
  return oqfl_test::finish("quant_math");
}
