// The CPU kernels of the integer convolution (oqfl::qconv2d / qlinear) of one instruction set, as
// plain function pointers on raw memory, like fake_quant_table.h. The torch side
// (cpu/qconv2d_cpu.cpp) does the argument checks, the threading and the buffers; these
// functions do the inner work of one task and never allocate or start threads.
//
// Input buffer ("padded NHWC"): uint8 codes [N, Hp, Wp, G, ICB * 4] with Hp = H + 2 * pad_h,
// Wp = W + 2 * pad_w; every pixel of the border and every channel past ICg in a group holds the
// zero point (so no tap is ever out of bounds and the padded channels meet zero weights).
// Signed (int8) codes are stored shifted by +128, with the zero point shifted alike: the
// result acc - zp * wsum is unchanged. A depthwise layer run by dw_row has one byte per channel
// instead (ICB * 4 -> 1).
//
// Weights: one "slab" is the weights of 16 output channels of one group,
// [KH, KW, ICB, 16, 4] int8 (qconv_args.h), 64 bytes per (kh, kw, cb) row.
#pragma once

#include <cstdint>

namespace oqfl {
namespace cpu {

// One run of output pixels of one output row times up to 32 output channels (two slabs).
struct QConvRowArgs {
  const uint8_t* in;       // padded input at the first tap (kh = kw = 0) of the first pixel
  int64_t npix;            // output pixels in the run
  int64_t pix_step;        // bytes between the first taps of consecutive pixels (stride_w * C)
  int64_t tap_h, tap_w;    // bytes between taps along kh (dil_h * Wp * C) and kw (dil_w * C)
  int64_t kh, kw, icb;     // kernel size and input-channel blocks of the group
  const int8_t* w0;        // slab of output channels 0..15
  const int8_t* w1;        // slab of output channels 16..31, or null (16 channels only)
  const int32_t* zws;      // [32] zero point * wsum per output channel (wrapping int32)
  const float* scale;      // [32] x_scale * w_scale[o] (a float32 product)
  const float* bias;       // [32] bias, or null
  int64_t noc;             // valid output channels, 1..32 (16 at most when w1 is null)
  // How many k-steps of u8 x s8 pair sums provably fit a (saturating) int16 accumulator: from
  // the largest input byte (code range and zero point) and the weight bits (0: not even one).
  // The AVX2 kernel sums that many vpmaddubsw results in int16 before widening; the others
  // ignore it.
  int64_t i16_steps;
  // Depthwise runs only (dw_row): the weight codes as int32 [KH * KW][channels rounded up to 8],
  // zero past the last channel; w0 / w1 unused, and zws / scale / bias / noc cover all channels.
  const int32_t* dw_w;
  int64_t dw_stride;       // int32 elements between the taps of dw_w
  // The epilogue (qconv_args.h; scalar version in qconv2d_epilogue.h): + residual, relu,
  // min(., clamp_max), then the float32 value or its code.
  const float* residual;   // residual of pixel 0, channel 0, or null
  int64_t res_pix_stride;  // floats between the residuals of consecutive pixels
  int64_t res_oc_stride;   // floats between the residuals of consecutive output channels
  bool relu;
  bool has_clamp;
  float clamp_max;         // when has_clamp
  bool stream;             // may write the output with non-temporal stores (large outputs)
  // Output: float32 to `out`, or (out_codes not null) the code quantize_code(v, out_scale,
  // out_zero_point, out_qmin, out_qmax) as a byte (uint8, or int8 in two's complement).
  float* out;              // output of pixel 0, channel 0 (float output), else null
  uint8_t* out_codes;      // code of pixel 0, channel 0 (code output), else null
  float out_scale, out_zero_point, out_qmin, out_qmax;  // code output only
  int64_t out_pix_stride;  // elements between consecutive pixels
  int64_t out_oc_stride;   // elements between consecutive output channels
};

// A block of consecutive whole output rows for conv_rows (stride 1, one run per row): the
// QConvRowArgs describe the block's first row (npix = the output width).
struct QConvRows {
  int64_t rows;            // output rows in the block
  int64_t row_pixels;      // padded input width: pix_steps between the inputs of two rows
  int64_t out_row_stride;  // elements between the outputs of consecutive rows
  int64_t res_row_stride;  // floats between the residuals of consecutive rows
};

struct QConvKernelTable {
  const char* name;
  // out[i] = clamp(rint(x[i] / s + z), qmin, qmax) + offset (quantize_code of quant_math.h; a
  // NaN gives code 0), for n contiguous floats.
  void (*quantize)(const float* x, uint8_t* out, int64_t n, float s, float z, float qmin,
                   float qmax, int32_t offset);
  // One slab: `rows` rows of 16 x 4 codes starting at `src` (int8 bytes when bits == 8, packed
  // int4 bytes, 32 per row, when bits == 4). Writes the int8 codes to dst (may be null when
  // bits == 8: nothing to unpack) and wsum[j] = sum of the codes of output channel j.
  void (*prepare_slab)(const uint8_t* src, int bits, int64_t rows, int8_t* dst, int32_t* wsum);
  // Computes one run of output pixels (see QConvRowArgs).
  void (*conv_row)(const QConvRowArgs& a);
  // Depthwise (groups == in channels == out channels): one run of output pixels times all the
  // channels, channel c reading byte c of each padded pixel (one byte per channel). Null where
  // the instruction set has none (then conv_row runs each channel's slab).
  void (*dw_row)(const QConvRowArgs& a);
  // Several whole output rows at once (see QConvRows), or null where the instruction set has
  // nothing better than conv_row per row.
  void (*conv_rows)(const QConvRowArgs& a, const QConvRows& r) = nullptr;
};

// Defined by the instruction-set translation units (qconv2d_isa_*.cpp).
const QConvKernelTable& qconv_kernels_default();
#if defined(__x86_64__) || defined(_M_X64)
const QConvKernelTable& qconv_kernels_avx512_vnni();
// AMX-INT8 conv_row (16-pixel tiles), the rest as qconv_kernels_avx512_vnni().
const QConvKernelTable& qconv_kernels_amx();
const QConvKernelTable& qconv_kernels_avx2();
#endif

}  // namespace cpu
}  // namespace oqfl
