// RoPE's rotation ("half" layout) of a few fp32 rows in one call, with torch's arithmetic.
//
// Why: transformers' rotation, x * cos + rotate_half(x) * sin, is five ops on the CPU (two
// products, a roll, a sum, and the views between), each with its own setup: about 10 us for a
// decoding step's queries and keys where the arithmetic takes well under one, twice per layer of
// a step. Here one call does the same operations on each row: each product rounded to fp32, then
// their sum (no fused multiply-add, which would round once), so the values are torch's bit for
// bit. The Python side uses it only where a probe at first use finds them equal
// (moekit/kernels/rope.py).
//
//   moekit::rope_half_rows(x, cos, sin) -> y: x [B, N, S, D] contiguous fp32, cos and sin
//     [B, 1, S, D] contiguous (broadcast over the N heads; sin's first half negated, as
//     `interop.rope.head_tables` gives it); y = x * cos + roll(x, D / 2) * sin.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdint>

#include "rotation.h"

namespace {

using moekit_rotation::rotate_row;

at::Tensor rope_half_rows(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const char* op = "moekit::rope_half_rows";
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.device().is_cpu() && x.is_contiguous() && x.dim() == 4, op,
              ": x must be a contiguous float32 CPU tensor [B, N, S, D]");
  const int64_t B = x.size(0), N = x.size(1), S = x.size(2), D = x.size(3);
  TORCH_CHECK(D % 2 == 0, op, ": the feature size must be even, got ", D);
  for (const auto* table : {&cos, &sin})
    TORCH_CHECK(table->scalar_type() == at::kFloat && table->device().is_cpu() && table->is_contiguous() &&
                    table->dim() == 4 && table->size(0) == B && table->size(1) == 1 && table->size(2) == S &&
                    table->size(3) == D,
                op, ": cos and sin must be contiguous float32 CPU tensors [", B, ", 1, ", S, ", ", D, "]");
  at::Tensor out = at::empty_like(x);
  const float *X = x.data_ptr<float>(), *C = cos.data_ptr<float>(), *Sn = sin.data_ptr<float>();
  float* O = out.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t n = 0; n < N; ++n)
      for (int64_t s = 0; s < S; ++s) {
        const int64_t row = ((b * N + n) * S + s) * D, table = (b * S + s) * D;
        rotate_row(X + row, C + table, Sn + table, O + row, D / 2);
      }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moekit, m) {
  m.def("rope_half_rows(Tensor x, Tensor cos, Tensor sin) -> Tensor");
  m.impl("rope_half_rows", c10::DispatchKey::CPU, TORCH_FN(rope_half_rows));
}
