// SwiGLU, silu(gate) * up, and its derivative in torch's own arithmetic, for layers that train
// through torch's ops (shared experts): one pass each way, the same bits.
//
// Why: a shared expert's silu(gate) * up under autograd is torch's silu, a product, and backward
// two products, silu's derivative and the chunk's concatenation of the halves' gradients, each a
// pass over [rows, ff]: fwd+bwd for 4096 rows of 256 took 3.85 ms on one core of an Intel Xeon,
// 1.71 ms here (BENCHMARKS.md §2). moekit's fused SwiGLU kernel (swiglu_rows.h) rounds its sigmoid otherwise, and a shared
// expert moved onto it changed a model's bits (BENCHMARKS.md §13, "a seventh time"); this one
// repeats torch's vector kernels: exp as SLEEF's expf_u10 (fused multiply-adds, the scale by 2^q
// in two halves), silu(x) = x / (1 + exp(-x)), and silu's derivative dy * s * (1 + x * (1 - s))
// with s = 1 / (1 + exp(-x)) and its last product and sum fused, as torch's build computes it.
// torch runs its scalar code (libm's expf) on a row's last elements past a whole number of vector
// steps, so the Python side takes only rows of a multiple of 32 values and uses the kernel only
// where a probe at first use finds torch's values bit for bit (moekit/kernels/torch_swiglu.py).
// NaN in gives NaN out (its sign bit may differ from torch's).
//
//   moekit::torch_swiglu_forward(h) -> y: h [..., 2 ff] contiguous fp32 = [gate | up], y [..., ff].
//   moekit::torch_swiglu_backward(h, grad) -> dL/dh: grad [..., ff] contiguous, dL/dh [..., 2 ff]
//     = [dL/dgate | dL/dup].

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

// SLEEF's expf_u10 (sleefsimdsp.c, xexpf) with its constants, as torch's Vectorized<float>::exp
// runs it: d = q ln2 + s (ln2 in two parts), a degree-6 polynomial in s, times 2^q as two powers.
__attribute__((optimize("fp-contract=off"))) inline float sleef_expf_u10(float d) {
  const float q = std::rint(d * 1.442695040888963407359924681001892137426645954152985934135449406931f);
  float s = std::fma(q, -0.693145751953125f, d);
  s = std::fma(q, -1.428606765330187045e-06f, s);
  float u = 0.000198527617612853646278381f;
  u = std::fma(u, s, 0.00139304355252534151077271f);
  u = std::fma(u, s, 0.00833336077630519866943359f);
  u = std::fma(u, s, 0.0416664853692054748535156f);
  u = std::fma(u, s, 0.166666671633720397949219f);
  u = std::fma(u, s, 0.5f);
  u = 1.0f + std::fma(s * s, u, s);
  const int32_t e = static_cast<int32_t>(q), half = e >> 1;
  const int32_t low_bits = (half + 0x7f) << 23, high_bits = (e - half + 0x7f) << 23;
  float low, high;
  std::memcpy(&low, &low_bits, sizeof low);
  std::memcpy(&high, &high_bits, sizeof high);
  u = u * low * high;
  u = d < -104.0f ? 0.0f : u;
  return 100.0f < d ? INFINITY : u;
}

__attribute__((optimize("fp-contract=off"))) void forward_row(const float* gate, const float* up, float* out,
                                                              int64_t ff) {
  for (int64_t j = 0; j < ff; ++j) {
    const float activated = gate[j] / (1.0f + sleef_expf_u10(-gate[j]));
    out[j] = activated * up[j];
  }
}

// autograd through silu(gate) * up: d up = grad * silu(gate); d gate = silu'(gate) at grad * up
__attribute__((optimize("fp-contract=off"))) void backward_row(const float* gate, const float* up,
                                                               const float* grad, float* d_gate, float* d_up,
                                                               int64_t ff) {
  for (int64_t j = 0; j < ff; ++j) {
    const float x = gate[j];
    const float denominator = 1.0f + sleef_expf_u10(-x);
    d_up[j] = grad[j] * (x / denominator);
    const float dy = grad[j] * up[j];
    const float sigmoid = 1.0f / denominator;
    d_gate[j] = (dy * sigmoid) * std::fma(x, 1.0f - sigmoid, 1.0f);
  }
}

void check_h(const at::Tensor& h, const char* op) {
  TORCH_CHECK(h.scalar_type() == at::kFloat && h.device().is_cpu() && h.is_contiguous() && h.dim() >= 1 &&
                  h.size(-1) % 2 == 0,
              op, ": h must be a contiguous float32 CPU tensor [..., 2 ff]");
}

// about torch's grain (32768 values) a task
int64_t grain(int64_t ff) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(2 * ff, 1)); }

at::Tensor torch_swiglu_forward(const at::Tensor& h) {
  check_h(h, "moekit::torch_swiglu_forward");
  const int64_t ff = h.size(-1) / 2, rows = ff ? h.numel() / (2 * ff) : 0;
  auto sizes = h.sizes().vec();
  sizes.back() = ff;
  at::Tensor out = at::empty(sizes, h.options());
  const float* H = h.data_ptr<float>();
  float* O = out.data_ptr<float>();
  at::parallel_for(0, rows, grain(ff), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) forward_row(H + r * 2 * ff, H + r * 2 * ff + ff, O + r * ff, ff);
  });
  return out;
}

at::Tensor torch_swiglu_backward(const at::Tensor& h, const at::Tensor& grad) {
  const char* op = "moekit::torch_swiglu_backward";
  check_h(h, op);
  const int64_t ff = h.size(-1) / 2, rows = ff ? h.numel() / (2 * ff) : 0;
  TORCH_CHECK(grad.scalar_type() == at::kFloat && grad.device().is_cpu() && grad.is_contiguous() &&
                  grad.numel() == rows * ff && grad.size(-1) == ff,
              op, ": grad must be a contiguous float32 CPU tensor [..., ", ff, "]");
  at::Tensor out = at::empty_like(h);
  const float *H = h.data_ptr<float>(), *G = grad.data_ptr<float>();
  float* D = out.data_ptr<float>();
  at::parallel_for(0, rows, grain(ff), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* row = H + r * 2 * ff;
      backward_row(row, row + ff, G + r * ff, D + r * 2 * ff, D + r * 2 * ff + ff, ff);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moekit, m) {
  m.def("torch_swiglu_forward(Tensor h) -> Tensor");
  m.impl("torch_swiglu_forward", c10::DispatchKey::CPU, TORCH_FN(torch_swiglu_forward));
  m.def("torch_swiglu_backward(Tensor h, Tensor grad) -> Tensor");
  m.impl("torch_swiglu_backward", c10::DispatchKey::CPU, TORCH_FN(torch_swiglu_backward));
}
