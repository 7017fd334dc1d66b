// RMSNorm of fp32 rows in one call, forward and backward, with torch's arithmetic in torch's order.
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
//
// Training runs the same arithmetic over many rows, and autograd's derivative of torch's ops, whose
// passes over x's size (seven ops forward, about a dozen backward) took a tenth of a small model's
// training step (BENCHMARKS.md §2); the rows are split over torch's threads (each row's values do
// not depend on the split):
//
//   moekit::rms_norm_forward(x, weight?, eps) -> (y, rstd): y as rms_norm_rows gives it, rstd [rows]
//     each row's scale 1 / sqrt(mean(x^2) + eps).
//   moekit::rms_norm_backward(g, x, weight?, rstd, weight_grad) -> (through_scale, through_square,
//     g_normed): for dL/dy = g [..., n] contiguous, the two terms of dL/dx that autograd adds to x's
//     gradient one after the other (through x * rstd, then through x^2), and with weight_grad,
//     g * (x * rstd), whose sum over rows (torch's, `sum_to_size`) is dL/dweight (else empty).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "torch_sum.h"

#if defined(MOEKIT_SIMD)

namespace {

using namespace moekit_torch_sum;

const float* checked_weight(const std::optional<at::Tensor>& weight, int64_t n, const char* op) {
  if (!weight.has_value()) return nullptr;
  TORCH_CHECK(weight->scalar_type() == at::kFloat && weight->device().is_cpu() && weight->is_contiguous() &&
                  weight->dim() == 1 && weight->size(0) == n,
              op, ": weight must be a contiguous float32 CPU tensor [", n, "]");
  return weight->data_ptr<float>();
}

void check_float_rows(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.device().is_cpu() && x.is_contiguous() && x.dim() >= 1, op,
              ": x must be a contiguous float32 CPU tensor");
}

// about torch's grain (32768 values) a task: small inputs stay on the calling thread
int64_t row_grain(int64_t n) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(n, 1)); }

at::Tensor rms_norm_rows(const at::Tensor& x, const std::optional<at::Tensor>& weight, double eps) {
  const char* op = "moekit::rms_norm_rows";
  check_float_rows(x, op);
  const int64_t n = x.size(-1), rows = n ? x.numel() / n : 0;
  const float* W = checked_weight(weight, n, op);
  at::Tensor out = at::empty_like(x);
  const float* X = x.data_ptr<float>();
  float* O = out.data_ptr<float>();
  const float eps32 = static_cast<float>(eps);
  std::vector<float> squares(static_cast<size_t>(n));
  for (int64_t r = 0; r < rows; ++r) rms_norm_row(X + r * n, O + r * n, n, eps32, W, squares.data());
  return out;
}

std::tuple<at::Tensor, at::Tensor> rms_norm_forward(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                                    double eps) {
  const char* op = "moekit::rms_norm_forward";
  check_float_rows(x, op);
  const int64_t n = x.size(-1), rows = n ? x.numel() / n : 0;
  const float* W = checked_weight(weight, n, op);
  at::Tensor out = at::empty_like(x);
  at::Tensor rstd = at::empty({rows}, x.options());
  const float* X = x.data_ptr<float>();
  float *O = out.data_ptr<float>(), *R = rstd.data_ptr<float>();
  const float eps32 = static_cast<float>(eps);
  at::parallel_for(0, rows, row_grain(n), [&](int64_t begin, int64_t end) {
    std::vector<float> squares(static_cast<size_t>(n));
    for (int64_t r = begin; r < end; ++r) R[r] = rms_norm_row(X + r * n, O + r * n, n, eps32, W, squares.data());
  });
  return {out, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_backward(const at::Tensor& grad, const at::Tensor& x,
                                                                 const std::optional<at::Tensor>& weight,
                                                                 const at::Tensor& rstd, bool weight_grad) {
  const char* op = "moekit::rms_norm_backward";
  check_float_rows(x, op);
  TORCH_CHECK(grad.scalar_type() == at::kFloat && grad.device().is_cpu() && grad.is_contiguous() &&
                  grad.sizes() == x.sizes(),
              op, ": grad must be a contiguous float32 CPU tensor of x's shape");
  const int64_t n = x.size(-1), rows = n ? x.numel() / n : 0;
  TORCH_CHECK(rstd.scalar_type() == at::kFloat && rstd.is_contiguous() && rstd.numel() == rows, op,
              ": rstd must be a contiguous float32 tensor of ", rows, " values");
  const float* W = checked_weight(weight, n, op);
  at::Tensor through_scale = at::empty_like(x), through_square = at::empty_like(x);
  at::Tensor g_normed = weight_grad ? at::empty_like(x) : at::empty({0}, x.options());
  const float *G = grad.data_ptr<float>(), *X = x.data_ptr<float>(), *R = rstd.data_ptr<float>();
  float *A = through_scale.data_ptr<float>(), *B = through_square.data_ptr<float>();
  float* N = weight_grad ? g_normed.data_ptr<float>() : nullptr;
  at::parallel_for(0, rows, row_grain(n), [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(static_cast<size_t>(n));
    for (int64_t r = begin; r < end; ++r)
      rms_norm_row_backward(G + r * n, X + r * n, W, R[r], n, A + r * n, B + r * n, N ? N + r * n : nullptr,
                            scratch.data());
  });
  return {through_scale, through_square, g_normed};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moekit, m) {
  m.def("rms_norm_rows(Tensor x, Tensor? weight, float eps) -> Tensor");
  m.impl("rms_norm_rows", c10::DispatchKey::CPU, TORCH_FN(rms_norm_rows));
  m.def("rms_norm_forward(Tensor x, Tensor? weight, float eps) -> (Tensor, Tensor)");
  m.impl("rms_norm_forward", c10::DispatchKey::CPU, TORCH_FN(rms_norm_forward));
  m.def(
      "rms_norm_backward(Tensor grad, Tensor x, Tensor? weight, Tensor rstd, bool weight_grad) -> "
      "(Tensor, Tensor, Tensor)");
  m.impl("rms_norm_backward", c10::DispatchKey::CPU, TORCH_FN(rms_norm_backward));
}

#endif  // MOEKIT_SIMD
