// A decoding step's keys and values written into a KV cache's buffers in one call.
//
// Why: appending through views is a slice and a copy for the keys and again for the values, each
// op with its own setup (a few microseconds apiece where the copy moves a few hundred bytes), in
// every attention layer of every step.
//
//   moekit::kv_append_(keys_buffer, values_buffer, keys, values, slot): keys_buffer[:, :, slot:
//     slot + S] = keys and the same for the values; buffers [B, KV, slots, D] with unit stride
//     along D, keys and values [B, KV, S, D] of their dtype.

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>

namespace {

void append_one(const char* op, const at::Tensor& buffer, const at::Tensor& step, int64_t slot) {
  TORCH_CHECK(buffer.dim() == 4 && step.dim() == 4 && buffer.device().is_cpu() && step.device().is_cpu() &&
                  buffer.scalar_type() == step.scalar_type(),
              op, ": buffers and steps must be 4-D CPU tensors of one dtype");
  TORCH_CHECK(buffer.size(0) == step.size(0) && buffer.size(1) == step.size(1) && buffer.size(3) == step.size(3), op,
              ": a step of shape ", step.sizes(), " does not fit a buffer of shape ", buffer.sizes());
  TORCH_CHECK(slot >= 0 && slot + step.size(2) <= buffer.size(2), op, ": slots [", slot, ", ",
              slot + step.size(2), ") are outside the buffer's ", buffer.size(2));
  TORCH_CHECK(buffer.stride(3) == 1 && step.stride(3) == 1, op, ": unit stride along the last dimension expected");
  const int64_t B = step.size(0), H = step.size(1), S = step.size(2);
  const size_t row = static_cast<size_t>(step.size(3) * step.element_size());
  const char* from = static_cast<const char*>(step.data_ptr());
  char* to = static_cast<char*>(buffer.data_ptr());
  const int64_t size = step.element_size();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t s = 0; s < S; ++s)
        std::memcpy(to + (b * buffer.stride(0) + h * buffer.stride(1) + (slot + s) * buffer.stride(2)) * size,
                    from + (b * step.stride(0) + h * step.stride(1) + s * step.stride(2)) * size, row);
}

void kv_append_(const at::Tensor& keys_buffer, const at::Tensor& values_buffer, const at::Tensor& keys,
                const at::Tensor& values, int64_t slot) {
  const char* op = "moekit::kv_append_";
  append_one(op, keys_buffer, keys, slot);
  append_one(op, values_buffer, values, slot);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moekit, m) {
  m.def("kv_append_(Tensor(a!) keys_buffer, Tensor(b!) values_buffer, Tensor keys, Tensor values, int slot) -> ()");
  m.impl("kv_append_", c10::DispatchKey::CPU, TORCH_FN(kv_append_));
}
