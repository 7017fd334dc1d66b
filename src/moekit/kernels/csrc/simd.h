// One vector register's worth of fp32 lanes, for the instruction set the kernels are built for:
// AVX-512 (16 lanes, mask registers) or AVX2 with FMA (8 lanes, masks as integer vectors).
//
// Why: the expert kernels (expert_gemm.cpp) are written once against this small interface, and
// the build picks the widest set the CPU has (moekit/kernels/native.py). CPUs without AVX-512
// (AVX2-only EPYCs and Core parts) then run the same tiles, loops and fused SwiGLU instead of
// the library path; the tile's shape follows from the lane and register counts below.

#pragma once

#include <immintrin.h>

#include <cstdint>

#if defined(MOEKIT_EMULATE_AVX512)
// the AVX-512 backend below on an emulation of its intrinsics (a test build: avx512_emulation.h)
#include "avx512_emulation.h"
#endif

#if defined(__AVX512F__) || defined(MOEKIT_EMULATE_AVX512)

namespace moekit_simd {

using Vec = __m512;
using Mask = __mmask16;
constexpr int kLanes = 16;
// Output vectors per row of a register tile: 6 rows x 4 vectors of accumulators take 24 of the
// 32 registers, leaving room for the 4 loaded weight vectors and a broadcast.
constexpr int kTileVectors = 4;

inline Mask full_mask() { return static_cast<Mask>(0xFFFF); }
inline Mask tail_mask(int64_t remaining) {
  return remaining >= kLanes ? full_mask() : static_cast<Mask>((1u << remaining) - 1);
}
inline Vec zero() { return _mm512_setzero_ps(); }
inline Vec set1(float x) { return _mm512_set1_ps(x); }
inline Vec load(const float* p) { return _mm512_loadu_ps(p); }
inline Vec load(Mask m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
inline void store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
inline void store(float* p, Mask m, Vec v) { _mm512_mask_storeu_ps(p, m, v); }
// past the caches (p aligned to 64 bytes; whole lines written in order combine in the CPU's buffers)
inline void stream(float* p, Vec v) { _mm512_stream_ps(p, v); }
inline Vec add(Vec a, Vec b) { return _mm512_add_ps(a, b); }
inline Vec sub(Vec a, Vec b) { return _mm512_sub_ps(a, b); }
inline Vec mul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
inline Vec min(Vec a, Vec b) { return _mm512_min_ps(a, b); }
inline Vec max(Vec a, Vec b) { return _mm512_max_ps(a, b); }
inline Vec fmadd(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec fnmadd(Vec a, Vec b, Vec c) { return _mm512_fnmadd_ps(a, b, c); }
inline float reduce_add(Vec v) { return _mm512_reduce_add_ps(v); }
inline Vec round_nearest(Vec v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
// p * 2^n for integral n in [-127, 127]
inline Vec scale_by_pow2(Vec p, Vec n) { return _mm512_scalef_ps(p, n); }
// 1 / d: a 14-bit estimate refined by one Newton step (~1e-7 relative)
inline Vec reciprocal(Vec d) {
  const Vec y = _mm512_rcp14_ps(d);
  return _mm512_mul_ps(y, _mm512_fnmadd_ps(d, y, _mm512_set1_ps(2.0f)));
}

// r[i][j] <- r[j][i] for a kLanes x kLanes block.
inline void transpose(Vec r[kLanes]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 4; ++j) {
      t[8 * i + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + 4 + j], 0x88);
      t[8 * i + 4 + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + 4 + j], 0xdd);
    }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0x88);
    r[8 + j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0xdd);
  }
}

}  // namespace moekit_simd

#define MOEKIT_SIMD 1

#elif defined(__AVX2__) && defined(__FMA__)

namespace moekit_simd {

using Vec = __m256;
using Mask = __m256i;  // lane i kept where its sign bit is set (maskload/maskstore)
constexpr int kLanes = 8;
// 6 rows x 2 vectors of accumulators take 12 of the 16 registers, with the 2 loaded weight
// vectors and a broadcast (the tile of BLIS's and OpenBLAS's AVX2 sgemm).
constexpr int kTileVectors = 2;

inline Mask full_mask() { return _mm256_set1_epi32(-1); }
inline Mask tail_mask(int64_t remaining) {
  if (remaining >= kLanes) return full_mask();
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(remaining)), lane);
}
inline Vec zero() { return _mm256_setzero_ps(); }
inline Vec set1(float x) { return _mm256_set1_ps(x); }
inline Vec load(const float* p) { return _mm256_loadu_ps(p); }
inline Vec load(Mask m, const float* p) { return _mm256_maskload_ps(p, m); }
inline void store(float* p, Vec v) { _mm256_storeu_ps(p, v); }
inline void store(float* p, Mask m, Vec v) { _mm256_maskstore_ps(p, m, v); }
// past the caches (p aligned to 32 bytes; whole lines written in order combine in the CPU's buffers)
inline void stream(float* p, Vec v) { _mm256_stream_ps(p, v); }
inline Vec add(Vec a, Vec b) { return _mm256_add_ps(a, b); }
inline Vec sub(Vec a, Vec b) { return _mm256_sub_ps(a, b); }
inline Vec mul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
inline Vec min(Vec a, Vec b) { return _mm256_min_ps(a, b); }
inline Vec max(Vec a, Vec b) { return _mm256_max_ps(a, b); }
inline Vec fmadd(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline Vec fnmadd(Vec a, Vec b, Vec c) { return _mm256_fnmadd_ps(a, b, c); }
inline float reduce_add(Vec v) {
  const __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 pairs = _mm_add_ps(half, _mm_movehl_ps(half, half));
  return _mm_cvtss_f32(_mm_add_ss(pairs, _mm_movehdup_ps(pairs)));
}
inline Vec round_nearest(Vec v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
// p * 2^n for integral n in [-127, 127]: 2^n built in the exponent field (n = -127 gives 0 where
// scalef gives a subnormal; below 1e-38 either way)
inline Vec scale_by_pow2(Vec p, Vec n) {
  const __m256i biased = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
  return _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(biased, 23)));
}
inline Vec reciprocal(Vec d) { return _mm256_div_ps(_mm256_set1_ps(1.0f), d); }

// r[i][j] <- r[j][i] for a kLanes x kLanes block.
inline void transpose(Vec r[kLanes]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {
    u[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int j = 0; j < 4; ++j) {
    r[j] = _mm256_permute2f128_ps(u[j], u[4 + j], 0x20);
    r[4 + j] = _mm256_permute2f128_ps(u[j], u[4 + j], 0x31);
  }
}

}  // namespace moekit_simd

#define MOEKIT_SIMD 1

#endif

#if defined(MOEKIT_SIMD)

namespace moekit_simd {

// Floats per 64-byte cache line (the unit of a prefetch request).
constexpr int64_t kLineFloats = 64 / static_cast<int64_t>(sizeof(float));

// The vector at p, or its first `remaining` lanes (zero beyond; a store writes nothing beyond)
// where fewer remain: plain loads and stores for whole vectors, the mask at a row's end only. On
// AVX2 a masked load is a `vmaskmovps` and a masked store a slower one still: a pass over rows
// of 256 floats that loads two vectors and stores two took 4.6-6.8x as long with masks on every
// vector (AVX2 EPYC, Zen 3; BENCHMARKS.md §13).
inline Vec load_upto(const float* p, int64_t remaining) {
  return remaining >= kLanes ? load(p) : load(tail_mask(remaining), p);
}
inline void store_upto(float* p, int64_t remaining, Vec v) {
  if (remaining >= kLanes)
    store(p, v);
  else
    store(p, tail_mask(remaining), v);
}

}  // namespace moekit_simd

#endif
