// RMSNorm of a few fp32 rows in one call, with torch's arithmetic in torch's order.
//
// Why: torch's fp32 rms_norm on the CPU is a composite of seven element-wise and reduction ops
// (pow, sum, div, add, rsqrt, mul, mul), each setting up its own iteration: 15-30 us for one row
// of 32 to 1024 values, where the arithmetic takes well under a microsecond. A decoding step of a
// small model runs several per layer. Here one call does the same operations on each row: the
// squares summed as torch's CPU sum kernel sums a contiguous row (`cascade_sum`: vectors of the
// build's width in four interleaved accumulators with cascade levels, the scalar tail first, then
// the vector's lanes in order; a row shorter than a vector as four interleaved scalars), divided
// by the width, plus eps (rounded to fp32 as torch rounds a Python float), 1 / sqrt of it, times
// each value, times the weight. The Python side uses it only where a probe at first use finds it
// equal to torch.rms_norm bit for bit (moekit/kernels/rms_norm.py).
//
//   moekit::rms_norm_rows(x, weight?, eps) -> y: x [..., n] contiguous fp32, weight [n] or None.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>

#include "simd.h"

#if defined(MOEKIT_SIMD)

namespace {

namespace S = moekit_simd;

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

struct VecSum {
  S::Vec v;
  VecSum operator+(const VecSum& o) const { return {S::add(v, o.v)}; }
};

// The sum of sq[0:n] (squares already rounded to fp32) in torch's order.
inline float sum_of(const float* sq, int64_t n) {
  if (n < S::kLanes)  // scalar_inner_sum
    return row_sum<float>(n, [&](int64_t i) { return sq[i]; }, 0.0f);
  const int64_t vectors = n / S::kLanes;  // vectorized_inner_sum
  const VecSum acc = row_sum<VecSum>(vectors, [&](int64_t i) { return VecSum{S::load(sq + i * S::kLanes)}; },
                                     VecSum{S::zero()});
  float total = 0.0f;
  for (int64_t k = vectors * S::kLanes; k < n; ++k) total += sq[k];
  alignas(64) float lanes[S::kLanes];
  S::store(lanes, acc.v);
  for (int k = 0; k < S::kLanes; ++k) total += lanes[k];
  return total;
}

at::Tensor rms_norm_rows(const at::Tensor& x, const std::optional<at::Tensor>& weight, double eps) {
  const char* op = "moekit::rms_norm_rows";
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.device().is_cpu() && x.is_contiguous() && x.dim() >= 1, op,
              ": x must be a contiguous float32 CPU tensor");
  const int64_t n = x.size(-1), rows = n ? x.numel() / n : 0;
  const float* W = nullptr;
  if (weight.has_value()) {
    TORCH_CHECK(weight->scalar_type() == at::kFloat && weight->device().is_cpu() && weight->is_contiguous() &&
                    weight->dim() == 1 && weight->size(0) == n,
                op, ": weight must be a contiguous float32 CPU tensor [", n, "]");
    W = weight->data_ptr<float>();
  }
  at::Tensor out = at::empty_like(x);
  const float* X = x.data_ptr<float>();
  float* O = out.data_ptr<float>();
  const float eps32 = static_cast<float>(eps);
  const float width = static_cast<float>(n);
  std::vector<float> squares(static_cast<size_t>(n));
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = X + r * n;
    float* o = O + r * n;
    for (int64_t i = 0; i < n; ++i) squares[i] = xr[i] * xr[i];
    const float mean = sum_of(squares.data(), n) / width;
    const float scale = 1.0f / std::sqrt(mean + eps32);
    if (W != nullptr)
      for (int64_t i = 0; i < n; ++i) o[i] = (xr[i] * scale) * W[i];
    else
      for (int64_t i = 0; i < n; ++i) o[i] = xr[i] * scale;
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moekit, m) {
  m.def("rms_norm_rows(Tensor x, Tensor? weight, float eps) -> Tensor");
  m.impl("rms_norm_rows", c10::DispatchKey::CPU, TORCH_FN(rms_norm_rows));
}

#endif  // MOEKIT_SIMD
