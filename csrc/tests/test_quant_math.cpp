// Unit tests of the torch-free scalar LSQ math (csrc/common/quant_math.h) against long double
// arithmetic written out independently. Run by ctest (see CMakeLists.txt).
#include <cmath>
#include <cstdio>
#include <initializer_list>
#include <limits>

#include "common/quant_math.h"

namespace {

int failures = 0;

#define EXPECT(cond)                                                     \
  do {                                                                   \
    if (!(cond)) {                                                       \
      ++failures;                                                        \
      std::fprintf(stderr, "%s:%d: expected %s\n", __FILE__, __LINE__, #cond); \
    }                                                                    \
  } while (0)

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

int main() {
  test_rounding();
  test_forward_grid();
  test_bounds_are_in_range();
  test_backward_cases();
  test_special_values();
  if (failures) std::fprintf(stderr, "%d check(s) failed\n", failures);
  else std::printf("quant_math: all checks passed\n");
  return failures ? 1 : 0;
}
