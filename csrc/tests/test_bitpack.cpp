// Unit tests of the torch-free int4/int8 packing helpers (csrc/common/bitpack.h): the documented
// golden bytes, every nibble value, round trips and the odd-tail padding. Run by ctest.
#include <cstdint>
#include <cstdio>
#include <vector>

#include "tests/expect.h"
#include "common/bitpack.h"

namespace {

std::vector<uint8_t> pack_all(const std::vector<int32_t>& codes, int bits) {
  const int64_t n = static_cast<int64_t>(codes.size());
  std::vector<uint8_t> out(oqfl::packed_bytes(n, bits));
  for (int64_t j = 0; j < static_cast<int64_t>(out.size()); ++j)
    out[j] = oqfl::pack_byte(j, n, bits, [&](int64_t i) { return codes[i]; });
  return out;
}

void test_golden() {
  // The example of bitpack.h and docs/DESIGN.md section 3.
  EXPECT((pack_all({1, -2, 7, -8, 3}, 4) == std::vector<uint8_t>{0xE1, 0x87, 0x03}));
  EXPECT((pack_all({0, 15, 10}, 4) == std::vector<uint8_t>{0xF0, 0x0A}));
  EXPECT((pack_all({-1, 0, 127, -128}, 8) == std::vector<uint8_t>{0xFF, 0x00, 0x7F, 0x80}));
  EXPECT(oqfl::packed_bytes(0, 4) == 0 && oqfl::packed_bytes(1, 4) == 1);
  EXPECT(oqfl::packed_bytes(5, 4) == 3 && oqfl::packed_bytes(5, 8) == 5);
}

void test_ranges() {
  EXPECT(oqfl::code_min(4, true) == -8 && oqfl::code_max(4, true) == 7);
  EXPECT(oqfl::code_min(4, false) == 0 && oqfl::code_max(4, false) == 15);
  EXPECT(oqfl::code_min(8, true) == -128 && oqfl::code_max(8, true) == 127);
  EXPECT(oqfl::code_min(8, false) == 0 && oqfl::code_max(8, false) == 255);
  EXPECT(oqfl::code_fits(-8, 4, true) && !oqfl::code_fits(-9, 4, true) && !oqfl::code_fits(8, 4, true));
  EXPECT(oqfl::code_fits(15, 4, false) && !oqfl::code_fits(16, 4, false) && !oqfl::code_fits(-1, 4, false));
}

void test_every_int4_pair() {
  for (int is_signed = 0; is_signed < 2; ++is_signed) {
    const int lo0 = oqfl::code_min(4, is_signed), hi0 = oqfl::code_max(4, is_signed);
    for (int a = lo0; a <= hi0; ++a)
      for (int b = lo0; b <= hi0; ++b) {
        const uint8_t byte = oqfl::pack_int4(a, b);
        EXPECT((byte & 0xF) == (a & 0xF) && (byte >> 4) == (b & 0xF));
        EXPECT(oqfl::unpack_int4(byte, 0, is_signed) == a);
        EXPECT(oqfl::unpack_int4(byte, 1, is_signed) == b);
      }
  }
}

void test_every_int8() {
  for (int v = -128; v <= 127; ++v) EXPECT(oqfl::unpack_int8(oqfl::pack_int8(v), true) == v);
  for (int v = 0; v <= 255; ++v) EXPECT(oqfl::unpack_int8(oqfl::pack_int8(v), false) == v);
}

void test_round_trip_odd_lengths() {
  for (int n = 0; n <= 9; ++n) {
    std::vector<int32_t> codes(n);
    for (int i = 0; i < n; ++i) codes[i] = (i * 5 + 3) % 16 - 8;
    for (int bits : {4, 8}) {
      const std::vector<uint8_t> bytes = pack_all(codes, bits);
      EXPECT(static_cast<int64_t>(bytes.size()) == oqfl::packed_bytes(n, bits));
      for (int i = 0; i < n; ++i) EXPECT(oqfl::unpack_code(bytes.data(), i, bits, true) == codes[i]);
      if (bits == 4 && n % 2 == 1) EXPECT((bytes.back() >> 4) == 0);  // padding nibble
    }
  }
}

}  // namespace

int main() {
  test_golden();
  test_ranges();
  test_every_int4_pair();
  test_every_int8();
  test_round_trip_odd_lengths();
  return oqfl_test::finish("bitpack");
}
