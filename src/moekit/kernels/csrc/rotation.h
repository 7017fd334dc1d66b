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

// The same rotation with the sine as it comes (its first half not negated: `models.lm.rope_tables`),
// as x * cos + cat(-x2, x1) * sin computes it: the first half's swapped product is subtracted
// (a - b is a + (-b) exactly, signed zeros included).
__attribute__((optimize("fp-contract=off"))) inline void rotate_row_plain(const float* x, const float* c,
                                                                    const float* s, float* o, int64_t half) {
  for (int64_t j = 0; j < half; ++j) {
    const float direct = x[j] * c[j];
    const float swapped = x[j + half] * s[j];
    o[j] = direct - swapped;
  }
  for (int64_t j = half; j < 2 * half; ++j) {
    const float direct = x[j] * c[j];
    const float swapped = x[j - half] * s[j];
    o[j] = direct + swapped;
  }
}

// The rotation's derivative with respect to x, given dL/dy = g: autograd's sum of g * cos (from the
// first product) and the swapped halves of g * sin (from the second), each product rounded to fp32.
// Each swapped product takes the sine of the position it came from (s[j + half] for j < half). With
// the sine as it comes (`signed_sin` false), transformers' rotate_half gives the second half's
// term with a minus, and the slices' backward adds zero-filled gradients, which turns a -0 sum
// into +0: the `+ 0.0f` below repeats that (it is not folded away without -ffast-math).
template <bool signed_sin>
__attribute__((optimize("fp-contract=off"))) inline void rotate_row_backward(const float* g, const float* c,
                                                                       const float* s, float* o, int64_t half) {
  for (int64_t j = 0; j < half; ++j) {
    const float direct = g[j] * c[j];
    const float swapped = g[j + half] * s[j + half];
    o[j] = signed_sin ? direct + swapped : (direct + swapped) + 0.0f;
  }
  for (int64_t j = half; j < 2 * half; ++j) {
    const float direct = g[j] * c[j];
    const float swapped = g[j - half] * s[j - half];
    o[j] = signed_sin ? direct + swapped : (direct - swapped) + 0.0f;
  }
}

}  // namespace moekit_rotation
