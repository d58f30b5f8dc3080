// Packed integer codes (docs/DESIGN.md section 3), shared by the CPU and CUDA packing kernels and the
// C++ unit tests. Torch-free.
//
// int8: one code per byte, the code's two's complement bits (signed) or its value (unsigned).
// int4: two codes per byte. Code 2i goes in the LOW nibble of byte i, code 2i+1 in the HIGH
//       nibble; signed codes are stored as their low 4 bits (two's complement, -1 -> 0xF).
//       With an odd count the last byte's high nibble is 0.
//
//   codes [1, -2, 7, -8, 3] (signed int4) -> bytes [0xE1, 0x87, 0x03]
//
// So n codes of `bits` bits take ceil(n * bits / 8) bytes.
#pragma once

#include <cstdint>

#include "common/host_device.h"

namespace oqfl {

OQFL_HD int64_t packed_bytes(int64_t n, int bits) { return (n * bits + 7) / 8; }

// Codes per byte: 2 for int4, 1 for int8.
OQFL_HD int codes_per_byte(int bits) { return 8 / bits; }

// Smallest and largest code of the width (signed: two's complement range).
OQFL_HD int32_t code_min(int bits, bool is_signed) { return is_signed ? -(1 << (bits - 1)) : 0; }
OQFL_HD int32_t code_max(int bits, bool is_signed) {
  return is_signed ? (1 << (bits - 1)) - 1 : (1 << bits) - 1;
}

OQFL_HD bool code_fits(int32_t v, int bits, bool is_signed) {
  return v >= code_min(bits, is_signed) && v <= code_max(bits, is_signed);
}

// One byte from the codes of elements 2i (lo) and 2i+1 (hi); only their low 4 bits are kept.
OQFL_HD uint8_t pack_int4(int32_t lo, int32_t hi) {
  return static_cast<uint8_t>((lo & 0xF) | ((hi & 0xF) << 4));
}

// The 4-bit field `nibble` (0: low, element 2i; 1: high, element 2i+1) of a byte, sign-extended
// from bit 3 for signed codes.
OQFL_HD int32_t unpack_int4(uint8_t byte, int nibble, bool is_signed) {
  const int32_t v = (byte >> (4 * nibble)) & 0xF;
  return is_signed ? (v ^ 0x8) - 0x8 : v;
}

OQFL_HD uint8_t pack_int8(int32_t v) { return static_cast<uint8_t>(v & 0xFF); }

OQFL_HD int32_t unpack_int8(uint8_t byte, bool is_signed) {
  const int32_t v = byte;
  return is_signed ? (v ^ 0x80) - 0x80 : v;
}

// Code of element i of a packed buffer.
OQFL_HD int32_t unpack_code(const uint8_t* packed, int64_t i, int bits, bool is_signed) {
  return bits == 4 ? unpack_int4(packed[i >> 1], static_cast<int>(i & 1), is_signed)
                   : unpack_int8(packed[i], is_signed);
}

// Byte j of a packed buffer from a function code(i) giving the code of element i (n elements).
template <typename CodeOf>
OQFL_HD uint8_t pack_byte(int64_t j, int64_t n, int bits, const CodeOf& code) {
  if (bits == 8) return pack_int8(code(j));
  const int64_t i = 2 * j;
  return pack_int4(code(i), i + 1 < n ? code(i + 1) : 0);
}

}  // namespace oqfl
