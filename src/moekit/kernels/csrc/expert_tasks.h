// The experts as tasks for torch's threads, shared by both kernels of the expert loops
// (expert_gemm.cpp: moekit's AVX-512 tile kernel; expert_mm.cpp: torch's at::mm).
//
// A task is one expert and its rows (expert, start, stop) of an expert-sorted buffer. Threads take
// whole tasks, one at a time, largest first, from a shared counter: a thread that finishes early,
// or was slowed by other work on its core, leaves the rest to the others, and each expert is
// computed by one thread in one way, so results do not depend on which thread took it. (The
// SwiGLU loops claim each thread's next task one ahead, to pull its weights into the right
// core's cache: take_tasks_ahead.)
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstddef>
#include <memory>
#include <new>
#include <numeric>
#include <vector>

namespace moekit_tasks {

// fn(i) for every task i in [0, count), in the given order, taken one at a time from a shared
// counter by up to `threads` of torch's threads (the calling thread alone for 1).
template <typename Fn>
void take_tasks(int64_t count, int64_t threads, const Fn& fn) {
  threads = std::max<int64_t>(1, std::min<int64_t>(threads, count));
  if (threads == 1) {
    for (int64_t i = 0; i < count; ++i) fn(i);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t i = next.fetch_add(1); i < count; i = next.fetch_add(1)) fn(i);
  });
}

// fn(i, following) for every task i as take_tasks, each thread claiming the task it will take
// next (`following`; count where none is left) as it starts one, so that fn can pull that task's
// operands into its own core's cache while it computes task i. With take_tasks, a thread that
// requested "the next task's" weights (i + 1) left them in its cache while the other thread
// often took that task and read them again from memory. The cost: a thread holds its claimed
// task while it works, so at the end another may wait for up to one (small: tasks come largest
// first) task more.
template <typename Fn>
void take_tasks_ahead(int64_t count, int64_t threads, const Fn& fn) {
  threads = std::max<int64_t>(1, std::min<int64_t>(threads, count));
  if (threads == 1) {
    for (int64_t i = 0; i < count; ++i) fn(i, i + 1);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t i = next.fetch_add(1); i < count;) {
      const int64_t following = std::min(next.fetch_add(1), count);
      fn(i, following);
      i = following;
    }
  });
}

// The number of distinct threads at::parallel_for runs n one-item tasks on (static split).
inline int64_t parallel_width(int64_t n) {
  std::vector<char> seen(static_cast<size_t>(std::max<int64_t>(1, at::get_num_threads())), 0);
  at::parallel_for(0, n, 1, [&](int64_t, int64_t) {
    const int64_t id = at::get_thread_num();
    if (id >= 0 && id < static_cast<int64_t>(seen.size())) seen[id] = 1;
  });
  return std::accumulate(seen.begin(), seen.end(), int64_t{0});
}

struct Task {
  int64_t expert, start, stop;
};

// Requests the cache lines of a row of `count` elements, for a loop over rows to ask for the next
// row while it works on this one. The SwiGLU passes read rows that are not in cache one short run
// at a time: h (written by the forward, read back by the backward; 25 MB at the layer benchmark's
// fine shape, past the last-level cache) and x's and grad_out's rows gathered in token order.
// Without it each row's loads waited on memory: on an AVX2 EPYC (Zen 3) the backward's first pass
// over h read 25 MB in 15-27 ms (by the machine's load), about one line in flight at a time; 6 ms
// with the next row requested (fine shape, one thread; the passes and gathers 32 -> 20 ms per
// step, BENCHMARKS.md §13). The tile kernel's passes over h request it a line at a time
// (expert_gemm.cpp: prefetch_next_row_line).
template <typename scalar_t>
inline void prefetch_row(const scalar_t* row, int64_t count) {
  const auto first = reinterpret_cast<uintptr_t>(row) & ~uintptr_t{63};
  const auto end = reinterpret_cast<uintptr_t>(row + count);
  for (uintptr_t line = first; line < end; line += 64) __builtin_prefetch(reinterpret_cast<const void*>(line), 0, 3);
}

// rows [0, stop - start) of out (row stride ldo) = rows token[start:stop] of X, d columns (an
// expert's rows gathered), the next token's row requested while one is copied.
template <typename scalar_t>
inline void gather_rows(const scalar_t* X, int64_t ldx, const int64_t* T, const Task& task, scalar_t* out, int64_t ldo,
                        int64_t d) {
  for (int64_t r = task.start; r < task.stop; ++r) {
    if (r + 1 < task.stop) prefetch_row(X + T[r + 1] * ldx, d);
    std::copy(X + T[r] * ldx, X + T[r] * ldx + d, out + (r - task.start) * ldo);
  }
}

// The tasks [n, 3] (expert, start row, stop row) as given, largest first: the last ones taken are
// the shortest, so the threads finish together.
inline std::vector<Task> tasks_of(const at::Tensor& tasks, const char* op) {
  TORCH_CHECK(tasks.dim() == 2 && tasks.size(1) == 3 && tasks.scalar_type() == at::kLong && tasks.device().is_cpu(),
              op, ": tasks must be an int64 CPU tensor [n, 3] of (expert, start, stop)");
  const auto contiguous = tasks.contiguous();
  const int64_t* t = contiguous.data_ptr<int64_t>();
  std::vector<Task> out(tasks.size(0));
  for (int64_t i = 0; i < tasks.size(0); ++i) out[i] = {t[3 * i], t[3 * i + 1], t[3 * i + 2]};
  std::stable_sort(out.begin(), out.end(),
                   [](const Task& a, const Task& b) { return a.stop - a.start > b.stop - b.start; });
  return out;
}

// Memory of the kernels' work spaces and packed panels, aligned to a 64-byte cache line, so that
// vector loads of a panel's rows never straddle two lines. new and std::vector align to 16 bytes:
// a register tile reading a 256-deep panel from L2 16 bytes off a line ran at 130-158 GFLOP/s
// instead of 174 (AVX-512 Xeon, the tile alone; level with the panel in L1), the layer's fwd+bwd
// took 5-13 % longer with every buffer off a line, and its speed depended on where the heap
// happened to place each thread's buffers (BENCHMARKS.md §13).
constexpr std::align_val_t kLine{64};

template <typename T>
struct LineAligned {
  using value_type = T;
  LineAligned() = default;
  template <typename U>
  LineAligned(const LineAligned<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), kLine)); }
  void deallocate(T* p, size_t) { ::operator delete(p, kLine); }
  template <typename U>
  bool operator==(const LineAligned<U>&) const { return true; }
  template <typename U>
  bool operator!=(const LineAligned<U>&) const { return false; }
};
template <typename T>
using LineVector = std::vector<T, LineAligned<T>>;

// Each thread's work space for one call of the expert loops, `elements` long (the largest task's
// need), allocated uninitialised and line-aligned by the thread at its first task and freed when
// the call returns. The rows an expert's steps pass to each other (gathered inputs, activations,
// their gradients) live here, reused from expert to expert, so that they stay in cache where full
// [A, .] buffers would be written out to memory and read back.
template <typename T>
class WorkSpaces {
 public:
  explicit WorkSpaces(int64_t elements)
      : elements_(elements), spaces_(static_cast<size_t>(std::max(1, at::get_num_threads()))) {}
  T* mine() {
    const int id = at::get_thread_num();
    TORCH_CHECK(id >= 0 && id < static_cast<int>(spaces_.size()), "moekit: thread ", id, " has no work space");
    auto& space = spaces_[static_cast<size_t>(id)];
    if (!space) space.reset(static_cast<T*>(::operator new[](static_cast<size_t>(elements_) * sizeof(T), kLine)));
    return space.get();
  }

 private:
  struct Free {
    void operator()(T* p) const { ::operator delete[](p, kLine); }
  };
  int64_t elements_;
  std::vector<std::unique_ptr<T[], Free>> spaces_;
};

inline int64_t largest_task(const std::vector<Task>& work) {
  int64_t rows = 0;
  for (const auto& task : work) rows = std::max(rows, task.stop - task.start);
  return rows;
}

// The tasks of expert-sorted rows: one (expert, start, stop) per run of equal ids in `expert`
// (int64 [A], non-decreasing, each in [0, experts)), largest first as `tasks_of` gives them. For
// callers that have the ids but no host-side task list (a decode step's few rows).
inline std::vector<Task> expert_runs(const at::Tensor& expert, int64_t experts, const char* op) {
  TORCH_CHECK(expert.dim() == 1 && expert.scalar_type() == at::kLong && expert.is_contiguous() &&
                  expert.device().is_cpu(),
              op, ": expert must be a contiguous int64 CPU tensor [A]");
  const int64_t* e = expert.data_ptr<int64_t>();
  std::vector<Task> out;
  for (int64_t r = 0; r < expert.size(0); ++r) {
    TORCH_CHECK(e[r] >= 0 && e[r] < experts, op, ": expert id ", e[r], " is out of range");
    TORCH_CHECK(r == 0 || e[r] >= e[r - 1], op, ": expert ids must be sorted (non-decreasing)");
    if (r == 0 || e[r] != e[r - 1])
      out.push_back({e[r], r, r + 1});
    else
      out.back().stop = r + 1;
  }
  std::stable_sort(out.begin(), out.end(),
                   [](const Task& a, const Task& b) { return a.stop - a.start > b.stop - b.start; });
  return out;
}

inline void check_task(const Task& task, int64_t experts, int64_t rows, const char* op) {
  TORCH_CHECK(task.expert >= 0 && task.expert < experts && task.start >= 0 && task.start <= task.stop &&
                  task.stop <= rows,
              op, ": task (", task.expert, ", ", task.start, ", ", task.stop, ") is out of range");
}

}  // namespace moekit_tasks
