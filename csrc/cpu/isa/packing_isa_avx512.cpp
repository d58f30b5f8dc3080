// AVX-512 instance of the packing kernels; compiled for x86-64 only, used only when the CPU
// reports AVX-512 F/BW/VL/DQ (see cpu/cpu_capability.cpp).
#if defined(__x86_64__) || defined(_M_X64)

#include <immintrin.h>

#include <cstdint>

#include "common/quant_math.h"
#include "isa/packing_table.h"

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#endif

#include "isa/counter_hash_simd.h"

namespace oqfl {
namespace cpu {
namespace avx512 {
namespace {
// The kernels, 16 float lanes, bit for bit the scalar math of common/quant_math.h:
//
//  - v = x / s + z with a real division (vdivps is correctly rounded like the scalar `/`);
//  - half-even rounding: vrndscaleps to nearest (= rintf); clamp with max/min ordered so that a
//    NaN passes through, then NaN -> code 0 (code_to_int);
//  - stochastic rounding: floor(v) + 1 where u < v - floor(v) (round_stochastic, which takes
//    the difference in double), u = k * 2^-24 with k = counter_bits24 of the element (32-bit
//    lanes, the counter key once per block of 2^32 indices). For integer k that is
//    k < ceil((v - f) * 2^24) = ceil(v * 2^24) - f * 2^24 (f = floor(v)), which float lanes
//    give exactly: scaling by 2^24 is exact; for |v| < 1 both terms are integers of magnitude
//    <= 2^24; for |v| >= 1, v * 2^24 is an integer and the difference, frac(v) * 2^24 with
//    frac(v) a multiple of ulp(v) >= 2^-23, fits 24 bits. v = +-inf, NaN, or |v| >= 2^104
//    (v * 2^24 overflows; v is an integer) give NaN or 0: no rounding up, as in double.
//
// Elements are processed in flattened order, 16 at a time; each vector gets its 16 step sizes
// from a channel walk (one broadcast when the 16 share a channel, a load when inner == 1, else
// lane by lane), so rows of any length and int4 bytes straddling rows need no special case.
// Tails go through masked loads/stores with padding lanes x = 0, s = 1, z = 0 (code 0, which is
// also the high nibble of an odd int4 tail).

// The lane operations of counter_bits24_lanes (isa/counter_hash_simd.h).
struct CounterOps {
  using V = __m512i;
  static V add(V a, V b) { return _mm512_add_epi32(a, b); }
  static V xorshift(V h, int n) { return _mm512_xor_si512(h, _mm512_srli_epi32(h, n)); }
  static V mul(V h, uint32_t m) { return _mm512_mullo_epi32(h, _mm512_set1_epi32(static_cast<int>(m))); }
  static V srl(V h, int n) { return _mm512_srli_epi32(h, n); }
};

inline __m512 load_x(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load_x(const BF16* p, __mmask16 m) {
  const __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load_x(const F16* p, __mmask16 m) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
}
inline __m512 load_x(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load_x(const BF16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load_x(const F16* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

inline __mmask16 lanes_mask(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1u);
}

// Step sizes and offsets of consecutive runs of up to 16 elements.
struct StepWalk {
  const float* s;
  const float* z;
  int64_t channels, inner, c, k;  // channel of the next element, and its place in its run
  StepWalk(const PackingSteps& st, int64_t first)
      : s(st.s), z(st.z), channels(st.channels), inner(st.inner),
        c((first / st.inner) % st.channels), k(first % st.inner) {}

  // The n (1..16) next elements' step sizes / offsets (padding lanes: 1 / 0); advances.
  void next(int64_t n, __m512& vs, __m512& vz) {
    if (k + n <= inner) {  // one channel
      vs = _mm512_set1_ps(s[c]);
      vz = z ? _mm512_set1_ps(z[c]) : _mm512_setzero_ps();
      if (n < 16) {
        const __mmask16 m = lanes_mask(n);
        vs = _mm512_mask_blend_ps(m, _mm512_set1_ps(1.f), vs);
        vz = _mm512_maskz_mov_ps(m, vz);
      }
      k += n;
      if (k == inner) {
        k = 0;
        if (++c == channels) c = 0;
      }
      return;
    }
    if (inner == 1 && c + n <= channels) {  // one channel per element, contiguous
      const __mmask16 m = lanes_mask(n);
      vs = _mm512_mask_loadu_ps(_mm512_set1_ps(1.f), m, s + c);
      vz = z ? _mm512_maskz_loadu_ps(m, z + c) : _mm512_setzero_ps();
      c += n;
      if (c == channels) c = 0;
      return;
    }
    alignas(64) float sb[16], zb[16];
    for (int l = 0; l < 16; ++l) {
      sb[l] = 1.f;
      zb[l] = 0.f;
    }
    for (int64_t l = 0; l < n; ++l) {
      sb[l] = s[c];
      zb[l] = z ? z[c] : 0.f;
      if (++k == inner) {
        k = 0;
        if (++c == channels) c = 0;
      }
    }
    vs = _mm512_load_ps(sb);
    vz = _mm512_load_ps(zb);
  }
};

// 16 codes (int32 lanes) of x. kStochastic: `low` holds the elements' index low halves, add/mid
// the counter key of their block.
template <bool kStochastic, bool kOffset>
inline __m512i codes16(__m512 x, __m512 vs, __m512 vz, __m512 lo, __m512 hi, __m512i low,
                       __m512i add, __m512i mid) {
  __m512 v = _mm512_div_ps(x, vs);
  if (kOffset) v = _mm512_add_ps(v, vz);
  __m512 r;
  if (kStochastic) {
    const __m512 f = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    const __m512 two24 = _mm512_set1_ps(16777216.f);
    const __m512 t = _mm512_sub_ps(
        _mm512_roundscale_ps(_mm512_mul_ps(v, two24), _MM_FROUND_TO_POS_INF | _MM_FROUND_NO_EXC),
        _mm512_mul_ps(f, two24));
    const __m512 k = _mm512_cvtepi32_ps(counter_bits24_lanes<CounterOps>(low, add, mid));
    const __mmask16 up = _mm512_cmp_ps_mask(k, t, _CMP_LT_OQ);
    r = _mm512_mask_add_ps(f, up, f, _mm512_set1_ps(1.f));
  } else {
    r = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  // max/min return their second operand when either is NaN: r second, so NaN survives.
  const __m512 q = _mm512_min_ps(hi, _mm512_max_ps(lo, r));
  return _mm512_maskz_cvttps_epi32(_mm512_cmp_ps_mask(q, q, _CMP_ORD_Q), q);
}

// 16 int32 codes -> 8 bytes of int4 pairs (low nibble: even element) in the low 64 bits.
inline __m128i pack_int4_16(__m512i codes) {
  const __m512i t = _mm512_and_si512(codes, _mm512_set1_epi32(0xF));
  return _mm512_cvtepi64_epi8(_mm512_or_si512(t, _mm512_srli_epi64(t, 28)));
}

// Elements [i0, i1) of one block of 2^32 indices (see for_each_counter_block), `key` its
// counter key.
template <int kBits, bool kStochastic, bool kOffset, typename T>
void quantize_pack_run(const T* x, uint8_t* out, int64_t i0, int64_t i1, const PackingSteps& st,
                       float qmin, float qmax, CounterKey key) {
  const __m512 lo = _mm512_set1_ps(qmin), hi = _mm512_set1_ps(qmax);
  const __m512i add = _mm512_set1_epi32(static_cast<int>(key.add));
  const __m512i mid = _mm512_set1_epi32(static_cast<int>(key.mid));
  const __m512i sixteen = _mm512_set1_epi32(16);
  __m512i low = _mm512_add_epi32(
      _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(i0))),
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  StepWalk w(st, i0);
  __m512 vs, vz;
  int64_t i = i0;
  uint8_t* o = out;
  for (; i + 16 <= i1; i += 16, low = _mm512_add_epi32(low, sixteen)) {
    w.next(16, vs, vz);
    const __m512i c = codes16<kStochastic, kOffset>(load_x(x + i), vs, vz, lo, hi, low, add, mid);
    if (kBits == 8) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(o), _mm512_cvtepi32_epi8(c));
      o += 16;
    } else {
      _mm_storel_epi64(reinterpret_cast<__m128i*>(o), pack_int4_16(c));
      o += 8;
    }
  }
  if (i < i1) {
    const int64_t n = i1 - i;
    const __mmask16 m = lanes_mask(n);
    w.next(n, vs, vz);
    const __m512i c = codes16<kStochastic, kOffset>(load_x(x + i, m), vs, vz, lo, hi, low, add, mid);
    if (kBits == 8) {
      _mm_mask_storeu_epi8(o, m, _mm512_cvtepi32_epi8(c));
    } else {
      _mm_mask_storeu_epi8(o, lanes_mask((n + 1) / 2), pack_int4_16(c));
    }
  }
}

template <typename T>
void quantize_pack(const T* x, uint8_t* out, int64_t i0, int64_t i1, int bits,
                   const PackingSteps& st, float qmin, float qmax, bool stochastic,
                   uint64_t seed) {
  quantize_pack_variants(out, i0, i1, bits, st.z != nullptr, stochastic, seed,
                         [&](auto variant, uint8_t* o, int64_t a, int64_t b, CounterKey key) {
    using V = decltype(variant);
    quantize_pack_run<V::bits, V::stochastic, V::offset>(x, o, a, b, st, qmin, qmax, key);
  });
}

// 16 signed codes of elements i.. (i even for int4) as int32 lanes; m: the lanes to read.
template <int kBits>
inline __m512i load_codes16(const uint8_t* in, int64_t i, __mmask16 m) {
  if (kBits == 8) return _mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, in + i));
  const __m512i e = _mm512_cvtepu8_epi64(_mm_maskz_loadu_epi8(m, in + i / 2));
  const __m512i t = _mm512_or_si512(e, _mm512_slli_epi64(e, 28));  // high nibble -> odd lane
  return _mm512_srai_epi32(_mm512_slli_epi32(t, 28), 28);           // sign-extend each nibble
}

template <int kBits, bool kOffset>
void unpack_dequantize_run(const uint8_t* in, float* y, int64_t i0, int64_t i1,
                           const PackingSteps& st) {
  StepWalk w(st, i0);
  __m512 vs, vz;
  const __mmask16 full = kBits == 8 ? 0xFFFF : 0xFF;
  int64_t i = i0;
  for (; i + 16 <= i1; i += 16) {
    w.next(16, vs, vz);
    __m512 q = _mm512_cvtepi32_ps(load_codes16<kBits>(in, i, full));
    if (kOffset) q = _mm512_sub_ps(q, vz);
    _mm512_storeu_ps(y + i, _mm512_mul_ps(q, vs));
  }
  if (i < i1) {
    const int64_t n = i1 - i;
    w.next(n, vs, vz);
    __m512 q = _mm512_cvtepi32_ps(
        load_codes16<kBits>(in, i, lanes_mask(kBits == 8 ? n : (n + 1) / 2)));
    if (kOffset) q = _mm512_sub_ps(q, vz);
    _mm512_mask_storeu_ps(y + i, lanes_mask(n), _mm512_mul_ps(q, vs));
  }
}

void unpack_dequantize(const uint8_t* in, float* y, int64_t i0, int64_t i1, int bits,
                       const PackingSteps& st) {
  if (bits == 4) {
    if (st.z) unpack_dequantize_run<4, true>(in, y, i0, i1, st);
    else unpack_dequantize_run<4, false>(in, y, i0, i1, st);
  } else {
    if (st.z) unpack_dequantize_run<8, true>(in, y, i0, i1, st);
    else unpack_dequantize_run<8, false>(in, y, i0, i1, st);
  }
}

inline const PackingKernelTable& table(const char* name) {
  static const PackingKernelTable t{name, {&quantize_pack<float>}, {&quantize_pack<BF16>},
                                    {&quantize_pack<F16>}, &unpack_dequantize};
  return t;
}
}  // namespace
}  // namespace avx512

const PackingKernelTable& packing_kernels_avx512() { return avx512::table("avx512"); }

}  // namespace cpu
}  // namespace oqfl

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#endif
