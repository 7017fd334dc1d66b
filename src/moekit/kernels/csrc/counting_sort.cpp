// A stable sort of small non-negative integer keys (expert ids, token ids) by counting: the
// grouping step of routing.
//
// Why: every router groups its [T, k] choices by expert with a stable sort, and the combine orders
// the expert-sorted rows by token with another, once per layer and step. numpy's radix sort (the
// portable path, moekit/routing/keysort.py) with its conversions, host reads of the keys' range,
// the gather of the sorted keys, the token runs' bincount and cumsum, and torch's int64 division
// and remainder for each choice's token and rank took 0.32 + 0.29 ms for the 16,384 choices of
// 2048 tokens over 128 experts, in a very fine layer's forward of 10-11 ms; counted, 0.11 + 0.15
// (BENCHMARKS.md §13). Counting is two passes over the keys and one over the counts, and it knows
// each key's place.
//
//   moekit::stable_counting_sort(keys, num_keys) -> (sorted, order, bounds): keys [n] int64, each in
//   [0, num_keys); order [n] int64, the stable permutation (equal keys in their original order),
//   sorted = keys[order], and bounds [num_keys + 1] int64, key j's run being
//   sorted[bounds[j]:bounds[j + 1]].
//   moekit::stable_counting_sort_cells(cells, num_keys) -> (sorted, order, row, column): the same
//   for the cells of cells [rows, width] in row-major order (a router's [T, k] choices), with each
//   sorted cell's row and column (order // width and order % width, without dividing).

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

// The places of a stable counting sort of keys [rows, width] (row-major), into `bounds` [num_keys
// + 1] (zeroed) and the outputs; `row` and `column` may be null.
void place_by_key(const char* op, const int64_t* K, int64_t rows, int64_t width, int64_t num_keys, int64_t* B,
                  int64_t* sorted, int64_t* order, int64_t* row, int64_t* column) {
  const int64_t n = rows * width;
  int64_t smallest = 0, largest = -1;
  for (int64_t i = 0; i < n; ++i) {
    smallest = std::min(smallest, K[i]);
    largest = std::max(largest, K[i]);
  }
  TORCH_CHECK(smallest >= 0 && largest < num_keys, op, ": keys must be in [0, ", num_keys, "), got ",
              smallest < 0 ? smallest : largest);
  for (int64_t i = 0; i < n; ++i) ++B[K[i] + 1];            // each key's count, one place up
  for (int64_t j = 0; j < num_keys; ++j) B[j + 1] += B[j];   // its run's start
  std::vector<int64_t> next(B, B + num_keys);                // the next free place in each run
  for (int64_t r = 0, i = 0; r < rows; ++r) {
    for (int64_t c = 0; c < width; ++c, ++i) {
      const int64_t at = next[K[i]]++;
      order[at] = i;
      sorted[at] = K[i];
      if (row != nullptr) {
        row[at] = r;
        column[at] = c;
      }
    }
  }
}

void check_keys(const at::Tensor& keys, int64_t dim, int64_t num_keys, const char* op) {
  TORCH_CHECK(num_keys >= 0, op, ": num_keys must be non-negative, got ", num_keys);
  TORCH_CHECK(keys.dim() == dim && keys.scalar_type() == at::kLong && keys.device().is_cpu(), op, ": keys must be a ",
              dim, "-D int64 CPU tensor");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> stable_counting_sort(const at::Tensor& keys, int64_t num_keys) {
  const char* op = "moekit::stable_counting_sort";
  check_keys(keys, 1, num_keys, op);
  const at::Tensor K = keys.contiguous();
  const int64_t n = K.size(0);
  at::Tensor bounds = at::zeros({num_keys + 1}, K.options());
  at::Tensor sorted = at::empty({n}, K.options()), order = at::empty({n}, K.options());
  place_by_key(op, K.data_ptr<int64_t>(), 1, n, num_keys, bounds.data_ptr<int64_t>(), sorted.data_ptr<int64_t>(),
               order.data_ptr<int64_t>(), nullptr, nullptr);
  return {sorted, order, bounds};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> stable_counting_sort_cells(const at::Tensor& cells,
                                                                                      int64_t num_keys) {
  const char* op = "moekit::stable_counting_sort_cells";
  check_keys(cells, 2, num_keys, op);
  const at::Tensor K = cells.contiguous();
  const int64_t rows = K.size(0), width = K.size(1), n = rows * width;
  std::vector<int64_t> bounds(num_keys + 1, 0);
  at::Tensor sorted = at::empty({n}, K.options()), order = at::empty({n}, K.options());
  at::Tensor row = at::empty({n}, K.options()), column = at::empty({n}, K.options());
  place_by_key(op, K.data_ptr<int64_t>(), rows, width, num_keys, bounds.data(), sorted.data_ptr<int64_t>(),
               order.data_ptr<int64_t>(), row.data_ptr<int64_t>(), column.data_ptr<int64_t>());
  return {sorted, order, row, column};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moekit, m) {
  m.def("stable_counting_sort(Tensor keys, int num_keys) -> (Tensor, Tensor, Tensor)");
  m.impl("stable_counting_sort", c10::DispatchKey::CPU, TORCH_FN(stable_counting_sort));
  m.def("stable_counting_sort_cells(Tensor cells, int num_keys) -> (Tensor, Tensor, Tensor, Tensor)");
  m.impl("stable_counting_sort_cells", c10::DispatchKey::CPU, TORCH_FN(stable_counting_sort_cells));
}
