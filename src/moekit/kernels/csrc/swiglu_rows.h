// SwiGLU (Shazeer 2020, "GLU Variants Improve Transformer") and its gradient over fp32 rows, in
// the vectors of simd.h: a vectorised exp for the sigmoid, where a scalar expf per element cost the
// expert loops more than their products' bookkeeping (expert_gemm.cpp's fused experts, and the
// at::mm loops of expert_mm.cpp for every dtype, whose rows are converted to fp32 around these).
#pragma once

#include <cstdint>

#include "simd.h"

#if defined(MOEKIT_SIMD)

namespace moekit_swiglu {

namespace S = moekit_simd;

// exp(x) for x in float range (Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, degree-6 polynomial in r,
// scaled by 2^n); relative error ~1e-7. Saturates below -88 and above 88 like expf's range.
inline S::Vec exp_ps(S::Vec x) {
  x = S::min(S::max(x, S::set1(-88.0f)), S::set1(88.0f));
  const S::Vec n = S::round_nearest(S::mul(x, S::set1(1.44269504088896341f)));
  S::Vec r = S::fnmadd(n, S::set1(0.693359375f), x);
  r = S::fnmadd(n, S::set1(-2.12194440e-4f), r);
  S::Vec p = S::set1(1.9875691500e-4f);
  p = S::fmadd(p, r, S::set1(1.3981999507e-3f));
  p = S::fmadd(p, r, S::set1(8.3334519073e-3f));
  p = S::fmadd(p, r, S::set1(4.1665795894e-2f));
  p = S::fmadd(p, r, S::set1(1.6666665459e-1f));
  p = S::fmadd(p, r, S::set1(5.0000001201e-1f));
  p = S::fmadd(S::mul(p, r), r, S::add(r, S::set1(1.0f)));
  return S::scale_by_pow2(p, n);
}

// 1 / (1 + exp(-x)), the reciprocal to ~1e-7 relative.
inline S::Vec sigmoid_ps(S::Vec x) {
  return S::reciprocal(S::add(S::set1(1.0f), exp_ps(S::sub(S::zero(), x))));
}

// o[0:ff] = silu(gate) * up for one row h = [gate | up] (Shazeer 2020, "GLU Variants Improve
// Transformer"), times `scale` (the routing weight, 1 where none applies).
inline void swiglu_row(const float* gate, float* o, int64_t ff, float scale = 1.0f) {
  const float* up = gate + ff;
  const S::Vec sc = S::set1(scale);
  for (int64_t j = 0; j < ff; j += S::kLanes) {
    const S::Vec g = S::load_upto(gate + j, ff - j);
    const S::Vec u = S::load_upto(up + j, ff - j);
    S::store_upto(o + j, ff - j, S::mul(S::mul(S::mul(g, sigmoid_ps(g)), u), sc));
  }
}

// The gradient of one row's swiglu with respect to h = [gate | up], given the gradient gr of its
// output: d gate = gr * up * s * (1 + gate * (1 - s)), d up = gr * gate * s, s = sigmoid(gate)
// (read from `sig` where given: the same bits as computed here).
inline void swiglu_backward_row(const float* gate, const float* gr, float* o, int64_t ff,
                                const float* sig = nullptr) {
  const float* up = gate + ff;
  const S::Vec one = S::set1(1.0f);
  for (int64_t j = 0; j < ff; j += S::kLanes) {
    const int64_t rest = ff - j;
    const S::Vec g = S::load_upto(gate + j, rest);
    const S::Vec u = S::load_upto(up + j, rest);
    const S::Vec d = S::load_upto(gr + j, rest);
    const S::Vec s = sig != nullptr ? S::load_upto(sig + j, rest) : sigmoid_ps(g);
    const S::Vec silu_grad = S::mul(s, S::fmadd(g, S::sub(one, s), one));
    S::store_upto(o + j, rest, S::mul(S::mul(d, u), silu_grad));
    S::store_upto(o + ff + j, rest, S::mul(d, S::mul(g, s)));
  }
}

}  // namespace moekit_swiglu

#endif  // MOEKIT_SIMD
