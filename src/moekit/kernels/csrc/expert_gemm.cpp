// moekit's expert kernels: small single-threaded fp32 GEMMs written straight into the caller's
// buffer, a loop over the experts that hands them to torch's threads, and SwiGLU with its
// derivative in one pass each.
//
// Why: an MoE layer runs hundreds of small products per step (128 rows x 256 x 256 per expert at
// 128 experts). A multi-threaded library GEMM per expert spends much of each product handing work
// between threads; here each thread takes whole experts, one at a time, largest first, from a
// shared counter, and computes them alone, reading the operands in place where the tiles read
// them in order (x @ W^T packs a weight panel with register transposes; g @ W copies W's panel
// rows; g^T @ x packs g's columns by tiles of rows and copies x's panel rows) and writing into
// any row-major view. Threads that take the next expert when they finish the last keep every
// core busy whatever the experts' sizes and whatever else runs on a core; each expert is computed
// by one thread in one way, so results do not depend on which thread took it.
//
// Registered with torch's dispatcher:
//   moekit::mm_into(a, b, out, prefetch_next=None): out = a @ b, all 2-D fp32 CPU tensors; a any
//     strides; out with unit column stride; b with unit stride along either dimension (b = W^T
//     packs panels of W); the memory of prefetch_next is pulled into cache while it runs.
//     Blocking: the output is computed in panels one register tile wide, each as tiles of 6 rows
//     over blocks of 512 of the inner dimension (kInnerBlock); the tile's width follows the
//     vector set the file is built for (simd.h): 64 columns (6 x 4 vectors in 24 of AVX-512's 32
//     registers) or 16 (6 x 2 vectors in 12 of AVX2's 16). While a panel's tiles run, the next
//     panel's weight rows and the next tile's output rows are pulled into cache, a line at a time
//     (kRequestEvery); weight gradients written in one pass are stored past the caches.
//   moekit::expert_products(rows, weights, out, tasks, threads): out[s:t] = rows[s:t] @ weights[e]^T
//     for every task (e, s, t), weights packed [E, n_out, n_in].
//   moekit::expert_backward_pairs(grad_rows, in_rows, weights, grad_weight?, grad_in, tasks, threads):
//     grad_weight[e] = grad_rows[s:t]^T @ in_rows[s:t] and grad_in[s:t] = grad_rows[s:t] @ weights[e]
//     for every task, the gradient rows read once while they are in cache.
//   moekit::expert_swiglu_forward / expert_swiglu_backward: SwiGLU experts (no biases, routing
//     weight on the output) whole, both products, activation and routing weight per expert, the
//     expert's rows of x and grad_out read in place through their token ids.
//   moekit::expert_swiglu_rows(x, token, expert, scale, w_in, w_out, threads) -> y: the same forward
//     for a few expert-sorted rows outside autograd, tasks, work space and combine in the call.
//   moekit::topk_swiglu_rows(x, index, weight, w_in, w_out, threads) -> (y, token, expert, weight, rank):
//     the same from a router's [T, k] top-k choices, grouped by expert in the call.
//   moekit::rows_linear(x, weight, bias?, threads) -> y: a dense layer's product for a few rows
//     (decode), the weight's rows split over torch's threads.
//   moekit::rows_linear_parts(x, weights, biases, threads) -> [y_1 | y_2 | ...]: the same for several
//     weights in one call (a decoding step's q, k and v projections).
//   moekit::combine_rows(rows, order, bounds, out): out[t] = sum of rows[order[bounds[t]:bounds[t+1]]].
//   moekit::swiglu_into(h, out), moekit::swiglu_backward_into(h, grad, out): SwiGLU of
//     h = [gate | up] and its gradient with respect to h, rows split over torch's threads.
//   (moekit::parallel_width and the same loops on torch's at::mm, for any CPU and dtype: expert_mm.cpp;
//   the experts as tasks for torch's threads: expert_tasks.h.)
// The Python side (moekit/kernels/native.py) checks the CPU, builds this file and probes it.
//
// Built with -fopenmp: without it, _OPENMP is undefined, ATen's parallel_for (ATen/ParallelOpenMP.h)
// runs its whole range on the calling thread, and every "parallel" loop here is serial. Measured
// (BENCHMARKS.md §13): a build without the flag took all experts on one thread and was 1.6-1.8x
// further from dense on a quiet 2-core machine, while looking level on a loaded one. The #error
// below makes that build fail instead, and `parallel_width` lets the probe check it at run time.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "expert_tasks.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <numeric>
#include <optional>
#include <tuple>
#include <vector>

#if !defined(_OPENMP)
#error "moekit's expert kernels must be compiled with -fopenmp (else at::parallel_for is serial)"
#endif

#include "combine_rows.h"
#include "simd.h"
#include "swiglu_rows.h"

#if defined(MOEKIT_SIMD)

namespace {

namespace S = moekit_simd;
using namespace moekit_tasks;
using namespace moekit_swiglu;

constexpr int kRowsPerTile = 6;
using S::kLineFloats;
// Output columns per panel: one register tile's width (AVX-512: 4 vectors of 16; AVX2: 2 of 8).
constexpr int kPanel = S::kTileVectors * S::kLanes;
// Depth (steps of k) of a block: 512, so that products with K up to 512 (an expert's weight
// gradients over up to 512 rows; the layer benchmark's K = 512 products) run in one pass, without
// reading their output back for a second block. AVX2 (a 32 KB panel of 16 columns): fine shape on
// an AVX2 EPYC, fwd+bwd 2-3 % less time than with 256. AVX-512 (a 128 KB panel of 64 columns, in
// L2): on an AVX-512 Xeon (family 6 model 207), two threads, the layer's fwd+bwd on the tile kernel
// took 0.97x the time of blocks of 256 at the coarse shape (K = 512 to 1024), the same at fine and
// very fine; with 128 (a panel in L1), 1.01-1.04x (BENCHMARKS.md §13).
constexpr int kInnerBlock = 512;

// Steps of k between a register tile's requests for memory it does not read itself: the next
// panel's weight rows, the caller's lines (another product's weights) and the next tile's output
// rows, one line of each per request (`tile`). A request that misses every cache holds one of the
// core's few fill buffers until its line arrives, so a burst of them (the tile's whole share
// before its first step, as requested before) stalls the tile's own loads for as long as the
// burst takes to arrive; spread over the tile's steps, the lines arrive while it computes. On an
// AVX-512 Xeon (family 6 model 207), with the next tile's output rows requested too: the layer's
// fwd+bwd on the tile kernel 0.94-0.96x the time of the requests in bursts (fine, very fine and
// coarse shapes, two threads), the same bits (BENCHMARKS.md §13); every 4 or every 16 steps
// instead: within 2 % of every 8, either way.
constexpr int64_t kRequestEvery = 8;

// One dimension of a product's operand: element i lies `at(i)` floats from the operand's base,
// i * stride, or index[i] * stride where the dimension runs through `index`. An indexed dimension
// is how a product reads an expert's rows of x or grad_out where they lie, through their token
// ids: gathered into a copy first, the rows passed through the cache twice (three gathers of
// 25 MB a training step at the layer benchmark's fine shape, 3.4 % of the experts' thread time;
// read in place, the layer's fwd+bwd 0.99x the time at fine and very fine, BENCHMARKS.md §13).
struct Axis {
  int64_t stride;
  const int64_t* index = nullptr;
  int64_t at(int64_t i) const { return (index != nullptr ? index[i] : i) * stride; }
  Axis from(int64_t i) const { return {stride, index != nullptr ? index + i : nullptr}; }
  bool is(int64_t plain_stride) const { return index == nullptr && stride == plain_stride; }
};

// A product's operand: element (i, j) at base + rows.at(i) + cols.at(j).
struct Operand {
  const float* base;
  Axis rows, cols;
  const float* at(int64_t i, int64_t j) const { return base + rows.at(i) + cols.at(j); }
  // The operand from element (i, j) on.
  Operand from(int64_t i, int64_t j) const {
    const int64_t row_offset = rows.index != nullptr ? 0 : i * rows.stride;
    const int64_t col_offset = cols.index != nullptr ? 0 : j * cols.stride;
    return {base + row_offset + col_offset, rows.from(i), cols.from(j)};
  }
};

inline Operand strided(const float* base, int64_t row_stride, int64_t col_stride) {
  return {base, {row_stride}, {col_stride}};
}

// A register tile's share of a stream of lines to request (`per_tile`, set by whoever sets up the
// stream), spent by `tile` one line every kRequestEvery steps and the rest at its end. `Lines`
// says whether lines are left (`more`) and requests the next (`request`).
template <typename Lines>
struct TileShare {
  int64_t per_tile = 0;
  int64_t budget = 0;  // of the current tile's share, the lines not yet requested
  inline void begin_tile() { budget = per_tile; }
  inline void one() {
    if (budget > 0 && lines().more()) {
      lines().request();
      --budget;
    }
  }
  inline void finish_tile() {
    for (; budget > 0 && lines().more(); --budget) lines().request();
    budget = 0;
  }

 private:
  inline Lines& lines() { return static_cast<Lines&>(*this); }
};

// Lines of memory to pull into L2 while a product runs (the next expert's weights, and after
// them, where `and_then` adds it, a second range), so that the loads overlap the arithmetic
// instead of stalling the product or pass that reads them: one per step of the dot-product loops
// (decode); on the tile kernel, `per_tile` lines in each register tile, spread over its steps
// (`product` sets the share, `tile` spends it).
struct Prefetch : TileShare<Prefetch> {
  const char* next = nullptr;
  const char* end = nullptr;
  const char* then_next = nullptr;  // the second range, requested once the first is
  const char* then_end = nullptr;
  inline bool more() const { return next < end || then_next < then_end; }
  inline int64_t lines_left() const { return ((end - next) + (then_end - then_next)) / 64; }
  inline void request() {
    if (next >= end) {
      next = then_next;
      end = then_end;
      then_next = then_end = nullptr;
    }
    _mm_prefetch(next, _MM_HINT_T1);
    next += 64;
  }
  inline void step() {
    if (more()) request();
  }
};

// The source of the next panel a product packs (a block of a weight's rows: `rows` runs of
// `elements` floats, `row_stride` apart), pulled into L2 a few lines in each register tile of the
// current panel (`_MM_HINT_T1`; T0 measured inconsistent, -2.5 to +0.7 %). The packing reads
// a weight the experts' loop has not touched for a whole step (the experts' weights exceed the
// last-level cache), a few short runs per row that the hardware's stream prefetchers barely start
// on: read cold, those loads stalled the packing.
struct PanelAhead : TileShare<PanelAhead> {
  const char* base = nullptr;
  int64_t rows = 0, lines_per_row = 0, stride = 0;
  int64_t row = 0, line = 0;

  static PanelAhead of(const float* first, int64_t rows, int64_t elements, int64_t row_stride, int64_t tiles) {
    PanelAhead ahead;
    if (rows <= 0 || elements <= 0) return ahead;
    const auto address = reinterpret_cast<uintptr_t>(first);
    ahead.base = reinterpret_cast<const char*>(address & ~uintptr_t{63});
    ahead.rows = rows;
    // lines a run touches, from the line of its first element (runs start anywhere in a line)
    ahead.lines_per_row = ((address & 63) + elements * static_cast<int64_t>(sizeof(float)) + 63) / 64;
    ahead.stride = row_stride * static_cast<int64_t>(sizeof(float));
    ahead.per_tile = (rows * ahead.lines_per_row + tiles - 1) / std::max<int64_t>(1, tiles);
    return ahead;
  }
  inline bool more() const { return row < rows; }
  inline void request() {
    _mm_prefetch(base + row * stride + line * 64, _MM_HINT_T1);
    if (++line == lines_per_row) {
      line = 0;
      ++row;
    }
  }
};

// The j-th of NV vectors of a tile row: whole, or the last one masked by `tail` where Masked.
template <int NV, bool Masked>
inline S::Vec load_part(int j, const float* p, S::Mask tail) {
  return Masked && j == NV - 1 ? S::load(tail, p) : S::load(p);
}
template <int NV, bool Masked>
inline void store_part(int j, float* p, S::Mask tail, S::Vec v) {
  if (Masked && j == NV - 1)
    S::store(p, tail, v);
  else
    S::store(p, v);
}

// C[0:MR, 0:kLanes*NV] (+)= A[0:MR, 0:K] @ B[0:K, 0:kLanes*NV], A's row i from a_rows[i] on, sak
// floats per step of k; the last vector masked by `tail` where Masked. `stream`: whole vectors
// stored past the caches (C's rows aligned to whole lines).
// Every kRequestEvery steps of k, one line of each of `prefetch` and `ahead` is requested (their
// shares for this tile, what is left at its end) and one line of `c_next`, the next tile's
// `c_next_rows` output rows, for writing: written cold, each of the tile's stores waited for its
// line to be read first.
template <int MR, int NV, bool Masked>
inline void tile(int64_t K, const float* const* a_rows, int64_t sak, const float* B, int64_t ldb,
                 float* C, int64_t ldc, S::Mask tail, bool accumulate, bool stream, Prefetch& prefetch,
                 PanelAhead& ahead, const float* c_next = nullptr, int64_t c_next_rows = 0) {
  const int64_t c_lines = c_next != nullptr ? c_next_rows * NV : 0;
  int64_t c_line = 0;
  const auto request_output_line = [&] {
    __builtin_prefetch(c_next + (c_line / NV) * ldc + (c_line % NV) * S::kLanes, /*rw=*/1, /*locality=*/3);
    ++c_line;
  };
  prefetch.begin_tile();
  ahead.begin_tile();
  const float* a[MR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) a[i] = a_rows[i];
  S::Vec acc[MR][NV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j)
      acc[i][j] = accumulate ? load_part<NV, Masked>(j, C + i * ldc + S::kLanes * j, tail) : S::zero();
  for (int64_t k = 0; k < K; ++k) {
    S::Vec b[NV];
    const float* row = B + k * ldb;
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) b[j] = load_part<NV, Masked>(j, row + S::kLanes * j, tail);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const S::Vec av = S::set1(a[i][k * sak]);
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) acc[i][j] = S::fmadd(av, b[j], acc[i][j]);
    }
    if (k % kRequestEvery == kRequestEvery - 1) {
      ahead.one();
      prefetch.one();
      if (c_line < c_lines) request_output_line();
    }
  }
  ahead.finish_tile();
  prefetch.finish_tile();
  while (c_line < c_lines) request_output_line();
  if (!Masked && stream) {
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) S::stream(C + i * ldc + S::kLanes * j, acc[i][j]);
    return;
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) store_part<NV, Masked>(j, C + i * ldc + S::kLanes * j, tail, acc[i][j]);
}

// Where the register tiles find A's rows: in place (`a`, its columns unit-stride or not, its rows
// strided or indexed) or packed by `pack_row_groups` (group g at packed + g * group, its row i at
// + i, kRowsPerTile floats per step of k).
struct RowsOfA {
  Operand a{nullptr, {0}, {0}};
  const float* packed = nullptr;
  int64_t group = 0;
  int64_t step() const { return packed != nullptr ? kRowsPerTile : a.cols.stride; }
  const float* row(int64_t i) const {
    return packed != nullptr ? packed + i / kRowsPerTile * group + i % kRowsPerTile : a.at(i, 0);
  }
};

// Rows of A by tiles of kRowsPerTile. Each tile requests lines of the next panel's source and of
// the caller's prefetch, and, where this pass writes C first (not accumulating, not streaming it
// past the caches), the next tile's rows of C.
template <int NV, bool Masked>
void panel_rows(int64_t M, int64_t K, const RowsOfA& A, const float* B, int64_t ldb, float* C, int64_t ldc,
                S::Mask tail, bool accumulate, bool stream, Prefetch& prefetch, PanelAhead& ahead) {
  const bool request_output = !accumulate && !stream;
  const int64_t sak = A.step();
  const float* rows[kRowsPerTile];
  int64_t i = 0;
  for (; i + kRowsPerTile <= M; i += kRowsPerTile) {
    for (int r = 0; r < kRowsPerTile; ++r) rows[r] = A.row(i + r);
    const int64_t next_rows = request_output ? std::min<int64_t>(kRowsPerTile, M - i - kRowsPerTile) : 0;
    tile<kRowsPerTile, NV, Masked>(K, rows, sak, B, ldb, C + i * ldc, ldc, tail, accumulate, stream, prefetch, ahead,
                                   next_rows > 0 ? C + (i + kRowsPerTile) * ldc : nullptr, next_rows);
  }
  for (int r = 0; r < M - i; ++r) rows[r] = A.row(i + r);
  float* c = C + i * ldc;
  switch (M - i) {
    case 5: tile<5, NV, Masked>(K, rows, sak, B, ldb, c, ldc, tail, accumulate, stream, prefetch, ahead); break;
    case 4: tile<4, NV, Masked>(K, rows, sak, B, ldb, c, ldc, tail, accumulate, stream, prefetch, ahead); break;
    case 3: tile<3, NV, Masked>(K, rows, sak, B, ldb, c, ldc, tail, accumulate, stream, prefetch, ahead); break;
    case 2: tile<2, NV, Masked>(K, rows, sak, B, ldb, c, ldc, tail, accumulate, stream, prefetch, ahead); break;
    case 1: tile<1, NV, Masked>(K, rows, sak, B, ldb, c, ldc, tail, accumulate, stream, prefetch, ahead); break;
    default: break;
  }
}

// A panel of NV vectors' width, its last vector whole or masked.
template <int NV>
void panel_of(int64_t M, int64_t K, const RowsOfA& A, const float* B, int64_t ldb, float* C, int64_t ldc,
              int64_t rest, bool accumulate, bool stream, Prefetch& prefetch, PanelAhead& ahead) {
  if (rest)
    panel_rows<NV, true>(M, K, A, B, ldb, C, ldc, S::tail_mask(rest), accumulate, stream, prefetch, ahead);
  else
    panel_rows<NV, false>(M, K, A, B, ldb, C, ldc, S::full_mask(), accumulate, stream, prefetch, ahead);
}

// C[:, 0:width] (+)= A @ B[:, 0:width] for a panel of width <= kPanel columns.
void panel(int64_t M, int64_t width, int64_t K, const RowsOfA& A, const float* B, int64_t ldb, float* C, int64_t ldc,
           bool accumulate, bool stream, Prefetch& prefetch, PanelAhead ahead = {}) {
  static_assert(S::kTileVectors <= 4, "panel() dispatches up to 4 vectors per tile row");
  const int64_t rest = width % S::kLanes;
  switch ((width + S::kLanes - 1) / S::kLanes) {
    case 4: panel_of<4>(M, K, A, B, ldb, C, ldc, rest, accumulate, stream, prefetch, ahead); break;
    case 3: panel_of<3>(M, K, A, B, ldb, C, ldc, rest, accumulate, stream, prefetch, ahead); break;
    case 2: panel_of<2>(M, K, A, B, ldb, C, ldc, rest, accumulate, stream, prefetch, ahead); break;
    case 1: panel_of<1>(M, K, A, B, ldb, C, ldc, rest, accumulate, stream, prefetch, ahead); break;
    default: break;
  }
}

// A packed for the tiles where its columns, not its rows, are contiguous (sai == 1: the weight
// gradient's grad_rows^T): read in place, a tile's 6 values per step of k lie a whole gradient row
// apart (1-2 KB), so every step of the inner loop touches a new cache line, and those lines fall
// into a few L1 sets (measured on an AVX2 EPYC: weight gradients 15-20 % below the forward
// products). Packed, rows [g * 6, g * 6 + 6) x `depth` are one contiguous group, k-major:
// packed[g][k][i] = A(g * 6 + i, k), rows past M zero.
void pack_row_groups(const Operand& A, int64_t rows, int64_t depth, float* packed) {
  int64_t g = 0;
  if (A.rows.is(1)) {
    // a group's 6 values per step of k are contiguous (one row of grad_rows): two moves of 4 and 2
    // floats each (an element-wise loop before: weight gradients 2-3 % slower, hot, AVX2 EPYC)
    for (; g + kRowsPerTile <= rows; g += kRowsPerTile) {
      float* out = packed + g * depth;
      for (int64_t k = 0; k < depth; ++k, out += kRowsPerTile) {
        const float* a = A.at(g, k);
        _mm_storeu_ps(out, _mm_loadu_ps(a));
        const __m128 last_two = _mm_loadl_pi(_mm_setzero_ps(), reinterpret_cast<const __m64*>(a + 4));
        _mm_storel_pi(reinterpret_cast<__m64*>(out + 4), last_two);
      }
    }
  }
  for (; g < rows; g += kRowsPerTile) {
    const int64_t count = std::min<int64_t>(kRowsPerTile, rows - g);
    float* group = packed + g * depth;
    for (int64_t k = 0; k < depth; ++k) {
      float* out = group + k * kRowsPerTile;
      for (int64_t i = 0; i < count; ++i) out[i] = *A.at(g + i, k);
      for (int64_t i = count; i < kRowsPerTile; ++i) out[i] = 0.0f;
    }
  }
}

// out[0:min(kPanel, count)] = row[...]: one panel's row in vector moves, the last vector masked
// (inline, where std::copy called memmove per 64-byte run; level on hot operands).
inline void copy_panel_row(const float* row, int64_t count, float* out) {
  if (count >= kPanel) {
#pragma GCC unroll 4
    for (int j = 0; j < S::kTileVectors; ++j) S::store(out + j * S::kLanes, S::load(row + j * S::kLanes));
    return;
  }
  for (int64_t j = 0; j < count; j += S::kLanes) S::store_upto(out + j, count - j, S::load_upto(row + j, count - j));
}

// Packed A's bytes per block of rows: a block's packed rows stay in L2 (256 KB or more on every
// x86 CPU with AVX2) while the panels of B pass over them.
constexpr int64_t kPackedRowsBytes = 128 * 1024;
// Copied panels of B's bytes per chunk of columns (input gradients), likewise.
constexpr int64_t kCopiedPanelsBytes = 128 * 1024;
// Copied panels of B's bytes per chunk of columns of a weight gradient, whose blocks of packed A
// each pass over the whole chunk: every column of the layer benchmark's shapes in one chunk (2 MB
// at coarse), so that A is packed once; a wider B is copied and A packed again chunk by chunk.
// Each of torch's threads keeps a buffer this large.
constexpr int64_t kWeightGradPanelsBytes = 2 * 1024 * 1024;

// B[0:depth, 0:columns] (rows strided or indexed, columns contiguous) copied, row by row,
// into panels of kPanel contiguous columns: panel p at panels + p * kPanel * depth, its row r at
// + r * kPanel. Read in place, a panel's rows lie a whole row of B apart: rows of whole kilobytes
// fall into a few L1 sets, long panels spread over many pages, and every register tile over the
// panel would fetch them again.
void copy_panels(const Operand& B, int64_t depth, int64_t columns, float* panels) {
  for (int64_t r = 0; r < depth; ++r) {
    const float* row = B.at(r, 0);
    for (int64_t n = 0; n < columns; n += kPanel) copy_panel_row(row + n, columns - n, panels + n * depth + r * kPanel);
  }
}

// packed[k][j] = W[j][k] for j < width (zero up to kPanel), k < depth; W rows of stride ldw.
void pack_transposed(const float* W, int64_t ldw, int64_t width, int64_t depth, float* packed) {
  for (int64_t block = 0; block < kPanel; block += S::kLanes) {
    for (int64_t k = 0; k < depth; k += S::kLanes) {
      const int64_t cols = std::min<int64_t>(S::kLanes, depth - k);
      const S::Mask mask = S::tail_mask(cols);
      S::Vec r[S::kLanes];
      for (int64_t j = 0; j < S::kLanes; ++j)
        r[j] = block + j >= width        ? S::zero()
               : cols == S::kLanes ? S::load(W + (block + j) * ldw + k)
                                   : S::load(mask, W + (block + j) * ldw + k);
      S::transpose(r);
      for (int64_t j = 0; j < cols; ++j) S::store(packed + (k + j) * kPanel + block, r[j]);
    }
  }
}

// C[0:M, 0:N] = A[0:M, 0:K] @ W[0:N, 0:K]^T for a few rows (M <= kDotRows), A and W rows unit-stride:
// dot products along K, each weight row read once, in place. For decode, where packing a weight
// panel for one or two rows costs more than the product.
constexpr int64_t kDotRows = 4;

template <int MR>
void dot_rows_narrow(int64_t N, int64_t K, const float* A, int64_t lda, const float* W, int64_t ldw, float* C,
                     int64_t ldc, Prefetch& prefetch);

// One row of A against kWideRows weight rows at a time: more weight rows read at once keep more
// of memory's reads in flight (one row against a 67 MB weight, one AVX2 EPYC thread: 15.8 GB/s
// four rows at a time, a sum over 1 GB 20). Each output is the same sum in the same order as
// dot_rows' (one vector accumulator along K, then its lanes), so the values do not change.
// Whole vectors are read with plain loads and only the last, partial one masked: on AVX2 every
// masked load is a `vmaskmovps`, and with masks on every load a 67 MB head and a `large` layer's
// experts were read 4-10 % and 2.5-6 % slower (AVX2 EPYC, two threads, six runs of the variants
// side by side in one process; BENCHMARKS.md §8). With plain loads, requesting the next block of
// rows a block ahead no longer paid (level or slower in all six), so there is none.
constexpr int kWideRows = 8;

void dot_row_wide(int64_t N, int64_t K, const float* A, const float* W, int64_t ldw, float* C, Prefetch& prefetch) {
  const int64_t whole = K / S::kLanes * S::kLanes;
  int64_t n = 0;
  for (; n + kWideRows <= N; n += kWideRows) {
    S::Vec acc[kWideRows];
    for (int j = 0; j < kWideRows; ++j) acc[j] = S::zero();
    const float* w = W + n * ldw;
    for (int64_t k = 0; k < whole; k += S::kLanes) {
      prefetch.step();
      const S::Vec a = S::load(A + k);
#pragma GCC unroll 8
      for (int j = 0; j < kWideRows; ++j) acc[j] = S::fmadd(a, S::load(w + j * ldw + k), acc[j]);
    }
    if (whole < K) {
      prefetch.step();
      const S::Mask m = S::tail_mask(K - whole);
      const S::Vec a = S::load(m, A + whole);
#pragma GCC unroll 8
      for (int j = 0; j < kWideRows; ++j) acc[j] = S::fmadd(a, S::load(m, w + j * ldw + whole), acc[j]);
    }
    for (int j = 0; j < kWideRows; ++j) C[n + j] = S::reduce_add(acc[j]);
  }
  if (n < N) dot_rows_narrow<1>(N - n, K, A, 0, W + n * ldw, ldw, C + n, 0, prefetch);
}

template <int MR>
void dot_rows(int64_t N, int64_t K, const float* A, int64_t lda, const float* W, int64_t ldw, float* C,
              int64_t ldc, Prefetch& prefetch) {
  if constexpr (MR == 1) {
    dot_row_wide(N, K, A, W, ldw, C, prefetch);
  } else {
    dot_rows_narrow<MR>(N, K, A, lda, W, ldw, C, ldc, prefetch);
  }
}

template <int MR>
void dot_rows_narrow(int64_t N, int64_t K, const float* A, int64_t lda, const float* W, int64_t ldw, float* C,
                     int64_t ldc, Prefetch& prefetch) {
  for (int64_t n = 0; n < N; n += 4) {
    const int64_t width = std::min<int64_t>(4, N - n);
    S::Vec acc[MR][4];
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < 4; ++j) acc[i][j] = S::zero();
    for (int64_t k = 0; k < K; k += S::kLanes) {
      prefetch.step();
      S::Vec w[4];
      for (int j = 0; j < 4; ++j) w[j] = j < width ? S::load_upto(W + (n + j) * ldw + k, K - k) : S::zero();
      for (int i = 0; i < MR; ++i) {
        const S::Vec a = S::load_upto(A + i * lda + k, K - k);
        for (int j = 0; j < 4; ++j) acc[i][j] = S::fmadd(a, w[j], acc[i][j]);
      }
    }
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < width; ++j) C[i * ldc + n + j] = S::reduce_add(acc[i][j]);
  }
}

void product_tiles(int64_t M, int64_t N, int64_t K, const Operand& A, const Operand& B, float* C, int64_t ldc,
                   Prefetch& prefetch, bool stream);

// C[0:M, 0:N] = A @ B for A [M, K], B [K, N] (one of B's dimensions unit-stride), C rows of stride
// ldc. Dimensions that may run through an index (Axis): A's rows, read in place by the register
// tiles; A's columns where A is packed (a weight gradient's grad_rows^T); B's rows where its
// columns are contiguous (copied into panels). `stream`: C is not read again soon (a weight
// gradient, which only the optimizer reads after the whole backward): where it is written in one
// pass (K within one block of k) and its rows are whole lines, it is stored past the caches, which
// saves reading each line from memory before writing it (fine shape on an AVX2 EPYC: weight
// gradients 2-4 % faster). Not over several blocks: a line streamed after an earlier block left it
// in cache is evicted first (coarse shape, K = 512: the layer's fwd+bwd 7 % slower).
void product(int64_t M, int64_t N, int64_t K, const Operand& A, const Operand& B, float* C, int64_t ldc,
             Prefetch& prefetch, bool stream = false) {
  stream = stream && K <= kInnerBlock && reinterpret_cast<uintptr_t>(C) % 64 == 0 &&
           ldc % kLineFloats == 0 && kPanel % kLineFloats == 0;
  product_tiles(M, N, K, A, B, C, ldc, prefetch, stream);
  if (stream) _mm_sfence();  // the streamed lines visible before any other thread reads them
}

// The same for strided A (strides sai, sak) and B (sbk, sbn).
void product(int64_t M, int64_t N, int64_t K, const float* A, int64_t sai, int64_t sak, const float* B,
             int64_t sbk, int64_t sbn, float* C, int64_t ldc, Prefetch& prefetch, bool stream = false) {
  product(M, N, K, strided(A, sai, sak), strided(B, sbk, sbn), C, ldc, prefetch, stream);
}

void product_tiles(int64_t M, int64_t N, int64_t K, const Operand& A, const Operand& B, float* C, int64_t ldc,
                   Prefetch& prefetch, bool stream) {
  if (M == 0 || N == 0) return;
  if (K == 0) {
    for (int64_t i = 0; i < M; ++i) std::fill(C + i * ldc, C + i * ldc + N, 0.0f);
    return;
  }
  const int64_t row_tiles = (M + kRowsPerTile - 1) / kRowsPerTile;
  if (prefetch.more()) {  // the caller's lines, spread over every tile of the product
    const int64_t tiles = row_tiles * ((N + kPanel - 1) / kPanel) * ((K + kInnerBlock - 1) / kInnerBlock);
    prefetch.per_tile = (prefetch.lines_left() + tiles) / tiles;
  }
  const bool b_rows_contiguous = B.cols.is(1) || N == 1;
  if (b_rows_contiguous && A.rows.is(1) && !A.cols.is(1) && M > 1) {
    // A with contiguous columns (weight gradients): packed by blocks of rows, per block of k; B's
    // block of k rows copied into panels first (`copy_panels`), once for all blocks of A: with B
    // read in place, the coarse shape's fwd+bwd took 3-5 % longer (AVX2 EPYC, the variants side by
    // side in one process; fine 0-1.5 %, very fine level; BENCHMARKS.md §13).
    thread_local LineVector<float> rows_packed, panels;
    for (int64_t k = 0; k < K; k += kInnerBlock) {
      const int64_t depth = std::min<int64_t>(kInnerBlock, K - k);
      const int64_t block = std::max<int64_t>(
          kRowsPerTile, kPackedRowsBytes / static_cast<int64_t>(sizeof(float)) / depth / kRowsPerTile * kRowsPerTile);
      const int64_t chunk = std::max<int64_t>(
          kPanel, kWeightGradPanelsBytes / static_cast<int64_t>(sizeof(float)) / depth / kPanel * kPanel);
      rows_packed.resize(static_cast<size_t>((block + kRowsPerTile) * depth));
      panels.resize(static_cast<size_t>(std::min<int64_t>(chunk, (N + kPanel - 1) / kPanel * kPanel) * depth));
      RowsOfA packed;
      packed.packed = rows_packed.data();
      packed.group = kRowsPerTile * depth;
      for (int64_t n0 = 0; n0 < N; n0 += chunk) {
        const int64_t columns = std::min<int64_t>(chunk, N - n0);
        copy_panels(B.from(k, n0), depth, columns, panels.data());
        for (int64_t m = 0; m < M; m += block) {
          const int64_t rows = std::min<int64_t>(block, M - m);
          pack_row_groups(A.from(m, k), rows, depth, rows_packed.data());
          for (int64_t n = 0; n < columns; n += kPanel)
            panel(rows, std::min<int64_t>(kPanel, columns - n), depth, packed, &panels[n * depth], kPanel,
                  C + m * ldc + n0 + n, ldc, k > 0, stream, prefetch);
        }
      }
    }
    return;
  }
  TORCH_INTERNAL_ASSERT(A.cols.index == nullptr, "moekit: A's columns run through an index only when packed");
  if (b_rows_contiguous && (M > kRowsPerTile || B.rows.index != nullptr)) {
    // B in place (input gradients: g @ W), reused by several tiles of A's rows: each block of k
    // rows is first copied, row by row in memory order, into panels of contiguous rows, a chunk of
    // columns at a time. Read in place, a panel's rows lie a whole weight row apart (1-2 KB) and
    // fall into a few L1 sets, so every tile would fetch them again (measured on an AVX2 EPYC,
    // fine shape: input gradients 11-14 % slower than the forward products, whose W^T is packed;
    // copied, 15 % faster, level with them; very fine level either way).
    thread_local LineVector<float> panels;
    for (int64_t k = 0; k < K; k += kInnerBlock) {
      const int64_t depth = std::min<int64_t>(kInnerBlock, K - k);
      const int64_t chunk = std::max<int64_t>(kPanel, kCopiedPanelsBytes / static_cast<int64_t>(sizeof(float)) /
                                                           depth / kPanel * kPanel);
      panels.resize(static_cast<size_t>(chunk * depth));
      for (int64_t n0 = 0; n0 < N; n0 += chunk) {
        const int64_t columns = std::min<int64_t>(chunk, N - n0);
        copy_panels(B.from(k, n0), depth, columns, panels.data());
        // the next chunk's rows: the next columns of this block of k, else the next block's first
        const bool last = n0 + chunk >= N;
        const int64_t next_k = last ? k + kInnerBlock : k, next_n = last ? 0 : n0 + chunk;
        PanelAhead ahead = next_k < K && B.rows.index == nullptr
                               ? PanelAhead::of(B.at(next_k, next_n), std::min<int64_t>(kInnerBlock, K - next_k),
                                                std::min<int64_t>(chunk, N - next_n), B.rows.stride,
                                                row_tiles * ((columns + kPanel - 1) / kPanel))
                               : PanelAhead{};
        for (int64_t n = 0; n < columns; n += kPanel)
          panel(M, std::min<int64_t>(kPanel, columns - n), depth, {A.from(0, k)}, &panels[n * depth], kPanel,
                C + n0 + n, ldc, k > 0, stream, prefetch, ahead);
      }
    }
    return;
  }
  if (b_rows_contiguous) {
    for (int64_t n = 0; n < N; n += kPanel)
      for (int64_t k = 0; k < K; k += kInnerBlock)
        panel(M, std::min<int64_t>(kPanel, N - n), std::min<int64_t>(kInnerBlock, K - k), {A.from(0, k)}, B.at(k, n),
              B.rows.stride, C + n, ldc, k > 0, stream, prefetch);
    return;
  }
  // B = W^T with W [N, K] row-major (stride ldw): dot products for a few rows, else W's panels
  // packed transposed.
  TORCH_INTERNAL_ASSERT(B.rows.is(1) && B.cols.index == nullptr, "moekit: B = W^T must be strided");
  const float* W = B.base;
  const int64_t ldw = B.cols.stride;
  if (M <= kDotRows && (A.cols.is(1) || K == 1)) {
    // a few rows (decode): through an index, copied first (at most kDotRows rows)
    thread_local LineVector<float> few;
    const float* rows = A.base;
    int64_t lda = A.rows.stride;
    if (A.rows.index != nullptr) {
      few.resize(static_cast<size_t>(M * K));
      for (int64_t i = 0; i < M; ++i) std::copy(A.at(i, 0), A.at(i, 0) + K, few.data() + i * K);
      rows = few.data();
      lda = K;
    }
    switch (M) {
      case 1: dot_rows<1>(N, K, rows, lda, W, ldw, C, ldc, prefetch); break;
      case 2: dot_rows<2>(N, K, rows, lda, W, ldw, C, ldc, prefetch); break;
      case 3: dot_rows<3>(N, K, rows, lda, W, ldw, C, ldc, prefetch); break;
      default: dot_rows<4>(N, K, rows, lda, W, ldw, C, ldc, prefetch); break;
    }
    return;
  }
  thread_local LineVector<float> packed;
  packed.resize(kInnerBlock * kPanel);
  for (int64_t n = 0; n < N; n += kPanel) {
    const int64_t width = std::min<int64_t>(kPanel, N - n);
    for (int64_t k = 0; k < K; k += kInnerBlock) {
      const int64_t depth = std::min<int64_t>(kInnerBlock, K - k);
      pack_transposed(W + n * ldw + k, ldw, width, depth, packed.data());
      // the next pack's rows of W: this panel's next block of k, else the next panel's first
      const bool last = k + kInnerBlock >= K;
      const int64_t next_n = last ? n + kPanel : n, next_k = last ? 0 : k + kInnerBlock;
      PanelAhead ahead = next_n < N ? PanelAhead::of(W + next_n * ldw + next_k, std::min<int64_t>(kPanel, N - next_n),
                                                     std::min<int64_t>(kInnerBlock, K - next_k), ldw, row_tiles)
                                    : PanelAhead{};
      panel(M, width, depth, {A.from(0, k)}, packed.data(), kPanel, C + n, ldc, k > 0, stream, prefetch, ahead);
    }
  }
}

Prefetch prefetch_of(const float* data, int64_t elements) {
  Prefetch prefetch;
  prefetch.next = reinterpret_cast<const char*>(data);
  prefetch.end = prefetch.next + elements * static_cast<int64_t>(sizeof(float));
  return prefetch;
}

// `first`'s lines, then those of `elements` floats from `data`.
Prefetch and_then(Prefetch first, const float* data, int64_t elements) {
  const Prefetch second = prefetch_of(data, elements);
  first.then_next = second.next;
  first.then_end = second.end;
  return first;
}

void check_float_cpu(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.device().is_cpu(), op, ": ", name, " must be a float32 CPU tensor");
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
  Prefetch prefetch;
  if (prefetch_next.has_value() && prefetch_next->is_non_overlapping_and_dense()) {
    int64_t span = 1;  // elements from the lowest address to the highest, the tensor being dense
    for (int64_t d = 0; d < prefetch_next->dim(); ++d) span += (prefetch_next->size(d) - 1) * prefetch_next->stride(d);
    prefetch.next = static_cast<const char*>(prefetch_next->data_ptr());
    prefetch.end = prefetch.next + (prefetch_next->numel() ? span : 0) * prefetch_next->element_size();
  }
  const int64_t sbk = b.stride(0), sbn = (b.stride(1) == 1 || N == 1) ? 1 : b.stride(1);
  product(M, N, K, a.data_ptr<float>(), a.stride(0), a.stride(1), b.data_ptr<float>(), sbk, sbn,
          out.data_ptr<float>(), out.stride(0), prefetch);
}

void check_rows(const at::Tensor& t, int64_t rows, int64_t cols, const char* op, const char* name) {
  check_float_cpu(t, op, name);
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols && t.stride(1) == 1, op, ": ", name,
              " must be [", rows, ", ", cols, "] with unit column stride, got ", t.sizes());
}

void check_packed(const at::Tensor& w, const char* op, const char* name) {
  check_float_cpu(w, op, name);
  TORCH_CHECK(w.dim() == 3 && (w.stride(2) == 1 || w.stride(1) == 1), op, ": ", name,
              " must be [E, n_out, n_in] with unit stride along one of its last two dimensions");
}

// out[s:t] = rows[s:t] @ weights[e]^T for every task (e, s, t).
void expert_products(const at::Tensor& rows, const at::Tensor& weights, const at::Tensor& out,
                     const at::Tensor& tasks, int64_t threads) {
  const char* op = "moekit::expert_products";
  check_packed(weights, op, "weights");
  const int64_t n_out = weights.size(1), n_in = weights.size(2);
  check_rows(rows, rows.size(0), n_in, op, "rows");
  check_rows(out, rows.size(0), n_out, op, "out");
  const auto work = tasks_of(tasks, op);
  for (const auto& task : work) check_task(task, weights.size(0), rows.size(0), op);
  const float* X = rows.data_ptr<float>();
  const float* W = weights.data_ptr<float>();
  float* Y = out.data_ptr<float>();
  const int64_t ldx = rows.stride(0), ldy = out.stride(0), swe = weights.stride(0);
  // b = W[e]^T: [n_in, n_out] with strides (weights.stride(2), weights.stride(1))
  const int64_t sbk = weights.stride(2), sbn = weights.stride(1);
  const int64_t span = (n_out - 1) * weights.stride(1) + (n_in - 1) * weights.stride(2) + 1;
  take_tasks(static_cast<int64_t>(work.size()), threads, [&](int64_t i) {
    const Task& task = work[i];
    // pull the expert after this one (in the order the threads take them) into cache meanwhile
    Prefetch prefetch = i + 1 < static_cast<int64_t>(work.size()) ? prefetch_of(W + work[i + 1].expert * swe, span)
                                                                   : Prefetch{};
    product(task.stop - task.start, n_out, n_in, X + task.start * ldx, ldx, 1, W + task.expert * swe, sbk,
            sbn == 1 ? 1 : sbn, Y + task.start * ldy, ldy, prefetch);
  });
}

// grad_weight[e] = grad_rows[s:t]^T @ in_rows[s:t] (if given) and grad_in[s:t] = grad_rows[s:t] @
// weights[e] for every task (e, s, t); the weight gradient's product pulls the expert's weights into
// cache for the input gradient's.
void expert_backward_pairs(const at::Tensor& grad_rows, const at::Tensor& in_rows, const at::Tensor& weights,
                           const std::optional<at::Tensor>& grad_weight, const at::Tensor& grad_in,
                           const at::Tensor& tasks, int64_t threads) {
  const char* op = "moekit::expert_backward_pairs";
  check_packed(weights, op, "weights");
  const int64_t rows = grad_rows.size(0), n_out = weights.size(1), n_in = weights.size(2);
  check_rows(grad_rows, rows, n_out, op, "grad_rows");
  check_rows(in_rows, rows, n_in, op, "in_rows");
  check_rows(grad_in, rows, n_in, op, "grad_in");
  if (grad_weight.has_value()) {
    check_float_cpu(*grad_weight, op, "grad_weight");
    TORCH_CHECK(grad_weight->dim() == 3 && grad_weight->sizes() == weights.sizes() && grad_weight->stride(2) == 1,
                op, ": grad_weight must be shaped like weights with unit column stride");
  }
  const auto work = tasks_of(tasks, op);
  for (const auto& task : work) check_task(task, weights.size(0), rows, op);
  const float* G = grad_rows.data_ptr<float>();
  const float* X = in_rows.data_ptr<float>();
  const float* W = weights.data_ptr<float>();
  float* GX = grad_in.data_ptr<float>();
  float* GW = grad_weight.has_value() ? grad_weight->data_ptr<float>() : nullptr;
  const int64_t ldg = grad_rows.stride(0), ldx = in_rows.stride(0), ldgx = grad_in.stride(0);
  const int64_t swe = weights.stride(0), sw_out = weights.stride(1), sw_in = weights.stride(2);
  const int64_t sgwe = GW ? grad_weight->stride(0) : 0, ldgw = GW ? grad_weight->stride(1) : 0;
  const int64_t span = (n_out - 1) * sw_out + (n_in - 1) * sw_in + 1;
  take_tasks(static_cast<int64_t>(work.size()), threads, [&](int64_t i) {
    const Task& task = work[i];
    const int64_t count = task.stop - task.start;
    const float* g = G + task.start * ldg;
    const float* w = W + task.expert * swe;
    if (GW != nullptr) {
      Prefetch this_expert = prefetch_of(w, span);
      // [n_out, count] @ [count, n_in]: A = grad_rows^T (strides 1, ldg)
      product(n_out, n_in, count, g, 1, ldg, X + task.start * ldx, ldx, 1, GW + task.expert * sgwe, ldgw,
              this_expert, /*stream=*/true);
    }
    Prefetch next = !GW && i + 1 < static_cast<int64_t>(work.size()) ? prefetch_of(W + work[i + 1].expert * swe, span)
                                                                     : Prefetch{};
    // [count, n_out] @ W[e] [n_out, n_in]
    product(count, n_in, n_out, g, ldg, 1, w, sw_out, sw_in == 1 ? 1 : sw_in, GX + task.start * ldgx, ldgx, next);
  });
}

// Rows per thread's share of an elementwise pass: at least ~64k elements, below which a hand-off
// between threads costs more than it saves.
inline int64_t split_grain(int64_t cols) { return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, cols)); }

// out[t] = sum of rows[order[i]] for i in [bounds[t], bounds[t+1]), in that order (the combine of
// the experts' rows into their tokens); tokens split over torch's threads. torch's index_add_ on
// the CPU scatters with atomics or serially; here each token's sum is one thread's, in a fixed
// order, so the result is that of a serial index_add_ in the order given.
void combine_rows(const at::Tensor& rows, const at::Tensor& order, const at::Tensor& bounds, const at::Tensor& out) {
  const char* op = "moekit::combine_rows";
  check_float_cpu(rows, op, "rows");
  check_float_cpu(out, op, "out");
  const int64_t cols = rows.size(1), tokens = out.size(0);
  TORCH_CHECK(rows.dim() == 2 && rows.stride(1) == 1 && out.dim() == 2 && out.size(1) == cols && out.stride(1) == 1,
              op, ": rows [A, d] and out [T, d] must be 2-D with unit column stride");
  TORCH_CHECK(order.dim() == 1 && order.scalar_type() == at::kLong && order.is_contiguous() && order.size(0) == rows.size(0),
              op, ": order must be a contiguous int64 [A]");
  TORCH_CHECK(bounds.dim() == 1 && bounds.scalar_type() == at::kLong && bounds.is_contiguous() && bounds.size(0) == tokens + 1,
              op, ": bounds must be a contiguous int64 [T + 1]");
  const float* R = rows.data_ptr<float>();
  const int64_t* O = order.data_ptr<int64_t>();
  const int64_t* B = bounds.data_ptr<int64_t>();
  float* Y = out.data_ptr<float>();
  const int64_t ldr = rows.stride(0), ldy = out.stride(0), count = rows.size(0);
  TORCH_CHECK(B[0] == 0 && B[tokens] == count, op, ": bounds must run from 0 to A");
  for (int64_t i = 0; i < count; ++i) TORCH_CHECK(O[i] >= 0 && O[i] < count, op, ": order holds ", O[i], ", out of range");
  at::parallel_for(0, tokens, std::max<int64_t>(1, split_grain(cols) / 8), [&](int64_t first, int64_t last) {
    for (int64_t t = first; t < last; ++t) moekit_combine::sum_token_rows(R, ldr, O, B, t, last, cols, Y + t * ldy);
  });
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

// out = silu(gate) * up for h = [gate | up].
void swiglu_into(const at::Tensor& h, const at::Tensor& out) {
  const int64_t ff = h.size(1) / 2;
  check_swiglu(h, out, ff, "moekit::swiglu_into");
  const float* H = h.data_ptr<float>();
  float* O = out.data_ptr<float>();
  const int64_t ldh = h.stride(0), ldo = out.stride(0);
  at::parallel_for(0, h.size(0), split_grain(h.size(1)), [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) swiglu_row(H + r * ldh, O + r * ldo, ff);
  });
}

// The gradient of swiglu with respect to h = [gate | up], given the gradient of its output.
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
  at::parallel_for(0, h.size(0), split_grain(h.size(1)), [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) swiglu_backward_row(H + r * ldh, G + r * ldg, O + r * ldo, ff);
  });
}


// The row stride of `cols` floats in a work space: one 64-byte line more, so that rows whose
// length is a multiple of 1-4 KB (d = 256, 512, ...) do not map to the same few L1 sets, which
// the tiles read 6 rows at a time and the weight gradients one row per step of k (x86's L1
// caches are indexed by address bits 6-11). Measured on an AVX2 EPYC (Zen 3), fwd+bwd at
// T=2048, one thread: 5 % less time at fine and at very fine (BENCHMARKS.md §13).
inline int64_t padded(int64_t cols) { return cols + kLineFloats; }

void check_swiglu_operands(const at::Tensor& rows_of_tokens, const at::Tensor& token, const at::Tensor& scale,
                           const at::Tensor& w_in, const at::Tensor& w_out, const std::optional<at::Tensor>& h,
                           const char* op) {
  check_packed(w_in, op, "w_in");
  check_packed(w_out, op, "w_out");
  const int64_t d = rows_of_tokens.size(1), ff = w_out.size(2), rows = token.size(0);
  TORCH_CHECK(w_in.size(1) == 2 * ff && w_in.size(2) == d && w_out.size(1) == d && w_in.size(0) == w_out.size(0), op,
              ": w_in must be [E, 2 ff, d] and w_out [E, d, ff]");
  if (h.has_value()) check_rows(*h, rows, 2 * ff, op, "h");
  TORCH_CHECK(token.dim() == 1 && token.scalar_type() == at::kLong && token.is_contiguous(), op,
              ": token must be a contiguous int64 [A]");
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == rows && scale.scalar_type() == at::kFloat && scale.is_contiguous(),
              op, ": scale must be a contiguous float32 [A]");
  const int64_t* T = token.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r)
    TORCH_CHECK(T[r] >= 0 && T[r] < rows_of_tokens.size(0), op, ": token ", T[r], " out of range");
}

// How much of a forward product's weights W^T (rows of W `row_stride` apart, `span` floats in
// all) to request while the product before it runs: for `rows` on register tiles, only its first
// panel (kPanel rows of W), since each pack requests the next one (PanelAhead); for dot products
// (decode), which request nothing themselves, all of it. Whole, the requests brought up to 1 MB
// (fine) into an L2 already holding the current expert's operands; with the first panel only,
// the layer's forward op took 33.2 ms against 37.0 at fine and 12.3 against 13.4 at very fine
// (two threads of an AVX-512 Xeon; BENCHMARKS.md §13). On an AVX2 EPYC the whole requests had
// measured within 1-3 % either way, and were not measured again there.
inline int64_t span_ahead(int64_t rows, int64_t span, int64_t row_stride) {
  return rows > kDotRows ? std::min<int64_t>(span, kPanel * row_stride) : span;
}

// SwiGLU experts whole, the routing weight on their output, every step of an expert done while
// its rows are in cache: for every task (e, s, t) and row r in [s, t): xs = x[token[r]],
// h = xs @ w_in[e]^T, a_in = swiglu(h) * scale[r], ys = a_in @ w_out[e]^T, xs read in place
// (Axis). Only h is kept for the backward (with x), where `h` is given: a_in and, outside
// autograd, h live in the thread's work space (a forward that keeps no h writes 16-25 MB less at
// the layer benchmark's very fine and fine shapes). `prefetch_next_task`: pull the thread's next
// task's weights (their first panel: span_ahead) into cache during this one's second product.
void swiglu_forward_tasks(const char* op, const at::Tensor& x, const at::Tensor& token, const at::Tensor& scale,
                          const at::Tensor& w_in, const at::Tensor& w_out, const std::optional<at::Tensor>& h,
                          const at::Tensor& ys, const std::vector<Task>& work, int64_t threads,
                          bool prefetch_next_task = true) {
  check_rows(x, x.size(0), x.size(1), op, "x");
  check_swiglu_operands(x, token, scale, w_in, w_out, h, op);
  const int64_t d = x.size(1), ff = w_out.size(2), rows = token.size(0);
  check_rows(ys, rows, d, op, "ys");
  for (const auto& task : work) check_task(task, w_in.size(0), rows, op);
  const int64_t* T = token.data_ptr<int64_t>();
  const float *X = x.data_ptr<float>(), *S = scale.data_ptr<float>();
  const float *WI = w_in.data_ptr<float>(), *WO = w_out.data_ptr<float>();
  float* Hp = h.has_value() ? h->data_ptr<float>() : nullptr;
  float* Y = ys.data_ptr<float>();
  const int64_t ldx = x.stride(0), ldy = ys.stride(0);
  const int64_t span_in = (2 * ff - 1) * w_in.stride(1) + (d - 1) * w_in.stride(2) + 1;
  const int64_t span_out = (d - 1) * w_out.stride(1) + (ff - 1) * w_out.stride(2) + 1;
  const int64_t ldai = padded(ff);
  const int64_t ldh = h.has_value() ? h->stride(0) : padded(2 * ff);
  WorkSpaces<float> spaces(largest_task(work) * (ldai + (h.has_value() ? 0 : ldh)));
  const int64_t task_count = static_cast<int64_t>(work.size());
  take_tasks_ahead(task_count, threads, [&](int64_t i, int64_t following_task) {
    const Task& task = work[i];
    const int64_t count = task.stop - task.start, s0 = task.start;
    float* a_in = spaces.mine();
    float* hs = h.has_value() ? Hp + s0 * ldh : a_in + count * ldai;  // the task's rows of h
    const float* wi = WI + task.expert * w_in.stride(0);
    const float* wo = WO + task.expert * w_out.stride(0);
    // This expert's w_out is pulled into cache during its first product only on the tile kernel:
    // in the dot products of a few rows (decode) those extra reads competed with the product's
    // own (the 8 experts of a `large` layer, cold, on two threads of an AVX2 EPYC: 6-18 % less time
    // without, in five runs of 40 calls each way side by side; BENCHMARKS.md §8).
    Prefetch this_out =
        count <= kDotRows ? Prefetch{} : prefetch_of(wo, span_ahead(count, span_out, w_out.stride(1)));
    const Operand xs{X, {ldx, T + s0}, {1}};  // the expert's rows of x, in place
    product(count, 2 * ff, d, xs, strided(wi, w_in.stride(2), w_in.stride(1)), hs, ldh, this_out);
    for (int64_t r = 0; r < count; ++r) swiglu_row(hs + r * ldh, a_in + r * ldai, ff, S[s0 + r]);
    const Task* following = following_task < task_count ? &work[following_task] : nullptr;
    Prefetch next = prefetch_next_task && following != nullptr
                        ? prefetch_of(WI + following->expert * w_in.stride(0),
                                      span_ahead(following->stop - following->start, span_in, w_in.stride(1)))
                        : Prefetch{};
    product(count, d, ff, a_in, ldai, 1, wo, w_out.stride(2), w_out.stride(1), Y + s0 * ldy, ldy, next);
  });
}

void expert_swiglu_forward(const at::Tensor& x, const at::Tensor& token, const at::Tensor& scale,
                           const at::Tensor& w_in, const at::Tensor& w_out, const std::optional<at::Tensor>& h,
                           const at::Tensor& ys, const at::Tensor& tasks, int64_t threads) {
  const char* op = "moekit::expert_swiglu_forward";
  swiglu_forward_tasks(op, x, token, scale, w_in, w_out, h, ys, tasks_of(tasks, op), threads);
}

// Each token's sum of its expert-sorted rows' SwiGLU experts (`work`: their runs of equal expert
// ids), computed as expert_swiglu_forward computes them, then each row added into its token's
// output in row order (from zero: the sums of combine_rows and of a serial index_add_).
at::Tensor summed_swiglu_rows(const char* op, const at::Tensor& x, const at::Tensor& token, const at::Tensor& scale,
                              const at::Tensor& w_in, const at::Tensor& w_out, const std::vector<Task>& work,
                              int64_t threads) {
  const int64_t rows = token.size(0), d = x.size(1), ff = w_out.size(2), num_tokens = x.size(0);
  const auto options = x.options();
  const at::Tensor ys = at::empty({rows, d}, options);
  // The next task's weights are pulled into this core's cache only on one thread (decode, `large`
  // on two threads of an AVX2 EPYC: the experts 1-9 % faster without on two; measured when the
  // next task went to whichever thread asked first, before tasks were claimed ahead).
  swiglu_forward_tasks(op, x, token, scale, w_in, w_out, std::nullopt, ys, work, threads,
                       /*prefetch_next_task=*/threads <= 1);
  at::Tensor out = at::zeros({num_tokens, d}, options);
  const int64_t* T = token.data_ptr<int64_t>();
  const float* Y = ys.data_ptr<float>();
  float* O = out.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    float* o = O + T[r] * d;
    const float* y = Y + r * d;
    for (int64_t j = 0; j < d; j += S::kLanes)
      S::store_upto(o + j, d - j, S::add(S::load_upto(o + j, d - j), S::load_upto(y + j, d - j)));
  }
  return out;
}

// The experts' output of expert-sorted rows, for a few rows outside autograd (decode): the same
// products and activation as expert_swiglu_forward, its tasks found from the expert ids and its
// work space allocated here, then each row added into its token's output in row order (from
// zero: the sums of combine_rows and of a serial index_add_). One call where the Python side would
// build the tasks, allocate its buffers and combine in a dozen calls of a few microseconds each.
at::Tensor expert_swiglu_rows(const at::Tensor& x, const at::Tensor& token, const at::Tensor& expert,
                              const at::Tensor& scale, const at::Tensor& w_in, const at::Tensor& w_out,
                              int64_t threads) {
  const char* op = "moekit::expert_swiglu_rows";
  check_packed(w_in, op, "w_in");
  check_packed(w_out, op, "w_out");
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [T, d]");
  TORCH_CHECK(expert.dim() == 1 && expert.size(0) == token.size(0), op, ": expert and token must both be [A]");
  return summed_swiglu_rows(op, x.contiguous(), token, scale, w_in, w_out, expert_runs(expert, w_in.size(0), op),
                            threads);
}

// `expert_swiglu_rows` from a router's top-k choices as they come, [T, k] expert ids `index` (best
// first) and their weights: the choices grouped by expert here (one stable sort, as
// `Assignments.from_dense` groups them), the experts' output summed per token, and the grouping
// returned as the kept assignments (token, expert, weight, rank) [T k] that the routing record
// holds. A decoding step's MoE layer in one call after its router's top-k, where the Python side
// would sort, gather and divide in half a dozen calls between the two.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> topk_swiglu_rows(
    const at::Tensor& x, const at::Tensor& index, const at::Tensor& weight, const at::Tensor& w_in,
    const at::Tensor& w_out, int64_t threads) {
  const char* op = "moekit::topk_swiglu_rows";
  check_packed(w_in, op, "w_in");
  check_packed(w_out, op, "w_out");
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [T, d]");
  TORCH_CHECK(index.dim() == 2 && index.size(0) == x.size(0) && index.scalar_type() == at::kLong && index.device().is_cpu(),
              op, ": index must be an int64 CPU tensor [T, k]");
  TORCH_CHECK(weight.sizes() == index.sizes() && weight.scalar_type() == at::kFloat && weight.device().is_cpu(), op,
              ": weight must be a float32 CPU tensor of index's shape");
  const int64_t k = index.size(1), rows = index.numel(), experts = w_in.size(0);
  const at::Tensor ids = index.contiguous(), weights = weight.contiguous();
  const int64_t* I = ids.data_ptr<int64_t>();
  const float* Wt = weights.data_ptr<float>();
  std::vector<int64_t> order(static_cast<size_t>(rows));
  std::iota(order.begin(), order.end(), int64_t{0});
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return I[a] < I[b]; });
  const auto long_options = ids.options();
  at::Tensor token = at::empty({rows}, long_options), expert = at::empty({rows}, long_options);
  at::Tensor rank = at::empty({rows}, long_options), scale = at::empty({rows}, weights.options());
  int64_t *T = token.data_ptr<int64_t>(), *E = expert.data_ptr<int64_t>(), *R = rank.data_ptr<int64_t>();
  float* Sc = scale.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t o = order[static_cast<size_t>(r)];
    T[r] = o / k;
    E[r] = I[o];
    R[r] = o % k;
    Sc[r] = Wt[o];
  }
  // (expert_runs checks every id's range, before any weight is read)
  at::Tensor out =
      summed_swiglu_rows(op, x.contiguous(), token, scale, w_in, w_out, expert_runs(expert, experts, op), threads);
  return {out, token, expert, scale, rank};
}

// out = x @ weight^T (+ bias) for a few rows x [M, K] (M <= kDotRows) of a dense layer, the
// weight's rows [N, K] split into chunks that `threads` of torch's threads take from a shared
// counter, each chunk's dot products along K read once, in place (dot_rows). A decoding step's
// dense products (the output head, attention projections) read their weights once for a row or
// a few; the library's GEMV, threaded or not, read a 67 MB head at 19-20 GB/s on one and two
// threads of an AVX2 EPYC whose sum over 1 GB reads 20 and 30.
// One weight of `rows_linear_parts`: W [N, K] (unit column stride), its bias [N] or null, and
// the column of the output its rows start at.
struct LinearPart {
  const float* weight;
  int64_t ldw, rows;
  const float* bias;
  int64_t column;
};

// out[:, part's columns] = x @ part.weight^T (+ bias) for every part, the parts' rows split into
// chunks of about the same size that `threads` of torch's threads take from a shared counter.
at::Tensor parts_product(const at::Tensor& x, const std::vector<LinearPart>& parts, int64_t columns, int64_t threads) {
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor out = at::empty({M, columns}, x.options());
  const float* X = x.data_ptr<float>();
  float* Y = out.data_ptr<float>();
  const int64_t ldx = x.stride(0);
  // chunks of 64 weight rows or more, about 8 per thread so that the threads finish together
  const int64_t chunk = std::max<int64_t>(64, (columns / (8 * std::max<int64_t>(1, threads)) + 3) / 4 * 4);
  struct Chunk {
    int64_t part, first, rows;
  };
  std::vector<Chunk> chunks;
  for (int64_t p = 0; p < static_cast<int64_t>(parts.size()); ++p)
    for (int64_t n0 = 0; n0 < parts[p].rows; n0 += chunk)
      chunks.push_back({p, n0, std::min<int64_t>(chunk, parts[p].rows - n0)});
  take_tasks(static_cast<int64_t>(chunks.size()), threads, [&](int64_t c) {
    const Chunk& task = chunks[static_cast<size_t>(c)];
    const LinearPart& part = parts[static_cast<size_t>(task.part)];
    const int64_t width = task.rows, n0 = task.first;
    Prefetch none;
    const float* w = part.weight + n0 * part.ldw;
    float* y = Y + part.column + n0;
    switch (M) {
      case 0: break;
      case 1: dot_rows<1>(width, K, X, ldx, w, part.ldw, y, columns, none); break;
      case 2: dot_rows<2>(width, K, X, ldx, w, part.ldw, y, columns, none); break;
      case 3: dot_rows<3>(width, K, X, ldx, w, part.ldw, y, columns, none); break;
      default: dot_rows<4>(width, K, X, ldx, w, part.ldw, y, columns, none); break;
    }
    if (part.bias != nullptr)
      for (int64_t i = 0; i < M; ++i)
        for (int64_t j = 0; j < width; ++j) y[i * columns + j] += part.bias[n0 + j];
  });
  return out;
}

LinearPart checked_part(const char* op, const at::Tensor& x, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias, int64_t column) {
  check_float_cpu(weight, op, "weight");
  const int64_t K = x.size(1), N = weight.size(0);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == K && weight.stride(1) == 1, op,
              ": weight must be [N, K] with unit column stride");
  const float* B = nullptr;
  if (bias.has_value()) {
    check_float_cpu(*bias, op, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N && bias->is_contiguous(), op, ": bias must be [N]");
    B = bias->data_ptr<float>();
  }
  return {weight.data_ptr<float>(), weight.stride(0), N, B, column};
}

void check_few_rows(const char* op, const at::Tensor& x) {
  check_float_cpu(x, op, "x");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.size(0) <= kDotRows, op, ": x must be [M <= ", kDotRows,
              ", K] with unit column stride");
}

at::Tensor rows_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       int64_t threads) {
  const char* op = "moekit::rows_linear";
  check_few_rows(op, x);
  const LinearPart part = checked_part(op, x, weight, bias, 0);
  return parts_product(x, {part}, part.rows, threads);
}

// [x @ W_1^T (+ b_1) | x @ W_2^T (+ b_2) | ...] in one call: a decoding step's query, key and
// value projections as one product over their weights where they lie, each output the value
// `rows_linear` gives it (the same dot products), with one hand-off between threads for all.
at::Tensor rows_linear_parts(const at::Tensor& x, at::TensorList weights, const c10::List<std::optional<at::Tensor>>& biases,
                             int64_t threads) {
  const char* op = "moekit::rows_linear_parts";
  check_few_rows(op, x);
  TORCH_CHECK(!weights.empty() && biases.size() == weights.size(), op, ": one bias (or None) per weight");
  std::vector<LinearPart> parts;
  int64_t columns = 0;
  for (size_t i = 0; i < weights.size(); ++i) {
    parts.push_back(checked_part(op, x, weights[i], biases.get(i), columns));
    columns += parts.back().rows;
  }
  return parts_product(x, parts, columns, threads);
}

// Within a pass over rows h = [gate | up] of 2 ff, at column j of this row's gate and up: the
// lines of the next row's gate and up at that column (once per 64-byte line), so that the next
// row's reads are requested as this row's are consumed, a line at a time. (The whole next row
// requested at once, 128 lines at ff = 1024: fwd+bwd 1-2 % slower at the coarse shape, one thread
// of an AVX2 EPYC; level at fine and very fine.)
inline void prefetch_next_row_line(const float* next, int64_t j, int64_t ff) {
  if (next == nullptr || j % kLineFloats != 0) return;
  _mm_prefetch(reinterpret_cast<const char*>(next + j), _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(next + ff + j), _MM_HINT_T0);
}

// The backward of `expert_swiglu_forward` for every task: the packed weight gradients (where
// given), grad_scale[r] = <grad of a_in, a> (the routing weight's gradient), and the gradient of
// the expert's rows of x, grad_xs (combined into tokens by the caller). a and a_in are formed
// again from h in the thread's work space (with the forward's arithmetic, so the same bits), as
// are the gradients of a and h; the expert's rows of x and grad_out are read in place (Axis).
void expert_swiglu_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& token,
                            const at::Tensor& scale, const at::Tensor& w_in, const at::Tensor& w_out,
                            const at::Tensor& h, const std::optional<at::Tensor>& grad_w_in,
                            const std::optional<at::Tensor>& grad_w_out, const at::Tensor& grad_scale,
                            const at::Tensor& grad_xs, const at::Tensor& tasks, int64_t threads) {
  const char* op = "moekit::expert_swiglu_backward";
  check_rows(x, x.size(0), x.size(1), op, "x");
  check_swiglu_operands(x, token, scale, w_in, w_out, h, op);
  const int64_t d = x.size(1), ff = w_out.size(2), rows = token.size(0);
  check_rows(grad_out, x.size(0), d, op, "grad_out");
  check_rows(grad_xs, rows, d, op, "grad_xs");
  TORCH_CHECK(grad_scale.dim() == 1 && grad_scale.size(0) == rows && grad_scale.scalar_type() == at::kFloat &&
                  grad_scale.is_contiguous(),
              op, ": grad_scale must be a contiguous float32 [A]");
  for (const auto* g : {&grad_w_in, &grad_w_out})
    if (g->has_value())
      TORCH_CHECK((*g)->scalar_type() == at::kFloat && (*g)->dim() == 3 && (*g)->stride(2) == 1, op,
                  ": weight gradients must be float32 [E, n_out, n_in] with unit column stride");
  if (grad_w_in.has_value()) TORCH_CHECK(grad_w_in->sizes() == w_in.sizes(), op, ": grad_w_in must be shaped like w_in");
  if (grad_w_out.has_value()) TORCH_CHECK(grad_w_out->sizes() == w_out.sizes(), op, ": grad_w_out must be shaped like w_out");
  const auto work = tasks_of(tasks, op);
  for (const auto& task : work) check_task(task, w_in.size(0), rows, op);
  const int64_t* T = token.data_ptr<int64_t>();
  const float *G = grad_out.data_ptr<float>(), *X = x.data_ptr<float>(), *S = scale.data_ptr<float>();
  const float *WI = w_in.data_ptr<float>(), *WO = w_out.data_ptr<float>(), *Hp = h.data_ptr<float>();
  float* GWI = grad_w_in.has_value() ? grad_w_in->data_ptr<float>() : nullptr;
  float* GWO = grad_w_out.has_value() ? grad_w_out->data_ptr<float>() : nullptr;
  float *GS = grad_scale.data_ptr<float>(), *GX = grad_xs.data_ptr<float>();
  const int64_t ldg = grad_out.stride(0), ldx = x.stride(0), ldh = h.stride(0), ldgx = grad_xs.stride(0);
  const int64_t span_in = (2 * ff - 1) * w_in.stride(1) + (d - 1) * w_in.stride(2) + 1;
  const int64_t span_out = (d - 1) * w_out.stride(1) + (ff - 1) * w_out.stride(2) + 1;
  const int64_t ldf = padded(ff), ldgh = padded(2 * ff);
  WorkSpaces<float> spaces(largest_task(work) * (2 * ldf + ldgh));
  const int64_t task_count = static_cast<int64_t>(work.size());
  take_tasks_ahead(task_count, threads, [&](int64_t i, int64_t following_task) {
    const Task& task = work[i];
    const int64_t count = task.stop - task.start, s0 = task.start;
    const float* wi = WI + task.expert * w_in.stride(0);
    const float* wo = WO + task.expert * w_out.stride(0);
    // the expert's rows of grad_out and of x, read in place; work space: sigmoid(gate), a_in then
    // grad_a [count, ff]; grad_h [count, 2 ff]
    const Operand grad_ys{G, {ldg, T + s0}, {1}}, xs{X, {ldx, T + s0}, {1}};
    float* sig = spaces.mine();
    float* ga = sig + count * ldf;
    float* gh = ga + count * ldf;
    for (int64_t r = 0; r < count; ++r) {  // sigmoid(gate) and a_in, as the forward formed it
      const float *gate = Hp + (s0 + r) * ldh, *up = gate + ff;
      const float* next = r + 1 < count ? gate + ldh : nullptr;
      const S::Vec sc = S::set1(S[s0 + r]);
      for (int64_t j = 0; j < ff; j += S::kLanes) {
        prefetch_next_row_line(next, j, ff);
        const int64_t rest = ff - j;
        const S::Vec g = S::load_upto(gate + j, rest);
        const S::Vec s = sigmoid_ps(g);
        S::store_upto(sig + r * ldf + j, rest, s);
        S::store_upto(ga + r * ldf + j, rest, S::mul(S::mul(S::mul(g, s), S::load_upto(up + j, rest)), sc));
      }
    }
    // w_in, which grad_xs reads last, is pulled into cache during the product just before it (the
    // weight gradient where there is one): requested during grad_a, two products ahead, its 1 MB
    // (fine shape) were evicted again by those products' own operands before grad_xs read them
    // (fine shape on an AVX2 EPYC, fwd+bwd: 1.2-2.6 % less time, very fine 1.5-2.8 %, coarse 1 %;
    // requested in both products: no gain). BENCHMARKS.md §13.
    Prefetch in_early = GWI == nullptr ? prefetch_of(wi, span_in) : Prefetch{};
    Prefetch in_late = GWI == nullptr ? Prefetch{} : prefetch_of(wi, span_in);
    // w_out, which grad_a reads, was requested during this thread's previous task (its last
    // product's `next`). Requested again during the weight gradient, as before tasks were claimed
    // ahead: the layer's fwd+bwd 1.02x the time at the coarse shape, 0.99-1.00x at fine, level at
    // very fine (two threads of an AVX-512 Xeon, two runs; BENCHMARKS.md §13).
    if (GWO != nullptr) {  // [d, count] @ [count, ff]
      Prefetch none;
      const Operand grad_ys_t{G, grad_ys.cols, grad_ys.rows};  // grad_ys^T
      product(d, ff, count, grad_ys_t, strided(ga, ldf, 1), GWO + task.expert * grad_w_out->stride(0),
              grad_w_out->stride(1), none, /*stream=*/true);
    }
    // grad_a = grad_ys @ w_out[e]: [count, d] @ [d, ff]
    product(count, ff, d, grad_ys, strided(wo, w_out.stride(1), w_out.stride(2)), ga, ldf, in_early);
    for (int64_t r = 0; r < count; ++r) {
      const float *gate = Hp + (s0 + r) * ldh, *up = gate + ff;
      const float* next = r + 1 < count ? gate + ldh : nullptr;
      float* gar = ga + r * ldf;
      const float* sr = sig + r * ldf;
      S::Vec dot = S::zero();
      const S::Vec sc = S::set1(S[s0 + r]);
      for (int64_t j = 0; j < ff; j += S::kLanes) {
        prefetch_next_row_line(next, j, ff);
        const int64_t rest = ff - j;
        const S::Vec g = S::load_upto(gar + j, rest);
        const S::Vec a =
            S::mul(S::mul(S::load_upto(gate + j, rest), S::load_upto(sr + j, rest)), S::load_upto(up + j, rest));
        dot = S::fmadd(g, a, dot);
        S::store_upto(gar + j, rest, S::mul(g, sc));
      }
      GS[s0 + r] = S::reduce_add(dot);
      swiglu_backward_row(gate, gar, gh + r * ldgh, ff, sr);
    }
    if (GWI != nullptr)  // [2 ff, count] @ [count, d]
      product(2 * ff, d, count, strided(gh, 1, ldgh), xs, GWI + task.expert * grad_w_in->stride(0),
              grad_w_in->stride(1), in_late, /*stream=*/true);
    // The next task's w_out (read by grad_a), then its rows of h, which its first pass reads from
    // memory (written by the forward long before): requested here, during this product's
    // arithmetic, the first pass reads them from cache (the layer's fwd+bwd 0.985-0.992x the time
    // at fine, 0.982-0.998x at very fine, level at coarse, in four runs on two threads of an
    // AVX-512 Xeon; BENCHMARKS.md §13).
    const Task* following = following_task < task_count ? &work[following_task] : nullptr;
    Prefetch next = following != nullptr
                        ? and_then(prefetch_of(WO + following->expert * w_out.stride(0), span_out),
                                   Hp + following->start * ldh, (following->stop - following->start) * ldh)
                        : Prefetch{};
    // grad_xs = grad_h @ w_in[e]: [count, 2 ff] @ [2 ff, d]
    product(count, d, 2 * ff, gh, ldgh, 1, wi, w_in.stride(1), w_in.stride(2), GX + s0 * ldgx, ldgx, next);
  });
}

}  // namespace

TORCH_LIBRARY(moekit, m) {
  m.def("mm_into(Tensor a, Tensor b, Tensor(c!) out, Tensor? prefetch_next=None) -> ()");
  m.impl("mm_into", c10::DispatchKey::CPU, TORCH_FN(mm_into));
  m.def("expert_products(Tensor rows, Tensor weights, Tensor(c!) out, Tensor tasks, int threads) -> ()");
  m.impl("expert_products", c10::DispatchKey::CPU, TORCH_FN(expert_products));
  m.def(
      "expert_backward_pairs(Tensor grad_rows, Tensor in_rows, Tensor weights, Tensor(c!)? grad_weight, "
      "Tensor(d!) grad_in, Tensor tasks, int threads) -> ()");
  m.impl("expert_backward_pairs", c10::DispatchKey::CPU, TORCH_FN(expert_backward_pairs));
  m.def(
      "expert_swiglu_forward(Tensor x, Tensor token, Tensor scale, Tensor w_in, Tensor w_out, Tensor(a!)? h, "
      "Tensor(b!) ys, Tensor tasks, int threads) -> ()");
  m.impl("expert_swiglu_forward", c10::DispatchKey::CPU, TORCH_FN(expert_swiglu_forward));
  m.def(
      "expert_swiglu_rows(Tensor x, Tensor token, Tensor expert, Tensor scale, Tensor w_in, Tensor w_out, "
      "int threads) -> Tensor");
  m.impl("expert_swiglu_rows", c10::DispatchKey::CPU, TORCH_FN(expert_swiglu_rows));
  m.def(
      "topk_swiglu_rows(Tensor x, Tensor index, Tensor weight, Tensor w_in, Tensor w_out, int threads) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.impl("topk_swiglu_rows", c10::DispatchKey::CPU, TORCH_FN(topk_swiglu_rows));
  m.def("rows_linear(Tensor x, Tensor weight, Tensor? bias, int threads) -> Tensor");
  m.impl("rows_linear", c10::DispatchKey::CPU, TORCH_FN(rows_linear));
  m.def("rows_linear_parts(Tensor x, Tensor[] weights, Tensor?[] biases, int threads) -> Tensor");
  m.impl("rows_linear_parts", c10::DispatchKey::CPU, TORCH_FN(rows_linear_parts));
  m.def(
      "expert_swiglu_backward(Tensor grad_out, Tensor x, Tensor token, Tensor scale, Tensor w_in, Tensor w_out, "
      "Tensor h, Tensor(a!)? grad_w_in, Tensor(b!)? grad_w_out, Tensor(c!) grad_scale, Tensor(d!) grad_xs, "
      "Tensor tasks, int threads) -> ()");
  m.impl("expert_swiglu_backward", c10::DispatchKey::CPU, TORCH_FN(expert_swiglu_backward));
  m.def("combine_rows(Tensor rows, Tensor order, Tensor bounds, Tensor(c!) out) -> ()");
  m.impl("combine_rows", c10::DispatchKey::CPU, TORCH_FN(combine_rows));
  m.def("swiglu_into(Tensor h, Tensor(c!) out) -> ()");
  m.impl("swiglu_into", c10::DispatchKey::CPU, TORCH_FN(swiglu_into));
  m.def("swiglu_backward_into(Tensor h, Tensor grad, Tensor(c!) out) -> ()");
  m.impl("swiglu_backward_into", c10::DispatchKey::CPU, TORCH_FN(swiglu_backward_into));
}

#endif  // MOEKIT_SIMD
