// AVX-512 (F, BW, VL, DQ) vector of 16 floats. Included only inside the AVX-512 translation
// unit, after its `#pragma GCC target`; see fake_quant_isa_avx512.cpp.
#pragma once

struct Simd {
  static constexpr int kLanes = 16;
  using V = __m512;
  using M = __mmask16;

  static V set1(float a) { return _mm512_set1_ps(a); }
  static V zero() { return _mm512_setzero_ps(); }

  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V load(const BF16* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static V load(const F16* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }

  // bf16 bits (rounded to nearest even) in the low half of each 32-bit lane. No NaN special
  // case: every NaN reaching a store comes from bf16 data or float arithmetic and has a zero
  // low half, so the rounding bias cannot carry into its exponent.
  static __m512i bf16_bits(V v) {
    const __m512i b = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    return _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(b, _mm512_set1_epi32(0x7FFF)), lsb), 16);
  }
  static __m256i to_f16(V v) {
    return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }

  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static void store(BF16* p, V v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(bf16_bits(v)));
  }
  static void store(F16* p, V v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_f16(v)); }

  // Pairs of vectors (2 * kLanes elements). bf16 is widened by interleaving with zeros inside
  // each 128-bit lane and narrowed by the matching pack: two shuffles per pair each way instead
  // of four, at the price of a permuted element order inside the pair, which elementwise code
  // with one step size and offset does not see. kStream: non-temporal stores (p aligned to
  // 2 * kLanes elements) for outputs too large for the cache; fence() orders them.
  static void load2(const float* p, V& a, V& b) { a = load(p); b = load(p + kLanes); }
  static void load2(const F16* p, V& a, V& b) { a = load(p); b = load(p + kLanes); }
  static void load2(const BF16* p, V& a, V& b) {
    const __m512i h = _mm512_loadu_si512(p);
    a = _mm512_castsi512_ps(_mm512_unpacklo_epi16(_mm512_setzero_si512(), h));
    b = _mm512_castsi512_ps(_mm512_unpackhi_epi16(_mm512_setzero_si512(), h));
  }
  template <bool kStream>
  static void store2(float* p, V a, V b) {
    if (kStream) {
      _mm512_stream_ps(p, a);
      _mm512_stream_ps(p + kLanes, b);
    } else {
      store(p, a);
      store(p + kLanes, b);
    }
  }
  template <bool kStream>
  static void store2(BF16* p, V a, V b) {
    put<kStream>(p, _mm512_packus_epi32(bf16_bits(a), bf16_bits(b)));
  }
  template <bool kStream>
  static void store2(F16* p, V a, V b) {
    put<kStream>(p, _mm512_inserti64x4(_mm512_castsi256_si512(to_f16(a)), to_f16(b), 1));
  }
  template <bool kStream, typename T>
  static void put(T* p, __m512i bits) {
    if (kStream) _mm512_stream_si512(reinterpret_cast<__m512i*>(p), bits);
    else _mm512_storeu_si512(p, bits);
  }
  static void fence() { _mm_sfence(); }

  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V div(V a, V b) { return _mm512_div_ps(a, b); }
  static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V round(V a) {
    return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  // max/min return their second operand when either is NaN: keep r second so NaN survives.
  static V clamp(V r, V lo, V hi) { return _mm512_min_ps(hi, _mm512_max_ps(lo, r)); }
  static M changed(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_NEQ_OQ); }
  static V add_where(M m, V acc, V a) { return _mm512_mask_add_ps(acc, m, acc, a); }
  static V select(M m, V if_true, V if_false) { return _mm512_mask_blend_ps(m, if_false, if_true); }
  static float sum(V a) { return _mm512_reduce_add_ps(a); }
};
