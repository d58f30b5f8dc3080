// Portable instance of the qconv2d kernels (plain int32 loops, no target pragma): used on CPUs
// without AVX2, under the "default" capability, and as the reference the VNNI and AVX2 paths
// are tested against. Correct for every geometry the torch side hands it.
//
// FMA contraction of the epilogue (float)(acc - zp * wsum) * scale + bias (qconv2d_epilogue.h)
// is switched off for this file (GCC: optimize pragma; clang: STDC FP_CONTRACT), so the product
// is rounded before the bias is added, as in the reference.
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include <cstdint>
#include <cstring>

#include "common/quant_math.h"
#include "isa/qconv2d_epilogue.h"
#include "isa/qconv2d_table.h"

namespace oqfl {
namespace cpu {
namespace portable {
namespace {

void quantize(const float* x, uint8_t* out, int64_t n, float s, float z, float qmin, float qmax,
              int32_t offset) {
  for (int64_t i = 0; i < n; ++i)
    out[i] = static_cast<uint8_t>(quantize_code(x[i], s, z, qmin, qmax, false, 0, 0) + offset);
}

void prepare_slab(const uint8_t* src, int bits, int64_t rows, int8_t* dst, int32_t* wsum) {
  int32_t sum[16] = {0};
  const int64_t n = rows * 64;
  for (int64_t e = 0; e < n; ++e) {
    int32_t v;
    if (bits == 8) {
      v = static_cast<int8_t>(src[e]);
    } else {
      const int32_t byte = src[e >> 1];
      const int32_t nib = (e & 1) ? (byte >> 4) : (byte & 15);
      v = (nib ^ 8) - 8;
    }
    sum[(e >> 2) & 15] += v;
    if (dst != nullptr) dst[e] = static_cast<int8_t>(v);
  }
  for (int j = 0; j < 16; ++j) wsum[j] = sum[j];
}

// The dot products of one pixel with one slab, accumulated into acc[16].
inline void slab_dot(const uint8_t* in, const int8_t* w, const QConvRowArgs& a, int32_t* acc) {
  for (int64_t kh = 0; kh < a.kh; ++kh) {
    for (int64_t kw = 0; kw < a.kw; ++kw) {
      const uint8_t* t = in + kh * a.tap_h + kw * a.tap_w;
      const int8_t* wr = w + (kh * a.kw + kw) * a.icb * 64;
      for (int64_t cb = 0; cb < a.icb; ++cb, t += 4, wr += 64) {
        const int32_t u0 = t[0], u1 = t[1], u2 = t[2], u3 = t[3];
        for (int j = 0; j < 16; ++j)
          acc[j] += u0 * wr[4 * j] + u1 * wr[4 * j + 1] + u2 * wr[4 * j + 2] + u3 * wr[4 * j + 3];
      }
    }
  }
}

void conv_row(const QConvRowArgs& a) {
  for (int64_t p = 0; p < a.npix; ++p) {
    const uint8_t* in = a.in + p * a.pix_step;
    int32_t acc[32] = {0};
    slab_dot(in, a.w0, a, acc);
    if (a.w1 != nullptr) slab_dot(in, a.w1, a, acc + 16);
    qconv_store_pixel(a, p, acc);
  }
}

}  // namespace
}  // namespace portable

const QConvKernelTable& qconv_kernels_default() {
  static const QConvKernelTable table{"default", &portable::quantize, &portable::prepare_slab,
                                      &portable::conv_row, nullptr};
  return table;
}

}  // namespace cpu
}  // namespace oqfl
