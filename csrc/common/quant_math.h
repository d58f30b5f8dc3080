// Scalar LSQ fake-quantization math (docs/DESIGN.md section 2), shared by the CPU kernels (their
// scalar tails and portable path), the CUDA kernels and the C++ unit tests. Torch-free.
//
//   v = x / s + z;   r = round_half_to_even(v);   q = clamp(r, qmin, qmax);   y = (q - z) * s
//
// Backward (straight-through estimator for the rounding):
//   in range (qmin <= r <= qmax): dx = dy, ds += dy * (q - v),  dz += 0
//   out of range:                 dx = 0,  ds += dy * (q - z),  dz += dy * (-s)
// (q is the bound that was hit when out of range); both sums are later multiplied by
// grad_factor, and the offset sum by -s, once per step size rather than per element.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/host_device.h"

namespace oqfl {

// rintf rounds half to even in the default floating-point environment on host and device,
// like torch.round and std::nearbyint.
OQFL_HD float round_half_even(float v) { return ::rintf(v); }

// Comparison-based clamp: a NaN passes through (fminf/fmaxf would replace it by a bound and
// silently turn garbage into a valid-looking code).
OQFL_HD float clamp_code(float r, float qmin, float qmax) {
  return r < qmin ? qmin : (r > qmax ? qmax : r);
}

// Stochastic rounding: floor(v) + 1 with probability frac(v) when u is uniform in [0, 1), so
// E[result] = v. The fraction is taken in double, where v - floor(v) is exact for every float v
// (in float it is not for negative v), so the only bias left is that of u's 2^-24 grid.
OQFL_HD float round_stochastic(float v, float u) {
  const float f = ::floorf(v);
  return static_cast<double>(u) < static_cast<double>(v) - static_cast<double>(f) ? f + 1.f : f;
}

// A code to store as an integer: NaN (a NaN input, or on CUDA an invalid step size) has no
// integer value and becomes 0; anything else is an integer inside the clamp bounds already.
OQFL_HD int32_t code_to_int(float q) { return q == q ? static_cast<int32_t>(q) : 0; }

// Counter-based uniform numbers for stochastic rounding: element `index` of a call seeded with
// `seed` gets u = top 24 bits of splitmix64(mix(seed) + (index + 1) * golden) / 2^24, a pure
// function of (seed, index). CPU and CUDA, and any thread count or chunking, therefore give
// the same bits. splitmix64 is the output function of Steele et al.'s SplittableRandom
// (passes BigCrush); keying it through one more mix decorrelates neighbouring seeds.
OQFL_HD uint64_t splitmix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

OQFL_HD float counter_uniform(uint64_t seed, uint64_t index) {
  const uint64_t key = splitmix64(seed);
  const uint64_t bits = splitmix64(key + (index + 1) * 0x9e3779b97f4a7c15ull);
  return static_cast<float>(bits >> 40) * 5.9604644775390625e-8f;  // * 2^-24, exact
}

// The stored code of x (quantize_pack): clamp(round(x / s + z), qmin, qmax) as an integer, the
// rounding half to even (the q of fq_forward) or, when `stochastic`, stochastic with the
// counter-based uniform of element `index`.
OQFL_HD int32_t quantize_code(float x, float s, float z, float qmin, float qmax, bool stochastic,
                              uint64_t seed, uint64_t index) {
  const float v = x / s + z;
  const float r = stochastic ? round_stochastic(v, counter_uniform(seed, index))
                             : round_half_even(v);
  return code_to_int(clamp_code(r, qmin, qmax));
}

// The value of a stored code (unpack_dequantize): (q - z) * s, as in fq_forward.
OQFL_HD float dequantize_code(int32_t q, float s, float z) {
  return (static_cast<float>(q) - z) * s;
}

OQFL_HD bool step_is_valid(float s) { return s > 0.f && s <= 3.402823466e38f; }

// The CUDA kernels cannot raise for a bad step size without a host sync; they use NaN instead,
// so everything computed from that step size comes out NaN (a code: 0, see code_to_int).
OQFL_HD float step_or_nan(float s) { return step_is_valid(s) ? s : NAN; }

OQFL_HD float fq_forward(float x, float s, float z, float qmin, float qmax) {
  const float v = x / s + z;
  const float q = clamp_code(round_half_even(v), qmin, qmax);
  return (q - z) * s;
}

struct FqGrad {
  float dx;        // gradient w.r.t. x
  float ds_term;   // this element's contribution to sum(dy * d y / d s), before grad_factor
  float dz_term;   // dy when the element was clamped, else 0; times (-s * grad_factor) later
};

OQFL_HD FqGrad fq_backward(float dy, float x, float s, float z, float qmin, float qmax) {
  const float v = x / s + z;
  const float r = round_half_even(v);
  const bool clamped = r < qmin || r > qmax;
  const float q = clamp_code(r, qmin, qmax);
  FqGrad g;
  g.dx = clamped ? 0.f : dy;
  g.ds_term = dy * (clamped ? q - z : q - v);
  g.dz_term = clamped ? dy : 0.f;
  return g;
}

}  // namespace oqfl
