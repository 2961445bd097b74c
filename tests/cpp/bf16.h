// A bfloat16 stand-in for the C++ tests (no torch there): 2 bytes,
// round-to-nearest-even from float, NaN kept NaN.
#pragma once

#include <cstdint>
#include <cstring>

struct Bf16 {
  uint16_t bits;
  Bf16() = default;
  Bf16(float f) {  // NOLINT: implicit, like c10::BFloat16
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
      bits = 0x7fc0;
      return;
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    bits = uint16_t(u >> 16);
  }
  operator float() const {  // NOLINT
    const uint32_t u = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};
static_assert(sizeof(Bf16) == 2, "a 2-byte type");
