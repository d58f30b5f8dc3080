// Scalar LSQ fake-quantization math (DESIGN.md section 2), shared by the CPU kernels (their
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

#if defined(__CUDACC__)
#define OQFL_HD __host__ __device__ __forceinline__
#else
#define OQFL_HD inline
#endif

namespace oqfl {

// rintf rounds half to even in the default floating-point environment on host and device,
// like torch.round and std::nearbyint.
OQFL_HD float round_half_even(float v) { return ::rintf(v); }

// Comparison-based clamp: a NaN passes through (fminf/fmaxf would replace it by a bound and
// silently turn garbage into a valid-looking code).
OQFL_HD float clamp_code(float r, float qmin, float qmax) {
  return r < qmin ? qmin : (r > qmax ? qmax : r);
}

OQFL_HD bool step_is_valid(float s) { return s > 0.f && s <= 3.402823466e38f; }

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
