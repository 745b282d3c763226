// y = x @ w (float32) for XLA:CPU as an FFI custom call, over a weight packed once at load time.
//
// Why not XLA's dot: XLA:CPU (YNNPACK) re-packs the weight matrix on every call (a transpose pass
// over all weights each step: ~7% of an engine step) and reaches only ~40-60% of the FMA peak at
// the 32-64 rows of a decode step. Packing the weight once into column panels lets a register-
// blocked micro-kernel stream it straight from memory at any M.
//
//   x    f32 [M, K]             activations, row-major
//   w    f32 [NB, K, 64]        weight packed by pack_weight(): NB = ceil(N / 64) column panels;
//                               element [b, k, c] = w[k, 64 b + c] (zero beyond N)
//        or f32 [L, NB, K, 64]  a stack of L such weights (one per layer), read in place
//   layer s32 []                which of the L weights to use (ignored for an unstacked w). Taking
//                               the whole stack avoids the copy XLA makes when a scan body slices
//                               one layer's weight out of it for a custom call.
//   rows s32 [4]                (a0, a1, b0, b1): only rows in [a0, a1) and [b0, b1) are computed,
//                               the others are set to zero. An engine step pads its decode rows and
//                               its prefill rows up to bucket sizes; skipping the padding saves up
//                               to a fifth of a decode step's matmul work.
//   attr n: the logical N (64 (NB - 1) < n <= 64 NB)
//   y    f32 [M, N]
//
// Work items are (run of consecutive column panels, block of rows); the calling thread and helpers
// on XLA's intra-op thread pool claim them from an atomic counter, one item ahead: while a thread
// sweeps the last panel of its item, the first panel of the item it claimed next streams into L2.
// (Claiming only when free left every item's first sweep waiting on DRAM; at decode sizes most
// items are a single panel, so that was most sweeps: 12-layer decode step at 64 rows 53 -> 46 ms.) The micro-kernel keeps a 6 x 64 block of y in 24
// zmm registers: per k, 4 panel loads + 6 broadcasts feed 24 FMAs.

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#define PJ_AVX512 1
#else
#define PJ_AVX512 0
#endif

#include "wait_done.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int NR = 64;  // columns per panel (4 zmm of 16 f32)
constexpr int MR = 6;   // rows per micro-kernel call
constexpr int ROWS_PER_ITEM = 96;

#ifndef PJ_PF
#define PJ_PF 16  // panel rows (256 bytes each) to prefetch ahead into L1
#endif

// Part of the next panel to pull into L2 during one sweep over the current one. A panel's first
// sweep would otherwise wait on DRAM (a 6-row sweep needs ~50 GB/s per core to run at FMA speed);
// spreading the next panel's load over the current panel's sweeps hides that wait at decode sizes.
struct NextPanel {
  const char* at = nullptr;
  int64_t lines = 0;  // cache lines to prefetch, from `at` on
};

#if PJ_AVX512
// y[r, 0:ncols] = sum_k x[r, k] * panel[k, 0:ncols] for R <= MR rows. Meanwhile it pulls
// pf.lines cache lines from pf.at into L2, spread evenly over the K steps (see NextPanel).
template <int R>
inline void micro_kernel(const float* x, int64_t ldx, int64_t K, const float* panel, float* y, int64_t ldy,
                         int ncols, NextPanel pf) {
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_ps();
  const float* wp = panel;
  const int64_t pf_total = pf.lines;
  int64_t pf_acc = 0;
  for (int64_t k = 0; k < K; ++k, wp += NR) {
    // Bresenham spread: pf.lines prefetches evenly over the K steps of this sweep.
    for (pf_acc += pf_total; pf_acc >= K; pf_acc -= K, pf.at += 64) _mm_prefetch(pf.at, _MM_HINT_T1);
    // All four cache lines of a panel row PJ_PF rows ahead: prefetching only every other line left
    // the rest to the L1 hardware prefetcher (interleaved A/B: 3-5% slower at 16-256 rows).
    for (int line = 0; line < NR; line += 16) _mm_prefetch(reinterpret_cast<const char*>(wp + PJ_PF * NR + line), _MM_HINT_T0);
    const __m512 b0 = _mm512_loadu_ps(wp);
    const __m512 b1 = _mm512_loadu_ps(wp + 16);
    const __m512 b2 = _mm512_loadu_ps(wp + 32);
    const __m512 b3 = _mm512_loadu_ps(wp + 48);
    for (int r = 0; r < R; ++r) {
      const __m512 a = _mm512_set1_ps(x[r * ldx + k]);
      acc[r][0] = _mm512_fmadd_ps(a, b0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(a, b1, acc[r][1]);
      acc[r][2] = _mm512_fmadd_ps(a, b2, acc[r][2]);
      acc[r][3] = _mm512_fmadd_ps(a, b3, acc[r][3]);
    }
  }
  for (int r = 0; r < R; ++r) {
    float* dst = y + r * ldy;
    for (int j = 0; j < 4; ++j) {
      const int c0 = 16 * j;
      if (c0 + 16 <= ncols) {
        _mm512_storeu_ps(dst + c0, acc[r][j]);
      } else if (c0 < ncols) {
        _mm512_mask_storeu_ps(dst + c0, static_cast<__mmask16>((1u << (ncols - c0)) - 1), acc[r][j]);
      }
    }
  }
}
#else
// Portable fallback (same contract); the compiler vectorises the inner loop.
template <int R>
inline void micro_kernel(const float* x, int64_t ldx, int64_t K, const float* panel, float* y, int64_t ldy,
                         int ncols, NextPanel) {
  float acc[R][NR] = {};
  for (int64_t k = 0; k < K; ++k) {
    const float* wp = panel + k * NR;
    for (int r = 0; r < R; ++r) {
      const float a = x[r * ldx + k];
#pragma omp simd
      for (int c = 0; c < NR; ++c) acc[r][c] += a * wp[c];
    }
  }
  for (int r = 0; r < R; ++r) std::memcpy(y + r * ldy, acc[r], sizeof(float) * ncols);
}
#endif

// Rows [m0, m1) of one panel, MR rows per sweep; `next` (or null) is the panel that follows, whose
// cache lines are shared out over these sweeps.
void run_rows(const float* x, int64_t K, const float* panel, const float* next, float* y, int64_t ldy, int ncols,
              int64_t m0, int64_t m1) {
  const int64_t sweeps = std::max<int64_t>(1, (m1 - m0 + MR - 1) / MR);
  const int64_t total_lines = next ? K * NR * int64_t(sizeof(float)) / 64 : 0;
  const int64_t lines_per_sweep = (total_lines + sweeps - 1) / sweeps;
  int64_t s = 0;
  auto share = [&]() {
    NextPanel pf;
    const int64_t first = std::min(total_lines, s * lines_per_sweep);
    pf.lines = std::min(total_lines, first + lines_per_sweep) - first;
    pf.at = reinterpret_cast<const char*>(next) + 64 * first;
    ++s;
    return pf;
  };
  int64_t m = m0;
  for (; m + MR <= m1; m += MR) micro_kernel<MR>(x + m * K, K, K, panel, y + m * ldy, ldy, ncols, share());
  switch (m1 - m) {
    case 5: micro_kernel<5>(x + m * K, K, K, panel, y + m * ldy, ldy, ncols, share()); break;
    case 4: micro_kernel<4>(x + m * K, K, K, panel, y + m * ldy, ldy, ncols, share()); break;
    case 3: micro_kernel<3>(x + m * K, K, K, panel, y + m * ldy, ldy, ncols, share()); break;
    case 2: micro_kernel<2>(x + m * K, K, K, panel, y + m * ldy, ldy, ncols, share()); break;
    case 1: micro_kernel<1>(x + m * K, K, K, panel, y + m * ldy, ldy, ncols, share()); break;
    default: break;
  }
}

// A block of at most ROWS_PER_ITEM rows of one valid row range.
struct RowBlock {
  int64_t m0, m1;
};

struct Work {
  const float* x;
  const float* w;
  float* y;
  int64_t N, K, NB, row_blocks, items;
  int64_t chunk;  // consecutive panels per work item
  std::vector<RowBlock> blocks;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::mutex mu;
  std::condition_variable cv;

  const float* first_panel(int64_t i) const { return w + (i / row_blocks) * chunk * K * NR; }

  void work() {
    int64_t finished = 0;
    int64_t i = next.fetch_add(1, std::memory_order_relaxed);
    while (i < items) {
      // Claim the following item now, so that its first panel streams into L2 while this item's last
      // panel is swept (a cold first panel otherwise stalls its first sweep on DRAM).
      const int64_t following = next.fetch_add(1, std::memory_order_relaxed);
      const int64_t c = i / row_blocks;
      const RowBlock& rb = blocks[i % row_blocks];
      const int64_t end = std::min(NB, (c + 1) * chunk);
      for (int64_t b = c * chunk; b < end; ++b) {
        const int ncols = static_cast<int>(std::min<int64_t>(NR, N - b * NR));
        const float* nxt = b + 1 < end ? w + (b + 1) * K * NR : (following < items ? first_panel(following) : nullptr);
        run_rows(x, K, w + b * K * NR, nxt, y + b * NR, N, ncols, rb.m0, rb.m1);
      }
      ++finished;
      i = following;
    }
    if (finished && done.fetch_add(finished, std::memory_order_acq_rel) + finished == items) {
      std::lock_guard<std::mutex> lock(mu);
      cv.notify_all();
    }
  }
};

ffi::Error PackedMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                            ffi::Buffer<ffi::S32> layer_buf, ffi::Buffer<ffi::S32> rows_buf, int64_t n,
                            ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions();
  const auto wd_all = w.dimensions();
  if (xd.size() != 2) return ffi::Error::InvalidArgument("x must be [M, K]");
  if ((wd_all.size() != 3 && wd_all.size() != 4) || wd_all[wd_all.size() - 1] != NR)
    return ffi::Error::InvalidArgument("w must be packed as [NB, K, 64] or [L, NB, K, 64]");
  const bool stacked = wd_all.size() == 4;
  const int64_t L = stacked ? wd_all[0] : 1;
  const int64_t NB = wd_all[stacked ? 1 : 0], WK = wd_all[stacked ? 2 : 1];
  const int64_t M = xd[0], K = xd[1];
  if (WK != K) return ffi::Error::InvalidArgument("w's K does not match x's K");
  int64_t layer = stacked ? layer_buf.typed_data()[0] : 0;
  layer = std::min<int64_t>(std::max<int64_t>(layer, 0), L - 1);
  if (n <= (NB - 1) * NR || n > NB * NR) return ffi::Error::InvalidArgument("n does not match w's panels");
  if (rows_buf.element_count() != 4) return ffi::Error::InvalidArgument("rows must be s32[4]");
  if (M == 0) return ffi::Error::Success();

  auto state = std::make_shared<Work>();
  // Valid row ranges, clamped and made disjoint; every other row of y is zeroed here.
  const int32_t* r = rows_buf.typed_data();
  int64_t a0 = std::clamp<int64_t>(r[0], 0, M), a1 = std::clamp<int64_t>(r[1], a0, M);
  int64_t b0 = std::clamp<int64_t>(r[2], a1, M), b1 = std::clamp<int64_t>(r[3], b0, M);
  if (K == 0) a1 = a0, b1 = b0;
  float* yd = y->typed_data();
  auto zero_rows = [&](int64_t from, int64_t to) {
    if (to > from) std::memset(yd + from * n, 0, sizeof(float) * (to - from) * n);
  };
  zero_rows(0, a0);
  zero_rows(a1, b0);
  zero_rows(b1, M);
  for (auto [lo, hi] : {std::pair<int64_t, int64_t>{a0, a1}, std::pair<int64_t, int64_t>{b0, b1}})
    for (int64_t m = lo; m < hi; m += ROWS_PER_ITEM) state->blocks.push_back({m, std::min(hi, m + ROWS_PER_ITEM)});
  if (state->blocks.empty()) return ffi::Error::Success();

  state->x = x.typed_data();
  state->w = w.typed_data() + layer * NB * K * NR;
  state->y = y->typed_data();
  state->N = n;
  state->K = K;
  state->row_blocks = int64_t(state->blocks.size());
  state->NB = NB;
  // About 16 items per thread and row block: runs of a few panels, short enough that the threads
  // finish together (4 per thread left one waiting on the other's last item: 3-5% slower at 16-64
  // rows in an interleaved A/B, no change at 256).
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  state->chunk = std::max<int64_t>(1, NB / (threads * 16));
  state->items = ((NB + state->chunk - 1) / state->chunk) * state->row_blocks;
  const int64_t helpers = std::min<int64_t>(threads - 1, state->items - 1);
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([state] { state->work(); });
  state->work();
  pagedjax_cpu::wait_done(state->done, state->items, state->mu, state->cv);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PagedJaxPackedMatmul, PackedMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // packed w (maybe stacked)
                                  .Arg<ffi::Buffer<ffi::S32>>()  // layer
                                  .Arg<ffi::Buffer<ffi::S32>>()  // rows
                                  .Attr<int64_t>("n")
                                  .Ret<ffi::Buffer<ffi::F32>>());

extern "C" int pagedjax_cpu_matmul_has_avx512() { return PJ_AVX512; }
