// A stable sort of small non-negative integer keys (expert ids, token ids) by counting: the
// grouping step of routing.
//
// Why: every router groups its [T, k] choices by expert with a stable sort, and the combine orders
// the expert-sorted rows by token with another, once per layer and step. numpy's radix sort (the
// portable path, moekit/routing/keysort.py) with its conversions, host reads of the keys' range,
// the gather of the sorted keys and the token runs' bincount and cumsum took 0.26 + 0.24 ms for the
// 16,384 choices of 2048 tokens over 128 experts, on one thread, in a very fine layer's forward of
// 10 ms (BENCHMARKS.md §13). Counting is two passes over the keys and one over the counts.
//
//   moekit::stable_counting_sort(keys, num_keys) -> (sorted, order, bounds): keys [n] int64, each in
//   [0, num_keys); order [n] int64, the stable permutation (equal keys in their original order),
//   sorted = keys[order], and bounds [num_keys + 1] int64, key j's run being
//   sorted[bounds[j]:bounds[j + 1]].

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> stable_counting_sort(const at::Tensor& keys, int64_t num_keys) {
  const char* op = "moekit::stable_counting_sort";
  TORCH_CHECK(num_keys >= 0, op, ": num_keys must be non-negative, got ", num_keys);
  TORCH_CHECK(keys.dim() == 1 && keys.scalar_type() == at::kLong && keys.device().is_cpu(), op,
              ": keys must be a 1-D int64 CPU tensor");
  const at::Tensor contiguous = keys.contiguous();
  const int64_t n = contiguous.size(0);
  const int64_t* K = contiguous.data_ptr<int64_t>();
  int64_t smallest = 0, largest = -1;
  for (int64_t i = 0; i < n; ++i) {
    smallest = std::min(smallest, K[i]);
    largest = std::max(largest, K[i]);
  }
  TORCH_CHECK(smallest >= 0 && largest < num_keys, op, ": keys must be in [0, ", num_keys, "), got ",
              smallest < 0 ? smallest : largest);
  const auto options = contiguous.options();
  at::Tensor bounds = at::zeros({num_keys + 1}, options);
  at::Tensor order = at::empty({n}, options);
  at::Tensor sorted = at::empty({n}, options);
  int64_t* B = bounds.data_ptr<int64_t>();
  int64_t *O = order.data_ptr<int64_t>(), *S = sorted.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) ++B[K[i] + 1];                  // each key's count, one place up
  for (int64_t j = 0; j < num_keys; ++j) B[j + 1] += B[j];         // its run's start
  std::vector<int64_t> next(B, B + num_keys);                      // the next free place in each run
  for (int64_t i = 0; i < n; ++i) {
    const int64_t at = next[K[i]]++;
    O[at] = i;
    S[at] = K[i];
  }
  return {sorted, order, bounds};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moekit, m) {
  m.def("stable_counting_sort(Tensor keys, int num_keys) -> (Tensor, Tensor, Tensor)");
  m.impl("stable_counting_sort", c10::DispatchKey::CPU, TORCH_FN(stable_counting_sort));
}
