// The scalar epilogue of the qconv2d CPU kernels (contract in qconv_args.h): from the int32
// accumulators of one output pixel to its stored outputs. The portable kernel uses it for every
// pixel; a SIMD kernel without a vectorized epilogue for some output mode calls
// qconv_store_pixel for each pixel of its tile. One place for the arithmetic, so every path gives
// the same bits.
//
// Include it only in translation units compiled without FP contraction (the build's
// -std=c++17 means -ffp-contract=off for GCC; the ISA files also switch it off explicitly, as
// qconv2d_isa_default.cpp does): the product must be rounded before the bias is added.
#pragma once

#include <cstdint>

#include "common/quant_math.h"
#include "isa/qconv2d_table.h"

namespace oqfl {
namespace cpu {

// The float32 value of output channel o (0 <= o < a.noc) of a pixel before the output
// conversion: (float)(acc - zp * wsum) * scale + bias, + residual, relu, min(., clamp_max).
// `res` is the pixel's residual (channel 0) or null.
inline float qconv_epilogue_value(const QConvRowArgs& a, int64_t o, int32_t acc,
                                  const float* res) {
  // Wrapping int32 difference (exact whenever the true value fits in int32).
  const int32_t d =
      static_cast<int32_t>(static_cast<uint32_t>(acc) - static_cast<uint32_t>(a.zws[o]));
  float v = static_cast<float>(d) * a.scale[o];
  if (a.bias != nullptr) v = v + a.bias[o];
  if (res != nullptr) v = v + res[o * a.res_oc_stride];
  if (a.relu) v = v < 0.f ? 0.f : v;                        // NaN stays NaN
  if (a.has_clamp) v = v > a.clamp_max ? a.clamp_max : v;   // NaN stays NaN
  return v;
}

// Stores output pixel p of the run (0 <= p < a.npix) from its accumulators acc[0..a.noc):
// the float32 values, or their codes when a.out_codes is set.
inline void qconv_store_pixel(const QConvRowArgs& a, int64_t p, const int32_t* acc) {
  const float* res = a.residual != nullptr ? a.residual + p * a.res_pix_stride : nullptr;
  if (a.out_codes != nullptr) {
    uint8_t* out = a.out_codes + p * a.out_pix_stride;
    for (int64_t o = 0; o < a.noc; ++o) {
      const float v = qconv_epilogue_value(a, o, acc[o], res);
      const int32_t q = quantize_code(v, a.out_scale, a.out_zero_point, a.out_qmin, a.out_qmax,
                                      /*stochastic=*/false, 0, 0);
      out[o * a.out_oc_stride] = static_cast<uint8_t>(q);  // int8 codes: two's complement
    }
    return;
  }
  float* out = a.out + p * a.out_pix_stride;
  for (int64_t o = 0; o < a.noc; ++o)
    out[o * a.out_oc_stride] = qconv_epilogue_value(a, o, acc[o], res);
}

}  // namespace cpu
}  // namespace oqfl
