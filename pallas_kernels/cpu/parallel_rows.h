// Shared by the CPU sampling kernels (top_k.cc, inverse_cdf.cc): a per-row job spread over the calling
// thread and helpers on XLA's intra-op pool.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <utility>

#include "wait_done.h"
#include "xla/ffi/api/ffi.h"

namespace pagedjax_cpu {

// Calls body(scratch, r) once for every row r in [0, rows): rows are claimed one at a time from an
// atomic counter; each thread default-constructs its own Scratch (per-row buffers it reuses).
// Returns when every row is done.
template <typename Scratch, typename Body>
void parallel_rows(xla::ffi::ThreadPool& pool, int64_t rows, Body body) {
  struct State {
    State(Body b, int64_t n) : body(std::move(b)), rows(n) {}
    Body body;
    int64_t rows;
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  if (rows <= 0) return;
  auto state = std::make_shared<State>(std::move(body), rows);
  auto work = [state] {
    Scratch scratch;
    int64_t finished = 0;
    for (int64_t r; (r = state->next.fetch_add(1, std::memory_order_relaxed)) < state->rows; ++finished)
      state->body(scratch, r);
    if (finished && state->done.fetch_add(finished, std::memory_order_acq_rel) + finished == state->rows) {
      std::lock_guard<std::mutex> lock(state->mu);
      state->cv.notify_all();
    }
  };
  const int64_t helpers = std::min<int64_t>(std::max<int64_t>(pool.num_threads(), 1) - 1, rows - 1);
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work] { work(); });
  work();
  wait_done(state->done, rows, state->mu, state->cv);
}

}  // namespace pagedjax_cpu
