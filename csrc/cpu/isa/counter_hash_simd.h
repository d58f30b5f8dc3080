// What the SIMD quantize_pack kernels share, written once: counter_bits24 of
// common/quant_math.h for a vector of indices, and the choice of a kernel's variant. Included
// only inside a SIMD translation unit, after its target pragma (everything inlines into it).
#pragma once

#include <cstdint>

#include "common/quant_math.h"
#include "isa/packing_table.h"

namespace oqfl {
namespace cpu {

// `Ops` supplies the lane operations of its instruction set (V: 32-bit integer lanes; add,
// xorshift = h ^ (h >> n), mul by a constant, srl).
template <class Ops>
inline typename Ops::V counter_bits24_lanes(typename Ops::V low, typename Ops::V add,
                                            typename Ops::V mid) {
  typename Ops::V h = Ops::add(low, add);
  h = Ops::mul(Ops::xorshift(h, 16), kFmix32Mul1);
  h = Ops::mul(Ops::xorshift(h, 13), kFmix32Mul2);
  h = Ops::add(Ops::xorshift(h, 16), mid);
  h = Ops::mul(Ops::xorshift(h, 16), kLowbias32Mul1);
  h = Ops::mul(Ops::xorshift(h, 15), kLowbias32Mul2);
  return Ops::srl(Ops::xorshift(h, 16), 8);
}

// A kernel variant's compile-time flags: code bits, stochastic rounding, zero points.
template <int kBits, bool kStochastic, bool kOffset>
struct PackVariant {
  static constexpr int bits = kBits;
  static constexpr bool stochastic = kStochastic, offset = kOffset;
};

template <int kBits, bool kOffset, class Run>
inline void quantize_pack_blocks(uint8_t* out, int64_t i0, int64_t i1, bool stochastic,
                                 uint64_t seed, const Run& run) {
  if (!stochastic) {
    run(PackVariant<kBits, false, kOffset>{}, out, i0, i1, CounterKey{});
    return;
  }
  const uint64_t key = splitmix64(seed);
  for_each_counter_block(i0, i1, [&](int64_t a, int64_t b, uint32_t high) {
    run(PackVariant<kBits, true, kOffset>{}, out + (kBits == 8 ? a - i0 : (a - i0) / 2), a, b,
        counter_key_of(key, high));
  });
}

// Runs elements [i0, i1) (codes from `out`) through the variant of `bits`, `offset` and
// `stochastic`: run(PackVariant<...>{}, out, a, b, key), once, or for stochastic rounding once
// per block of 2^32 indices with that block's counter key (for_each_counter_block).
template <class Run>
inline void quantize_pack_variants(uint8_t* out, int64_t i0, int64_t i1, int bits, bool offset,
                                   bool stochastic, uint64_t seed, const Run& run) {
  if (bits == 4) {
    if (offset) quantize_pack_blocks<4, true>(out, i0, i1, stochastic, seed, run);
    else quantize_pack_blocks<4, false>(out, i0, i1, stochastic, seed, run);
  } else {
    if (offset) quantize_pack_blocks<8, true>(out, i0, i1, stochastic, seed, run);
    else quantize_pack_blocks<8, false>(out, i0, i1, stochastic, seed, run);
  }
}

}  // namespace cpu
}  // namespace oqfl
