// The expert loops of expert_gemm.cpp on torch's own matrix products: torch's threads take whole
// experts, largest first, from a shared counter (expert_tasks.h), and each product is written into
// the caller's buffer by the library at::mm would call: BLAS's sgemm_ / dgemm_ (MKL) for fp32 and
// fp64, called directly, else at::mm itself (oneDNN for bf16 and fp16). For any floating
// dtype and any x86 CPU: where moekit's AVX-512 tile kernel does not run (no AVX-512, bf16, fp16,
// fp64) or was measured slower than torch's products (moekit/kernels/native.py).
//
// Registered in the moekit namespace (a fragment: expert_gemm.cpp registers the tile kernel's ops
// where it is built for AVX-512), each with the signature of its tile-kernel twin:
//   moekit::expert_products_mm(rows, weights, out, tasks, threads): out[s:t] = rows[s:t] @ weights[e]^T.
//   moekit::expert_backward_pairs_mm(grad_rows, in_rows, weights, grad_weight?, grad_in, tasks, threads).
//   moekit::expert_swiglu_forward_mm / expert_swiglu_backward_mm: SwiGLU experts whole.
//   moekit::combine_rows_any(rows, order, bounds, out): out[t] = sum of rows[order[bounds[t]:bounds[t+1]]].
//   moekit::parallel_width(n): how many of torch's threads at::parallel_for gives n one-item tasks.
//
// Threads: inside torch's parallel region every product runs on the thread that took the expert
// (OpenMP runs nested regions serially, and ATen's own parallel_for runs inline there). With
// `threads` 1 (decode) the loop runs on the calling thread with OpenMP set to one thread for the
// duration, so that tiny products do not hand off between threads; a single expert with more
// threads asked is one product threaded as torch threads at::mm.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <omp.h>
#include <torch/library.h>

#include "combine_rows.h"
#include "expert_tasks.h"
#include "swiglu_rows.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#if !defined(_OPENMP)
#error "moekit's expert loops must be compiled with -fopenmp (else at::parallel_for is serial)"
#endif

// Fortran BLAS's sgemm_ and dgemm_: inside torch's x86 builds, MKL's, the routines at::mm ends in
// for fp32 and fp64 (torch's own cpublas::gemm wrappers are not exported). Declared weak: where a
// torch build does not export them, every product goes through at::mm.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

namespace {

using namespace moekit_tasks;

// A matrix in memory: `rows` x `cols` at `data`, element (i, j) at data[i * row_stride + j *
// col_stride]. The expert loops pass an expert's rows and weights to each product as these
// instead of as tensor views: at very fine (128 experts, six products each per fwd+bwd step) the
// views (select, narrow, transpose) and at::mm's own checks came to about 3,000 torch calls per
// step; without them the layer's fwd+bwd took 0.96x the time on an AVX-512 Xeon (BENCHMARKS.md §13).
template <typename T>
struct Matrix {
  T* data;
  int64_t rows, cols, row_stride, col_stride;
  Matrix t() const { return {data, cols, rows, col_stride, row_stride}; }
};

template <typename T>
Matrix<T> rows_matrix(const at::Tensor& t, const Task& task) {
  return {static_cast<T*>(t.data_ptr()) + task.start * t.stride(0), task.stop - task.start, t.size(1), t.stride(0),
          t.stride(1)};
}

// `count` rows of `cols` packed at `data` (a thread's work space)
template <typename T>
Matrix<T> packed_rows(T* data, int64_t count, int64_t cols) {
  return {data, count, cols, cols, 1};
}

// weights[e] of packed weights [E, n_out, n_in]
template <typename T>
Matrix<T> expert_matrix(const at::Tensor& w, int64_t e) {
  return {static_cast<T*>(w.data_ptr()) + e * w.stride(0), w.size(1), w.size(2), w.stride(1), w.stride(2)};
}

// The matrix as a tensor over its memory (for at::mm, which writes only its output).
template <typename T>
at::Tensor as_tensor(const Matrix<T>& m) {
  using Element = std::remove_const_t<T>;
  return at::from_blob(const_cast<Element*>(m.data), {m.rows, m.cols}, {m.row_stride, m.col_stride},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<Element>::value));
}

// How BLAS reads a matrix: 'N' with leading dimension ld for row-major storage (BLAS's column-major
// view of its transpose), 'T' for the transpose of row-major storage; false for any other layout.
template <typename T>
bool blas_layout(const Matrix<T>& m, char* trans, int64_t* ld) {
  if (m.col_stride == 1 && (m.row_stride >= m.cols || m.rows <= 1)) {
    *trans = 'N';
    *ld = std::max<int64_t>({m.row_stride, m.cols, 1});
    return true;
  }
  if (m.row_stride == 1 && (m.col_stride >= m.rows || m.cols <= 1)) {
    *trans = 'T';
    *ld = std::max<int64_t>({m.col_stride, m.rows, 1});
    return true;
  }
  return false;
}

// Whether at::mm computes fp32 products in full fp32 (through BLAS): not where the user allowed
// oneDNN's reduced-precision fp32 products (torch.set_float32_matmul_precision("medium"/"high")).
inline bool full_fp32_products() {
  const auto precision = at::globalContext().float32Precision(at::Float32Backend::MKLDNN, at::Float32Op::MATMUL);
  return precision != at::Float32Precision::BF16 && precision != at::Float32Precision::TF32;
}

// c = a @ b (c [m, n] row-major, a [m, k], b [k, n]), c's old values unread. fp32 and fp64 go
// straight to BLAS where every operand has a unit stride and at::mm would too: the row-major
// product c = a b is BLAS's column-major c^T = b^T a^T, so b is passed first. Other dtypes (bf16,
// fp16: oneDNN underneath), layouts, sizes and precision settings take at::mm.
template <typename T>
void product(const Matrix<T>& c, const Matrix<const T>& a, const Matrix<const T>& b) {
  TORCH_INTERNAL_ASSERT(a.rows == c.rows && b.cols == c.cols && a.cols == b.rows);
  const int64_t m = c.rows, n = c.cols, k = a.cols;
  if (m == 0 || n == 0) return;
  constexpr bool kHasBlas = std::is_same_v<T, float> || std::is_same_v<T, double>;
  if constexpr (kHasBlas) {
    const bool linked =
        std::is_same_v<T, float> ? sgemm_ != nullptr && full_fp32_products() : dgemm_ != nullptr;
    char trans_a = 'N', trans_b = 'N';
    int64_t lda = 0, ldb = 0;
    const int64_t ldc = std::max<int64_t>({c.row_stride, n, 1});
    constexpr int64_t kMaxInt = std::numeric_limits<int>::max();
    if (linked && k > 0 && c.col_stride == 1 && blas_layout(a, &trans_a, &lda) && blas_layout(b, &trans_b, &ldb) &&
        std::max({m, n, k, lda, ldb, ldc}) <= kMaxInt) {
      const int M = static_cast<int>(n), N = static_cast<int>(m), K = static_cast<int>(k);
      const int LDA = static_cast<int>(ldb), LDB = static_cast<int>(lda), LDC = static_cast<int>(ldc);
      const T one = 1, zero = 0;
      if constexpr (std::is_same_v<T, float>)
        sgemm_(&trans_b, &trans_a, &M, &N, &K, &one, b.data, &LDA, a.data, &LDB, &zero, c.data, &LDC);
      else
        dgemm_(&trans_b, &trans_a, &M, &N, &K, &one, b.data, &LDA, a.data, &LDB, &zero, c.data, &LDC);
      return;
    }
  }
  auto out = as_tensor(c);
  at::mm_out(out, as_tensor(a), as_tensor(b));
}

// This thread's OpenMP regions (MKL's, oneDNN's, ATen's) on one thread while it lives.
struct OneOpenMPThread {
  int previous = omp_get_max_threads();
  OneOpenMPThread() { omp_set_num_threads(1); }
  ~OneOpenMPThread() { omp_set_num_threads(previous); }
};

// fn(task, i) for every task, on `threads` of torch's threads (the calling thread alone, and
// unthreaded products, for 1). Every at:: call inside skips autograd: the threads of the parallel
// region have grad mode on, and the caller's autograd function owns the gradients.
template <typename Fn>
void for_each_task(const std::vector<Task>& work, int64_t threads, const Fn& fn) {
  const auto run = [&](int64_t i) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    fn(work[i]);
  };
  const int64_t count = static_cast<int64_t>(work.size());
  if (threads <= 1) {
    OneOpenMPThread one;
    for (int64_t i = 0; i < count; ++i) run(i);
    return;
  }
  take_tasks(count, threads, run);
}

std::vector<Task> checked_tasks(const at::Tensor& tasks, int64_t experts, int64_t rows, const char* op) {
  auto work = tasks_of(tasks, op);
  for (const auto& task : work) check_task(task, experts, rows, op);
  return work;
}

void check_rows(const at::Tensor& t, const at::Tensor& like, int64_t rows, int64_t cols, const char* op,
                const char* name) {
  TORCH_CHECK(t.scalar_type() == like.scalar_type() && t.device().is_cpu(), op, ": ", name, " must be a ",
              like.scalar_type(), " CPU tensor");
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols && t.stride(1) == 1, op, ": ", name, " must be [",
              rows, ", ", cols, "] with unit column stride, got ", t.sizes());
}

void check_packed(const at::Tensor& w, const at::Tensor& like, const char* op, const char* name) {
  TORCH_CHECK(w.scalar_type() == like.scalar_type() && w.device().is_cpu() && w.dim() == 3, op, ": ", name,
              " must be a ", like.scalar_type(), " CPU tensor [E, n_out, n_in]");
}

void check_token(const at::Tensor& token, int64_t rows, int64_t num_tokens, const char* op) {
  TORCH_CHECK(token.dim() == 1 && token.size(0) == rows && token.scalar_type() == at::kLong && token.is_contiguous() &&
                  token.device().is_cpu(),
              op, ": token must be a contiguous int64 CPU tensor [A]");
  const int64_t* T = token.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r) TORCH_CHECK(T[r] >= 0 && T[r] < num_tokens, op, ": token ", T[r], " out of range");
}

void check_scale(const at::Tensor& t, const at::Tensor& like, int64_t rows, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == rows && t.scalar_type() == like.scalar_type() && t.is_contiguous(), op,
              ": ", name, " must be a contiguous [A] of the rows' dtype");
}

// out[s:t] = rows[s:t] @ weights[e]^T for every task (e, s, t).
void expert_products_mm(const at::Tensor& rows, const at::Tensor& weights, const at::Tensor& out,
                        const at::Tensor& tasks, int64_t threads) {
  const char* op = "moekit::expert_products_mm";
  check_packed(weights, rows, op, "weights");
  check_rows(rows, rows, rows.size(0), weights.size(2), op, "rows");
  check_rows(out, rows, rows.size(0), weights.size(1), op, "out");
  const auto work = checked_tasks(tasks, weights.size(0), rows.size(0), op);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, rows.scalar_type(), "expert_products_mm", [&] {
    for_each_task(work, threads, [&](const Task& task) {
      product(rows_matrix<scalar_t>(out, task), rows_matrix<const scalar_t>(rows, task),
              expert_matrix<const scalar_t>(weights, task.expert).t());
    });
  });
}

// grad_weight[e] = grad_rows[s:t]^T @ in_rows[s:t] (if given) and grad_in[s:t] = grad_rows[s:t] @
// weights[e] for every task (e, s, t).
void expert_backward_pairs_mm(const at::Tensor& grad_rows, const at::Tensor& in_rows, const at::Tensor& weights,
                              const std::optional<at::Tensor>& grad_weight, const at::Tensor& grad_in,
                              const at::Tensor& tasks, int64_t threads) {
  const char* op = "moekit::expert_backward_pairs_mm";
  check_packed(weights, grad_rows, op, "weights");
  const int64_t rows = grad_rows.size(0);
  check_rows(grad_rows, grad_rows, rows, weights.size(1), op, "grad_rows");
  check_rows(in_rows, grad_rows, rows, weights.size(2), op, "in_rows");
  check_rows(grad_in, grad_rows, rows, weights.size(2), op, "grad_in");
  if (grad_weight.has_value())
    TORCH_CHECK(grad_weight->scalar_type() == grad_rows.scalar_type() && grad_weight->sizes() == weights.sizes(), op,
                ": grad_weight must be shaped like weights, of the rows' dtype");
  const auto work = checked_tasks(tasks, weights.size(0), rows, op);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad_rows.scalar_type(), "expert_backward_pairs_mm", [&] {
    for_each_task(work, threads, [&](const Task& task) {
      const auto g = rows_matrix<const scalar_t>(grad_rows, task);
      if (grad_weight.has_value())
        product(expert_matrix<scalar_t>(*grad_weight, task.expert), g.t(),
                rows_matrix<const scalar_t>(in_rows, task));
      product(rows_matrix<scalar_t>(grad_in, task), g, expert_matrix<const scalar_t>(weights, task.expert));
    });
  });
}

template <typename acc_t>
inline acc_t sigmoid(acc_t g) {
  return acc_t(1) / (acc_t(1) + std::exp(-g));
}

// SwiGLU rows of any dtype, one row at a time. Where simd.h's vectors are built (AVX2 or AVX-512)
// and the dtype computes in fp32 (fp32, bf16, fp16), a row is converted to fp32 in the thread's
// scratch (`kRowScratch` rows of ff floats), computed by swiglu_rows.h and converted back,
// rounding each value once as the scalar loop does; else (fp64, or no vectors) a scalar loop in
// the op-math type. With a scalar expf per element, the SwiGLU passes of a bf16 layer's experts
// took nearly as long as their products (fine shape, fwd+bwd under autocast on an AVX-512 Xeon
// with AMX: the loops' own time 36 ms of a 105 ms step, the products 39 ms; BENCHMARKS.md §7).
#if defined(MOEKIT_SIMD)
template <typename scalar_t>
constexpr bool kVectorRows = std::is_same_v<at::opmath_type<scalar_t>, float>;
#else
template <typename scalar_t>
constexpr bool kVectorRows = false;
#endif
// scratch floats per row: h as fp32 [2 ff], the gradient of h [2 ff], three rows of ff
constexpr int64_t kRowScratch = 7;

// The row as fp32: itself for fp32, else converted into `scratch`.
template <typename scalar_t>
inline const float* as_floats(const scalar_t* in, int64_t n, float* scratch) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return in;
  } else {
    for (int64_t j = 0; j < n; ++j) scratch[j] = static_cast<float>(in[j]);
    return scratch;
  }
}

// Where an fp32 result of n values goes: `out` itself for fp32, else `scratch` (then `store_floats`).
template <typename scalar_t>
inline float* float_target(scalar_t* out, float* scratch) {
  if constexpr (std::is_same_v<scalar_t, float>)
    return out;
  else
    return scratch;
}

template <typename scalar_t>
inline void store_floats(const float* in, int64_t n, scalar_t* out) {
  if constexpr (!std::is_same_v<scalar_t, float>)
    for (int64_t j = 0; j < n; ++j) out[j] = static_cast<scalar_t>(in[j]);
}

// out[0:ff] = silu(gate) * up * scale for h = [gate | up], and where `unscaled`, also
// unscaled[0:ff] = silu(gate) * up (the backward's a, formed again as the forward formed it).
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void scaled_swiglu_row(const scalar_t* h, int64_t ff, acc_t scale, scalar_t* out, scalar_t* unscaled,
                       float* scratch) {
  if constexpr (kVectorRows<scalar_t>) {
#if defined(MOEKIT_SIMD)
    const float* hf = as_floats(h, 2 * ff, scratch);
    if (unscaled == nullptr) {
      float* value = float_target(out, scratch + 2 * ff);
      moekit_swiglu::swiglu_row(hf, value, ff, scale);
      store_floats(value, ff, out);
      return;
    }
    float* value = scratch + 2 * ff;
    moekit_swiglu::swiglu_row(hf, value, ff);
    for (int64_t j = 0; j < ff; ++j) {
      unscaled[j] = static_cast<scalar_t>(value[j]);
      out[j] = static_cast<scalar_t>(value[j] * scale);
    }
#endif
  } else {
    const scalar_t* up = h + ff;
    for (int64_t j = 0; j < ff; ++j) {
      const acc_t g = static_cast<acc_t>(h[j]);
      const acc_t value = g * sigmoid(g) * static_cast<acc_t>(up[j]);
      if (unscaled != nullptr) unscaled[j] = static_cast<scalar_t>(value);
      out[j] = static_cast<scalar_t>(value * scale);
    }
  }
}

// From the gradient gr of a_in = a * scale (a = silu(gate) * up, given): the routing weight's
// gradient <gr, a> (returned) and the gradient of h = [gate | up] into out [2 ff]:
// d gate = da * up * s * (1 + gate * (1 - s)), d up = da * gate * s, da = gr * scale, s = sigmoid(gate).
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
acc_t scaled_swiglu_backward_row(const scalar_t* h, const scalar_t* gr, const scalar_t* a, int64_t ff,
                                  acc_t scale, scalar_t* out, float* scratch) {
  if constexpr (kVectorRows<scalar_t>) {
#if defined(MOEKIT_SIMD)
    namespace S = moekit_simd;
    const float* hf = as_floats(h, 2 * ff, scratch);
    const float* grf = as_floats(gr, ff, scratch + 4 * ff);
    const float* af = as_floats(a, ff, scratch + 5 * ff);
    float* da = scratch + 6 * ff;
    S::Vec dot = S::zero();
    const S::Vec sc = S::set1(scale);
    for (int64_t j = 0; j < ff; j += S::kLanes) {
      const S::Vec g = S::load_upto(grf + j, ff - j);
      dot = S::fmadd(g, S::load_upto(af + j, ff - j), dot);
      S::store_upto(da + j, ff - j, S::mul(g, sc));
    }
    float* grad_h = float_target(out, scratch + 2 * ff);
    moekit_swiglu::swiglu_backward_row(hf, da, grad_h, ff);
    store_floats(grad_h, 2 * ff, out);
    return S::reduce_add(dot);
#endif
  } else {
    const scalar_t* up = h + ff;
    acc_t dot = 0;
    for (int64_t j = 0; j < ff; ++j) dot += static_cast<acc_t>(gr[j]) * static_cast<acc_t>(a[j]);
    for (int64_t j = 0; j < ff; ++j) {
      const acc_t da = static_cast<acc_t>(gr[j]) * scale, g = static_cast<acc_t>(h[j]);
      const acc_t sg = sigmoid(g);
      out[j] = static_cast<scalar_t>(da * static_cast<acc_t>(up[j]) * sg * (acc_t(1) + g * (acc_t(1) - sg)));
      out[ff + j] = static_cast<scalar_t>(da * g * sg);
    }
    return dot;
  }
}

void check_swiglu_operands(const at::Tensor& x, const at::Tensor& token, const at::Tensor& scale,
                           const at::Tensor& w_in, const at::Tensor& w_out, const std::optional<at::Tensor>& h,
                           const char* op) {
  const int64_t d = x.size(1), rows = token.size(0);
  check_packed(w_in, x, op, "w_in");
  check_packed(w_out, x, op, "w_out");
  const int64_t ff = w_out.size(2);
  TORCH_CHECK(w_in.size(1) == 2 * ff && w_in.size(2) == d && w_out.size(1) == d && w_in.size(0) == w_out.size(0), op,
              ": w_in must be [E, 2 ff, d] and w_out [E, d, ff]");
  check_token(token, rows, x.size(0), op);
  check_rows(x, x, x.size(0), d, op, "x");
  if (h.has_value()) check_rows(*h, x, rows, 2 * ff, op, "h");
  check_scale(scale, x, rows, op, "scale");
}

// SwiGLU experts whole, the routing weight on their output (expert_gemm.cpp's
// expert_swiglu_forward): for every task (e, s, t), xs = x[token[s:t]], h = xs @ w_in[e]^T,
// a_in = silu(gate) * up * scale[s:t] for h = [gate | up] (Shazeer 2020), ys = a_in @ w_out[e]^T;
// xs and a_in in the thread's work space, h kept for the backward where `h` is given (else in the
// work space too). Only the products are torch calls: the gather and the activation are loops
// here, so that a decode step's many small experts pay no per-op dispatch for them.
void expert_swiglu_forward_mm(const at::Tensor& x, const at::Tensor& token, const at::Tensor& scale,
                              const at::Tensor& w_in, const at::Tensor& w_out, const std::optional<at::Tensor>& h,
                              const at::Tensor& ys, const at::Tensor& tasks, int64_t threads) {
  const char* op = "moekit::expert_swiglu_forward_mm";
  check_swiglu_operands(x, token, scale, w_in, w_out, h, op);
  const int64_t d = x.size(1), rows = token.size(0), ff = w_out.size(2);
  check_rows(ys, x, rows, d, op, "ys");
  const auto work = checked_tasks(tasks, w_in.size(0), rows, op);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "expert_swiglu_forward_mm", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t* T = token.data_ptr<int64_t>();
    const scalar_t *X = x.data_ptr<scalar_t>(), *S = scale.data_ptr<scalar_t>();
    const int64_t ldx = x.stride(0);
    WorkSpaces<scalar_t> spaces(largest_task(work) * (d + ff + (h.has_value() ? 0 : 2 * ff)));
    WorkSpaces<float> scratches(kRowScratch * ff);
    for_each_task(work, threads, [&](const Task& task) {
      const int64_t count = task.stop - task.start;
      scalar_t* space = spaces.mine();
      float* scratch = scratches.mine();
      scalar_t *XS = space, *AI = space + count * d;
      const Matrix<scalar_t> hs =
          h.has_value() ? rows_matrix<scalar_t>(*h, task) : packed_rows(AI + count * ff, count, 2 * ff);
      gather_rows(X, ldx, T, task, XS, d, d);
      product(hs, packed_rows<const scalar_t>(XS, count, d), expert_matrix<const scalar_t>(w_in, task.expert).t());
      for (int64_t r = 0; r < count; ++r)
        scaled_swiglu_row(hs.data + r * hs.row_stride, ff, static_cast<acc_t>(S[task.start + r]), AI + r * ff,
                          static_cast<scalar_t*>(nullptr), scratch);
      product(rows_matrix<scalar_t>(ys, task), packed_rows<const scalar_t>(AI, count, ff),
              expert_matrix<const scalar_t>(w_out, task.expert).t());
    });
  });
}

// The backward of expert_swiglu_forward_mm (expert_gemm.cpp's expert_swiglu_backward): the packed
// weight gradients (where given), grad_scale[r] = <grad of a_in, a> (the routing weight's
// gradient), and the gathered rows' gradient grad_xs; x's rows, a and a_in formed again (as the
// forward formed them) and the gradients of a and h, in the thread's work space.
// d gate = d a * up * s * (1 + gate * (1 - s)), d up = d a * gate * s, s = sigmoid(gate).
void expert_swiglu_backward_mm(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& token,
                               const at::Tensor& scale, const at::Tensor& w_in, const at::Tensor& w_out,
                               const at::Tensor& h, const std::optional<at::Tensor>& grad_w_in,
                               const std::optional<at::Tensor>& grad_w_out, const at::Tensor& grad_scale,
                               const at::Tensor& grad_xs, const at::Tensor& tasks, int64_t threads) {
  const char* op = "moekit::expert_swiglu_backward_mm";
  check_swiglu_operands(x, token, scale, w_in, w_out, h, op);
  const int64_t d = x.size(1), rows = token.size(0), ff = w_out.size(2);
  check_rows(grad_out, x, x.size(0), d, op, "grad_out");
  check_rows(grad_xs, x, rows, d, op, "grad_xs");
  check_scale(grad_scale, x, rows, op, "grad_scale");
  if (grad_w_in.has_value())
    TORCH_CHECK(grad_w_in->sizes() == w_in.sizes() && grad_w_in->scalar_type() == w_in.scalar_type(), op,
                ": grad_w_in must be shaped like w_in");
  if (grad_w_out.has_value())
    TORCH_CHECK(grad_w_out->sizes() == w_out.sizes() && grad_w_out->scalar_type() == w_out.scalar_type(), op,
                ": grad_w_out must be shaped like w_out");
  const auto work = checked_tasks(tasks, w_in.size(0), rows, op);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad_out.scalar_type(), "expert_swiglu_backward_mm", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t* T = token.data_ptr<int64_t>();
    const scalar_t *G = grad_out.data_ptr<scalar_t>(), *X = x.data_ptr<scalar_t>(), *S = scale.data_ptr<scalar_t>();
    const scalar_t* H = h.data_ptr<scalar_t>();
    scalar_t* GS = grad_scale.data_ptr<scalar_t>();
    const int64_t ldg = grad_out.stride(0), ldx = x.stride(0), ldh = h.stride(0);
    WorkSpaces<scalar_t> spaces(largest_task(work) * (d + 4 * ff));
    WorkSpaces<float> scratches(kRowScratch * ff);
    for_each_task(work, threads, [&](const Task& task) {
      const int64_t count = task.stop - task.start;
      // grad_out's rows, then x's; a_in, then the gradient of a_in; a; the gradient of h
      scalar_t* space = spaces.mine();
      float* scratch = scratches.mine();
      scalar_t *RD = space, *GA = space + count * d, *A = space + count * (d + ff);
      scalar_t* GH = space + count * (d + 2 * ff);
      const auto rows_d = packed_rows<const scalar_t>(RD, count, d), gh = packed_rows<const scalar_t>(GH, count, 2 * ff);
      gather_rows(G, ldg, T, task, RD, d, d);
      for (int64_t r = 0; r < count; ++r) {
        const scalar_t* hr = H + (task.start + r) * ldh;
        if (r + 1 < count) prefetch_row(hr + ldh, 2 * ff);
        scaled_swiglu_row(hr, ff, static_cast<acc_t>(S[task.start + r]), GA + r * ff, A + r * ff, scratch);
      }
      if (grad_w_out.has_value())
        product(expert_matrix<scalar_t>(*grad_w_out, task.expert), rows_d.t(),
                packed_rows<const scalar_t>(GA, count, ff));
      // the gradient of a_in
      product(packed_rows<scalar_t>(GA, count, ff), rows_d, expert_matrix<const scalar_t>(w_out, task.expert));
      for (int64_t r = 0; r < count; ++r) {
        const scalar_t* hr = H + (task.start + r) * ldh;
        if (r + 1 < count) prefetch_row(hr + ldh, 2 * ff);
        GS[task.start + r] = static_cast<scalar_t>(scaled_swiglu_backward_row(
            hr, GA + r * ff, A + r * ff, ff, static_cast<acc_t>(S[task.start + r]), GH + r * 2 * ff, scratch));
      }
      gather_rows(X, ldx, T, task, RD, d, d);
      if (grad_w_in.has_value())
        product(expert_matrix<scalar_t>(*grad_w_in, task.expert), gh.t(), rows_d);
      product(rows_matrix<scalar_t>(grad_xs, task), gh, expert_matrix<const scalar_t>(w_in, task.expert));
    });
  });
}

// out[t] = sum of rows[order[i]] for i in [bounds[t], bounds[t+1]), in that order, accumulated in
// the dtype's op-math type (fp32 for bf16/fp16); tokens split over torch's threads, each token's sum
// one thread's (torch's index_add_ on the CPU was 4-8x slower on two threads: BENCHMARKS.md §13).
// fp32 rows where simd.h's vectors are built: combine_rows.h, as the tile path's combine_rows.
void combine_rows_any(const at::Tensor& rows, const at::Tensor& order, const at::Tensor& bounds,
                      const at::Tensor& out) {
  const char* op = "moekit::combine_rows_any";
  const int64_t cols = rows.size(1), tokens = out.size(0), count = rows.size(0);
  check_rows(rows, rows, count, cols, op, "rows");
  check_rows(out, rows, tokens, cols, op, "out");
  TORCH_CHECK(order.dim() == 1 && order.scalar_type() == at::kLong && order.is_contiguous() && order.size(0) == count,
              op, ": order must be a contiguous int64 [A]");
  TORCH_CHECK(bounds.dim() == 1 && bounds.scalar_type() == at::kLong && bounds.is_contiguous() &&
                  bounds.size(0) == tokens + 1,
              op, ": bounds must be a contiguous int64 [T + 1]");
  const int64_t* O = order.data_ptr<int64_t>();
  const int64_t* B = bounds.data_ptr<int64_t>();
  TORCH_CHECK(B[0] == 0 && B[tokens] == count, op, ": bounds must run from 0 to A");
  for (int64_t i = 0; i < count; ++i) TORCH_CHECK(O[i] >= 0 && O[i] < count, op, ": order holds ", O[i], ", out of range");
  const int64_t ldr = rows.stride(0), ldy = out.stride(0);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 13) / std::max<int64_t>(1, cols));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, rows.scalar_type(), "combine_rows_any", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* R = rows.data_ptr<scalar_t>();
    scalar_t* Y = out.data_ptr<scalar_t>();
    at::parallel_for(0, tokens, grain, [&](int64_t first, int64_t last) {
#if defined(MOEKIT_SIMD)
      if constexpr (std::is_same_v<scalar_t, float>) {  // as the tile path's combine_rows sums
        // (the casts are no-ops: this lambda is no template, so the branch compiles for every dtype)
        const auto* rows_f = reinterpret_cast<const float*>(R);
        auto* out_f = reinterpret_cast<float*>(Y);
        for (int64_t t = first; t < last; ++t)
          moekit_combine::sum_token_rows(rows_f, ldr, O, B, t, last, cols, out_f + t * ldy);
        return;
      }
#endif
      std::vector<acc_t> acc(cols);
      for (int64_t t = first; t < last; ++t) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t i = B[t]; i < B[t + 1]; ++i) {
          const scalar_t* row = R + O[i] * ldr;
          for (int64_t j = 0; j < cols; ++j) acc[j] += static_cast<acc_t>(row[j]);
        }
        for (int64_t j = 0; j < cols; ++j) Y[t * ldy + j] = static_cast<scalar_t>(acc[j]);
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moekit, m) {
  m.def("parallel_width(int n) -> int", TORCH_FN(parallel_width));
  m.def("expert_products_mm(Tensor rows, Tensor weights, Tensor(c!) out, Tensor tasks, int threads) -> ()");
  m.impl("expert_products_mm", c10::DispatchKey::CPU, TORCH_FN(expert_products_mm));
  m.def(
      "expert_backward_pairs_mm(Tensor grad_rows, Tensor in_rows, Tensor weights, Tensor(c!)? grad_weight, "
      "Tensor(d!) grad_in, Tensor tasks, int threads) -> ()");
  m.impl("expert_backward_pairs_mm", c10::DispatchKey::CPU, TORCH_FN(expert_backward_pairs_mm));
  m.def(
      "expert_swiglu_forward_mm(Tensor x, Tensor token, Tensor scale, Tensor w_in, Tensor w_out, Tensor(a!)? h, "
      "Tensor(b!) ys, Tensor tasks, int threads) -> ()");
  m.impl("expert_swiglu_forward_mm", c10::DispatchKey::CPU, TORCH_FN(expert_swiglu_forward_mm));
  m.def(
      "expert_swiglu_backward_mm(Tensor grad_out, Tensor x, Tensor token, Tensor scale, Tensor w_in, "
      "Tensor w_out, Tensor h, Tensor(a!)? grad_w_in, Tensor(b!)? grad_w_out, Tensor(c!) grad_scale, "
      "Tensor(d!) grad_xs, Tensor tasks, int threads) -> ()");
  m.impl("expert_swiglu_backward_mm", c10::DispatchKey::CPU, TORCH_FN(expert_swiglu_backward_mm));
  m.def("combine_rows_any(Tensor rows, Tensor order, Tensor bounds, Tensor(c!) out) -> ()");
  m.impl("combine_rows_any", c10::DispatchKey::CPU, TORCH_FN(combine_rows_any));
}
