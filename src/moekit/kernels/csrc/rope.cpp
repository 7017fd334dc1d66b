// RoPE's rotation ("half" layout) in one pass over the rows, forward and backward, with torch's
// arithmetic.
//
// Why: transformers' rotation, x * cos + rotate_half(x) * sin, is five ops on the CPU (two
// products, a roll or a negation and a concatenation, a sum), each with its own setup and its own
// pass over x's size: about 10 us for a decoding step's queries and keys where the arithmetic takes
// well under one, and in training about a tenth of a small model's step, forward and backward
// (whose slices add zero-filled gradients). Here one call does the same operations on each row:
// each product rounded to fp32, then their sum (no fused multiply-add, which would round once), so
// the values are torch's bit for bit. The Python side uses it only where a probe at first use finds
// them equal (moekit/kernels/rope.py).
//
//   moekit::rope_half(x, cos, sin, signed_sin, backward) -> y: x [B, N, S, D] fp32 with unit
//     feature stride, any other strides (queries and keys are transposed views of their
//     projections); y laid out as torch's ops lay it out (as x; dL/dx contiguous). cos and sin
//     [B or 1, S, D] or [B or 1, 1, S, D] contiguous, broadcast over the N heads (and the batch).
//     signed_sin: sin's first half negated (`interop.rope.head_tables`: y = x * cos + roll(x, D / 2)
//     * sin) or as it comes (`models.lm.rope_tables`: y = x * cos + cat(-x2, x1) * sin).
//     backward: x is dL/dy, and y is dL/dx as autograd computes it through those ops. The rows
//     are split over torch's threads (each row's values do not depend on the split).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "rotation.h"

namespace {

using moekit_rotation::rotate_row;
using moekit_rotation::rotate_row_backward;
using moekit_rotation::rotate_row_plain;

at::Tensor rope_half(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool signed_sin,
                     bool backward) {
  const char* op = "moekit::rope_half";
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.device().is_cpu() && x.dim() == 4 && x.stride(3) == 1, op,
              ": x must be a float32 CPU tensor [B, N, S, D] with unit feature stride");
  const int64_t B = x.size(0), N = x.size(1), S = x.size(2), D = x.size(3);
  TORCH_CHECK(D % 2 == 0, op, ": the feature size must be even, got ", D);
  // tables [T, S, D] or [T, 1, S, D], T = B or 1
  const bool four = cos.dim() == 4;
  const int64_t table_batch = cos.dim() == 3 || four ? cos.size(0) : -1;
  for (const auto* table : {&cos, &sin})
    TORCH_CHECK(table->scalar_type() == at::kFloat && table->device().is_cpu() && table->is_contiguous() &&
                    table->dim() == cos.dim() && (table_batch == B || table_batch == 1) &&
                    table->size(0) == table_batch && (!four || table->size(1) == 1) &&
                    table->size(-2) == S && table->size(-1) == D,
                op, ": cos and sin must be contiguous float32 CPU tensors [", B, " or 1, (1,) ", S, ", ", D, "]");
  // the layouts torch's ops give, which decide the order of later sums (the probe checks them):
  // y laid out as x where x is dense, dL/dx contiguous whatever dL/dy's layout
  at::Tensor out = backward ? at::empty(x.sizes(), x.options()) : at::empty_like(x);
  const float *X = x.data_ptr<float>(), *C = cos.data_ptr<float>(), *Sn = sin.data_ptr<float>();
  float* O = out.data_ptr<float>();
  const int64_t xs[3] = {x.stride(0), x.stride(1), x.stride(2)};
  const int64_t os[3] = {out.stride(0), out.stride(1), out.stride(2)};
  const int64_t half = D / 2, rows = B * N * S;
  // about torch's grain (32768 values) a task: small inputs stay on the calling thread
  const int64_t grain = std::max<int64_t>(1, 32768 / D);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t s = row % S, n = (row / S) % N, b = row / (S * N);
      const int64_t table = ((table_batch == 1 ? 0 : b) * S + s) * D;
      const float* in = X + b * xs[0] + n * xs[1] + s * xs[2];
      float* o = O + b * os[0] + n * os[1] + s * os[2];
      const float *c = C + table, *sn = Sn + table;
      if (backward && signed_sin)
        rotate_row_backward<true>(in, c, sn, o, half);
      else if (backward)
        rotate_row_backward<false>(in, c, sn, o, half);
      else if (signed_sin)
        rotate_row(in, c, sn, o, half);
      else
        rotate_row_plain(in, c, sn, o, half);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moekit, m) {
  m.def("rope_half(Tensor x, Tensor cos, Tensor sin, bool signed_sin, bool backward) -> Tensor");
  m.impl("rope_half", c10::DispatchKey::CPU, TORCH_FN(rope_half));
}
