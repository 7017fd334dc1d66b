// torch's CPU summation order for one contiguous fp32 row (its `cascade_sum` inner sum), so
// that kernels which repeat torch's arithmetic (rms_norm.cpp, attention_step.cpp) round as
// torch does: vectors of 8 lanes in four interleaved accumulators with cascade levels, the
// scalar tail first, then the vector's lanes in order; a row shorter than a vector as four
// interleaved scalars. And one row's RMSNorm in torch's order on top of it.
//
// 8 lanes on AVX-512 CPUs too: torch registers its sum kernel with REGISTER_DISPATCH, which
// gives an AVX-512 CPU the AVX2 build of the kernel (ATen's DispatchStub.h; only
// ALSO_REGISTER_AVX512_DISPATCH kernels run 16 lanes). So the width here is torch's whatever set
// this file is built for, and a build for the CPU's other set repeats torch's sums too. (Before,
// it summed at the build's width: on an AVX-512 Xeon the probe failed and both kernels were off.)
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "simd.h"

#if defined(MOEKIT_SIMD)

namespace moekit_torch_sum {

// torch's AVX2 Vectorized<float>, as a plain GCC vector: lane-wise adds, in any build
constexpr int kTorchLanes = 8;
typedef float TorchVec __attribute__((vector_size(kTorchLanes * sizeof(float))));

constexpr int kIlp = 4;     // torch's row_sum: four interleaved accumulators
constexpr int kLevels = 4;  // torch's multi_row_sum: cascade levels

inline int64_t ceil_log2(int64_t x) {
  if (x <= 2) return x <= 1 ? 0 : 1;
  int64_t bits = 0;
  for (uint64_t v = static_cast<uint64_t>(x - 1); v; v >>= 1) ++bits;
  return bits;
}

// torch's multi_row_sum over `groups` groups of kIlp consecutive items (a vector or a value each):
// item k of each group goes to accumulator k, the level-0 sums folded into higher levels every
// 2^level_power groups.
template <typename Acc, typename Load>
inline void multi_row_sum(int64_t groups, Acc (&out)[kIlp], Load load, Acc zero) {
  const int64_t level_power = std::max<int64_t>(4, ceil_log2(groups) / kLevels);
  const int64_t level_step = int64_t{1} << level_power;
  const int64_t level_mask = level_step - 1;
  Acc acc[kLevels][kIlp];
  for (auto& level : acc)
    for (auto& a : level) a = zero;
  int64_t i = 0;
  for (; i + level_step <= groups;) {
    for (int64_t j = 0; j < level_step; ++j, ++i)
      for (int k = 0; k < kIlp; ++k) acc[0][k] = acc[0][k] + load(i * kIlp + k);
    for (int j = 1; j < kLevels; ++j) {
      for (int k = 0; k < kIlp; ++k) {
        acc[j][k] = acc[j][k] + acc[j - 1][k];
        acc[j - 1][k] = zero;
      }
      if ((i & (level_mask << (j * level_power))) != 0) break;
    }
  }
  for (; i < groups; ++i)
    for (int k = 0; k < kIlp; ++k) acc[0][k] = acc[0][k] + load(i * kIlp + k);
  for (int j = 1; j < kLevels; ++j)
    for (int k = 0; k < kIlp; ++k) acc[0][k] = acc[0][k] + acc[j][k];
  for (int k = 0; k < kIlp; ++k) out[k] = acc[0][k];
}

// torch's row_sum: multi_row_sum over whole groups, the rest into accumulator 0, then 1..3 into 0.
template <typename Acc, typename Load>
inline Acc row_sum(int64_t items, Load load, Acc zero) {
  Acc partial[kIlp];
  const int64_t groups = items / kIlp;
  multi_row_sum(groups, partial, load, zero);
  for (int64_t i = groups * kIlp; i < items; ++i) partial[0] = partial[0] + load(i);
  for (int k = 1; k < kIlp; ++k) partial[0] = partial[0] + partial[k];
  return partial[0];
}

inline TorchVec load_torch_vec(const float* p) {
  TorchVec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// The sum of sq[0:n] (squares already rounded to fp32) in torch's order.
inline float sum_of(const float* sq, int64_t n) {
  if (n < kTorchLanes)  // scalar_inner_sum
    return row_sum<float>(n, [&](int64_t i) { return sq[i]; }, 0.0f);
  const int64_t vectors = n / kTorchLanes;  // vectorized_inner_sum
  const TorchVec acc = row_sum<TorchVec>(
      vectors, [&](int64_t i) { return load_torch_vec(sq + i * kTorchLanes); }, TorchVec{});
  float total = 0.0f;
  for (int64_t k = vectors * kTorchLanes; k < n; ++k) total += sq[k];
  for (int k = 0; k < kTorchLanes; ++k) total += acc[k];
  return total;
}

// o = x * (1 / sqrt(mean(x^2) + eps)) (* w where given) for one row of n values, torch.rms_norm's
// operations in its order; `squares` is room for n values. Returns the row's scale (its rstd).
inline float rms_norm_row(const float* x, float* o, int64_t n, float eps32, const float* w, float* squares) {
  for (int64_t i = 0; i < n; ++i) squares[i] = x[i] * x[i];
  const float mean = sum_of(squares, n) / static_cast<float>(n);
  const float scale = 1.0f / std::sqrt(mean + eps32);
  if (w != nullptr)
    for (int64_t i = 0; i < n; ++i) o[i] = (x[i] * scale) * w[i];
  else
    for (int64_t i = 0; i < n; ++i) o[i] = x[i] * scale;
  return scale;
}

// The derivative of `rms_norm_row` as autograd computes it through torch's ops (pow, mean, add,
// rsqrt, mul, mul), for dL/do = g and the row's scale r, in torch's order, each operation rounded
// to fp32:
//   g_n = g * w                              (the weight's product; g where there is none)
//   through_scale = g_n * r                  (x * r's derivative with respect to x)
//   d_r = sum(g_n * x)                       (... with respect to r, summed as torch sums a row)
//   d_mean = ((-0.5 * d_r) * ((r * r) * r)) / n   (rsqrt's derivative, then the mean's)
//   through_square = d_mean * (2 * x)        (pow(x, 2)'s derivative)
// The two derivatives with respect to x stay apart, as autograd adds them to x's gradient one
// after the other. `g_normed` (where not null): g * (x * r), whose sum over rows is the weight's
// gradient. `scratch` is room for n values.
__attribute__((optimize("fp-contract=off"))) inline void rms_norm_row_backward(
    const float* g, const float* x, const float* w, float r, int64_t n, float* through_scale, float* through_square,
    float* g_normed, float* scratch) {
  for (int64_t i = 0; i < n; ++i) {
    const float g_n = w != nullptr ? g[i] * w[i] : g[i];
    through_scale[i] = g_n * r;
    scratch[i] = g_n * x[i];
  }
  if (g_normed != nullptr)
    for (int64_t i = 0; i < n; ++i) {
      const float normed = x[i] * r;
      g_normed[i] = g[i] * normed;
    }
  const float d_r = sum_of(scratch, n);
  const float cube = (r * r) * r;
  const float d_rsqrt = (-0.5f * d_r) * cube;
  const float d_mean = d_rsqrt / static_cast<float>(n);
  for (int64_t i = 0; i < n; ++i) {
    const float twice = 2.0f * x[i];
    through_square[i] = d_mean * twice;
  }
}

}  // namespace moekit_torch_sum

#endif  // MOEKIT_SIMD
