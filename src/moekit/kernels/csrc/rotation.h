// RoPE's rotation of one row ("half" layout) with torch's arithmetic: each product rounded to
// fp32, then their sum (no fused multiply-add), as transformers' x * cos + rotate_half(x) * sin
// computes it on the CPU (rope.cpp, attention_step.cpp).
#pragma once

#include <cstdint>

namespace moekit_rotation {

// o[j] = x[j] * c[j] + x[(j + half) mod 2 half] * s[j], each product and the sum rounded to fp32.
__attribute__((optimize("fp-contract=off"))) inline void rotate_row(const float* x, const float* c, const float* s,
                                                              float* o, int64_t half) {
  for (int64_t j = 0; j < half; ++j) {
    const float direct = x[j] * c[j];
    const float swapped = x[j + half] * s[j];
    o[j] = direct + swapped;
  }
  for (int64_t j = half; j < 2 * half; ++j) {
    const float direct = x[j] * c[j];
    const float swapped = x[j - half] * s[j];
    o[j] = direct + swapped;
  }
}

}  // namespace moekit_rotation
