// counter_bits24 of common/quant_math.h for a vector of indices, written once for the SIMD
// packing kernels: `Ops` supplies the lane operations of its instruction set (V: 32-bit integer
// lanes; add, xorshift = h ^ (h >> n), mul by a constant, srl). Included only inside a SIMD
// translation unit, after its target pragma (the operations inline into it).
#pragma once

#include <cstdint>

#include "common/quant_math.h"

namespace oqfl {
namespace cpu {

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

}  // namespace cpu
}  // namespace oqfl
