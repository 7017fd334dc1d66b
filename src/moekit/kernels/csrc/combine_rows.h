// The combine of the experts' fp32 rows into their tokens, in the vectors of simd.h: one token's
// sum, shared by both expert libraries (expert_gemm.cpp's combine_rows, expert_mm.cpp's
// combine_rows_any for fp32), so that both sum alike, bit for bit.
//
// A token's rows lie wherever their experts' tasks put them (rows sorted by expert, one row per
// token and choice), a few short runs of 1-2 KB each: the hardware's stream prefetchers barely
// start on them before the next token's rows begin elsewhere. So while a token's rows are summed,
// the rows of the token `kTokensAhead` later are requested, one line per line summed (fine shape,
// 2048 tokens x 6 rows of 512 read from the last-level cache, two threads of an AVX-512 Xeon:
// 0.62-0.79 ms against 0.74-1.07 without; BENCHMARKS.md §13).
#pragma once

#include <cstdint>

#include "simd.h"

#if defined(MOEKIT_SIMD)

namespace moekit_combine {

namespace S = moekit_simd;

constexpr int64_t kTokensAhead = 2;

// y[0:cols] = sum of R[O[i] * ldr + 0:cols] for i in [bounds[t], bounds[t + 1]), in that order,
// from zero; meanwhile the rows of token t + kTokensAhead are requested if it is below `end` (the
// end of the calling thread's share of tokens).
inline void sum_token_rows(const float* R, int64_t ldr, const int64_t* O, const int64_t* bounds, int64_t t,
                           int64_t end, int64_t cols, float* y) {
  const int64_t ahead = t + kTokensAhead;
  const int64_t first_ahead = ahead < end ? bounds[ahead] : 0, last_ahead = ahead < end ? bounds[ahead + 1] : 0;
  for (int64_t j = 0; j < cols; j += S::kLanes) {
    S::Vec acc = S::zero();
    for (int64_t i = bounds[t]; i < bounds[t + 1]; ++i) acc = S::add(acc, S::load_upto(R + O[i] * ldr + j, cols - j));
    if (j % S::kLineFloats == 0)
      for (int64_t i = first_ahead; i < last_ahead; ++i)
        _mm_prefetch(reinterpret_cast<const char*>(R + O[i] * ldr + j), _MM_HINT_T0);
    S::store_upto(y + j, cols - j, acc);
  }
}

}  // namespace moekit_combine

#endif
