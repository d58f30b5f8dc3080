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

// Counter-based uniform numbers for stochastic rounding, a pure function of (seed, index): CPU
// (every instruction set) and CUDA, and any thread count or chunking, give the same bits.
//
//   key      = splitmix64(seed)                                  (64 bits, once per call)
//   add, mid = low 32 bits of key, (high 32 bits of key) ^ (index >> 32) * 0x9E3779B9
//   h        = fmix32(uint32(index) + add) + mid                 (all mod 2^32)
//   u        = (lowbias32(h) >> 8) * 2^-24                       (24 bits, in [0, 1))
//
// fmix32 is MurmurHash3's 32-bit finalizer, lowbias32 the two-multiply finalizer found by
// C. Wellons' hash-prospector: two keyed rounds of 32-bit multiply-xorshift, so AVX2/AVX-512
// use native 32-bit multiplies (vpmulld) instead of emulating 64-bit ones. splitmix64 (the
// output function of SplittableRandom) turns neighbouring seeds into unrelated keys; the key
// enters before and between the rounds, so two seeds' streams are not shifts of one sequence
// (added, not xored, between them: fmix32 ends and lowbias32 starts with the same xorshift,
// which would cancel around an xor).
// The index's high half goes into mid (times an odd constant: distinct halves, distinct keys),
// so tensors of more than 2^32 elements do not repeat; within a block of 2^32 indices the
// 32-bit hash is a bijection of the index.
OQFL_HD uint64_t splitmix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// The multipliers of the two rounds, and of the index's high half (shared with the vector
// kernels, which repeat counter_bits24's operations lane by lane).
constexpr uint32_t kFmix32Mul1 = 0x85ebca6bu, kFmix32Mul2 = 0xc2b2ae35u;
constexpr uint32_t kLowbias32Mul1 = 0x7feb352du, kLowbias32Mul2 = 0x846ca68bu;
constexpr uint32_t kCounterHighMul = 0x9e3779b9u;

// The per-call key of `seed` for the indices whose high 32 bits are `high`.
struct CounterKey {
  uint32_t add, mid;
};

OQFL_HD CounterKey counter_key_of(uint64_t key, uint32_t high) {
  return {static_cast<uint32_t>(key),
          static_cast<uint32_t>(key >> 32) ^ (high * kCounterHighMul)};
}

OQFL_HD CounterKey counter_key(uint64_t seed, uint32_t high) {
  return counter_key_of(splitmix64(seed), high);
}

// The 24 bits of u for the index whose low 32 bits are `low`.
OQFL_HD uint32_t counter_bits24(CounterKey k, uint32_t low) {
  uint32_t h = low + k.add;
  h = (h ^ (h >> 16)) * kFmix32Mul1;
  h = (h ^ (h >> 13)) * kFmix32Mul2;
  h = (h ^ (h >> 16)) + k.mid;
  h = (h ^ (h >> 16)) * kLowbias32Mul1;
  h = (h ^ (h >> 15)) * kLowbias32Mul2;
  return (h ^ (h >> 16)) >> 8;
}

OQFL_HD float counter_uniform(uint64_t seed, uint64_t index) {
  const uint32_t bits = counter_bits24(counter_key(seed, static_cast<uint32_t>(index >> 32)),
                                       static_cast<uint32_t>(index));
  return static_cast<float>(bits) * 5.9604644775390625e-8f;  // * 2^-24, exact
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
