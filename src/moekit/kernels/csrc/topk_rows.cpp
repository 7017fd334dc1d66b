// The indices of each row's k largest fp32 scores, largest first: torch.topk's indices wherever a
// row's k largest values are distinct from each other and from the rest of the row.
//
// Why: a router picks each token's top k of its experts' scores once per layer and step, and
// torch.topk on the CPU sorts a copied (value, index) buffer per row: 3.9 ms on one thread for a
// [2048, 128] score matrix with k = 8 (1.9 us a row; BENCHMARKS.md §13), about 4 % of a very fine
// layer's fwd+bwd. Here each of the k picks is a vectorised max over the values below the last
// pick and a scan for its first position, then one counting pass checks the row: exactly k values
// at or above the k-th pick and no NaN. Where that holds, the k largest values are distinct and
// strictly above every other value, so they and their order are fixed by the values alone and
// torch.topk gives the same indices. A row that fails the check (a tie among or at the edge of
// its top k, a NaN, a +inf, fewer than k values above -inf) is flagged, and the caller asks torch.topk
// for those rows, whose order among equal values is its own (moekit/kernels/topk.py).
//
//   moekit::topk_rows(scores, k) -> (index, flagged): scores [T, n] contiguous fp32, 1 <= k <= n;
//   index [T, k] int64 (a flagged row's is unspecified), flagged [T] bool.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>

namespace {

// Row `v` of n scores: its k largest values' indices into `index`, largest first; false where the
// row must go to torch.topk (see the header).
bool distinct_topk_row(const float* v, int64_t n, int64_t k, int64_t* index) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  float below = kInf;  // the last pick: the next pick is the largest value under it
  for (int64_t pick = 0; pick < k; ++pick) {
    float best = -kInf;
#pragma omp simd reduction(max : best)
    for (int64_t j = 0; j < n; ++j) {
      const float x = v[j] < below ? v[j] : -kInf;
      best = x > best ? x : best;
    }
    if (!(best > -kInf)) return false;  // fewer than k values above -inf (or the rest NaN)
    int32_t at = static_cast<int32_t>(n);  // its first position (best is one of v's values)
#pragma omp simd reduction(min : at)
    for (int32_t j = 0; j < static_cast<int32_t>(n); ++j) at = v[j] == best && j < at ? j : at;
    index[pick] = at;
    below = best;
  }
  int64_t at_or_above = 0, nan = 0;
#pragma omp simd reduction(+ : at_or_above, nan)
  for (int64_t j = 0; j < n; ++j) {
    at_or_above += v[j] >= below;
    nan += v[j] != v[j];
  }
  return at_or_above == k && nan == 0;
}

std::tuple<at::Tensor, at::Tensor> topk_rows(const at::Tensor& scores, int64_t k) {
  const char* op = "moekit::topk_rows";
  TORCH_CHECK(scores.dim() == 2 && scores.scalar_type() == at::kFloat && scores.device().is_cpu() &&
                  scores.is_contiguous(),
              op, ": scores must be a contiguous float32 CPU tensor [T, n]");
  const int64_t rows = scores.size(0), n = scores.size(1);
  TORCH_CHECK(k >= 1 && k <= n, op, ": k must be in [1, ", n, "], got ", k);
  TORCH_CHECK(n <= std::numeric_limits<int32_t>::max(), op, ": rows of more than 2^31 - 1 scores");
  auto index = at::empty({rows, k}, scores.options().dtype(at::kLong));
  auto flagged = at::empty({rows}, scores.options().dtype(at::kBool));
  const float* S = scores.data_ptr<float>();
  int64_t* I = index.data_ptr<int64_t>();
  bool* F = flagged.data_ptr<bool>();
  // about 32 K score comparisons per task, so that a decode step's few rows stay on one thread
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, n * k));
  at::parallel_for(0, rows, grain, [&](int64_t first, int64_t last) {
    for (int64_t t = first; t < last; ++t) F[t] = !distinct_topk_row(S + t * n, n, k, I + t * k);
  });
  return {index, flagged};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moekit, m) {
  m.def("topk_rows(Tensor scores, int k) -> (Tensor, Tensor)");
  m.impl("topk_rows", c10::DispatchKey::CPU, TORCH_FN(topk_rows));
}
