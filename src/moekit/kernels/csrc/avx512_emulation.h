// The AVX-512 intrinsics that simd.h's AVX-512 backend calls, emulated lane by lane on any x86
// CPU, for a test build (MOEKIT_EMULATE_AVX512; moekit/kernels/native.py: MOEKIT_NATIVE_ISA).
//
// Why: a machine builds the tile kernel for its own vector set only, so the AVX-512 build's code
// (16-lane vectors, tiles of 6 x 4 vectors, panels 64 wide, blocks of 512, mask registers, the
// 16 x 16 transpose) would otherwise run nowhere but on an AVX-512 CPU. With this header the same
// backend code, unchanged, is compiled for AVX2 and runs the kernel tests there: each intrinsic
// below does what Intel's intrinsics guide specifies for it, lane by lane (several times slower
// than the real instructions: for correctness, never for speed). The compiler's own __m512,
// __m512d and __mmask16 types are used, so the backend's code reads exactly as in the real build.
//
// Beyond the guide's results, the emulation keeps two of the hardware's constraints visible: a
// streaming store to an address not aligned to 64 bytes traps (as it faults on the CPU), and the
// reciprocal estimate keeps only the 14 bits of precision that rcp14 guarantees, so that the
// Newton step after it is what makes the result accurate, as on the CPU.

#pragma once

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace moekit_avx512_emulation {

using V = __m512;
using VD = __m512d;
using M = __mmask16;
constexpr int kLanes = 16;

inline bool kept(M mask, int lane) { return ((mask >> lane) & 1) != 0; }

inline V setzero_ps() { return V{}; }
inline V set1_ps(float x) {
  V v;
  for (int i = 0; i < kLanes; ++i) v[i] = x;
  return v;
}
inline V loadu_ps(const void* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
// masked-off lanes are zero and their memory is not read (the CPU suppresses their faults)
inline V maskz_loadu_ps(M mask, const void* p) {
  const float* f = static_cast<const float*>(p);
  V v{};
  for (int i = 0; i < kLanes; ++i)
    if (kept(mask, i)) v[i] = f[i];
  return v;
}
inline void storeu_ps(void* p, V v) { std::memcpy(p, &v, sizeof(V)); }
inline void mask_storeu_ps(void* p, M mask, V v) {
  float* f = static_cast<float*>(p);
  for (int i = 0; i < kLanes; ++i)
    if (kept(mask, i)) f[i] = v[i];
}
inline void stream_ps(void* p, V v) {
  if (reinterpret_cast<uintptr_t>(p) % 64 != 0) __builtin_trap();  // vmovntps faults there
  std::memcpy(p, &v, sizeof(V));
}
inline V add_ps(V a, V b) { return a + b; }
inline V sub_ps(V a, V b) { return a - b; }
inline V mul_ps(V a, V b) { return a * b; }
// (a < b) ? a : b and (a > b) ? a : b lane by lane: the second operand where either is NaN
inline V min_ps(V a, V b) {
  V v;
  for (int i = 0; i < kLanes; ++i) v[i] = a[i] < b[i] ? a[i] : b[i];
  return v;
}
inline V max_ps(V a, V b) {
  V v;
  for (int i = 0; i < kLanes; ++i) v[i] = a[i] > b[i] ? a[i] : b[i];
  return v;
}
// fused: one rounding
inline V fmadd_ps(V a, V b, V c) {
  V v;
  for (int i = 0; i < kLanes; ++i) v[i] = std::fma(a[i], b[i], c[i]);
  return v;
}
inline V fnmadd_ps(V a, V b, V c) {
  V v;
  for (int i = 0; i < kLanes; ++i) v[i] = std::fma(-a[i], b[i], c[i]);
  return v;
}
// halves added pairwise down to one lane (8 + 8, 4 + 4, 2 + 2, 1 + 1), the compilers' order
inline float reduce_add_ps(V v) {
  float s[8];
  for (int i = 0; i < 8; ++i) s[i] = v[i] + v[i + 8];
  for (int i = 0; i < 4; ++i) s[i] = s[i] + s[i + 4];
  for (int i = 0; i < 2; ++i) s[i] = s[i] + s[i + 2];
  return s[0] + s[1];
}
// rounded to 2^-M (M = imm[7:4]) in the mode of imm[1:0] (nearest even, down, up, toward zero)
inline V roundscale_ps(V v, int imm) {
  const float scale = std::ldexp(1.0f, (imm >> 4) & 15);
  V out;
  for (int i = 0; i < kLanes; ++i) {
    const float x = v[i] * scale;
    float r;
    switch (imm & 3) {
      case 0: r = std::nearbyint(x); break;  // the default rounding mode: to nearest, ties to even
      case 1: r = std::floor(x); break;
      case 2: r = std::ceil(x); break;
      default: r = std::trunc(x); break;
    }
    out[i] = r / scale;
  }
  return out;
}
// a * 2^floor(b) (subnormal where the result is that small)
inline V scalef_ps(V a, V b) {
  V v;
  for (int i = 0; i < kLanes; ++i) v[i] = std::ldexp(a[i], static_cast<int>(std::floor(b[i])));
  return v;
}
// 1 / d with its mantissa cut to 14 bits: within the 2^-14 relative error rcp14 guarantees
inline V rcp14_ps(V d) {
  V v;
  for (int i = 0; i < kLanes; ++i) {
    const float exact = 1.0f / d[i];
    uint32_t bits;
    std::memcpy(&bits, &exact, sizeof(bits));
    bits &= ~((uint32_t{1} << (23 - 14)) - 1);
    std::memcpy(&v[i], &bits, sizeof(bits));
  }
  return v;
}
inline VD castps_pd(V v) {
  VD d;
  std::memcpy(&d, &v, sizeof(d));
  return d;
}
inline V castpd_ps(VD d) {
  V v;
  std::memcpy(&v, &d, sizeof(v));
  return v;
}
// Within each 128-bit lane (`per_lane` elements): a's and b's elements `first`, `first + 1`, ...
// (half a lane's worth) interleaved. unpacklo takes each lane's low half, unpackhi its high half.
template <typename W, int per_lane>
inline W interleave(W a, W b, int first) {
  W v;
  for (int L = 0; L < 4; ++L)
    for (int i = 0; i < per_lane / 2; ++i) {
      v[per_lane * L + 2 * i] = a[per_lane * L + first + i];
      v[per_lane * L + 2 * i + 1] = b[per_lane * L + first + i];
    }
  return v;
}
inline V unpacklo_ps(V a, V b) { return interleave<V, 4>(a, b, 0); }
inline V unpackhi_ps(V a, V b) { return interleave<V, 4>(a, b, 2); }
inline VD unpacklo_pd(VD a, VD b) { return interleave<VD, 2>(a, b, 0); }
inline VD unpackhi_pd(VD a, VD b) { return interleave<VD, 2>(a, b, 1); }
// 128-bit lanes 0 and 1 from a, 2 and 3 from b, each picked by two bits of imm
inline V shuffle_f32x4(V a, V b, int imm) {
  V v;
  for (int L = 0; L < 4; ++L) {
    const V& from = L < 2 ? a : b;
    const int pick = (imm >> (2 * L)) & 3;
    for (int i = 0; i < 4; ++i) v[4 * L + i] = from[4 * pick + i];
  }
  return v;
}

}  // namespace moekit_avx512_emulation

// The backend's calls, by their intrinsic names (after <immintrin.h>, so its declarations are
// untouched; some compilers define intrinsics that take an immediate as macros).
#undef _mm512_roundscale_ps
#undef _mm512_shuffle_f32x4
#define _mm512_setzero_ps moekit_avx512_emulation::setzero_ps
#define _mm512_set1_ps moekit_avx512_emulation::set1_ps
#define _mm512_loadu_ps moekit_avx512_emulation::loadu_ps
#define _mm512_maskz_loadu_ps moekit_avx512_emulation::maskz_loadu_ps
#define _mm512_storeu_ps moekit_avx512_emulation::storeu_ps
#define _mm512_mask_storeu_ps moekit_avx512_emulation::mask_storeu_ps
#define _mm512_stream_ps moekit_avx512_emulation::stream_ps
#define _mm512_add_ps moekit_avx512_emulation::add_ps
#define _mm512_sub_ps moekit_avx512_emulation::sub_ps
#define _mm512_mul_ps moekit_avx512_emulation::mul_ps
#define _mm512_min_ps moekit_avx512_emulation::min_ps
#define _mm512_max_ps moekit_avx512_emulation::max_ps
#define _mm512_fmadd_ps moekit_avx512_emulation::fmadd_ps
#define _mm512_fnmadd_ps moekit_avx512_emulation::fnmadd_ps
#define _mm512_reduce_add_ps moekit_avx512_emulation::reduce_add_ps
#define _mm512_roundscale_ps moekit_avx512_emulation::roundscale_ps
#define _mm512_scalef_ps moekit_avx512_emulation::scalef_ps
#define _mm512_rcp14_ps moekit_avx512_emulation::rcp14_ps
#define _mm512_castps_pd moekit_avx512_emulation::castps_pd
#define _mm512_castpd_ps moekit_avx512_emulation::castpd_ps
#define _mm512_unpacklo_ps moekit_avx512_emulation::unpacklo_ps
#define _mm512_unpackhi_ps moekit_avx512_emulation::unpackhi_ps
#define _mm512_unpacklo_pd moekit_avx512_emulation::unpacklo_pd
#define _mm512_unpackhi_pd moekit_avx512_emulation::unpackhi_pd
#define _mm512_shuffle_f32x4 moekit_avx512_emulation::shuffle_f32x4
