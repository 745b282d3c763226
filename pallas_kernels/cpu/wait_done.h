// Shared by the CPU kernels (paged_attention.cc, matmul.cc): how a custom call's calling thread waits
// for the helpers it scheduled on XLA's intra-op pool to finish their items.
#pragma once

#include <atomic>
#include <condition_variable>
#include <mutex>

namespace pagedjax_cpu {

// Waits for `done` to reach `n`: spins first, then sleeps on `cv` if that takes unusually long. When
// the calling thread runs out of items a helper has at most its last one left; a caller asleep on the
// condition variable waited ~10-20 us more for the kernel to wake it, on every call (whole bench125m
// runs, alternating: 23.64 / 22.89 s -> 22.80 / 22.17 s; 64-row decode steps 72.3 / 69.7 -> 68.4 / 66.6 ms).
template <typename Count>
void wait_done(const std::atomic<Count>& done, Count n, std::mutex& mu, std::condition_variable& cv) {
  for (int spin = 0; spin < 20000 && done.load(std::memory_order_acquire) != n; ++spin) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
  }
  if (done.load(std::memory_order_acquire) != n) {
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [&] { return done.load(std::memory_order_acquire) == n; });
  }
}

}  // namespace pagedjax_cpu
