// RMSNorm of a few fp32 rows in one call, with torch's arithmetic in torch's order.
//
// Why: torch's fp32 rms_norm on the CPU is a composite of seven element-wise and reduction ops
// (pow, sum, div, add, rsqrt, mul, mul), each setting up its own iteration: 15-30 us for one row
// of 32 to 1024 values, where the arithmetic takes well under a microsecond. A decoding step of a
// small model runs several per layer. Here one call does the same operations on each row: the
// squares summed as torch's CPU sum kernel sums a contiguous row (`cascade_sum`: vectors of 8
// lanes, torch's AVX2 kernel, which AVX-512 CPUs run too (torch_sum.h), in four interleaved
// accumulators with cascade levels, the scalar tail first, then the vector's lanes in order; a
// row shorter than a vector as four interleaved scalars), divided
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

#include "torch_sum.h"

#if defined(MOEKIT_SIMD)

namespace {

using namespace moekit_torch_sum;

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
  std::vector<float> squares(static_cast<size_t>(n));
  for (int64_t r = 0; r < rows; ++r) rms_norm_row(X + r * n, O + r * n, n, eps32, W, squares.data());
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moekit, m) {
  m.def("rms_norm_rows(Tensor x, Tensor? weight, float eps) -> Tensor");
  m.impl("rms_norm_rows", c10::DispatchKey::CPU, TORCH_FN(rms_norm_rows));
}

#endif  // MOEKIT_SIMD
