// CUDA kernels of the integer inference ops oqfl::qconv2d and oqfl::qlinear. The contract (what
// is computed, the checks) and the blocked weight layout are in qconv_args.h; the quantization
// of a float input is quantize_code of common/quant_math.h, shared with the CPU kernel.
//
// Three launches on the current stream; nothing is read on the host (no sync):
//
//  1. quantize_input_kernel: x (float32 quantized here, or uint8 / int8 codes; any strides) ->
//     a zero-point-padded NHWC buffer of int8 codes, logically
//       xq[N, H + 2 pad_h, W + 2 pad_w, G, ICB * 4]     (ICB = ceil(ICg / 4) per group),
//     stored as 32-bit words [N, Hp, Wp, G, ICB]: byte i of word cb is channel cb * 4 + i of the
//     group (little-endian, the byte order __dp4a pairs with the weight word). Spatial padding
//     holds the (shifted) zero point, a real 0; channels c >= ICg of the last word hold 0.
//     One thread writes one word; the thread order follows x's layout (channel-fastest for
//     channels_last x, width-fastest for NCHW x) so that the reads of x are coalesced.
//  2. channel_params_kernel: one thread per output channel o computes
//       corr[o]  = zp' * wsum[o]  (int64; wsum = sum of the weight codes of channel o over
//                                  taps and the ICg real input channels)
//       scale[o] = x_scale * w_scale[o]   (float32, rounded once, as in the contract)
//     NaN instead of the scale when x_scale or w_scale[o] is not positive and finite or the
//     zero point lies outside the code domain (the CUDA ops cannot raise without a host sync).
//  3. conv_kernel: a block of 16 x 16 threads covers 16 output channels (one weight block ob
//     of one group, threadIdx.x = j) times 64 output pixels (threadIdx.y = r; thread (j, r)
//     owns pixels tile * 64 + r + 16 k, k = 0..3). For every tap (kh, kw) and channel word cb
//     a thread loads the weight word of (o, cb) once - the 16 threads over j read 16
//     neighbouring words, 64 bytes - and feeds it to four __dp4a with the activation words of
//     its four pixels (one word per pixel, shared by the 16 threads over j: a broadcast).
//     Accumulation in int32 (dp4a); then the epilogue of qconv_args.h,
//       v = (float)((int64)acc - corr[o]) * scale[o] (+ bias[o]) (+ residual) (relu: negative
//           -> 0) (clamp_max: min)
//     with __fmul_rn / __fadd_rn, so nvcc cannot contract the multiply and add into an FMA
//     (the reference rounds after each), then v, or its code quantize_code(v, out_scale,
//     out_zero_point, out_quant_min, out_quant_max), written through the output's strides
//     (NCHW or channels_last, whichever qconv_empty_output chose). The residual is read
//     through its own strides. Grid: x over pixel tiles, y over G * OCB weight blocks, both
//     grid-stride loops (no grid limit is ever exceeded).
//
// Signedness. CUDA's __dp4a has no unsigned-by-signed overload, so both operands are signed:
// an unsigned-domain code u (0..255) is stored as the int8 u - 128 (the byte u ^ 0x80) and the
// zero point is shifted by the same 128, zp' = zp - 128 (signed-domain codes and zero points
// are stored as they are, shift 0). Then, exactly in integers,
//   sum (u - 128) w - (zp - 128) wsum  =  sum u w - zp wsum  =  sum (u - zp) w,
// and the shifted int32 accumulator has a smaller range than the unshifted one would
// (|u - 128| <= 128 < 255), so it overflows no earlier than the contract's int32 acc.
// The correction zp' * wsum and the difference are taken in int64, so the result equals the
// int64 reference whenever the dot product itself fits in int32.
//
// int4 weights (w_bits 4, uint8 [..., 16, 2]): the four codes of output channel j and input
// channels cb * 4 + 0..3 are flat elements 4 j + 0..3 of the 64-element row, i.e. bytes 2 j
// and 2 j + 1 (element 2k in the low nibble of byte k), i.e. the little-endian uint16 number j
// of the row, nibble i = input channel i. unpack_int4_word sign-extends each nibble with
// (v ^ 8) - 8 and puts it in byte i of an int8 word, so both widths feed the same dp4a.
//
// Robustness: the weight layout's padding slots are meant to be 0, but they are never relied
// on: padded input channels are 0 in xq (so any weight there adds 0 to acc) and wsum counts
// the ICg real channels only; threads of padded output channels (ob * 16 + j >= OCg) compute
// but do not write.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <vector>

#include "common/quant_math.h"
#include "ops.h"
#include "qconv_args.h"

namespace oqfl {
namespace {

// ---------------------------------------------------------------------------------------------
// Launch shapes.

constexpr int kThreads = 256;         // 1-d kernels (quantize, channel parameters)
constexpr int64_t kMaxBlocks = 4096;  // 1-d grid cap; the loops stride past the rest
constexpr int kLanes = 16;            // conv block x: output channels j of one weight block
constexpr int kRows = 16;             // conv block y
constexpr int kPix = 4;               // output pixels per conv thread
constexpr int64_t kTilePixels = int64_t(kRows) * kPix;  // output pixels per conv block
constexpr int64_t kMaxGridX = INT_MAX;
constexpr int64_t kMaxGridY = 65535;
static_assert(kLanes == kQConvOcBlock, "one conv block row is one weight block of 16 channels");
static_assert(kQConvIcBlock == 4, "one dp4a word holds 4 input channels");

unsigned blocks_for(int64_t n) {
  return static_cast<unsigned>(
      std::min<int64_t>(std::max<int64_t>((n + kThreads - 1) / kThreads, 1), kMaxBlocks));
}

#define OQFL_GRID_STRIDE(i, n)                                              \
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < (n); \
       i += int64_t(gridDim.x) * blockDim.x)

// ---------------------------------------------------------------------------------------------
// Scalars read on the device.

// x_zero_point is int32 or int64 (exactly one of the pointers is set).
struct ZeroPointPtr {
  const int32_t* p32;
  const int64_t* p64;
};

__device__ __forceinline__ int64_t read_zero_point(ZeroPointPtr z) {
  return z.p64 != nullptr ? *z.p64 : static_cast<int64_t>(*z.p32);
}

__device__ __forceinline__ bool zero_point_valid(int64_t zp, bool signed_domain) {
  return signed_domain ? (zp >= -128 && zp <= 127) : (zp >= 0 && zp <= 255);
}

// What is subtracted from a code of the domain to make it an int8 (see the file comment).
__device__ __forceinline__ int32_t domain_shift(bool signed_domain) {
  return signed_domain ? 0 : 128;
}

// ---------------------------------------------------------------------------------------------
// 1. Input quantization into the zero-point-padded NHWC word buffer.

// x seen as [N, C, H, W] through its strides (in elements).
struct InputView {
  int64_t c, h, w;
  int64_t sn, sc, sh, sw;
};

// The word buffer [N, Hp, Wp, G, ICB].
struct PaddedInput {
  int64_t n, hp, wp, groups, icb;
  int64_t icg;  // real channels per group (<= 4 * icb)
  int64_t pad_h, pad_w;
};

// The code of one input element, in its domain (0..255 or -128..127).
__device__ __forceinline__ int32_t input_code(float v, float s, float z, float qmin, float qmax) {
  return quantize_code(v, s, z, qmin, qmax, /*stochastic=*/false, 0, 0);
}
__device__ __forceinline__ int32_t input_code(uint8_t v, float, float, float, float) {
  return static_cast<int32_t>(v);
}
__device__ __forceinline__ int32_t input_code(int8_t v, float, float, float, float) {
  return static_cast<int32_t>(v);
}

template <typename T>
__global__ void quantize_input_kernel(const T* __restrict__ x, InputView in, PaddedInput b,
                                      const float* __restrict__ x_scale, ZeroPointPtr zp_ptr,
                                      float qmin, float qmax, bool signed_domain,
                                      bool width_fastest, int64_t words,
                                      uint32_t* __restrict__ xq) {
  // An invalid step size gives NaN and so code 0 (code_to_int); the outputs are NaN anyway
  // (channel_params_kernel), the codes only have to be in range.
  const float s = step_or_nan(*x_scale);
  const int64_t zp = read_zero_point(zp_ptr);
  const bool zp_ok = zero_point_valid(zp, signed_domain);
  const float zf = zp_ok ? static_cast<float>(zp) : 0.f;
  const int32_t shift = domain_shift(signed_domain);
  const uint32_t pad_byte = zp_ok ? static_cast<uint32_t>(zp - shift) & 0xFFu : 0u;

  OQFL_GRID_STRIDE(t, words) {
    int64_t n, hp, wp, g, cb, rest;
    if (width_fastest) {  // thread order [N, G, ICB, Hp, Wp]: coalesced reads of NCHW x
      wp = t % b.wp;
      rest = t / b.wp;
      hp = rest % b.hp;
      rest /= b.hp;
      cb = rest % b.icb;
      rest /= b.icb;
      g = rest % b.groups;
      n = rest / b.groups;
    } else {  // thread order = buffer order [N, Hp, Wp, G, ICB]
      cb = t % b.icb;
      rest = t / b.icb;
      g = rest % b.groups;
      rest /= b.groups;
      wp = rest % b.wp;
      rest /= b.wp;
      hp = rest % b.hp;
      n = rest / b.hp;
    }
    const int64_t h = hp - b.pad_h, w = wp - b.pad_w;
    const bool inside = h >= 0 && h < in.h && w >= 0 && w < in.w;
    uint32_t word = 0;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t c = cb * 4 + i;  // channel inside the group
      if (c >= b.icg) break;         // padded channel: byte 0
      uint32_t byte = pad_byte;
      if (inside) {
        const T v = x[n * in.sn + (g * b.icg + c) * in.sc + h * in.sh + w * in.sw];
        byte = static_cast<uint32_t>(input_code(v, s, zf, qmin, qmax) - shift) & 0xFFu;
      }
      word |= byte << (8 * i);
    }
    xq[(((n * b.hp + hp) * b.wp + wp) * b.groups + g) * b.icb + cb] = word;
  }
}

// ---------------------------------------------------------------------------------------------
// Weights.

// Four signed 4-bit codes (nibble i = input channel i) -> an int8 word (byte i).
__device__ __forceinline__ int32_t unpack_int4_word(uint32_t nibbles) {
  uint32_t word = 0;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int32_t v = static_cast<int32_t>((nibbles >> (4 * i)) & 0xFu);
    const int32_t code = (v ^ 8) - 8;  // sign extension from bit 3
    word |= (static_cast<uint32_t>(code) & 0xFFu) << (8 * i);
  }
  return static_cast<int32_t>(word);
}

// The int8 word of flat index `idx` = ((((g * OCB + ob) * KH + kh) * KW + kw) * ICB + cb) * 16
// + j of the blocked layout: the 4 codes w[o, cb * 4 + 0..3, kh, kw], byte i = channel i.
template <int W_BITS>
__device__ __forceinline__ int32_t load_weight_word(const void* __restrict__ w, int64_t idx) {
  if constexpr (W_BITS == 8) {
    return __ldg(static_cast<const int32_t*>(w) + idx);
  } else {
    static_assert(W_BITS == 4, "w_bits is 4 or 8");
    // Row [16, 2] bytes = 16 little-endian uint16, one per output channel j.
    return unpack_int4_word(__ldg(static_cast<const unsigned short*>(w) + idx));
  }
}

// Byte i of a word as a signed code.
__device__ __forceinline__ int32_t word_byte(int32_t word, int i) {
  return static_cast<int32_t>(static_cast<int8_t>((static_cast<uint32_t>(word) >> (8 * i)) & 0xFFu));
}

// Blocked weight geometry (per group: OCB blocks of 16 output channels, ICB words).
struct WeightGeom {
  int64_t ocg, ocb, kh, kw, icb, icg;
};

// ---------------------------------------------------------------------------------------------
// 2. Per output channel: zero-point correction and combined scale.

template <int W_BITS>
__global__ void channel_params_kernel(const void* __restrict__ w, WeightGeom wg, int64_t oc,
                                      const float* __restrict__ x_scale,
                                      const float* __restrict__ w_scale, ZeroPointPtr zp_ptr,
                                      bool signed_domain, int64_t* __restrict__ corr,
                                      float* __restrict__ scale) {
  const int64_t zp = read_zero_point(zp_ptr);
  const bool zp_ok = zero_point_valid(zp, signed_domain);
  const int64_t zp_shifted = zp_ok ? zp - domain_shift(signed_domain) : 0;
  const float xs = step_or_nan(*x_scale);
  OQFL_GRID_STRIDE(o, oc) {
    const int64_t g = o / wg.ocg, oo = o % wg.ocg;
    const int64_t ob = oo / kQConvOcBlock, j = oo % kQConvOcBlock;
    const int64_t taps = wg.kh * wg.kw;
    int64_t wsum = 0;
    for (int64_t tap = 0; tap < taps; ++tap) {
      // Word index of (g, ob, tap, cb = 0, j); consecutive cb are 16 words apart.
      const int64_t base = ((g * wg.ocb + ob) * taps + tap) * wg.icb * kQConvOcBlock + j;
      for (int64_t cb = 0; cb < wg.icb; ++cb) {
        const int32_t word = load_weight_word<W_BITS>(w, base + cb * kQConvOcBlock);
#pragma unroll
        for (int i = 0; i < 4; ++i)
          if (cb * 4 + i < wg.icg) wsum += word_byte(word, i);
      }
    }
    corr[o] = zp_shifted * wsum;
    const float s = __fmul_rn(xs, step_or_nan(w_scale[o]));
    scale[o] = zp_ok ? s : __int_as_float(0x7fc00000);
  }
}

// ---------------------------------------------------------------------------------------------
// 3. The convolution.

// The epilogue after the bias (qconv_args.h). out_scale / out_zero_point are read on the
// device: an invalid one makes every value NaN, so every code 0 (code_to_int).
struct Epilogue {
  const float* residual;           // or null
  int64_t rs_n, rs_c, rs_h, rs_w;  // residual strides in elements
  bool relu;
  bool has_clamp;
  float clamp_max;
  uint8_t* codes;                  // code output (uint8 / int8 bytes), or null: float output
  const float* out_scale;          // code output: device scalar
  ZeroPointPtr out_zp;             // code output: device scalar
  float out_qmin, out_qmax;
  bool out_signed;
};

struct ConvGeom {
  int64_t pixels;            // N * OH * OW
  int64_t out_h, out_w;
  int64_t hp, wp;            // padded input size (the word buffer's spatial dims)
  int64_t groups, icb;       // row of the word buffer = groups * icb words per pixel
  int64_t ocg, ocb;
  int64_t kh, kw;
  int64_t stride_h, stride_w, dil_h, dil_w;
  int64_t os_n, os_c, os_h, os_w;  // output strides in elements
};

template <int W_BITS>
__global__ void __launch_bounds__(kLanes* kRows)
    conv_kernel(const int32_t* __restrict__ xq, const void* __restrict__ w,
                const int64_t* __restrict__ corr, const float* __restrict__ scale,
                const float* __restrict__ bias, ConvGeom q, Epilogue e,
                float* __restrict__ out) {
  const int j = threadIdx.x;    // output channel inside the weight block
  const int row = threadIdx.y;  // pixel row of the tile
  const int64_t row_words = q.groups * q.icb;
  const int64_t taps = q.kh * q.kw;
  const int64_t tiles = (q.pixels + kTilePixels - 1) / kTilePixels;
  float out_s = 1.f, out_z = 0.f;
  if (e.codes != nullptr) {
    const int64_t zp = read_zero_point(e.out_zp);
    out_s = zero_point_valid(zp, e.out_signed) ? step_or_nan(*e.out_scale)
                                               : __int_as_float(0x7fc00000);
    out_z = static_cast<float>(zp);
  }

  for (int64_t gob = blockIdx.y; gob < q.groups * q.ocb; gob += gridDim.y) {
    const int64_t g = gob / q.ocb, ob = gob % q.ocb;
    const int64_t oo = ob * kQConvOcBlock + j;  // output channel inside the group
    const bool channel_real = oo < q.ocg;
    const int64_t o = g * q.ocg + oo;
    // Word index of (g, ob, kh = 0, kw = 0, cb = 0, j).
    const int64_t w_base = gob * taps * q.icb * kQConvOcBlock + j;

    for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
      int64_t x_base[kPix];    // word of (n, oh * sh, ow * sw, g, cb = 0): tap (0, 0)
      int64_t out_base[kPix];  // output element of (n, 0, oh, ow); -1: pixel past the end
      int64_t res_base[kPix];  // residual element of (n, 0, oh, ow)
#pragma unroll
      for (int k = 0; k < kPix; ++k) {
        const int64_t p = tile * kTilePixels + int64_t(k) * kRows + row;
        // Pixels past the end read the last pixel's words (valid memory) and write nothing.
        const int64_t pc = p < q.pixels ? p : q.pixels - 1;
        const int64_t ow = pc % q.out_w, t = pc / q.out_w;
        const int64_t oh = t % q.out_h, n = t / q.out_h;
        x_base[k] = ((n * q.hp + oh * q.stride_h) * q.wp + ow * q.stride_w) * row_words +
                    g * q.icb;
        out_base[k] = p < q.pixels ? n * q.os_n + oh * q.os_h + ow * q.os_w : -1;
        res_base[k] = n * e.rs_n + oh * e.rs_h + ow * e.rs_w;
      }

      int32_t acc[kPix];
#pragma unroll
      for (int k = 0; k < kPix; ++k) acc[k] = 0;

      for (int64_t kh = 0; kh < q.kh; ++kh) {
        for (int64_t kw = 0; kw < q.kw; ++kw) {
          const int64_t x_tap = (kh * q.dil_h * q.wp + kw * q.dil_w) * row_words;
          const int64_t w_tap = w_base + (kh * q.kw + kw) * q.icb * kQConvOcBlock;
          for (int64_t cb = 0; cb < q.icb; ++cb) {
            const int32_t wv = load_weight_word<W_BITS>(w, w_tap + cb * kQConvOcBlock);
#pragma unroll
            for (int k = 0; k < kPix; ++k)
              acc[k] = __dp4a(__ldg(xq + x_base[k] + x_tap + cb), wv, acc[k]);
          }
        }
      }

      if (!channel_real) continue;
      const int64_t c = corr[o];
      const float s = scale[o];
      const float b = bias != nullptr ? bias[o] : 0.f;
#pragma unroll
      for (int k = 0; k < kPix; ++k) {
        if (out_base[k] < 0) continue;
        float v = __fmul_rn(static_cast<float>(static_cast<int64_t>(acc[k]) - c), s);
        if (bias != nullptr) v = __fadd_rn(v, b);
        if (e.residual != nullptr) v = __fadd_rn(v, e.residual[res_base[k] + o * e.rs_c]);
        if (e.relu && v < 0.f) v = 0.f;  // NaN compares false and stays NaN
        if (e.has_clamp && v > e.clamp_max) v = e.clamp_max;
        if (e.codes != nullptr) {
          const int32_t code =
              quantize_code(v, out_s, out_z, e.out_qmin, e.out_qmax, /*stochastic=*/false, 0, 0);
          e.codes[out_base[k] + o * q.os_c] = static_cast<uint8_t>(code);  // int8: two's compl.
        } else {
          out[out_base[k] + o * q.os_c] = v;
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side.

ZeroPointPtr zero_point_ptr(const at::Tensor& z) {
  ZeroPointPtr p{nullptr, nullptr};
  if (z.scalar_type() == at::kLong)
    p.p64 = z.const_data_ptr<int64_t>();
  else
    p.p32 = z.const_data_ptr<int32_t>();
  return p;
}

// The blocked weights, contiguous and 4-byte aligned (the kernels load 32-/16-bit words).
at::Tensor aligned_weights(const at::Tensor& w_packed) {
  at::Tensor w = w_packed.contiguous();
  if (reinterpret_cast<uintptr_t>(w.const_data_ptr()) % 4 != 0)
    w = w.clone(at::MemoryFormat::Contiguous);  // a fresh allocation is aligned
  return w;
}

template <typename T>
void launch_quantize(const at::Tensor& x, const InputView& in, const PaddedInput& b,
                     const at::Tensor& x_scale, ZeroPointPtr zp, const QConvGeometry& g,
                     int64_t words, uint32_t* xq, cudaStream_t stream) {
  const bool width_fastest = in.sc != 1;  // NCHW-like x: walk the buffer width-fastest
  quantize_input_kernel<T><<<blocks_for(words), kThreads, 0, stream>>>(
      x.const_data_ptr<T>(), in, b, x_scale.const_data_ptr<float>(), zp,
      static_cast<float>(g.x_quant_min), static_cast<float>(g.x_quant_max), g.signed_domain,
      width_fastest, words, xq);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <int W_BITS>
void launch_weights_and_conv(const at::Tensor& w, const WeightGeom& wg, const ConvGeom& q,
                             int64_t oc, const at::Tensor& x_scale, const at::Tensor& w_scale,
                             ZeroPointPtr zp, bool signed_domain, const at::Tensor& xq,
                             const float* bias, const Epilogue& e, float* out,
                             cudaStream_t stream) {
  const at::TensorOptions dev = w_scale.options();
  at::Tensor corr = at::empty({oc}, dev.dtype(at::kLong));
  at::Tensor scale = at::empty({oc}, dev.dtype(at::kFloat));
  channel_params_kernel<W_BITS><<<blocks_for(oc), kThreads, 0, stream>>>(
      w.const_data_ptr(), wg, oc, x_scale.const_data_ptr<float>(),
      w_scale.const_data_ptr<float>(), zp, signed_domain, corr.mutable_data_ptr<int64_t>(),
      scale.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const int64_t tiles = (q.pixels + kTilePixels - 1) / kTilePixels;
  const dim3 grid(static_cast<unsigned>(std::min(tiles, kMaxGridX)),
                  static_cast<unsigned>(std::min(q.groups * q.ocb, kMaxGridY)));
  const dim3 block(kLanes, kRows);
  conv_kernel<W_BITS><<<grid, block, 0, stream>>>(
      xq.const_data_ptr<int32_t>(), w.const_data_ptr(), corr.const_data_ptr<int64_t>(),
      scale.const_data_ptr<float>(), bias, q, e, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The convolution of x4 (a [N, C, H, W] view, any strides) into out4 (a [N, OC, OH, OW] view,
// any strides, float32 or codes as g says, allocated by the caller) with the checked geometry
// g; res4 is the residual as a [N, OC, OH, OW] view (any strides) when g.has_residual.
void qconv_launch(const QConvGeometry& g, const at::Tensor& x4, const at::Tensor& x_scale,
                  const at::Tensor& x_zero_point, const at::Tensor& w_packed,
                  const at::Tensor& w_scale, const std::optional<at::Tensor>& bias,
                  const at::Tensor& res4, const QConvEpilogueArgs& ea, at::Tensor& out4) {
  TORCH_INTERNAL_ASSERT(x4.dim() == 4 && out4.dim() == 4);
  if (out4.numel() == 0) return;
  TORCH_INTERNAL_ASSERT(g.out_h >= 1 && g.out_w >= 1 && g.batch >= 1);
  const int64_t hp = g.padded_h, wp = g.padded_w;
  // Every tap of every output pixel lies inside the padded buffer.
  TORCH_INTERNAL_ASSERT((g.out_h - 1) * g.stride_h + (g.kernel_h - 1) * g.dil_h < hp &&
                        (g.out_w - 1) * g.stride_w + (g.kernel_w - 1) * g.dil_w < wp);

  const at::Tensor w = aligned_weights(w_packed);
  const int64_t w_bytes = g.groups * g.oc_blocks * g.kernel_h * g.kernel_w * g.ic_blocks *
                          kQConvOcBlock * (g.w_bits == 8 ? 4 : 2);
  TORCH_INTERNAL_ASSERT(w.numel() == w_bytes, "qconv: blocked weight size ", w.numel(),
                        " does not match the geometry (", w_bytes, ")");
  const at::Tensor ws = w_scale.contiguous();
  const at::Tensor bs = bias.has_value() ? bias->contiguous() : at::Tensor();
  const ZeroPointPtr zp = zero_point_ptr(x_zero_point);
  const auto stream = c10::cuda::getCurrentCUDAStream();

  // 1. Quantized, zero-point-padded NHWC input.
  const InputView in{g.in_channels, g.in_h, g.in_w,
                     x4.stride(0), x4.stride(1), x4.stride(2), x4.stride(3)};
  const PaddedInput pb{g.batch, hp, wp, g.groups, g.ic_blocks, g.in_per_group,
                       g.pad_h, g.pad_w};
  const int64_t words = g.batch * hp * wp * g.groups * g.ic_blocks;
  at::Tensor xq = at::empty({words}, x4.options().dtype(at::kInt));
  if (words > 0) {
    auto* xq_ptr = reinterpret_cast<uint32_t*>(xq.mutable_data_ptr<int32_t>());
    switch (x4.scalar_type()) {
      case at::kFloat:
        launch_quantize<float>(x4, in, pb, x_scale, zp, g, words, xq_ptr, stream);
        break;
      case at::kByte:
        TORCH_INTERNAL_ASSERT(!g.signed_domain);
        launch_quantize<uint8_t>(x4, in, pb, x_scale, zp, g, words, xq_ptr, stream);
        break;
      case at::kChar:
        TORCH_INTERNAL_ASSERT(g.signed_domain);
        launch_quantize<int8_t>(x4, in, pb, x_scale, zp, g, words, xq_ptr, stream);
        break;
      default:
        TORCH_INTERNAL_ASSERT(false, "qconv: unexpected x dtype ", x4.scalar_type());
    }
  }

  // 2. + 3. Channel parameters and the convolution.
  const WeightGeom wg{g.out_per_group, g.oc_blocks, g.kernel_h, g.kernel_w, g.ic_blocks,
                      g.in_per_group};
  ConvGeom q;
  q.pixels = g.batch * g.out_h * g.out_w;
  q.out_h = g.out_h;
  q.out_w = g.out_w;
  q.hp = hp;
  q.wp = wp;
  q.groups = g.groups;
  q.icb = g.ic_blocks;
  q.ocg = g.out_per_group;
  q.ocb = g.oc_blocks;
  q.kh = g.kernel_h;
  q.kw = g.kernel_w;
  q.stride_h = g.stride_h;
  q.stride_w = g.stride_w;
  q.dil_h = g.dil_h;
  q.dil_w = g.dil_w;
  q.os_n = out4.stride(0);
  q.os_c = out4.stride(1);
  q.os_h = out4.stride(2);
  q.os_w = out4.stride(3);
  const float* bias_ptr = bs.defined() ? bs.const_data_ptr<float>() : nullptr;
  Epilogue e{};
  if (g.has_residual) {
    TORCH_INTERNAL_ASSERT(res4.dim() == 4);
    e.residual = res4.const_data_ptr<float>();
    e.rs_n = res4.stride(0);
    e.rs_c = res4.stride(1);
    e.rs_h = res4.stride(2);
    e.rs_w = res4.stride(3);
  }
  e.relu = g.relu;
  e.has_clamp = g.has_clamp;
  e.clamp_max = g.clamp_max;
  float* out_ptr = nullptr;
  if (g.code_output) {
    e.codes = static_cast<uint8_t*>(out4.mutable_data_ptr());
    e.out_scale = ea.out_scale->const_data_ptr<float>();
    e.out_zp = zero_point_ptr(*ea.out_zero_point);
    e.out_qmin = static_cast<float>(g.out_quant_min);
    e.out_qmax = static_cast<float>(g.out_quant_max);
    e.out_signed = g.out_signed;
  } else {
    out_ptr = out4.mutable_data_ptr<float>();
  }
  if (g.w_bits == 8) {
    launch_weights_and_conv<8>(w, wg, q, g.out_channels, x_scale, ws, zp, g.signed_domain, xq,
                               bias_ptr, e, out_ptr, stream);
  } else {
    TORCH_INTERNAL_ASSERT(g.w_bits == 4);
    launch_weights_and_conv<4>(w, wg, q, g.out_channels, x_scale, ws, zp, g.signed_domain, xq,
                               bias_ptr, e, out_ptr, stream);
  }
}

}  // namespace

at::Tensor qconv2d_cuda(const at::Tensor& x, const at::Tensor& x_scale,
                        const at::Tensor& x_zero_point, const at::Tensor& w_packed,
                        const at::Tensor& w_scale, const std::optional<at::Tensor>& bias,
                        int64_t w_bits, at::IntArrayRef stride, at::IntArrayRef padding,
                        at::IntArrayRef dilation, int64_t groups, bool relu, int64_t x_quant_min,
                        int64_t x_quant_max, const std::optional<at::Tensor>& residual,
                        std::optional<double> clamp_max,
                        const std::optional<at::Tensor>& out_scale,
                        const std::optional<at::Tensor>& out_zero_point, int64_t out_quant_min,
                        int64_t out_quant_max) {
  const QConvEpilogueArgs e{residual, clamp_max, out_scale, out_zero_point, out_quant_min,
                            out_quant_max};
  const QConvGeometry g =
      check_qconv2d_args("qconv2d", x, x_scale, x_zero_point, w_packed, w_scale, bias, w_bits,
                         stride, padding, dilation, groups, relu, x_quant_min, x_quant_max, e);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = qconv_empty_output(g, x);
  const at::Tensor res4 = g.has_residual ? *residual : at::Tensor();
  qconv_launch(g, x, x_scale, x_zero_point, w_packed, w_scale, bias, res4, e, out);
  return out;
}

// A 1x1 convolution of x viewed as [M, IC, 1, 1] (M = prod of the leading dims) with the
// weights viewed as [1, OCB, 1, 1, ICB, 16, 4|2] (the same bytes); output [..., OC].
at::Tensor qlinear_cuda(const at::Tensor& x, const at::Tensor& x_scale,
                        const at::Tensor& x_zero_point, const at::Tensor& w_packed,
                        const at::Tensor& w_scale, const std::optional<at::Tensor>& bias,
                        int64_t w_bits, bool relu, int64_t x_quant_min, int64_t x_quant_max,
                        const std::optional<at::Tensor>& residual,
                        std::optional<double> clamp_max,
                        const std::optional<at::Tensor>& out_scale,
                        const std::optional<at::Tensor>& out_zero_point, int64_t out_quant_min,
                        int64_t out_quant_max) {
  const QConvEpilogueArgs e{residual, clamp_max, out_scale, out_zero_point, out_quant_min,
                            out_quant_max};
  const QConvGeometry g = check_qlinear_args("qlinear", x, x_scale, x_zero_point, w_packed,
                                             w_scale, bias, w_bits, relu, x_quant_min,
                                             x_quant_max, e);
  const c10::cuda::CUDAGuard guard(x.device());
  std::vector<int64_t> out_sizes(x.sizes().begin(), x.sizes().end() - 1);
  out_sizes.push_back(g.out_channels);
  at::Tensor out = at::empty(out_sizes, x.options().dtype(qconv_output_dtype(g)));
  if (out.numel() == 0) return out;
  // [M, IC] (a view when x's leading dims allow it, else a copy), then [M, IC, 1, 1]; the
  // residual likewise as [M, OC, 1, 1].
  const at::Tensor x4 = x.reshape({g.batch, g.in_channels}).unsqueeze(-1).unsqueeze(-1);
  at::Tensor out4 = out.view({g.batch, g.out_channels, 1, 1});
  const at::Tensor res4 =
      g.has_residual
          ? residual->reshape({g.batch, g.out_channels}).unsqueeze(-1).unsqueeze(-1)
          : at::Tensor();
  qconv_launch(g, x4, x_scale, x_zero_point, w_packed, w_scale, bias, res4, e, out4);
  return out;
}

TORCH_LIBRARY_IMPL(oqfl, CUDA, m) {
  m.impl("qconv2d", &qconv2d_cuda);
  m.impl("qlinear", &qlinear_cuda);
}

}  // namespace oqfl
