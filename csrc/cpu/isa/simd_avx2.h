// AVX2 + FMA + F16C vector of 8 floats. Included only inside the AVX2 translation unit, after
// its `#pragma GCC target`; see fake_quant_isa_avx2.cpp.
#pragma once

struct Simd {
  static constexpr int kLanes = 8;
  using V = __m256;
  using M = __m256;  // all-ones lanes where true

  static V set1(float a) { return _mm256_set1_ps(a); }
  static V zero() { return _mm256_setzero_ps(); }

  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V load(const BF16* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static V load(const F16* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }

  // bf16 bits (rounded to nearest even) in the low half of each 32-bit lane; no NaN special
  // case, see simd_avx512.h.
  static __m256i bf16_bits(V v) {
    const __m256i b = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
    return _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(b, _mm256_set1_epi32(0x7FFF)), lsb), 16);
  }
  static __m128i to_f16(V v) {
    return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }

  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static void store(BF16* p, V v) {
    // packus works per 128-bit half: pack, then gather the two useful quarters.
    const __m256i r = bf16_bits(v);
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
  }
  static void store(F16* p, V v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), to_f16(v)); }

  // Pairs of vectors, as in simd_avx512.h (bf16 interleaved with zeros per 128-bit lane).
  static void load2(const float* p, V& a, V& b) { a = load(p); b = load(p + kLanes); }
  static void load2(const F16* p, V& a, V& b) { a = load(p); b = load(p + kLanes); }
  static void load2(const BF16* p, V& a, V& b) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    a = _mm256_castsi256_ps(_mm256_unpacklo_epi16(_mm256_setzero_si256(), h));
    b = _mm256_castsi256_ps(_mm256_unpackhi_epi16(_mm256_setzero_si256(), h));
  }
  template <bool kStream>
  static void store2(float* p, V a, V b) {
    if (kStream) {
      _mm256_stream_ps(p, a);
      _mm256_stream_ps(p + kLanes, b);
    } else {
      store(p, a);
      store(p + kLanes, b);
    }
  }
  template <bool kStream>
  static void store2(BF16* p, V a, V b) {
    put<kStream>(p, _mm256_packus_epi32(bf16_bits(a), bf16_bits(b)));
  }
  template <bool kStream>
  static void store2(F16* p, V a, V b) {
    put<kStream>(p, _mm256_set_m128i(to_f16(b), to_f16(a)));
  }
  template <bool kStream, typename T>
  static void put(T* p, __m256i bits) {
    if (kStream) _mm256_stream_si256(reinterpret_cast<__m256i*>(p), bits);
    else _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), bits);
  }
  static void fence() { _mm_sfence(); }

  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V div(V a, V b) { return _mm256_div_ps(a, b); }
  static V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V round(V a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  // max/min return their second operand when either is NaN: keep r second so NaN survives.
  static V clamp(V r, V lo, V hi) { return _mm256_min_ps(hi, _mm256_max_ps(lo, r)); }
  static M changed(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_NEQ_OQ); }
  static V add_where(M m, V acc, V a) { return _mm256_add_ps(acc, _mm256_and_ps(m, a)); }
  static V select(M m, V if_true, V if_false) { return _mm256_blendv_ps(if_false, if_true, m); }
  static float sum(V a) {
    const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    return _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));
  }
};
