// AVX2 instance of the packing kernels; compiled for x86-64 only, used only when the CPU
// reports AVX2, FMA and F16C (see cpu/cpu_capability.cpp).
#if defined(__x86_64__) || defined(_M_X64)

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "common/quant_math.h"
#include "isa/packing_table.h"

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif

#include "isa/counter_hash_simd.h"

namespace oqfl {
namespace cpu {
namespace avx2 {
namespace {
// The kernels, 8 float lanes: the same arithmetic as packing_isa_avx512.cpp (see there), with
// masks as vectors. Tails go through zero-padded stack buffers and the same vector code.

// The lane operations of counter_bits24_lanes (isa/counter_hash_simd.h).
struct CounterOps {
  using V = __m256i;
  static V add(V a, V b) { return _mm256_add_epi32(a, b); }
  static V xorshift(V h, int n) { return _mm256_xor_si256(h, _mm256_srli_epi32(h, n)); }
  static V mul(V h, uint32_t m) { return _mm256_mullo_epi32(h, _mm256_set1_epi32(static_cast<int>(m))); }
  static V srl(V h, int n) { return _mm256_srli_epi32(h, n); }
};

inline __m256 load_x(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load_x(const BF16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline __m256 load_x(const F16* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// Step sizes and offsets of consecutive runs of up to 8 elements.
struct StepWalk {
  const float* s;
  const float* z;
  int64_t channels, inner, c, k;
  StepWalk(const PackingSteps& st, int64_t first)
      : s(st.s), z(st.z), channels(st.channels), inner(st.inner),
        c((first / st.inner) % st.channels), k(first % st.inner) {}

  // The n (1..8) next elements' step sizes / offsets (padding lanes: 1 / 0); advances.
  void next(int64_t n, __m256& vs, __m256& vz) {
    if (n == 8 && k + 8 <= inner) {
      vs = _mm256_set1_ps(s[c]);
      vz = z ? _mm256_set1_ps(z[c]) : _mm256_setzero_ps();
      k += 8;
      if (k == inner) {
        k = 0;
        if (++c == channels) c = 0;
      }
      return;
    }
    if (n == 8 && inner == 1 && c + 8 <= channels) {
      vs = _mm256_loadu_ps(s + c);
      vz = z ? _mm256_loadu_ps(z + c) : _mm256_setzero_ps();
      c += 8;
      if (c == channels) c = 0;
      return;
    }
    alignas(32) float sb[8], zb[8];
    for (int l = 0; l < 8; ++l) {
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
    vs = _mm256_load_ps(sb);
    vz = _mm256_load_ps(zb);
  }
};

// 8 codes (int32 lanes) of x; kStochastic: `low` holds the elements' index low halves, add/mid
// the counter key of their block.
template <bool kStochastic, bool kOffset>
inline __m256i codes8(__m256 x, __m256 vs, __m256 vz, __m256 lo, __m256 hi, __m256i low,
                      __m256i add, __m256i mid) {
  __m256 v = _mm256_div_ps(x, vs);
  if (kOffset) v = _mm256_add_ps(v, vz);
  __m256 r;
  if (kStochastic) {
    const __m256 f = _mm256_round_ps(v, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    // k < ceil(v * 2^24) - floor(v) * 2^24: round_stochastic's comparison, in float (see
    // packing_isa_avx512.cpp)
    const __m256 two24 = _mm256_set1_ps(16777216.f);
    const __m256 t = _mm256_sub_ps(
        _mm256_round_ps(_mm256_mul_ps(v, two24), _MM_FROUND_TO_POS_INF | _MM_FROUND_NO_EXC),
        _mm256_mul_ps(f, two24));
    const __m256 k = _mm256_cvtepi32_ps(counter_bits24_lanes<CounterOps>(low, add, mid));
    const __m256 m = _mm256_cmp_ps(k, t, _CMP_LT_OQ);
    r = _mm256_blendv_ps(f, _mm256_add_ps(f, _mm256_set1_ps(1.f)), m);
  } else {
    r = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  // max/min return their second operand when either is NaN: r second, so NaN survives.
  const __m256 q = _mm256_min_ps(hi, _mm256_max_ps(lo, r));
  return _mm256_and_si256(_mm256_cvttps_epi32(q),
                          _mm256_castps_si256(_mm256_cmp_ps(q, q, _CMP_ORD_Q)));
}

// 8 int32 codes -> 8 bytes (int8) in the low 64 bits.
inline __m128i pack_int8_8(__m256i c) {
  const __m256i idx = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                       0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
  const __m256i t = _mm256_shuffle_epi8(c, idx);
  return _mm_unpacklo_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
}

// 8 int32 codes -> 4 bytes of int4 pairs in the low 32 bits.
inline __m128i pack_int4_8(__m256i c) {
  const __m256i t = _mm256_and_si256(c, _mm256_set1_epi32(0xF));
  const __m256i b = _mm256_or_si256(t, _mm256_srli_epi64(t, 28));
  const __m256i idx = _mm256_setr_epi8(0, 8, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                       0, 8, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
  const __m256i g = _mm256_shuffle_epi8(b, idx);
  return _mm_unpacklo_epi16(_mm256_castsi256_si128(g), _mm256_extracti128_si256(g, 1));
}

// Elements [i0, i1) of one block of 2^32 indices (see for_each_counter_block), `key` its
// counter key.
template <int kBits, bool kStochastic, bool kOffset, typename T>
void quantize_pack_run(const T* x, uint8_t* out, int64_t i0, int64_t i1, const PackingSteps& st,
                       float qmin, float qmax, CounterKey key) {
  const __m256 lo = _mm256_set1_ps(qmin), hi = _mm256_set1_ps(qmax);
  const __m256i add = _mm256_set1_epi32(static_cast<int>(key.add));
  const __m256i mid = _mm256_set1_epi32(static_cast<int>(key.mid));
  const __m256i eight = _mm256_set1_epi32(8);
  __m256i low = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(i0))),
                                 _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  StepWalk w(st, i0);
  __m256 vs, vz;
  int64_t i = i0;
  uint8_t* o = out;
  for (; i + 8 <= i1; i += 8, low = _mm256_add_epi32(low, eight)) {
    w.next(8, vs, vz);
    const __m256i c = codes8<kStochastic, kOffset>(load_x(x + i), vs, vz, lo, hi, low, add, mid);
    if (kBits == 8) {
      _mm_storel_epi64(reinterpret_cast<__m128i*>(o), pack_int8_8(c));
      o += 8;
    } else {
      const int32_t b = _mm_cvtsi128_si32(pack_int4_8(c));
      std::memcpy(o, &b, 4);
      o += 4;
    }
  }
  if (i < i1) {
    const int64_t n = i1 - i;
    T xb[8] = {};
    std::memcpy(xb, x + i, n * sizeof(T));
    w.next(n, vs, vz);
    const __m256i c = codes8<kStochastic, kOffset>(load_x(xb), vs, vz, lo, hi, low, add, mid);
    alignas(16) uint8_t ob[16];
    _mm_storeu_si128(reinterpret_cast<__m128i*>(ob), kBits == 8 ? pack_int8_8(c) : pack_int4_8(c));
    std::memcpy(o, ob, kBits == 8 ? n : (n + 1) / 2);
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

// 8 signed codes from the bytes at p (8 bytes for int8, 4 for int4) as int32 lanes.
template <int kBits>
inline __m256i load_codes8(const uint8_t* p) {
  if (kBits == 8)
    return _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  int32_t b;
  std::memcpy(&b, p, 4);
  const __m256i e = _mm256_cvtepu8_epi64(_mm_cvtsi32_si128(b));
  const __m256i t = _mm256_or_si256(e, _mm256_slli_epi64(e, 28));  // high nibble -> odd lane
  return _mm256_srai_epi32(_mm256_slli_epi32(t, 28), 28);           // sign-extend each nibble
}

template <int kBits, bool kOffset>
void unpack_dequantize_run(const uint8_t* in, float* y, int64_t i0, int64_t i1,
                           const PackingSteps& st) {
  StepWalk w(st, i0);
  __m256 vs, vz;
  int64_t i = i0;
  const auto byte_of = [](int64_t e) { return kBits == 8 ? e : e / 2; };
  for (; i + 8 <= i1; i += 8) {
    w.next(8, vs, vz);
    __m256 q = _mm256_cvtepi32_ps(load_codes8<kBits>(in + byte_of(i)));
    if (kOffset) q = _mm256_sub_ps(q, vz);
    _mm256_storeu_ps(y + i, _mm256_mul_ps(q, vs));
  }
  if (i < i1) {
    const int64_t n = i1 - i;
    uint8_t ib[8] = {};
    std::memcpy(ib, in + byte_of(i), kBits == 8 ? n : (n + 1) / 2);
    w.next(n, vs, vz);
    __m256 q = _mm256_cvtepi32_ps(load_codes8<kBits>(ib));
    if (kOffset) q = _mm256_sub_ps(q, vz);
    alignas(32) float yb[8];
    _mm256_store_ps(yb, _mm256_mul_ps(q, vs));
    std::memcpy(y + i, yb, n * sizeof(float));
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
}  // namespace avx2

const PackingKernelTable& packing_kernels_avx2() { return avx2::table("avx2"); }

}  // namespace cpu
}  // namespace oqfl

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#endif
