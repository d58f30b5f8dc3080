// AVX-512 VNNI instance of the qconv2d kernels; compiled for x86-64 only, used only when the
// CPU reports AVX-512 F/BW/VL/DQ and VNNI and the capability is "avx512" (cpu_capability.cpp).
//
// Microkernel: a register tile of kTile = 14 consecutive output pixels of one output row x 32
// output channels (two slabs of 16), 28 zmm accumulators. Per k-step (4 input channels of one
// tap) it loads the two 64-byte weight rows [16 oc x 4 ic] and, for each pixel, broadcasts the
// pixel's 4 input bytes (vpbroadcastd) into vpdpbusd (u8 activations x s8 weights -> int32).
// 14 divides the ResNet widths 56, 28 and 14; other widths end with a shorter tile.
// Epilogue fused in registers: acc - zp * wsum, cvt to float, multiply by the float scale
// product and add the bias (and the residual) with the explicit-rounding intrinsics
// _mm512_mul_round_ps / _mm512_add_round_ps (builtins that the compiler never contracts into an
// FMA, unlike _mm512_mul_ps / _mm512_add_ps, which GCC implements as plain vector arithmetic),
// then relu and the clamp, then a float32 store or the output codes (quantize16, as for the
// input). Plain float output without residual or clamp keeps its store modes (streaming, full
// rows); the other modes store each 16-channel block with masked stores (finish16).
#if defined(__x86_64__) || defined(_M_X64)

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "isa/qconv2d_table.h"

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,amx-tile,amx-int8"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,amx-tile,amx-int8")
#endif

namespace oqfl {
namespace cpu {
namespace avx512_vnni {
namespace {

constexpr int kTile = 14;
constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

typedef int32_t __attribute__((may_alias, aligned(1))) unaligned_i32;

inline int32_t load_u32(const uint8_t* p) { return *reinterpret_cast<const unaligned_i32*>(p); }

// quantize_code of 16 floats (a NaN gives code 0), plus the offset, narrowed to bytes.
inline __m128i quantize16(__m512 x, __m512 s, __m512 z, __m512 lo, __m512 hi, __m512i off) {
  const __m512 v = _mm512_add_ps(_mm512_div_ps(x, s), z);
  // Clamping before rounding is the same as after (integer bounds, monotone rounding).
  // max/min return their second operand when one is NaN, so a NaN stays NaN here ...
  const __m512 c = _mm512_min_ps(hi, _mm512_max_ps(lo, v));
  // ... and converts to 0x80000000, whose low byte after adding the offset (0 or 128) is the
  // byte of code 0, as quantize_code gives for NaN. Otherwise: rint (half to even).
  const __m512i q = _mm512_add_epi32(_mm512_cvt_roundps_epi32(c, kRound), off);
  return _mm512_cvtepi32_epi8(q);  // truncating narrow: codes are 0..255
}

void quantize(const float* x, uint8_t* out, int64_t n, float s, float z, float qmin, float qmax,
              int32_t offset) {
  const __m512 vs = _mm512_set1_ps(s), vz = _mm512_set1_ps(z);
  const __m512 lo = _mm512_set1_ps(qmin), hi = _mm512_set1_ps(qmax);
  const __m512i off = _mm512_set1_epi32(offset);
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    const __m128i a = quantize16(_mm512_loadu_ps(x + i), vs, vz, lo, hi, off);
    const __m128i b = quantize16(_mm512_loadu_ps(x + i + 16), vs, vz, lo, hi, off);
    const __m128i c = quantize16(_mm512_loadu_ps(x + i + 32), vs, vz, lo, hi, off);
    const __m128i d = quantize16(_mm512_loadu_ps(x + i + 48), vs, vz, lo, hi, off);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), a);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i + 16), b);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i + 32), c);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i + 48), d);
  }
  for (; i < n; i += 16) {
    const int64_t left = n - i;
    const __mmask16 m = left >= 16 ? static_cast<__mmask16>(0xFFFF)
                                   : static_cast<__mmask16>((1u << left) - 1);
    const __m128i q = quantize16(_mm512_maskz_loadu_ps(m, x + i), vs, vz, lo, hi, off);
    _mm_mask_storeu_epi8(out + i, m, q);
  }
}

void prepare_slab(const uint8_t* src, int bits, int64_t rows, int8_t* dst, int32_t* wsum) {
  const __m512i ones = _mm512_set1_epi8(1);
  const __m512i eight = _mm512_set1_epi8(8);
  const __m512i lo_mask = _mm512_set1_epi16(0x000F), hi_mask = _mm512_set1_epi16(0x0F00);
  __m512i acc = _mm512_setzero_si512();
  for (int64_t r = 0; r < rows; ++r) {
    __m512i w;
    if (bits == 8) {
      w = _mm512_loadu_si512(src + r * 64);
    } else {
      // Byte k of the row holds element 2k (low nibble) and 2k + 1 (high nibble): widen each
      // byte to a 16-bit lane and place the nibbles in its low and high byte.
      const __m512i e = _mm512_cvtepu8_epi16(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + r * 32)));
      w = _mm512_or_si512(_mm512_and_si512(e, lo_mask),
                          _mm512_and_si512(_mm512_slli_epi16(e, 4), hi_mask));
      w = _mm512_sub_epi8(_mm512_xor_si512(w, eight), eight);  // sign-extend the nibbles
    }
    if (dst != nullptr) _mm512_storeu_si512(dst + r * 64, w);
    acc = _mm512_dpbusd_epi32(acc, ones, w);
  }
  _mm512_storeu_si512(wsum, acc);
}

// (float)(acc - zp * wsum) * scale + bias, rounded after each operation.
inline __m512 scaled(__m512i acc, __m512i zws, __m512 scale, const __m512* bias) {
  __m512 f = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc, zws));
  f = _mm512_mul_round_ps(f, scale, kRound);
  if (bias != nullptr) f = _mm512_add_round_ps(f, *bias, kRound);
  return f;
}

// relu, then min(., clamp_max). max/min return their second operand when one is NaN, so a NaN
// stays NaN (like torch.relu / torch.clamp), and on equal values (+-0) the value itself, as
// the scalar epilogue's comparisons do.
inline __m512 activate(__m512 f, bool relu, bool clamp, __m512 clamp_max) {
  if (relu) f = _mm512_max_ps(_mm512_setzero_ps(), f);
  if (clamp) f = _mm512_min_ps(clamp_max, f);
  return f;
}

inline __mmask16 lane_mask(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1);
}

// The broadcast epilogue constants of a row.
struct FinishVecs {
  __m512 clamp_max, out_scale, out_zero_point, out_lo, out_hi;
  explicit FinishVecs(const QConvRowArgs& a)
      : clamp_max(_mm512_set1_ps(a.has_clamp ? a.clamp_max : 0.f)),
        out_scale(_mm512_set1_ps(a.out_scale)),
        out_zero_point(_mm512_set1_ps(a.out_zero_point)),
        out_lo(_mm512_set1_ps(a.out_qmin)),
        out_hi(_mm512_set1_ps(a.out_qmax)) {}
};

// Channels ch0 .. ch0 + valid - 1 (valid >= 1; lanes past 16 ignored) of pixel p of the run,
// from the scaled values f: + residual, relu, clamp, then the float32 values or their codes,
// through any channel stride (a scalar loop when it is not 1).
inline void finish16(const QConvRowArgs& a, const FinishVecs& e, int64_t p, int64_t ch0,
                     int64_t valid, __m512 f) {
  const int64_t n = valid < 16 ? valid : 16;
  const __mmask16 m = lane_mask(n);
  if (a.residual != nullptr) {
    const float* r = a.residual + p * a.res_pix_stride + ch0 * a.res_oc_stride;
    __m512 rv;
    if (a.res_oc_stride == 1) {
      rv = _mm512_maskz_loadu_ps(m, r);
    } else {
      alignas(64) float t[16] = {0};
      for (int64_t j = 0; j < n; ++j) t[j] = r[j * a.res_oc_stride];
      rv = _mm512_load_ps(t);
    }
    f = _mm512_add_round_ps(f, rv, kRound);
  }
  f = activate(f, a.relu, a.has_clamp, e.clamp_max);
  const int64_t os = a.out_oc_stride;
  if (a.out_codes != nullptr) {
    const __m128i q = quantize16(f, e.out_scale, e.out_zero_point, e.out_lo, e.out_hi,
                                 _mm512_setzero_si512());
    uint8_t* out = a.out_codes + p * a.out_pix_stride + ch0 * os;
    if (os == 1) {
      _mm_mask_storeu_epi8(out, m, q);
    } else {
      alignas(16) uint8_t t[16];
      _mm_store_si128(reinterpret_cast<__m128i*>(t), q);
      for (int64_t j = 0; j < n; ++j) out[j * os] = t[j];
    }
    return;
  }
  float* out = a.out + p * a.out_pix_stride + ch0 * os;
  if (os == 1) {
    _mm512_mask_storeu_ps(out, m, f);
  } else {
    alignas(64) float t[16];
    _mm512_store_ps(t, f);
    for (int64_t j = 0; j < n; ++j) out[j * os] = t[j];
  }
}

// How one 16-channel block of a tile is stored (chosen once per tile).
enum StoreMode { kSkip, kFull, kStream, kMasked, kStrided };

inline StoreMode store_mode(const QConvRowArgs& a, int64_t valid, const float* first) {
  if (valid <= 0) return kSkip;
  if (a.out_oc_stride != 1) return kStrided;
  if (valid < 16) return kMasked;
  // Streaming needs every pixel's 16 floats 64-byte aligned.
  const bool aligned = (reinterpret_cast<uintptr_t>(first) & 63) == 0 &&
                       (a.out_pix_stride & 15) == 0;
  return a.stream && aligned ? kStream : kFull;
}

inline void store16(StoreMode mode, float* out, __m512 v, int64_t valid, int64_t oc_stride) {
  switch (mode) {
    case kFull: _mm512_storeu_ps(out, v); break;
    case kStream: _mm512_stream_ps(out, v); break;
    case kMasked:
      _mm512_mask_storeu_ps(out, static_cast<__mmask16>((1u << valid) - 1), v);
      break;
    case kStrided: {
      alignas(64) float tmp[16];
      _mm512_store_ps(tmp, v);
      const int64_t n = valid < 16 ? valid : 16;
      for (int64_t j = 0; j < n; ++j) out[j * oc_stride] = tmp[j];
      break;
    }
    default: break;
  }
}

// Depthwise (dw_row): 16 channels per vector from the padded pixel's bytes (one per channel),
// zero-extended to 32-bit lanes, int32 weights, vpmaddwd: the code times the weight's low
// int16 plus 0 times its sign extension, exact. 64 channels (4 accumulators) per step, 4
// pixels at a time; masked loads at the channel tail never read past the last channel (the
// input, weights, zws, scale and bias all end there or at the 8-channel padding).
inline __mmask16 tail_mask(int64_t n) { return n <= 0 ? 0 : lane_mask(n); }

// P consecutive pixels x B blocks of 16 channels: each weight vector loaded once per tap
// serves the P pixels.
template <int B, int P>
void dw_blocks(const QConvRowArgs& a, const FinishVecs& e, int64_t p0, int64_t ch0) {
  __m512i acc[P][B];
  __mmask16 mask[B];
#pragma GCC unroll 4
  for (int b = 0; b < B; ++b) {
    mask[b] = tail_mask(a.noc - ch0 - 16 * b);
#pragma GCC unroll 4
    for (int q = 0; q < P; ++q) acc[q][b] = _mm512_setzero_si512();
  }
  const uint8_t* in = a.in + p0 * a.pix_step + ch0;
  const int32_t* w = a.dw_w + ch0;
  for (int64_t kh = 0; kh < a.kh; ++kh) {
    for (int64_t kw = 0; kw < a.kw; ++kw, w += a.dw_stride) {
      const uint8_t* t = in + kh * a.tap_h + kw * a.tap_w;
#pragma GCC unroll 4
      for (int b = 0; b < B; ++b) {
        const __m512i wv = _mm512_maskz_loadu_epi32(mask[b], w + 16 * b);
#pragma GCC unroll 4
        for (int q = 0; q < P; ++q) {
          const __m512i u = _mm512_cvtepu8_epi32(
              _mm_maskz_loadu_epi8(mask[b], t + q * a.pix_step + 16 * b));
          acc[q][b] = _mm512_add_epi32(acc[q][b], _mm512_madd_epi16(u, wv));
        }
      }
    }
  }
#pragma GCC unroll 4
  for (int b = 0; b < B; ++b) {
    const int64_t ch = ch0 + 16 * b;
    if (mask[b] == 0) continue;
    const __m512i zws = _mm512_maskz_loadu_epi32(mask[b], a.zws + ch);
    const __m512 scale = _mm512_maskz_loadu_ps(mask[b], a.scale + ch);
    __m512 bias = _mm512_setzero_ps();
    if (a.bias != nullptr) bias = _mm512_maskz_loadu_ps(mask[b], a.bias + ch);
#pragma GCC unroll 4
    for (int q = 0; q < P; ++q)
      finish16(a, e, p0 + q, ch, a.noc - ch,
               scaled(acc[q][b], zws, scale, a.bias != nullptr ? &bias : nullptr));
  }
}

template <int P>
void dw_pixels(const QConvRowArgs& a, const FinishVecs& e, int64_t p) {
  int64_t ch = 0;
  for (; ch + 64 <= a.noc; ch += 64) dw_blocks<4, P>(a, e, p, ch);
  for (; ch < a.noc; ch += 16) dw_blocks<1, P>(a, e, p, ch);
}

void dw_row(const QConvRowArgs& a) {
  const FinishVecs e(a);
  int64_t p = 0;
  for (; p + 4 <= a.npix; p += 4) dw_pixels<4>(a, e, p);
  for (; p < a.npix; ++p) dw_pixels<1>(a, e, p);
  if (a.stream) _mm_sfence();
}

template <int M, bool TWO>
inline void epilogue(const QConvRowArgs& a, int64_t p0, const __m512i* c0, const __m512i* c1);

// Calls run(t, w0, w1, steps) once per contiguous run of the kernel window: t is the input of
// pixel p0 at the run's first tap, w0 / w1 the slab rows of that tap, steps the run's k-steps of
// 4 input channels. When the kw taps of a kernel row are adjacent in memory (dilation 1, one
// group), a whole kernel row is one run over contiguous input bytes and weight rows.
template <bool TWO, class Run>
inline void for_each_run(const QConvRowArgs& a, int64_t p0, Run&& run) {
  const int64_t icb = a.icb;
  const uint8_t* in = a.in + p0 * a.pix_step;
  const bool merged = a.tap_w == 4 * icb;
  const int64_t nkw = merged ? 1 : a.kw, steps = merged ? a.kw * icb : icb;
  for (int64_t kh = 0; kh < a.kh; ++kh) {
    for (int64_t kw = 0; kw < nkw; ++kw) {
      const int64_t woff = (kh * a.kw + kw) * icb * 64;
      run(in + kh * a.tap_h + kw * a.tap_w, a.w0 + woff, TWO ? a.w1 + woff : nullptr, steps);
    }
  }
}

// Adds the k-steps [first, steps) of every run to the accumulators of M pixels with vpdpbusd
// (the whole sum for the VNNI tiles, the leftover steps for the AMX tiles).
template <int M, bool TWO>
inline void accumulate_vnni(const QConvRowArgs& a, int64_t p0, int64_t first, __m512i* c0,
                            __m512i* c1) {
  const int64_t ps = a.pix_step;
  for_each_run<TWO>(a, p0, [&](const uint8_t* t, const int8_t* pa, const int8_t* pb,
                               int64_t steps) {
    t += first * 4;
    pa += first * 64;
    if (TWO) pb += first * 64;
    for (int64_t cb = first; cb < steps; ++cb, t += 4, pa += 64) {
      const __m512i b0 = _mm512_loadu_si512(pa);
      __m512i b1 = _mm512_setzero_si512();
      if (TWO) {
        b1 = _mm512_loadu_si512(pb);
        pb += 64;
      }
#pragma GCC unroll 16
      for (int m = 0; m < M; ++m) {
        const __m512i av = _mm512_set1_epi32(load_u32(t + m * ps));
        c0[m] = _mm512_dpbusd_epi32(c0[m], av, b0);
        if (TWO) c1[m] = _mm512_dpbusd_epi32(c1[m], av, b1);
      }
    }
  });
}

template <int M, bool TWO>
void tile(const QConvRowArgs& a, int64_t p0) {
  __m512i c0[M], c1[M];
#pragma GCC unroll 16
  for (int m = 0; m < M; ++m) {
    c0[m] = _mm512_setzero_si512();
    if (TWO) c1[m] = _mm512_setzero_si512();
  }
  accumulate_vnni<M, TWO>(a, p0, 0, c0, c1);
  epilogue<M, TWO>(a, p0, c0, c1);
}

// The epilogue of M pixels x 16 or 32 channels from the int32 accumulators (shared by the VNNI
// tiles and the AMX tiles, so both give the same bits).
template <int M, bool TWO>
inline void epilogue(const QConvRowArgs& a, int64_t p0, const __m512i* c0, const __m512i* c1) {
  const __m512i z0 = _mm512_loadu_si512(a.zws), z1 = _mm512_loadu_si512(a.zws + 16);
  const __m512 s0 = _mm512_loadu_ps(a.scale), s1 = _mm512_loadu_ps(a.scale + 16);
  __m512 bias0 = _mm512_setzero_ps(), bias1 = _mm512_setzero_ps();
  const bool has_bias = a.bias != nullptr, relu = a.relu;
  if (has_bias) {
    bias0 = _mm512_loadu_ps(a.bias);
    bias1 = _mm512_loadu_ps(a.bias + 16);
  }
  const int64_t valid0 = a.noc, valid1 = a.noc - 16;
  if (a.out_codes != nullptr || a.residual != nullptr || a.has_clamp) {
    const FinishVecs e(a);
#pragma GCC unroll 16
    for (int m = 0; m < M; ++m) {
      finish16(a, e, p0 + m, 0, valid0, scaled(c0[m], z0, s0, has_bias ? &bias0 : nullptr));
      if (TWO)
        finish16(a, e, p0 + m, 16, valid1, scaled(c1[m], z1, s1, has_bias ? &bias1 : nullptr));
    }
    return;
  }
  const int64_t pix_stride = a.out_pix_stride, oc_stride = a.out_oc_stride;
  float* out = a.out + p0 * pix_stride;
  float* out1 = out + 16 * oc_stride;
  const StoreMode mode0 = store_mode(a, valid0, out);
  const StoreMode mode1 = TWO ? store_mode(a, valid1, out1) : kSkip;
#pragma GCC unroll 16
  for (int m = 0; m < M; ++m) {
    const __m512 zero = _mm512_setzero_ps();
    store16(mode0, out + m * pix_stride,
            activate(scaled(c0[m], z0, s0, has_bias ? &bias0 : nullptr), relu, false, zero),
            valid0, oc_stride);
    if (TWO)
      store16(mode1, out1 + m * pix_stride,
              activate(scaled(c1[m], z1, s1, has_bias ? &bias1 : nullptr), relu, false, zero),
              valid1, oc_stride);
  }
}

template <int M>
void tile_any(const QConvRowArgs& a, int64_t p0) {
  if (a.w1 != nullptr) {
    tile<M, true>(a, p0);
  } else {
    tile<M, false>(a, p0);
  }
}


// AMX-INT8: tiles of 16 (or twice 16) output pixels x 16 or 32 channels. A tile row m is pixel
// m's 64 input bytes (16 k-steps of 4 channels, contiguous within one (kh, kw) run or the merged
// kw * icb run), B is 16 consecutive 64-byte slab rows (the slab layout is the VNNI B layout), and
// tdpbusd adds u8 x s8 dot products of 4 bytes into int32 like vpdpbusd. The k-steps left over
// in each run (steps % 16) are added afterwards with vpdpbusd: int32 addition wraps and is
// associative, so the sum is bit-identical to the VNNI tiles'. Then the shared epilogue.
namespace amx {

struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

inline void configure() {
  TileConfig cfg;
  std::memset(&cfg, 0, sizeof(cfg));
  cfg.palette_id = 1;
  // 0..3: C (pixel tile 0 / 1 x channels 0..15 / 16..31: C00, C01, C10, C11); 4, 5: A of
  // pixel tiles 0, 1; 6, 7: B of channels 0..15, 16..31
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
}

// The int32 sums of pixels p0..p0+16*P-1 x 16 or 32 channels into c0 / c1 [16 * P]. With
// P = 2 each B tile (16 weight rows, 1 kB) loaded serves 32 pixels: layers whose slabs outgrow
// L1 (256 channels: 72 kB per slab pair) are bound by the B loads from L2 otherwise.
template <int P, bool TWO>
void accumulate(const QConvRowArgs& a, int64_t p0, __m512i* c0, __m512i* c1) {
  const int64_t ps = a.pix_step;
  const bool merged = a.tap_w == 4 * a.icb;
  const int64_t steps = merged ? a.kw * a.icb : a.icb, full = steps / 16 * 16;
  _tile_zero(0);
  if (TWO) _tile_zero(1);
  if (P == 2) {
    _tile_zero(2);
    if (TWO) _tile_zero(3);
  }
  if (full > 0) {
    for_each_run<TWO>(a, p0, [&](const uint8_t* t, const int8_t* pa, const int8_t* pb, int64_t) {
      for (int64_t cb = 0; cb < full; cb += 16) {
        _tile_loadd(6, pa + cb * 64, 64);
        if (TWO) _tile_loadd(7, pb + cb * 64, 64);
        _tile_loadd(4, t + cb * 4, ps);
        _tile_dpbusd(0, 4, 6);
        if (TWO) _tile_dpbusd(1, 4, 7);
        if (P == 2) {
          _tile_loadd(5, t + 16 * ps + cb * 4, ps);
          _tile_dpbusd(2, 5, 6);
          if (TWO) _tile_dpbusd(3, 5, 7);
        }
      }
    });
  }
  // a C tile's 16 rows of 16 int32 are 16 zmm accumulators, stored straight into c0 / c1
  _tile_stored(0, c0, 64);
  if (TWO) _tile_stored(1, c1, 64);
  if (P == 2) {
    _tile_stored(2, c0 + 16, 64);
    if (TWO) _tile_stored(3, c1 + 16, 64);
  }
  if (full < steps) {
    accumulate_vnni<16, TWO>(a, p0, full, c0, c1);
    if (P == 2) accumulate_vnni<16, TWO>(a, p0 + 16, full, c0 + 16, c1 + 16);
  }
}

template <int P, bool TWO>
void tile(const QConvRowArgs& a, int64_t p0) {
  __m512i c0[16 * P], c1[16 * P];
  accumulate<P, TWO>(a, p0, c0, c1);
  epilogue<16, TWO>(a, p0, c0, c1);
  if (P == 2) epilogue<16, TWO>(a, p0 + 16, c0 + 16, c1 + 16);
}

}  // namespace amx

// The pixel tail (< kTile) of a run with the VNNI tiles.
void conv_tail(const QConvRowArgs& a, int64_t p) {
  switch (a.npix - p) {
    case 1: tile_any<1>(a, p); break;
    case 2: tile_any<2>(a, p); break;
    case 3: tile_any<3>(a, p); break;
    case 4: tile_any<4>(a, p); break;
    case 5: tile_any<5>(a, p); break;
    case 6: tile_any<6>(a, p); break;
    case 7: tile_any<7>(a, p); break;
    case 8: tile_any<8>(a, p); break;
    case 9: tile_any<9>(a, p); break;
    case 10: tile_any<10>(a, p); break;
    case 11: tile_any<11>(a, p); break;
    case 12: tile_any<12>(a, p); break;
    case 13: tile_any<13>(a, p); break;
    default: break;
  }
}

void conv_row(const QConvRowArgs& a) {
  int64_t p = 0;
  for (; p + kTile <= a.npix; p += kTile) tile_any<kTile>(a, p);
  conv_tail(a, p);
  if (a.stream) _mm_sfence();  // order the non-temporal stores before the caller goes on
}

// The AMX tiles only pay where a run has at least one whole chunk of 16 k-steps (64 input
// bytes); below that (e.g. 16 input channels, 3x3: 12 steps) everything would be leftover steps
// on the VNNI units plus the tile round trip, so the VNNI tiles run instead.
inline bool amx_pays(const QConvRowArgs& a) {
  return (a.tap_w == 4 * a.icb ? a.kw * a.icb : a.icb) >= 16;
}

// The epilogue of n (1..16) consecutive pixels.
template <bool TWO>
void epilogue_n(const QConvRowArgs& a, int64_t p0, const __m512i* c0, const __m512i* c1,
                int64_t n) {
  switch (n) {
    case 1: epilogue<1, TWO>(a, p0, c0, c1); break;
    case 2: epilogue<2, TWO>(a, p0, c0, c1); break;
    case 3: epilogue<3, TWO>(a, p0, c0, c1); break;
    case 4: epilogue<4, TWO>(a, p0, c0, c1); break;
    case 5: epilogue<5, TWO>(a, p0, c0, c1); break;
    case 6: epilogue<6, TWO>(a, p0, c0, c1); break;
    case 7: epilogue<7, TWO>(a, p0, c0, c1); break;
    case 8: epilogue<8, TWO>(a, p0, c0, c1); break;
    case 9: epilogue<9, TWO>(a, p0, c0, c1); break;
    case 10: epilogue<10, TWO>(a, p0, c0, c1); break;
    case 11: epilogue<11, TWO>(a, p0, c0, c1); break;
    case 12: epilogue<12, TWO>(a, p0, c0, c1); break;
    case 13: epilogue<13, TWO>(a, p0, c0, c1); break;
    case 14: epilogue<14, TWO>(a, p0, c0, c1); break;
    case 15: epilogue<15, TWO>(a, p0, c0, c1); break;
    case 16: epilogue<16, TWO>(a, p0, c0, c1); break;
    default: break;
  }
}

// AMX conv_row: groups of 32, then 16 pixels on the tiles, then up to 15 pixels on the VNNI
// tiles (one of 14, then the rest). The tile configuration is loaded on every call: calls may run
// on any thread, and the configuration is per thread.
template <bool TWO>
void row_amx(const QConvRowArgs& a) {
  int64_t p = 0;
  for (; p + 32 <= a.npix; p += 32) amx::tile<2, TWO>(a, p);
  for (; p + 16 <= a.npix; p += 16) amx::tile<1, TWO>(a, p);
  for (; p + kTile <= a.npix; p += kTile) tile_any<kTile>(a, p);
  conv_tail(a, p);
}

void conv_row_amx(const QConvRowArgs& a) {
  if (a.npix >= 16 && amx_pays(a)) {
    amx::configure();
    if (a.w1 != nullptr) {
      row_amx<true>(a);
    } else {
      row_amx<false>(a);
    }
  } else {
    int64_t p = 0;
    for (; p + kTile <= a.npix; p += kTile) tile_any<kTile>(a, p);
    conv_tail(a, p);
  }
  if (a.stream) _mm_sfence();
}

// The run a starting at pixel `col` of output row `row` of a block.
QConvRowArgs at_pixel(const QConvRowArgs& a, const QConvRows& r, int64_t row, int64_t col) {
  QConvRowArgs b = a;
  b.in += (row * r.row_pixels + col) * a.pix_step;
  b.npix = a.npix - col;
  const int64_t out_at = row * r.out_row_stride + col * a.out_pix_stride;
  if (b.out != nullptr) b.out += out_at;
  if (b.out_codes != nullptr) b.out_codes += out_at;
  if (b.residual != nullptr) b.residual += row * r.res_row_stride + col * a.res_pix_stride;
  return b;
}

// AMX over r.rows output rows at once. With stride 1 the padded input of output pixel
// (row, col) starts (row * row_pixels + col) * pix_step bytes after pixel (0, 0), so the block
// is one run of "virtual" pixels whose columns past npix land in the padding between rows: their
// taps stay inside the buffer (they end before the last real pixel's) and their sums are
// computed and dropped. Narrow layers (7x7, 14x14 outputs; rows of < 16 pixels) then fill the
// 16-row tiles too. The virtual pixels after the last whole tile go to the VNNI tiles row by row.
template <bool TWO>
void rows16(const QConvRowArgs& a, const QConvRows& r) {
  const int64_t span = (r.rows - 1) * r.row_pixels + a.npix;  // up to the last real pixel
  int64_t q = 0;
  if (span >= 16 && amx_pays(a)) {
    amx::configure();
    __m512i c0[32], c1[32];
    while (q + 16 <= span) {
      const int64_t n = q + 32 <= span ? 32 : 16;
      if (n == 32) {
        amx::accumulate<2, TWO>(a, q, c0, c1);
      } else {
        amx::accumulate<1, TWO>(a, q, c0, c1);
      }
      // the real pixels, in stretches of consecutive columns of one row (16 at most)
      for (int64_t m = 0; m < n;) {
        const int64_t row = (q + m) / r.row_pixels, col = (q + m) % r.row_pixels;
        if (col < a.npix) {
          const int64_t k = std::min<int64_t>(std::min<int64_t>(a.npix - col, n - m), 16);
          epilogue_n<TWO>(at_pixel(a, r, row, col), 0, c0 + m, c1 + m, k);
          m += k;
        } else {
          m += std::min<int64_t>(r.row_pixels - col, n - m);
        }
      }
      q += n;
    }
  }
  for (int64_t row = q / r.row_pixels; row < r.rows; ++row) {
    const int64_t col = row == q / r.row_pixels ? q % r.row_pixels : 0;
    if (col >= a.npix) continue;
    const QConvRowArgs b = at_pixel(a, r, row, col);
    int64_t p = 0;
    for (; p + kTile <= b.npix; p += kTile) tile_any<kTile>(b, p);
    conv_tail(b, p);
  }
  if (a.stream) _mm_sfence();
}

void conv_rows_amx(const QConvRowArgs& a, const QConvRows& r) {
  if (a.w1 != nullptr) {
    rows16<true>(a, r);
  } else {
    rows16<false>(a, r);
  }
}

}  // namespace
}  // namespace avx512_vnni

const QConvKernelTable& qconv_kernels_avx512_vnni() {
  static const QConvKernelTable table{"avx512_vnni", &avx512_vnni::quantize,
                                      &avx512_vnni::prepare_slab, &avx512_vnni::conv_row,
                                      &avx512_vnni::dw_row};
  return table;
}

const QConvKernelTable& qconv_kernels_amx() {
  static const QConvKernelTable table{"amx", &avx512_vnni::quantize, &avx512_vnni::prepare_slab,
                                      &avx512_vnni::conv_row_amx, &avx512_vnni::dw_row,
                                      &avx512_vnni::conv_rows_amx};
  return table;
}

}  // namespace cpu
}  // namespace oqfl

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#endif
