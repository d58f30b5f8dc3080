// Portable one-lane "vector": the fallback path for CPUs without AVX2 (and non-x86 CPUs).
// Same arithmetic, in the same order, as the wide paths, so results agree bit for bit.
#pragma once

struct Simd {
  static constexpr int kLanes = 1;
  using V = float;
  using M = bool;

  static V set1(float a) { return a; }
  static V zero() { return 0.f; }

  static V load(const float* p) { return *p; }
  static V load(const BF16* p) {
    const uint32_t bits = static_cast<uint32_t>(p->bits) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
  }
  static V load(const F16* p) { return c10::detail::fp16_ieee_to_fp32_value(p->bits); }

  static void store(float* p, V v) { *p = v; }
  static void store(BF16* p, V v) {
    if (std::isnan(v)) {
      p->bits = 0x7FC0;
      return;
    }
    uint32_t b;
    std::memcpy(&b, &v, sizeof b);
    p->bits = static_cast<uint16_t>((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
  }
  static void store(F16* p, V v) { p->bits = c10::detail::fp16_ieee_from_fp32_value(v); }

  // Pairs, as on the wide paths (no reordering, no non-temporal stores here).
  template <typename T>
  static void load2(const T* p, V& a, V& b) { a = load(p); b = load(p + 1); }
  template <bool kStream, typename T>
  static void store2(T* p, V a, V b) {
    store(p, a);
    store(p + 1, b);
  }
  static void fence() {}

  static V add(V a, V b) { return a + b; }
  static V sub(V a, V b) { return a - b; }
  static V mul(V a, V b) { return a * b; }
  static V div(V a, V b) { return a / b; }
  static V fmadd(V a, V b, V c) { return a * b + c; }
  static V round(V a) { return round_half_even(a); }
  static V clamp(V r, V lo, V hi) { return clamp_code(r, lo, hi); }
  static M changed(V a, V b) { return a < b || a > b; }  // false for NaN, like _CMP_NEQ_OQ
  static V add_where(M m, V acc, V a) { return m ? acc + a : acc; }
  static V select(M m, V if_true, V if_false) { return m ? if_true : if_false; }
  static float sum(V a) { return a; }
};
