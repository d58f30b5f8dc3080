// Argument validation and geometry shared by the CPU and CUDA kernels of the integer inference
// ops qconv2d and qlinear (schemas in registration.cpp).
//
// Contract of qconv2d (qlinear is qconv2d with a 1x1 kernel on [N, IC, 1, 1]; its output and
// residual are [..., OC], the output contiguous):
//   x            float32 [N, C, H, W] (NCHW or channels_last), quantized inside the op as
//                u = clamp(round_half_even(x / x_scale + x_zero_point), x_quant_min, x_quant_max)
//                (the quantize_code of common/quant_math.h); or uint8 codes (taken as is, code
//                domain 0..255); or int8 codes (taken as is, code domain -128..127).
//   x_scale      float32, one element, > 0 and finite.
//   x_zero_point integer dtype (int32/int64), one element, inside the code domain. Integer-valued
//                so that padding (a real 0) is the code x_zero_point exactly.
//   x_quant_min/x_quant_max  code range of a float input: inside 0..255 (unsigned domain) or,
//                when x_quant_min < 0, inside -128..127 (signed domain). Ignored for code input.
//   w_packed     the blocked weight layout below, int8 (w_bits 8) or uint8 (w_bits 4).
//   w_scale      float32 [OC], > 0 and finite (per output channel).
//   bias         float32 [OC] or None.
//   epilogue     per output element (n, o, p), each float32 operation rounded on its own (no
//                FMA contraction):
//                  v = (float)(acc - x_zero_point * wsum[o]) * (x_scale * w_scale[o]) + bias[o]
//                  v = v + residual[n, o, p]        when residual is given
//                  v = max(v, 0)                    when relu (NaN stays NaN, like torch.relu)
//                  v = min(v, clamp_max)            when clamp_max is given (NaN stays NaN)
//                where acc = sum over taps and channels of u * w in int32 (padding taps
//                contribute x_zero_point * w) and wsum[o] = sum of the weight codes of channel o;
//                equivalently sum (u - x_zero_point) * w. ReLU6 is relu with clamp_max 6.
//   residual     float32, exactly the output's shape [N, OC, OH, OW], any strides (contiguous
//                or channels_last read in place, anything else copied first); same device.
//   clamp_max    a finite float32 value, >= 0 when relu; rounded to float32.
//   output       without out_scale: float32 v, [N, OC, OH, OW] in x's memory format
//                (channels_last in, channels_last out).
//                With out_scale: the codes q = clamp(round_half_even(v / out_scale +
//                out_zero_point), out_quant_min, out_quant_max) (quantize_code of
//                common/quant_math.h; NaN gives code 0), bit-identical to quantizing the float
//                output, as uint8 when out_quant_min >= 0 (range inside 0..255) or int8 when
//                out_quant_min < 0 (range inside -128..127), [N, OC, OH, OW] channels_last
//                always (the layout a consumer qconv2d reads fastest), so two integer layers
//                chain through codes without a float tensor.
//   out_scale    float32, one element, > 0 and finite; out_zero_point (required with it) integer
//                dtype, one element, inside the output's code domain (0..255 or -128..127).
//                out_quant_min <= out_quant_max; both ignored without out_scale.
//   limits       every derived size fits in int64, and the reduction length K = ICg * KH * KW
//                is at most qconv_max_reduction(w_bits) (65793 for w_bits 8, 1052688 for 4), so
//                acc cannot overflow int32; larger shapes are refused (ValueError), not wrapped.
//
// Blocked weight layout (independent of the device):
//   int8 codes w[o, c, kh, kw] (o < OC, c < ICg = IC / groups) live in a tensor of shape
//     [G, OCB, KH, KW, ICB, 16, 4],  OCB = ceil(OCg / 16), ICB = ceil(ICg / 4), OCg = OC / G,
//   element [g, ob, kh, kw, cb, j, i] = w[g * OCg + ob * 16 + j, cb * 4 + i, kh, kw], 0 where
//   ob * 16 + j >= OCg or cb * 4 + i >= ICg. One 64-byte row [j, i] is one AVX-512 VNNI operand
//   (16 output channels x 4 input channels) and, per output channel j, one dp4a word.
//   int4 (w_bits 4): the same elements, two per byte along the flattened [16, 4] row (element 2k
//   in the low nibble of byte k, two's complement; docs/DESIGN.md section 3), shape [..., 16, 2] uint8.
//   qlinear's w_packed is [OCB, ICB, 16, 4] / [OCB, ICB, 16, 2] (G = KH = KW = 1 dropped).
#pragma once

#include <cstdint>
#include <optional>

#include <ATen/core/Tensor.h>

namespace oqfl {

constexpr int64_t kQConvOcBlock = 16;  // output channels per weight block
constexpr int64_t kQConvIcBlock = 4;   // input channels per weight block (one 32-bit word)

struct QConvGeometry {
  int64_t batch = 0, in_channels = 0, in_h = 0, in_w = 0;
  int64_t out_channels = 0, out_h = 0, out_w = 0;
  int64_t groups = 1, in_per_group = 0, out_per_group = 0;
  int64_t oc_blocks = 0;  // OCB, per group
  int64_t ic_blocks = 0;  // ICB, per group
  int64_t kernel_h = 1, kernel_w = 1;
  int64_t stride_h = 1, stride_w = 1, pad_h = 0, pad_w = 0, dil_h = 1, dil_w = 1;
  // H + 2 pad_h and W + 2 pad_w: the spatial size of the zero-point-padded code buffer both
  // backends build, N * padded_h * padded_w * G * ICB * 4 bytes (checked to fit in int64).
  int64_t padded_h = 1, padded_w = 1;
  int64_t w_bits = 8;
  int64_t x_quant_min = 0, x_quant_max = 255;
  bool input_is_float = true;   // false: x holds codes (uint8 or int8)
  bool signed_domain = false;   // codes are int8 (-128..127) rather than uint8 (0..255)
  bool channels_last = false;   // x (and the output) in channels_last memory format
  bool relu = false;
  // The epilogue (check_qconv_epilogue).
  bool has_residual = false;
  bool has_clamp = false;
  float clamp_max = 0.f;        // when has_clamp
  bool code_output = false;     // out_scale given: codes instead of float32
  bool out_signed = false;      // code output is int8 (out_quant_min < 0) rather than uint8
  int64_t out_quant_min = 0, out_quant_max = 255;
};

// The epilogue arguments of qconv2d / qlinear (the schema's keyword arguments after
// x_quant_max).
struct QConvEpilogueArgs {
  std::optional<at::Tensor> residual;
  std::optional<double> clamp_max;
  std::optional<at::Tensor> out_scale;
  std::optional<at::Tensor> out_zero_point;
  int64_t out_quant_min = 0, out_quant_max = 255;
};

// Worst case of the int32 accumulation: a reduction of K = ICg * KH * KW products, each at most
// 255 (the span of either code domain: |u - x_zero_point| <= 255, and the CPU kernels add the
// codes shifted into 0..255) times the largest weight code magnitude (128 for w_bits 8, 8 for
// w_bits 4). The checks refuse K above this, so the int32 sums of every backend are exact.
constexpr int64_t kQConvMaxCodeSpan = 255;
int64_t qconv_max_reduction(int64_t w_bits);

// Checks every argument of qconv2d (dtypes, shapes, devices, the layout sizes against x and
// groups, stride/padding/dilation >= 1/0/1, a non-empty output, every derived size - dilated
// kernel, padded input, padded buffer and output bytes - in int64 without overflow, the
// reduction length against qconv_max_reduction, the epilogue arguments) and returns the
// geometry. Reads metadata only, never values (the value checks of the scales are separate
// below).
QConvGeometry check_qconv2d_args(const char* op, const at::Tensor& x, const at::Tensor& x_scale,
                                 const at::Tensor& x_zero_point, const at::Tensor& w_packed,
                                 const at::Tensor& w_scale, const std::optional<at::Tensor>& bias,
                                 int64_t w_bits, at::IntArrayRef stride, at::IntArrayRef padding,
                                 at::IntArrayRef dilation, int64_t groups, bool relu,
                                 int64_t x_quant_min, int64_t x_quant_max,
                                 const QConvEpilogueArgs& epilogue);

// qlinear: x [..., IC] and w_packed [OCB, ICB, 16, 4|2] (with the size and reduction limits of
// qconv2d). Returns the geometry of the equivalent 1x1 convolution on [prod(...), IC, 1, 1]
// channels_last.
QConvGeometry check_qlinear_args(const char* op, const at::Tensor& x, const at::Tensor& x_scale,
                                 const at::Tensor& x_zero_point, const at::Tensor& w_packed,
                                 const at::Tensor& w_scale, const std::optional<at::Tensor>& bias,
                                 int64_t w_bits, bool relu, int64_t x_quant_min,
                                 int64_t x_quant_max, const QConvEpilogueArgs& epilogue);

// CPU only (reads values): x_scale, every w_scale and out_scale positive and finite,
// x_zero_point and out_zero_point inside their code domains. Returns the scalars.
struct QConvScalars {
  float x_scale;
  int32_t x_zero_point;
  float out_scale = 1.f;       // code output only
  int32_t out_zero_point = 0;  // code output only
};
QConvScalars check_qconv_scalars_cpu(const char* op, const QConvGeometry& g,
                                     const at::Tensor& x_scale, const at::Tensor& x_zero_point,
                                     const at::Tensor& w_scale, const QConvEpilogueArgs& epilogue);

// The output tensor of qconv2d's geometry: float32 [N, OC, OH, OW] in x's memory format, or the
// codes (uint8 / int8) [N, OC, OH, OW] channels_last.
at::Tensor qconv_empty_output(const QConvGeometry& g, const at::Tensor& x);

// The dtype of the output: float32, or uint8 / int8 codes.
at::ScalarType qconv_output_dtype(const QConvGeometry& g);

}  // namespace oqfl
