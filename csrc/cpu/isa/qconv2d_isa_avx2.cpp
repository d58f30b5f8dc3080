// AVX2 instance of the qconv2d kernels (uint8 activations x int8 weights -> int32), for CPUs with
// AVX2 but without AVX-512 VNNI; compiled for x86-64 only, chosen by cpu/cpu_capability.cpp.
//
// Exact products (docs/DESIGN.md section 7.1): vpmaddubsw would add two u8 x s8 products in a
// saturating int16 (255 * -128 * 2 < -32768), so both operands are widened to int16 and
// multiplied with vpmaddwd, whose int32 pair sums are exact. No widening pass over memory: the
// 64-byte weight row [16 oc x 4 ic] is read as 32-bit lanes (w0 w1 w2 w3 per output channel)
// and split in registers into the int16 pairs (w0, w2) (shift left 8, arithmetic shift right 8)
// and (w1, w3) (arithmetic shift right 8); the broadcast input word u0 u1 u2 u3 is split into
// (u0, u2) (mask 0x00FF00FF) and (u1, u3) (logical shift right 8). Then per output channel
// madd(even) + madd(odd) = u0 w0 + u1 w1 + u2 w2 + u3 w3 in its own int32 lane, the same
// layout as the VNNI kernel, so the blocked weight layout is used unchanged.
//
// Small codes (QConvRowArgs::i16_steps >= 1: e.g. int4 weights, or 7-bit / 4-bit activations):
// there vpmaddubsw provably cannot saturate, and its int16 pair sums are added for up to
// i16_steps k-steps before one vpmaddwd by ones widens them (tile_i16), half the multiplies.
//
// Microkernel: kTile = 4 consecutive output pixels x 16 output channels (one slab): 8 ymm
// accumulators, 4 ymm of split weights per k-step (reused by the 4 pixels), 2 of input.
// The two slabs of a run are computed one after the other.
// Depthwise layers (dw_row): 8 channels per vector from the words of the padded pixel, int32
// weights, vpmaddwd; 32 channels (4 accumulators) per step, masked loads at the channel tail.
// Epilogue in registers: acc - zp * wsum, cvt, * scale, + bias, + residual, relu, clamp (plain
// AVX arithmetic; this file is compiled without FMA and without contraction, so every product
// is rounded before the following addition, as in qconv2d_epilogue.h), then float32 stores or
// the output codes (quantize8, the same operations as quantize_code of common/quant_math.h).
#if defined(__x86_64__) || defined(_M_X64)

#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "isa/qconv2d_table.h"

// No "fma" here: without FMA instructions the compiler cannot fuse the epilogue's products.
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2")
#endif

namespace oqfl {
namespace cpu {
namespace avx2_qconv {
namespace {

constexpr int kTile = 4;
constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

typedef int32_t __attribute__((may_alias, aligned(1))) unaligned_i32;

inline int32_t load_u32(const uint8_t* p) { return *reinterpret_cast<const unaligned_i32*>(p); }

// quantize_code of 8 floats plus the offset, as int32 (a NaN gives 0x80000000, whose low byte
// plus the offset is the byte of code 0, as quantize_code gives for NaN).
inline __m256i quantize8(__m256 x, __m256 s, __m256 z, __m256 lo, __m256 hi, __m256i off) {
  const __m256 v = _mm256_add_ps(_mm256_div_ps(x, s), z);
  // rint (half to even), then the clamp; max/min return their second operand when one is NaN,
  // so a NaN stays NaN and converts to 0x80000000.
  const __m256 r = _mm256_round_ps(v, kRound);
  const __m256 c = _mm256_min_ps(hi, _mm256_max_ps(lo, r));
  return _mm256_add_epi32(_mm256_cvttps_epi32(c), off);
}

// The low bytes of the 8 int32 lanes of q, in order, in the low 64 bits (a truncating narrow).
inline __m128i narrow8(__m256i q) {
  const __m256i b = _mm256_and_si256(q, _mm256_set1_epi32(0xFF));
  const __m256i w = _mm256_packus_epi32(b, b);   // [q0..3 q0..3 | q4..7 q4..7] as int16
  const __m256i c = _mm256_packus_epi16(w, w);   // bytes, per 128-bit half
  return _mm_unpacklo_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
}

void quantize(const float* x, uint8_t* out, int64_t n, float s, float z, float qmin, float qmax,
              int32_t offset) {
  const __m256 vs = _mm256_set1_ps(s), vz = _mm256_set1_ps(z);
  const __m256 lo = _mm256_set1_ps(qmin), hi = _mm256_set1_ps(qmax);
  const __m256i off = _mm256_set1_epi32(offset);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i q = narrow8(quantize8(_mm256_loadu_ps(x + i), vs, vz, lo, hi, off));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(out + i), q);
  }
  if (i < n) {
    alignas(32) float t[8] = {0};
    std::memcpy(t, x + i, (n - i) * sizeof(float));
    alignas(16) uint8_t b[16];
    _mm_store_si128(reinterpret_cast<__m128i*>(b),
                    narrow8(quantize8(_mm256_load_ps(t), vs, vz, lo, hi, off)));
    std::memcpy(out + i, b, n - i);
  }
}

// int8 codes of one 64-byte row of int4 nibbles (32 bytes; element 2k in the low nibble of byte
// k), as two ymm of 32 codes each.
inline void unpack_int4_row(const uint8_t* src, __m256i* r0, __m256i* r1) {
  const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
  const __m256i m = _mm256_set1_epi8(0x0F), eight = _mm256_set1_epi8(8);
  const __m256i lo = _mm256_and_si256(b, m);
  const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), m);
  // Interleaved per 128-bit half: il = elements 0..15 | 32..47, ih = 16..31 | 48..63.
  const __m256i il = _mm256_unpacklo_epi8(lo, hi), ih = _mm256_unpackhi_epi8(lo, hi);
  __m256i a = _mm256_permute2x128_si256(il, ih, 0x20);
  __m256i c = _mm256_permute2x128_si256(il, ih, 0x31);
  // Sign-extend the nibbles: (v ^ 8) - 8.
  *r0 = _mm256_sub_epi8(_mm256_xor_si256(a, eight), eight);
  *r1 = _mm256_sub_epi8(_mm256_xor_si256(c, eight), eight);
}

// Per output channel (32-bit lane) the sum of its 4 codes.
inline __m256i lane_sums(__m256i w) {
  const __m256i p = _mm256_maddubs_epi16(_mm256_set1_epi8(1), w);  // |pair sum| <= 256: exact
  return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
}

void prepare_slab(const uint8_t* src, int bits, int64_t rows, int8_t* dst, int32_t* wsum) {
  __m256i s0 = _mm256_setzero_si256(), s1 = _mm256_setzero_si256();
  for (int64_t r = 0; r < rows; ++r) {
    __m256i w0, w1;
    if (bits == 8) {
      w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + r * 64));
      w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + r * 64 + 32));
    } else {
      unpack_int4_row(src + r * 32, &w0, &w1);
    }
    if (dst != nullptr) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + r * 64), w0);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + r * 64 + 32), w1);
    }
    s0 = _mm256_add_epi32(s0, lane_sums(w0));
    s1 = _mm256_add_epi32(s1, lane_sums(w1));
  }
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(wsum), s0);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(wsum + 8), s1);
}

// The broadcast epilogue constants of a row.
struct FinishVecs {
  __m256 clamp_max, out_scale, out_zero_point, out_lo, out_hi;
  explicit FinishVecs(const QConvRowArgs& a)
      : clamp_max(_mm256_set1_ps(a.has_clamp ? a.clamp_max : 0.f)),
        out_scale(_mm256_set1_ps(a.out_scale)),
        out_zero_point(_mm256_set1_ps(a.out_zero_point)),
        out_lo(_mm256_set1_ps(a.out_qmin)),
        out_hi(_mm256_set1_ps(a.out_qmax)) {}
};

inline __m256i lane_mask(int64_t n) {
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(n)), idx);
}

// Output channels ch0 .. ch0 + min(valid, 8) - 1 of pixel p of the run from their
// accumulators: the whole epilogue, then the stores (any channel stride; scalar when not 1).
inline void finish8(const QConvRowArgs& a, const FinishVecs& e, int64_t p, int64_t ch0,
                    int64_t valid, __m256i acc) {
  if (valid <= 0) return;
  const int64_t n = valid < 8 ? valid : 8;
  const __m256i zws = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.zws + ch0));
  __m256 f = _mm256_cvtepi32_ps(_mm256_sub_epi32(acc, zws));
  f = _mm256_mul_ps(f, _mm256_loadu_ps(a.scale + ch0));
  if (a.bias != nullptr) f = _mm256_add_ps(f, _mm256_loadu_ps(a.bias + ch0));
  if (a.residual != nullptr) {
    const float* r = a.residual + p * a.res_pix_stride + ch0 * a.res_oc_stride;
    __m256 rv;
    if (a.res_oc_stride == 1) {
      rv = n == 8 ? _mm256_loadu_ps(r) : _mm256_maskload_ps(r, lane_mask(n));
    } else {
      alignas(32) float t[8] = {0};
      for (int64_t j = 0; j < n; ++j) t[j] = r[j * a.res_oc_stride];
      rv = _mm256_load_ps(t);
    }
    f = _mm256_add_ps(f, rv);
  }
  // max/min return their second operand when one is NaN: a NaN stays NaN, and on equal values
  // (+-0) the value itself, as the scalar comparisons of qconv2d_epilogue.h do.
  if (a.relu) f = _mm256_max_ps(_mm256_setzero_ps(), f);
  if (a.has_clamp) f = _mm256_min_ps(e.clamp_max, f);
  const int64_t os = a.out_oc_stride;
  if (a.out_codes != nullptr) {
    const __m128i q = narrow8(quantize8(f, e.out_scale, e.out_zero_point, e.out_lo, e.out_hi,
                                        _mm256_setzero_si256()));
    uint8_t* out = a.out_codes + p * a.out_pix_stride + ch0 * os;
    if (os == 1 && n == 8) {
      _mm_storel_epi64(reinterpret_cast<__m128i*>(out), q);
    } else {
      alignas(16) uint8_t t[16];
      _mm_store_si128(reinterpret_cast<__m128i*>(t), q);
      for (int64_t j = 0; j < n; ++j) out[j * os] = t[j];
    }
    return;
  }
  float* out = a.out + p * a.out_pix_stride + ch0 * os;
  if (os == 1) {
    if (n < 8) {
      _mm256_maskstore_ps(out, lane_mask(n), f);
    } else if (a.stream && (reinterpret_cast<uintptr_t>(out) & 31) == 0) {
      _mm256_stream_ps(out, f);
    } else {
      _mm256_storeu_ps(out, f);
    }
  } else {
    alignas(32) float t[8];
    _mm256_store_ps(t, f);
    for (int64_t j = 0; j < n; ++j) out[j * os] = t[j];
  }
}

// M output pixels from p0 x the 16 output channels of slab w (channels ch0 .. ch0 + 15).
template <int M>
void tile(const QConvRowArgs& a, const FinishVecs& e, int64_t p0, const int8_t* w,
          int64_t ch0) {
  __m256i c0[M], c1[M];
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m) {
    c0[m] = _mm256_setzero_si256();
    c1[m] = _mm256_setzero_si256();
  }
  const int64_t ps = a.pix_step, icb = a.icb;
  const uint8_t* in = a.in + p0 * ps;
  const __m256i byte_mask = _mm256_set1_epi32(0x00FF00FF);
  // When the kw taps of a kernel row are adjacent in memory (dilation 1, one group), the kw
  // and input-channel-block loops are one loop over contiguous input bytes and weight rows.
  const bool merged = a.tap_w == 4 * icb;
  const int64_t nkw = merged ? 1 : a.kw, steps = merged ? a.kw * icb : icb;
  for (int64_t kh = 0; kh < a.kh; ++kh) {
    for (int64_t kw = 0; kw < nkw; ++kw) {
      const uint8_t* t = in + kh * a.tap_h + kw * a.tap_w;
      const int8_t* pw = w + (kh * a.kw + kw) * icb * 64;
      for (int64_t cb = 0; cb < steps; ++cb, t += 4, pw += 64) {
        const __m256i wa = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pw));
        const __m256i wb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pw + 32));
        // int16 pairs (w0, w2) and (w1, w3) of each output channel's 32-bit lane.
        const __m256i wa_even = _mm256_srai_epi16(_mm256_slli_epi16(wa, 8), 8);
        const __m256i wa_odd = _mm256_srai_epi16(wa, 8);
        const __m256i wb_even = _mm256_srai_epi16(_mm256_slli_epi16(wb, 8), 8);
        const __m256i wb_odd = _mm256_srai_epi16(wb, 8);
#pragma GCC unroll 8
        for (int m = 0; m < M; ++m) {
          const __m256i u = _mm256_set1_epi32(load_u32(t + m * ps));
          const __m256i ue = _mm256_and_si256(u, byte_mask);  // (u0, u2) as int16
          const __m256i uo = _mm256_srli_epi16(u, 8);         // (u1, u3) as int16
          c0[m] = _mm256_add_epi32(c0[m], _mm256_add_epi32(_mm256_madd_epi16(ue, wa_even),
                                                           _mm256_madd_epi16(uo, wa_odd)));
          c1[m] = _mm256_add_epi32(c1[m], _mm256_add_epi32(_mm256_madd_epi16(ue, wb_even),
                                                           _mm256_madd_epi16(uo, wb_odd)));
        }
      }
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m) {
    finish8(a, e, p0 + m, ch0, a.noc - ch0, c0[m]);
    finish8(a, e, p0 + m, ch0 + 8, a.noc - ch0 - 8, c1[m]);
  }
}

// The same tile where a.i16_steps >= 1 (small codes): vpmaddubsw pair sums (exact, and
// provably without saturation) added in int16 for up to a.i16_steps k-steps, then widened to
// int32 with one vpmaddwd by ones: about half the multiplies of `tile` when i16_steps is large.
template <int M>
void tile_i16(const QConvRowArgs& a, const FinishVecs& e, int64_t p0, const int8_t* w,
              int64_t ch0) {
  __m256i c0[M], c1[M], s0[M], s1[M];
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m) {
    c0[m] = _mm256_setzero_si256();
    c1[m] = _mm256_setzero_si256();
  }
  const int64_t ps = a.pix_step, icb = a.icb;
  const uint8_t* in = a.in + p0 * ps;
  const __m256i ones = _mm256_set1_epi16(1);
  const bool merged = a.tap_w == 4 * icb;
  const int64_t nkw = merged ? 1 : a.kw, steps = merged ? a.kw * icb : icb;
  const int64_t chunk = a.i16_steps;
  for (int64_t kh = 0; kh < a.kh; ++kh) {
    for (int64_t kw = 0; kw < nkw; ++kw) {
      const uint8_t* t = in + kh * a.tap_h + kw * a.tap_w;
      const int8_t* pw = w + (kh * a.kw + kw) * icb * 64;
      for (int64_t cb0 = 0; cb0 < steps; cb0 += chunk) {
        const int64_t cb1 = steps - cb0 < chunk ? steps : cb0 + chunk;
#pragma GCC unroll 8
        for (int m = 0; m < M; ++m) {
          s0[m] = _mm256_setzero_si256();
          s1[m] = _mm256_setzero_si256();
        }
        for (int64_t cb = cb0; cb < cb1; ++cb, t += 4, pw += 64) {
          const __m256i wa = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pw));
          const __m256i wb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pw + 32));
#pragma GCC unroll 8
          for (int m = 0; m < M; ++m) {
            const __m256i u = _mm256_set1_epi32(load_u32(t + m * ps));
            s0[m] = _mm256_add_epi16(s0[m], _mm256_maddubs_epi16(u, wa));
            s1[m] = _mm256_add_epi16(s1[m], _mm256_maddubs_epi16(u, wb));
          }
        }
#pragma GCC unroll 8
        for (int m = 0; m < M; ++m) {
          c0[m] = _mm256_add_epi32(c0[m], _mm256_madd_epi16(s0[m], ones));
          c1[m] = _mm256_add_epi32(c1[m], _mm256_madd_epi16(s1[m], ones));
        }
      }
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m) {
    finish8(a, e, p0 + m, ch0, a.noc - ch0, c0[m]);
    finish8(a, e, p0 + m, ch0 + 8, a.noc - ch0 - 8, c1[m]);
  }
}

template <template <int> class K>
void slab_row_with(const QConvRowArgs& a, const FinishVecs& e, const int8_t* w, int64_t ch0) {
  int64_t p = 0;
  for (; p + kTile <= a.npix; p += kTile) K<kTile>::run(a, e, p, w, ch0);
  switch (a.npix - p) {
    case 1: K<1>::run(a, e, p, w, ch0); break;
    case 2: K<2>::run(a, e, p, w, ch0); break;
    case 3: K<3>::run(a, e, p, w, ch0); break;
    default: break;
  }
}

template <int M>
struct Exact {
  static void run(const QConvRowArgs& a, const FinishVecs& e, int64_t p0, const int8_t* w,
                  int64_t ch0) { tile<M>(a, e, p0, w, ch0); }
};
template <int M>
struct Int16 {
  static void run(const QConvRowArgs& a, const FinishVecs& e, int64_t p0, const int8_t* w,
                  int64_t ch0) { tile_i16<M>(a, e, p0, w, ch0); }
};

void slab_row(const QConvRowArgs& a, const FinishVecs& e, const int8_t* w, int64_t ch0) {
  if (a.i16_steps >= 1) {
    slab_row_with<Int16>(a, e, w, ch0);
  } else {
    slab_row_with<Exact>(a, e, w, ch0);
  }
}

// Depthwise: B blocks of 8 channels from ch0 for pixel p. Channel c's code is byte c of each
// padded pixel, so one 8-byte load zero-extended gives 8 channels as int32 lanes; the int32
// weights (sign-extended) then multiply exactly in vpmaddwd (the high int16 halves of the codes
// are 0). At the channel tail the codes go through a local copy: a load never reads past the
// last channel (the end of the buffer).
inline __m256i dw_codes(const uint8_t* src, int64_t n) {
  if (n >= 8) return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src)));
  uint8_t tail[8] = {0};
  if (n > 0) std::memcpy(tail, src, static_cast<size_t>(n));
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(tail)));
}

template <int B>
void dw_blocks(const QConvRowArgs& a, const FinishVecs& e, int64_t p, int64_t ch0) {
  __m256i acc[B];
#pragma GCC unroll 4
  for (int b = 0; b < B; ++b) acc[b] = _mm256_setzero_si256();
  const uint8_t* in = a.in + p * a.pix_step + ch0;
  const int32_t* w = a.dw_w + ch0;
  for (int64_t kh = 0; kh < a.kh; ++kh) {
    for (int64_t kw = 0; kw < a.kw; ++kw, w += a.dw_stride) {
      const uint8_t* t = in + kh * a.tap_h + kw * a.tap_w;
#pragma GCC unroll 4
      for (int b = 0; b < B; ++b) {
        const __m256i u = dw_codes(t + 8 * b, a.noc - ch0 - 8 * b);
        const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 8 * b));
        acc[b] = _mm256_add_epi32(acc[b], _mm256_madd_epi16(u, wv));
      }
    }
  }
#pragma GCC unroll 4
  for (int b = 0; b < B; ++b) finish8(a, e, p, ch0 + 8 * b, a.noc - ch0 - 8 * b, acc[b]);
}

void dw_row(const QConvRowArgs& a) {
  const FinishVecs e(a);
  for (int64_t p = 0; p < a.npix; ++p) {
    int64_t ch = 0;
    for (; ch + 32 <= a.noc; ch += 32) dw_blocks<4>(a, e, p, ch);
    for (; ch < a.noc; ch += 8) dw_blocks<1>(a, e, p, ch);
  }
  if (a.stream) _mm_sfence();
}

void conv_row(const QConvRowArgs& a) {
  const FinishVecs e(a);
  slab_row(a, e, a.w0, 0);
  if (a.w1 != nullptr) slab_row(a, e, a.w1, 16);
  if (a.stream) _mm_sfence();  // order the non-temporal stores before the caller goes on
}

}  // namespace
}  // namespace avx2_qconv

const QConvKernelTable& qconv_kernels_avx2() {
  static const QConvKernelTable table{"avx2", &avx2_qconv::quantize, &avx2_qconv::prepare_slab,
                                      &avx2_qconv::conv_row, &avx2_qconv::dw_row};
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
