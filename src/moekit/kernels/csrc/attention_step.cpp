// A decoding step's queries, keys and values from their joined projection, in one call: each
// head's RMSNorm (Qwen3's per-head q and k norms, where the model has them), RoPE's rotation of
// the queries and keys, and the keys and values written into the KV cache's buffers; the queries
// are returned for attention. With torch's arithmetic in torch's order (the norm's sum as
// torch's CPU sum adds a row, `torch_sum.h`; products rounded before their sums, `rotation.h`),
// so the values are those of the ops it stands in for, bit for bit.
//
// Why: between the projection and attention, a step of one layer ran seven ops (a view, two
// splits, the norm, its weight's product, the rotation, the cache append) with Python between
// them, for a few hundred values; the Python side uses this only where the probes of the norm
// and the rotation kernels found torch's values (moekit/kernels/attention_step.py).
//
//   moekit::qk_norm_rope_append(qkv, norm?, eps, cos, sin, keys_buffer, values_buffer, slot, heads)
//     -> q [B, heads, 1, D]: qkv [B, (heads + 2 kv) D] contiguous fp32, laid out [q heads | k heads
//     | v heads]; norm [heads + kv, D] (per head, the q norm's weight in the q rows) or None;
//     cos and sin [B, 1, 1, D] or [1, 1, 1, D] for every row (`interop.rope.head_tables`);
//     buffers [B, kv, slots, D] with unit stride along D, the step written at `slot`.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#include "rotation.h"
#include "torch_sum.h"

#if defined(MOEKIT_SIMD)

namespace {

using moekit_rotation::rotate_row;
using moekit_torch_sum::rms_norm_row;

at::Tensor qk_norm_rope_append(const at::Tensor& qkv, const std::optional<at::Tensor>& norm, double eps,
                               const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& keys_buffer,
                               const at::Tensor& values_buffer, int64_t slot, int64_t heads) {
  const char* op = "moekit::qk_norm_rope_append";
  TORCH_CHECK(qkv.scalar_type() == at::kFloat && qkv.device().is_cpu() && qkv.is_contiguous() && qkv.dim() == 2, op,
              ": qkv must be a contiguous float32 CPU tensor [B, (heads + 2 kv) D]");
  for (const auto* buffer : {&keys_buffer, &values_buffer})
    TORCH_CHECK(buffer->scalar_type() == at::kFloat && buffer->device().is_cpu() && buffer->dim() == 4 &&
                    buffer->stride(3) == 1 && buffer->sizes() == keys_buffer.sizes(),
                op, ": the buffers must be float32 CPU tensors [B, kv, slots, D] with unit stride along D");
  const int64_t B = qkv.size(0), kv = keys_buffer.size(1), D = keys_buffer.size(3);
  TORCH_CHECK(keys_buffer.size(0) == B && heads >= 1 && qkv.size(1) == (heads + 2 * kv) * D && D % 2 == 0, op,
              ": qkv [", B, ", ", qkv.size(1), "] does not hold ", heads, " query and 2 x ", kv, " key/value heads of ",
              D, " (even)");
  TORCH_CHECK(slot >= 0 && slot < keys_buffer.size(2), op, ": slot ", slot, " is outside the buffers' ",
              keys_buffer.size(2));
  for (const auto* table : {&cos, &sin})
    TORCH_CHECK(table->scalar_type() == at::kFloat && table->device().is_cpu() && table->is_contiguous() &&
                    table->sizes() == cos.sizes() && (table->numel() == B * D || table->numel() == D),
                op, ": cos and sin must be contiguous float32 CPU tensors [B or 1, 1, 1, D]");
  const int64_t table_stride = cos.numel() == D ? 0 : D;  // one table row for every batch row
  const float* N = nullptr;
  if (norm.has_value()) {
    TORCH_CHECK(norm->scalar_type() == at::kFloat && norm->device().is_cpu() && norm->is_contiguous() &&
                    norm->numel() == (heads + kv) * D,
                op, ": norm must be a contiguous float32 CPU tensor [heads + kv, D]");
    N = norm->data_ptr<float>();
  }
  at::Tensor q = at::empty({B, heads, 1, D}, qkv.options());
  const float *X = qkv.data_ptr<float>(), *C = cos.data_ptr<float>(), *Sn = sin.data_ptr<float>();
  float *Q = q.data_ptr<float>(), *K = keys_buffer.data_ptr<float>(), *V = values_buffer.data_ptr<float>();
  const float eps32 = static_cast<float>(eps);
  std::vector<float> normed(static_cast<size_t>(D)), squares(static_cast<size_t>(D));
  for (int64_t b = 0; b < B; ++b) {
    const float* row = X + b * qkv.size(1);
    const float *c = C + b * table_stride, *s = Sn + b * table_stride;
    for (int64_t n = 0; n < heads + kv; ++n) {
      const float* head = row + n * D;
      if (N != nullptr) {
        rms_norm_row(head, normed.data(), D, eps32, N + n * D, squares.data());
        head = normed.data();
      }
      float* out = n < heads ? Q + (b * heads + n) * D
                             : K + b * keys_buffer.stride(0) + (n - heads) * keys_buffer.stride(1) +
                                   slot * keys_buffer.stride(2);
      rotate_row(head, c, s, out, D / 2);
    }
    for (int64_t n = 0; n < kv; ++n)
      std::memcpy(V + b * values_buffer.stride(0) + n * values_buffer.stride(1) + slot * values_buffer.stride(2),
                  row + (heads + kv + n) * D, static_cast<size_t>(D) * sizeof(float));
  }
  return q;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moekit, m) {
  m.def(
      "qk_norm_rope_append(Tensor qkv, Tensor? norm, float eps, Tensor cos, Tensor sin, Tensor(a!) keys_buffer, "
      "Tensor(b!) values_buffer, int slot, int heads) -> Tensor");
  m.impl("qk_norm_rope_append", c10::DispatchKey::CPU, TORCH_FN(qk_norm_rope_append));
}

#endif  // MOEKIT_SIMD
