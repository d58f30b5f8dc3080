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

  // Round to nearest even on the upper 16 bits; NaN becomes the canonical quiet NaN.
  static __m256i to_bf16(V v) {
    const __m512i b = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(_mm512_add_epi32(b, _mm512_set1_epi32(0x7FFF)), lsb);
    r = _mm512_srli_epi32(r, 16);
    r = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), r,
                                _mm512_set1_epi32(0x7FC0));
    return _mm512_cvtepi32_epi16(r);
  }
  static __m256i to_f16(V v) {
    return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }

  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static void store(BF16* p, V v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_bf16(v)); }
  static void store(F16* p, V v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_f16(v)); }

  // Non-temporal stores (p aligned to one vector) for outputs too large to stay in cache: they
  // skip reading the destination first. fence() orders them before the data is shared.
  static void stream(float* p, V v) { _mm512_stream_ps(p, v); }
  static void stream(BF16* p, V v) { _mm256_stream_si256(reinterpret_cast<__m256i*>(p), to_bf16(v)); }
  static void stream(F16* p, V v) { _mm256_stream_si256(reinterpret_cast<__m256i*>(p), to_f16(v)); }
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
