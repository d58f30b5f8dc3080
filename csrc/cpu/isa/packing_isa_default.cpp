// Portable instance of the packing kernels (scalar, no target pragma): the fallback on CPUs
// without AVX-512 and the reference the vectorized instances must equal bit for bit. It is the
// scalar math of common/quant_math.h and the layout of common/bitpack.h, element by element.
#include <cstdint>
#include <vector>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "common/bitpack.h"
#include "common/quant_math.h"
#include "isa/packing_table.h"

namespace oqfl {
namespace cpu {
namespace portable {
namespace {

inline float to_float(float v) { return v; }
inline float to_float(BF16 v) { return static_cast<float>(c10::BFloat16(v.bits, c10::BFloat16::from_bits())); }
inline float to_float(F16 v) { return static_cast<float>(c10::Half(v.bits, c10::Half::from_bits())); }

// Channel of each element, walked incrementally over consecutive elements.
struct ChannelWalk {
  int64_t channels, inner, c, k;
  ChannelWalk(const PackingSteps& st, int64_t first)
      : channels(st.channels), inner(st.inner), c((first / st.inner) % st.channels),
        k(first % st.inner) {}
  void next() {
    if (++k == inner) {
      k = 0;
      if (++c == channels) c = 0;
    }
  }
};

template <typename T>
void quantize_pack(const T* x, uint8_t* out, int64_t i0, int64_t i1, int bits,
                   const PackingSteps& st, float qmin, float qmax, bool stochastic,
                   uint64_t seed) {
  // Codes first (a walk over channels), then the bytes.
  std::vector<int32_t> codes(i1 - i0 + 1, 0);  // + 1: the padding of an odd int4 tail
  ChannelWalk w(st, i0);
  for (int64_t i = i0; i < i1; ++i, w.next())
    codes[i - i0] = quantize_code(to_float(x[i]), st.s[w.c], st.z ? st.z[w.c] : 0.f, qmin, qmax,
                                  stochastic, seed, static_cast<uint64_t>(i));
  const int32_t* c = codes.data();
  const int64_t bytes = packed_bytes(i1 - i0, bits);
  for (int64_t j = 0; j < bytes; ++j)
    out[j] = pack_byte(j, i1 - i0, bits, [c](int64_t i) { return c[i]; });
}

void unpack_dequantize(const uint8_t* in, float* y, int64_t i0, int64_t i1, int bits,
                       const PackingSteps& st) {
  ChannelWalk w(st, i0);
  for (int64_t i = i0; i < i1; ++i, w.next())
    y[i] = dequantize_code(unpack_code(in, i, bits, true), st.s[w.c], st.z ? st.z[w.c] : 0.f);
}

}  // namespace
}  // namespace portable

const PackingKernelTable& packing_kernels_default() {
  static const PackingKernelTable t{"default",
                                    {&portable::quantize_pack<float>},
                                    {&portable::quantize_pack<BF16>},
                                    {&portable::quantize_pack<F16>},
                                    &portable::unpack_dequantize};
  return t;
}

}  // namespace cpu
}  // namespace oqfl
