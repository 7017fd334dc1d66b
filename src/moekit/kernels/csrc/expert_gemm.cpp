// moekit's expert kernels: small single-threaded fp32 GEMMs written straight into the caller's
// buffer, and SwiGLU with its derivative in one pass each.
//
// Why: an MoE layer runs hundreds of small products per step (128 rows x 256 x 256 per expert at
// 128 experts). oneDNN, the fastest library kernel torch ships for them on AVX-512 CPUs, costs
// ~10 us per call, repacks the weight on every call and returns a new tensor that the caller must
// copy into its buffer. The products here read both operands in place (only x @ W^T packs a
// weight panel, with 16 x 16 register transposes), write into any row-major view, and run on the
// calling thread: the layer's workers give each core its own experts (moekit.dispatch.workers).
//
// Registered with torch's dispatcher, so that TorchScript code can call them:
//   moekit::mm_into(a, b, out, prefetch_next=None): out = a @ b, all 2-D fp32 CPU tensors; a any
//     strides; out with unit column stride; b with unit stride along either dimension (b = W^T
//     packs panels of W); the memory of prefetch_next is pulled into cache while it runs.
//     Blocking: the output is computed in panels of 64 columns, each as tiles of 6 rows x 64
//     columns held in 24 AVX-512 registers, over blocks of 256 of the inner dimension.
//   moekit::swiglu_into(h, out), moekit::swiglu_backward_into(h, grad, out): SwiGLU of
//     h = [gate | up] and its gradient with respect to h.
// The Python side (moekit/kernels/native.py) checks the CPU, builds this file and probes it.

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>

namespace {

constexpr int kRowsPerTile = 6;
constexpr int kPanel = 64;  // output columns per panel: 4 vectors of 16
constexpr int kInnerBlock = 256;

// Lines of memory to pull into L2 while a product runs (the next expert's weights): one per step
// of the inner loop, so that the loads overlap the arithmetic instead of stalling the next product.
struct Prefetch {
  const char* next = nullptr;
  const char* end = nullptr;
  inline void step() {
    if (next < end) {
      _mm_prefetch(next, _MM_HINT_T1);
      next += 64;
    }
  }
};

// C[0:MR, 0:16*NV] (+)= A[0:MR, 0:K] @ B[0:K, 0:16*NV]; the last vector masked by `tail`.
template <int MR, int NV>
inline void tile(int64_t K, const float* A, int64_t sai, int64_t sak, const float* B, int64_t ldb,
                 float* C, int64_t ldc, __mmask16 tail, bool accumulate, Prefetch& prefetch) {
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j)
      acc[i][j] = accumulate ? _mm512_maskz_loadu_ps(j < NV - 1 ? 0xFFFF : tail, C + i * ldc + 16 * j)
                             : _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    prefetch.step();
    __m512 b[NV];
    const float* row = B + k * ldb;
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) b[j] = _mm512_maskz_loadu_ps(j < NV - 1 ? 0xFFFF : tail, row + 16 * j);
    const float* a = A + k * sak;
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m512 av = _mm512_set1_ps(a[i * sai]);
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) acc[i][j] = _mm512_fmadd_ps(av, b[j], acc[i][j]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) _mm512_mask_storeu_ps(C + i * ldc + 16 * j, j < NV - 1 ? 0xFFFF : tail, acc[i][j]);
}

template <int NV>
void panel_rows(int64_t M, int64_t K, const float* A, int64_t sai, int64_t sak, const float* B,
                int64_t ldb, float* C, int64_t ldc, __mmask16 tail, bool accumulate, Prefetch& prefetch) {
  int64_t i = 0;
  for (; i + kRowsPerTile <= M; i += kRowsPerTile)
    tile<kRowsPerTile, NV>(K, A + i * sai, sai, sak, B, ldb, C + i * ldc, ldc, tail, accumulate, prefetch);
  const float* a = A + i * sai;
  float* c = C + i * ldc;
  switch (M - i) {
    case 5: tile<5, NV>(K, a, sai, sak, B, ldb, c, ldc, tail, accumulate, prefetch); break;
    case 4: tile<4, NV>(K, a, sai, sak, B, ldb, c, ldc, tail, accumulate, prefetch); break;
    case 3: tile<3, NV>(K, a, sai, sak, B, ldb, c, ldc, tail, accumulate, prefetch); break;
    case 2: tile<2, NV>(K, a, sai, sak, B, ldb, c, ldc, tail, accumulate, prefetch); break;
    case 1: tile<1, NV>(K, a, sai, sak, B, ldb, c, ldc, tail, accumulate, prefetch); break;
    default: break;
  }
}

// C[:, 0:width] (+)= A @ B[:, 0:width] for a panel of width <= kPanel columns.
void panel(int64_t M, int64_t width, int64_t K, const float* A, int64_t sai, int64_t sak, const float* B,
           int64_t ldb, float* C, int64_t ldc, bool accumulate, Prefetch& prefetch) {
  const int64_t rest = width % 16;
  const __mmask16 tail = rest ? static_cast<__mmask16>((1u << rest) - 1) : static_cast<__mmask16>(0xFFFF);
  switch ((width + 15) / 16) {
    case 4: panel_rows<4>(M, K, A, sai, sak, B, ldb, C, ldc, tail, accumulate, prefetch); break;
    case 3: panel_rows<3>(M, K, A, sai, sak, B, ldb, C, ldc, tail, accumulate, prefetch); break;
    case 2: panel_rows<2>(M, K, A, sai, sak, B, ldb, C, ldc, tail, accumulate, prefetch); break;
    case 1: panel_rows<1>(M, K, A, sai, sak, B, ldb, C, ldc, tail, accumulate, prefetch); break;
    default: break;
  }
}

inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 4; ++j) {
      t[8 * i + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + 4 + j], 0x88);
      t[8 * i + 4 + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + 4 + j], 0xdd);
    }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0x88);
    r[8 + j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0xdd);
  }
}

// packed[k][j] = W[j][k] for j < width (zero up to kPanel), k < depth; W rows of stride ldw.
void pack_transposed(const float* W, int64_t ldw, int64_t width, int64_t depth, float* packed) {
  for (int64_t block = 0; block < kPanel; block += 16) {
    for (int64_t k = 0; k < depth; k += 16) {
      const int64_t cols = std::min<int64_t>(16, depth - k);
      const __mmask16 mask = static_cast<__mmask16>((1u << cols) - 1);
      __m512 r[16];
      for (int64_t j = 0; j < 16; ++j)
        r[j] = block + j < width ? _mm512_maskz_loadu_ps(mask, W + (block + j) * ldw + k) : _mm512_setzero_ps();
      transpose16(r);
      for (int64_t j = 0; j < cols; ++j) _mm512_storeu_ps(packed + (k + j) * kPanel + block, r[j]);
    }
  }
}

// C[0:M, 0:N] = A[0:M, 0:K] @ W[0:N, 0:K]^T for a few rows (M <= kDotRows), A and W rows unit-stride:
// dot products along K, each weight row read once, in place. For decode, where packing a weight
// panel for one or two rows costs more than the product.
constexpr int64_t kDotRows = 4;

template <int MR>
void dot_rows(int64_t N, int64_t K, const float* A, int64_t lda, const float* W, int64_t ldw, float* C,
              int64_t ldc, Prefetch& prefetch) {
  for (int64_t n = 0; n < N; n += 4) {
    const int64_t width = std::min<int64_t>(4, N - n);
    __m512 acc[MR][4];
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
      prefetch.step();
      const __mmask16 m = K - k >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (K - k)) - 1);
      __m512 w[4];
      for (int j = 0; j < 4; ++j)
        w[j] = j < width ? _mm512_maskz_loadu_ps(m, W + (n + j) * ldw + k) : _mm512_setzero_ps();
      for (int i = 0; i < MR; ++i) {
        const __m512 a = _mm512_maskz_loadu_ps(m, A + i * lda + k);
        for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_fmadd_ps(a, w[j], acc[i][j]);
      }
    }
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < width; ++j) C[i * ldc + n + j] = _mm512_reduce_add_ps(acc[i][j]);
  }
}

void mm_into(const at::Tensor& a, const at::Tensor& b, const at::Tensor& out,
             const std::optional<at::Tensor>& prefetch_next) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && out.dim() == 2, "moekit::mm_into: a, b and out must be 2-D");
  TORCH_CHECK(a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat,
              "moekit::mm_into: a, b and out must be float32");
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu() && out.device().is_cpu(),
              "moekit::mm_into: a, b and out must be on the CPU");
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  TORCH_CHECK(b.size(0) == K && out.size(0) == M && out.size(1) == N, "moekit::mm_into: shapes ", a.sizes(),
              " @ ", b.sizes(), " -> ", out.sizes(), " do not match");
  TORCH_CHECK(out.stride(1) == 1 || N <= 1, "moekit::mm_into: out must have unit column stride");
  TORCH_CHECK(b.stride(1) == 1 || b.stride(0) == 1 || N <= 1 || K <= 1,
              "moekit::mm_into: b must have unit stride along one dimension");
  if (M == 0 || N == 0) return;
  float* C = out.data_ptr<float>();
  if (K == 0) {
    for (int64_t i = 0; i < M; ++i) std::fill(C + i * out.stride(0), C + i * out.stride(0) + N, 0.0f);
    return;
  }
  Prefetch prefetch;
  if (prefetch_next.has_value() && prefetch_next->is_non_overlapping_and_dense()) {
    int64_t span = 1;  // elements from the lowest address to the highest, the tensor being dense
    for (int64_t d = 0; d < prefetch_next->dim(); ++d) span += (prefetch_next->size(d) - 1) * prefetch_next->stride(d);
    prefetch.next = static_cast<const char*>(prefetch_next->data_ptr());
    prefetch.end = prefetch.next + (prefetch_next->numel() ? span : 0) * prefetch_next->element_size();
  }
  const float* A = a.data_ptr<float>();
  const float* B = b.data_ptr<float>();
  const int64_t sai = a.stride(0), sak = a.stride(1), ldc = out.stride(0);
  if (b.stride(1) == 1 || N == 1) {
    const int64_t ldb = b.stride(0);
    for (int64_t n = 0; n < N; n += kPanel)
      for (int64_t k = 0; k < K; k += kInnerBlock)
        panel(M, std::min<int64_t>(kPanel, N - n), std::min<int64_t>(kInnerBlock, K - k), A + k * sak, sai, sak,
              B + k * ldb + n, ldb, C + n, ldc, k > 0, prefetch);
    return;
  }
  // b = W^T with W [N, K] row-major (stride ldw): dot products for a few rows, else W's panels
  // packed transposed.
  const int64_t ldw = b.stride(1);
  if (M <= kDotRows && (sak == 1 || K == 1)) {
    switch (M) {
      case 1: dot_rows<1>(N, K, A, sai, B, ldw, C, ldc, prefetch); break;
      case 2: dot_rows<2>(N, K, A, sai, B, ldw, C, ldc, prefetch); break;
      case 3: dot_rows<3>(N, K, A, sai, B, ldw, C, ldc, prefetch); break;
      default: dot_rows<4>(N, K, A, sai, B, ldw, C, ldc, prefetch); break;
    }
    return;
  }
  thread_local std::vector<float> packed;
  packed.resize(kInnerBlock * kPanel);
  for (int64_t n = 0; n < N; n += kPanel) {
    const int64_t width = std::min<int64_t>(kPanel, N - n);
    for (int64_t k = 0; k < K; k += kInnerBlock) {
      const int64_t depth = std::min<int64_t>(kInnerBlock, K - k);
      pack_transposed(B + n * ldw + k, ldw, width, depth, packed.data());
      panel(M, width, depth, A + k * sak, sai, sak, packed.data(), kPanel, C + n, ldc, k > 0, prefetch);
    }
  }
}

// exp(x) for x in float range (Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, degree-6 polynomial in r,
// scaled by 2^n); relative error ~1e-7. Saturates below -88 and above 88 like expf's range.
inline __m512 exp_ps(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-88.0f)), _mm512_set1_ps(88.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// 1 / (1 + exp(-x)): a 14-bit reciprocal estimate refined by one Newton step (~1e-7 relative).
inline __m512 sigmoid_ps(__m512 x) {
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 d = _mm512_add_ps(one, exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), x)));
  const __m512 y = _mm512_rcp14_ps(d);
  return _mm512_mul_ps(y, _mm512_fnmadd_ps(d, y, _mm512_set1_ps(2.0f)));
}

void check_swiglu(const at::Tensor& h, const at::Tensor& out, int64_t out_cols, const char* op) {
  TORCH_CHECK(h.dim() == 2 && out.dim() == 2, op, ": h and out must be 2-D");
  TORCH_CHECK(h.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat, op, ": h and out must be float32");
  TORCH_CHECK(h.device().is_cpu() && out.device().is_cpu(), op, ": h and out must be on the CPU");
  TORCH_CHECK(h.size(1) % 2 == 0, op, ": h must have an even number of columns (gate, then up)");
  TORCH_CHECK(out.size(0) == h.size(0) && out.size(1) == out_cols, op, ": out has shape ", out.sizes(),
              ", expected [", h.size(0), ", ", out_cols, "]");
  TORCH_CHECK(h.stride(1) == 1 && out.stride(1) == 1, op, ": h and out must have unit column stride");
}

// out = silu(gate) * up for h = [gate | up] (Shazeer 2020, "GLU Variants Improve Transformer").
void swiglu_into(const at::Tensor& h, const at::Tensor& out) {
  const int64_t ff = h.size(1) / 2;
  check_swiglu(h, out, ff, "moekit::swiglu_into");
  const float* H = h.data_ptr<float>();
  float* O = out.data_ptr<float>();
  const int64_t ldh = h.stride(0), ldo = out.stride(0);
  {
    for (int64_t r = 0; r < h.size(0); ++r) {
      const float* gate = H + r * ldh;
      const float* up = gate + ff;
      float* o = O + r * ldo;
      for (int64_t j = 0; j < ff; j += 16) {
        const __mmask16 m = ff - j >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (ff - j)) - 1);
        const __m512 g = _mm512_maskz_loadu_ps(m, gate + j);
        const __m512 u = _mm512_maskz_loadu_ps(m, up + j);
        _mm512_mask_storeu_ps(o + j, m, _mm512_mul_ps(_mm512_mul_ps(g, sigmoid_ps(g)), u));
      }
    }
  }
}

// The gradient of swiglu with respect to h = [gate | up], given the gradient of its output:
// d gate = grad * up * s * (1 + gate * (1 - s)), d up = grad * gate * s, s = sigmoid(gate).
void swiglu_backward_into(const at::Tensor& h, const at::Tensor& grad, const at::Tensor& out) {
  const int64_t ff = h.size(1) / 2;
  check_swiglu(h, out, 2 * ff, "moekit::swiglu_backward_into");
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == h.size(0) && grad.size(1) == ff && grad.stride(1) == 1 &&
                  grad.scalar_type() == at::kFloat && grad.device().is_cpu(),
              "moekit::swiglu_backward_into: grad must be float32 [", h.size(0), ", ", ff,
              "] with unit column stride, got ", grad.sizes());
  const float* H = h.data_ptr<float>();
  const float* G = grad.data_ptr<float>();
  float* O = out.data_ptr<float>();
  const int64_t ldh = h.stride(0), ldg = grad.stride(0), ldo = out.stride(0);
  const __m512 one = _mm512_set1_ps(1.0f);
  {
    for (int64_t r = 0; r < h.size(0); ++r) {
      const float* gate = H + r * ldh;
      const float* up = gate + ff;
      const float* gr = G + r * ldg;
      float* o = O + r * ldo;
      for (int64_t j = 0; j < ff; j += 16) {
        const __mmask16 m = ff - j >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (ff - j)) - 1);
        const __m512 g = _mm512_maskz_loadu_ps(m, gate + j);
        const __m512 u = _mm512_maskz_loadu_ps(m, up + j);
        const __m512 d = _mm512_maskz_loadu_ps(m, gr + j);
        const __m512 s = sigmoid_ps(g);
        const __m512 silu_grad = _mm512_mul_ps(s, _mm512_fmadd_ps(g, _mm512_sub_ps(one, s), one));
        _mm512_mask_storeu_ps(o + j, m, _mm512_mul_ps(_mm512_mul_ps(d, u), silu_grad));
        _mm512_mask_storeu_ps(o + ff + j, m, _mm512_mul_ps(d, _mm512_mul_ps(g, s)));
      }
    }
  }
}

}  // namespace

TORCH_LIBRARY(moekit, m) {
  m.def("mm_into(Tensor a, Tensor b, Tensor(c!) out, Tensor? prefetch_next=None) -> ()");
  m.impl("mm_into", c10::DispatchKey::CPU, TORCH_FN(mm_into));
  m.def("swiglu_into(Tensor h, Tensor(c!) out) -> ()");
  m.impl("swiglu_into", c10::DispatchKey::CPU, TORCH_FN(swiglu_into));
  m.def("swiglu_backward_into(Tensor h, Tensor grad, Tensor(c!) out) -> ()");
  m.impl("swiglu_backward_into", c10::DispatchKey::CPU, TORCH_FN(swiglu_backward_into));
}

#endif  // __AVX512F__
