// y = x @ w with bfloat16 operands and float32 accumulation, as an XLA:CPU FFI call: on Intel AMX
// tiles where the CPU and OS allow them, else with AVX-512 BF16 dot products (VDPBF16PS: AMD Zen 4,
// Xeons without AMX). Both paths read the same packed weight; the path is picked per call (AMX unless
// pagedjax_cpu_bf16_matmul_force_dot(1) was called), so a compiled program runs on either.
//
// Why: on a CPU with AMX one TDPBF16PS instruction multiplies a 16 x 32 bf16 tile by a 32 x 16 one
// into 16 x 16 float32 sums (16,384 FLOP), ~1,000 FLOP per cycle per core against ~64 for float32
// AVX-512 FMAs. XLA:CPU's bf16 dot uses AMX too (through oneDNN) but re-packs the weight on every
// call and reached only 70-300 GFLOP/s at the 8-64 rows of a decode step (650 at 1,024 rows) on
// this project's shapes. Here the weight is packed once, at load time, into the tile layout.
//
//   x     bf16 [M, K]               activations, row-major; K a multiple of 32 (the wrapper pads)
//   w     bf16 [NB, K / 2, 32]      weight packed by pack_weight_bf16(): NB = ceil(N / 16) panels of
//                                   16 columns in AMX's pair ("VNNI") layout: element [b, p, 2 c + e]
//                                   = w[2 p + e, 16 b + c] (zero beyond N), so the B tile of panel b
//                                   and k block kb is 1 KiB of contiguous memory
//         or bf16 [L, NB, K / 2, 32] a stack of L such weights (one per layer), read in place
//   layer s32 []                    which of the L weights (ignored for an unstacked w)
//   rows  s32 [4]                   (a0, a1, b0, b1): only rows in [a0, a1) and [b0, b1) are computed;
//                                   the others are set to zero (a bucketed step's padding rows)
//   attr n: the logical N (16 (NB - 1) < n <= 16 NB)
//   y     f32 [M, N]
//
// PagedJaxAmxMatmulSwiglu is the same product with the gated-MLP activation fused into its output:
// w is an MLP's [gate | up] weight (N = 2 F) packed with its panels interleaved (gate panel j, then
// up panel j), so each panel pair's two accumulator tiles hold gate and up of the same 16 columns,
// and the kernel writes act = silu(gate) * up rounded to bf16 [M, F] -- the down projection's input
// -- instead of f32 [M, 2 F] that XLA would read back, activate and round (on a 1,088-row prefill
// step of the 125M model that round trip is ~36 MB of memory traffic per layer).
//
// AVX-512 BF16 path (see Work::dot_block): 6 rows x 4 panels of y in 24 zmm accumulators; measured
// on a 2-core AMD EPYC (Zen 4) VM at SmolLM2's shapes: 340-430 GFLOP/s at 64-1,024 rows, about twice
// the float32 FMA kernel (matmul.cc) there.
//
// AMX tiles: 4 accumulators (2 row tiles x 2 panels = 32 x 32 of y), 2 A tiles, 2 B tiles: all 8 of
// AMX's registers. Work items are (run of panel pairs, block of rows), claimed from an atomic
// counter by the calling thread and by helpers on XLA's intra-op thread pool, as in matmul.cc.

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>
#define PJ_BF16DOT 1  // AVX-512 BF16 dot products (VDPBF16PS): the path for CPUs without AMX
#else
#define PJ_BF16DOT 0
#endif
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && PJ_BF16DOT && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#define PJ_AMX 1
#else
#define PJ_AMX 0
#endif

#include "simd_math.h"
#include "wait_done.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int TILE_ROWS = 16;      // rows of an A / C tile
constexpr int TILE_COLS = 16;      // float32 columns of a C tile = columns of a panel
constexpr int TILE_K = 32;         // bf16 values of K per tile step
constexpr int PANEL_ELEMS = TILE_K * TILE_COLS;  // bf16 values of one B tile (1 KiB)
constexpr int ROWS_PER_ITEM = 128;
#ifndef PJ_DOT_PF
#define PJ_DOT_PF 8  // dot path: panel rows (64 bytes each) to prefetch ahead into L1, per panel
#endif
#ifndef PJ_AMX_L2PF
#define PJ_AMX_L2PF 1  // software L2 prefetch of the next panel pair (0: leave it to the hardware)
#endif

// Linux hands out AMX's 8 KiB of tile state only to processes that ask for it (arch_prctl). The
// permission is per process; each thread still loads its own tile configuration.
bool amx_permitted() {
#if PJ_AMX
  static const bool ok = [] {
    constexpr long ARCH_REQ_XCOMP_PERM = 0x1023;
    constexpr long XFEATURE_XTILEDATA = 18;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  }();
  return ok;
#else
  return false;
#endif
}

// Set by pagedjax_cpu_bf16_matmul_force_dot(): run the AVX-512 BF16 path even where AMX works
// (tests of both paths on one machine, A/B runs).
std::atomic<bool> g_force_dot{false};

bool use_amx() { return !g_force_dot.load(std::memory_order_relaxed) && amx_permitted(); }

#if PJ_AMX
struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// tmm0-3: C (row tile r, panel j) = tmm(2 r + j); tmm4-5: A of row tile 0 / 1; tmm6-7: B of panel 0 / 1.
void configure_tiles() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = TILE_ROWS;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}
#endif

// One tile's worth of rows: where its A rows are and where its C rows go.
struct RowTile {
  const uint16_t* a;  // 16 rows of x (stride lda elements), or a zero-padded copy
  int64_t lda;
  int64_t m;          // first row of y
  int rows;           // valid rows (<= 16)
};

struct RowBlock {
  int64_t m0, m1;
};

struct Work {
  const uint16_t* x;
  const uint16_t* w;
  float* y;         // f32 [M, N] output, or
  uint16_t* act;    // bf16 [M, N / 2] output of the fused gated activation (swiglu weights)
  int64_t N, K, NB, pairs, row_blocks, items;
  int64_t chunk;  // consecutive panel pairs per work item
  bool amx = false;  // AMX tiles, else AVX-512 BF16 dot products
  std::vector<RowBlock> blocks;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::mutex mu;
  std::condition_variable cv;

#if PJ_AMX
  // Stores C tile `t` for rows rt.m.., columns col..: straight into y when whole, else through a
  // scratch tile (partial rows or the last, partial panel).
  void store(int t, const RowTile& rt, int64_t col) {
    const int ncols = static_cast<int>(std::min<int64_t>(TILE_COLS, N - col));
    if (ncols <= 0) return;
    const bool whole = rt.rows == TILE_ROWS && ncols == TILE_COLS;
    alignas(64) float tmp[TILE_ROWS * TILE_COLS];
    float* dst = whole ? y + rt.m * N + col : tmp;
    const int64_t stride = whole ? N * 4 : TILE_COLS * 4;
    switch (t) {  // tile numbers are immediates
      case 0: _tile_stored(0, dst, stride); break;
      case 1: _tile_stored(1, dst, stride); break;
      case 2: _tile_stored(2, dst, stride); break;
      default: _tile_stored(3, dst, stride); break;
    }
    if (!whole)
      for (int r = 0; r < rt.rows; ++r) std::memcpy(y + (rt.m + r) * N + col, tmp + r * TILE_COLS, 4 * ncols);
  }

  // act[rows, 16 p .. 16 p + 16) = bf16(silu(gate) * up) from the gate and up tiles' sums g and u.
  void store_swiglu(const RowTile& rt, int64_t p, const float* g, const float* u) {
    const int64_t F = N / 2;
    for (int r = 0; r < rt.rows; ++r) {
      const __m512 gv = _mm512_load_ps(g + r * TILE_COLS);
      const __m512 uv = _mm512_load_ps(u + r * TILE_COLS);
      const __m512 one = _mm512_set1_ps(1.f);
      // silu(g) = g / (1 + exp(-g)); exp512 clamps its argument, so large |g| stays finite.
      const __m512 silu = _mm512_div_ps(gv, _mm512_add_ps(one, pagedjax_cpu::exp512(_mm512_sub_ps(_mm512_setzero_ps(), gv))));
      const __m256bh out = _mm512_cvtneps_pbh(_mm512_mul_ps(silu, uv));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(act + (rt.m + r) * F + p * TILE_COLS), reinterpret_cast<const __m256i&>(out));
    }
  }

  // y tiles of one or two row tiles x one or two panels, starting at panel b. Meanwhile it pulls
  // pf_lines cache lines from pf into L2, spread evenly over the K steps: the next panels' first
  // sweep would otherwise wait on DRAM (tile loads get little help from the hardware prefetchers).
  template <bool TWO_ROWS, bool TWO_PANELS>
  void block(const RowTile& r0, const RowTile& r1, int64_t b, const char* pf, int64_t pf_lines) {
    const uint16_t* b0 = w + b * (K * TILE_COLS);
    const uint16_t* b1 = b0 + K * TILE_COLS;
    const int64_t steps = K / TILE_K;
    int64_t pf_acc = 0;
    _tile_zero(0);
    if (TWO_PANELS) _tile_zero(1);
    if (TWO_ROWS) _tile_zero(2);
    if (TWO_ROWS && TWO_PANELS) _tile_zero(3);
    for (int64_t kb = 0; kb < steps; ++kb) {
      if (PJ_AMX_L2PF)
        for (pf_acc += pf_lines; pf_acc >= steps; pf_acc -= steps, pf += 64) _mm_prefetch(pf, _MM_HINT_T1);
      _tile_loadd(4, r0.a + kb * TILE_K, r0.lda * 2);
      _tile_loadd(6, b0 + kb * PANEL_ELEMS, 64);
      if (TWO_PANELS) _tile_loadd(7, b1 + kb * PANEL_ELEMS, 64);
      _tile_dpbf16ps(0, 4, 6);
      if (TWO_PANELS) _tile_dpbf16ps(1, 4, 7);
      if (TWO_ROWS) {
        _tile_loadd(5, r1.a + kb * TILE_K, r1.lda * 2);
        _tile_dpbf16ps(2, 5, 6);
        if (TWO_PANELS) _tile_dpbf16ps(3, 5, 7);
      }
    }
    if (act != nullptr && TWO_PANELS) {  // swiglu: every pair is (gate panel, up panel)
      alignas(64) float g[TILE_ROWS * TILE_COLS], u[TILE_ROWS * TILE_COLS];
      _tile_stored(0, g, TILE_COLS * 4);
      _tile_stored(1, u, TILE_COLS * 4);
      store_swiglu(r0, b / 2, g, u);
      if (TWO_ROWS) {
        _tile_stored(2, g, TILE_COLS * 4);
        _tile_stored(3, u, TILE_COLS * 4);
        store_swiglu(r1, b / 2, g, u);
      }
      return;
    }
    store(0, r0, b * TILE_COLS);
    if (TWO_PANELS) store(1, r0, (b + 1) * TILE_COLS);
    if (TWO_ROWS) store(2, r1, b * TILE_COLS);
    if (TWO_ROWS && TWO_PANELS) store(3, r1, (b + 1) * TILE_COLS);
  }

  const uint16_t* pair_start(int64_t p) const { return w + 2 * p * (K * TILE_COLS); }
  int64_t pair_lines(int64_t p) const { return (std::min<int64_t>(2, NB - 2 * p) * K * TILE_COLS * 2) / 64; }

  // Item i; `following` is the item this thread runs next (or -1), whose first panel pair is
  // prefetched while this item's last pair is computed.
  void run_item(int64_t i, int64_t following, std::vector<uint16_t>& pad) {
    const RowBlock& rb = blocks[i % row_blocks];
    const int64_t c = i / row_blocks;
    // Row tiles of this block; a partial last tile reads a zero-padded copy of its rows (a tile load
    // of 16 rows would run past the end of x).
    RowTile tiles[ROWS_PER_ITEM / TILE_ROWS];
    int nt = 0;
    for (int64_t m = rb.m0; m < rb.m1; m += TILE_ROWS) {
      const int rows = static_cast<int>(std::min<int64_t>(TILE_ROWS, rb.m1 - m));
      RowTile t{x + m * K, K, m, rows};
      if (rows < TILE_ROWS) {
        pad.resize(TILE_ROWS * K);
        std::memcpy(pad.data(), x + m * K, 2 * rows * K);
        std::memset(pad.data() + rows * K, 0, 2 * (TILE_ROWS - rows) * K);
        t.a = pad.data();
      }
      tiles[nt++] = t;
    }
    const int64_t end = std::min(pairs, (c + 1) * chunk);
    for (int64_t p = c * chunk; p < end; ++p) {
      const int64_t b = 2 * p;
      const bool two_panels = b + 1 < NB;
      // The next pair's weights go to L2 during the first row tiles' sweep (later sweeps of this
      // pair read it from L2 already).
      int64_t np = p + 1 < end ? p + 1 : (following >= 0 ? (following / row_blocks) * chunk : -1);
      const char* pf = np >= 0 ? reinterpret_cast<const char*>(pair_start(np)) : nullptr;
      int64_t pf_lines = np >= 0 ? pair_lines(np) : 0;
      int t = 0;
      for (; t + 1 < nt; t += 2) {
        if (two_panels) block<true, true>(tiles[t], tiles[t + 1], b, pf, pf_lines);
        else block<true, false>(tiles[t], tiles[t + 1], b, pf, pf_lines);
        pf_lines = 0;
      }
      if (t < nt) {
        if (two_panels) block<false, true>(tiles[t], tiles[t], b, pf, pf_lines);
        else block<false, false>(tiles[t], tiles[t], b, pf, pf_lines);
      }
    }
  }
#endif

#if PJ_BF16DOT
  // The AVX-512 BF16 path (CPUs without AMX): VDPBF16PS multiplies the 16 bf16 pairs of one
  // packed-panel row -- the pair layout AMX's B tiles use, so both paths share the packed weight --
  // by a broadcast pair of x and adds the 16 products to float32 sums. A block of R <= 6 rows x
  // NP <= 4 panels (64 columns) keeps its sums in 24 zmm registers over the whole of K; each pair
  // step loads NP panel rows and R broadcasts for R x NP dot instructions.
  template <int R, int NP>
  void dot_block(int64_t m, int64_t b) {
    __m512 acc[R][NP];
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < NP; ++j) acc[r][j] = _mm512_setzero_ps();
    const int64_t panel_stride = K * TILE_COLS;  // elements from one panel to the next
    const uint16_t* wp = w + b * panel_stride;
    const uint16_t* xr = x + m * K;
    const int64_t pairs_k = K / 2;
    for (int64_t p = 0; p < pairs_k; ++p, wp += 2 * TILE_COLS) {
      __m512i bv[NP];
      for (int j = 0; j < NP; ++j) {
        _mm_prefetch(reinterpret_cast<const char*>(wp + j * panel_stride + PJ_DOT_PF * 2 * TILE_COLS), _MM_HINT_T0);
        bv[j] = _mm512_loadu_si512(wp + j * panel_stride);
      }
      for (int r = 0; r < R; ++r) {
        int32_t pair;
        std::memcpy(&pair, xr + r * K + 2 * p, sizeof pair);
        const __m512i a = _mm512_set1_epi32(pair);
        for (int j = 0; j < NP; ++j)
          acc[r][j] = _mm512_dpbf16_ps(acc[r][j], reinterpret_cast<const __m512bh&>(a),
                                       reinterpret_cast<const __m512bh&>(bv[j]));
      }
    }
    if (act != nullptr) {  // swiglu: panels come as (gate j, up j) pairs, b even
      const int64_t F = N / 2;
      const __m512 one = _mm512_set1_ps(1.f);
      for (int r = 0; r < R; ++r)
        for (int j = 0; j + 1 < NP; j += 2) {
          const __m512 g = acc[r][j];
          const __m512 silu = _mm512_div_ps(g, _mm512_add_ps(one, pagedjax_cpu::exp512(_mm512_sub_ps(_mm512_setzero_ps(), g))));
          const __m256bh out = _mm512_cvtneps_pbh(_mm512_mul_ps(silu, acc[r][j + 1]));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(act + (m + r) * F + (b + j) / 2 * TILE_COLS),
                              reinterpret_cast<const __m256i&>(out));
        }
      return;
    }
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < NP; ++j) {
        const int64_t col = (b + j) * TILE_COLS;
        const int64_t ncols = std::min<int64_t>(TILE_COLS, N - col);
        float* dst = y + (m + r) * N + col;
        if (ncols == TILE_COLS) _mm512_storeu_ps(dst, acc[r][j]);
        else if (ncols > 0) _mm512_mask_storeu_ps(dst, static_cast<__mmask16>((1u << ncols) - 1), acc[r][j]);
      }
  }

  template <int NP>
  void dot_rows(const RowBlock& rb, int64_t b) {
    int64_t m = rb.m0;
    for (; m + 6 <= rb.m1; m += 6) dot_block<6, NP>(m, b);
    switch (rb.m1 - m) {
      case 5: dot_block<5, NP>(m, b); break;
      case 4: dot_block<4, NP>(m, b); break;
      case 3: dot_block<3, NP>(m, b); break;
      case 2: dot_block<2, NP>(m, b); break;
      case 1: dot_block<1, NP>(m, b); break;
      default: break;
    }
  }

  // Item i: its panels in groups of 4 (a group's weights come from DRAM on the first row sweep and
  // from L2 on the others).
  void run_item_dot(int64_t i) {
    const RowBlock& rb = blocks[i % row_blocks];
    const int64_t c = i / row_blocks;
    const int64_t b_end = std::min(NB, 2 * std::min(pairs, (c + 1) * chunk));
    for (int64_t b = 2 * c * chunk; b < b_end; b += 4) {
      switch (std::min<int64_t>(4, b_end - b)) {
        case 4: dot_rows<4>(rb, b); break;
        case 3: dot_rows<3>(rb, b); break;
        case 2: dot_rows<2>(rb, b); break;
        default: dot_rows<1>(rb, b); break;
      }
    }
  }
#endif

  void work() {
    int64_t finished = 0;
#if PJ_AMX
    std::vector<uint16_t> pad;
    if (amx) configure_tiles();
#endif
    // Claim the following item one ahead, so its first weights stream in during this one.
    int64_t i = next.fetch_add(1, std::memory_order_relaxed);
    while (i < items) {
      const int64_t following = next.fetch_add(1, std::memory_order_relaxed);
#if PJ_AMX
      if (amx) run_item(i, following < items ? following : -1, pad);
#endif
#if PJ_BF16DOT
      if (!amx) run_item_dot(i);
#endif
      ++finished;
      i = following;
    }
#if PJ_AMX
    if (amx) _tile_release();
#endif
    if (finished && done.fetch_add(finished, std::memory_order_acq_rel) + finished == items) {
      std::lock_guard<std::mutex> lock(mu);
      cv.notify_all();
    }
  }
};

// Shared by both handlers: exactly one of y (f32 [M, n]) and act (bf16 [M, n / 2]) is set.
ffi::Error Run(ffi::ThreadPool& pool, ffi::Buffer<ffi::BF16>& x, ffi::Buffer<ffi::BF16>& w,
               ffi::Buffer<ffi::S32>& layer_buf, ffi::Buffer<ffi::S32>& rows_buf, int64_t n, float* yd,
               uint16_t* act) {
  const bool amx = use_amx();
  if (!amx && !PJ_BF16DOT) return ffi::Error::Internal("neither AMX nor AVX-512 BF16 is available here");
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  if (xd.size() != 2) return ffi::Error::InvalidArgument("x must be [M, K]");
  if ((wd.size() != 3 && wd.size() != 4) || wd[wd.size() - 1] != 2 * TILE_COLS)
    return ffi::Error::InvalidArgument("w must be packed as [NB, K/2, 32] or [L, NB, K/2, 32]");
  const bool stacked = wd.size() == 4;
  const int64_t L = stacked ? wd[0] : 1;
  const int64_t NB = wd[stacked ? 1 : 0], WK = 2 * wd[stacked ? 2 : 1];
  const int64_t M = xd[0], K = xd[1];
  if (WK != K) return ffi::Error::InvalidArgument("w's K does not match x's K");
  if (K % TILE_K != 0) return ffi::Error::InvalidArgument("K must be a multiple of 32");
  if (n <= (NB - 1) * TILE_COLS || n > NB * TILE_COLS)
    return ffi::Error::InvalidArgument("n does not match w's panels");
  if (rows_buf.element_count() != 4) return ffi::Error::InvalidArgument("rows must be s32[4]");
  int64_t layer = stacked ? layer_buf.typed_data()[0] : 0;
  layer = std::min<int64_t>(std::max<int64_t>(layer, 0), L - 1);
  if (M == 0) return ffi::Error::Success();

  const int32_t* r = rows_buf.typed_data();
  int64_t a0 = std::clamp<int64_t>(r[0], 0, M), a1 = std::clamp<int64_t>(r[1], a0, M);
  int64_t b0 = std::clamp<int64_t>(r[2], a1, M), b1 = std::clamp<int64_t>(r[3], b0, M);
  if (K == 0) a1 = a0, b1 = b0;
  if (act != nullptr && (n % (2 * TILE_COLS) != 0 || NB * TILE_COLS != n))
    return ffi::Error::InvalidArgument("a swiglu weight needs N = 2 F with F a multiple of 16");
  auto zero_rows = [&](int64_t from, int64_t to) {
    if (to <= from) return;
    if (act != nullptr)
      std::memset(act + from * (n / 2), 0, sizeof(uint16_t) * (to - from) * (n / 2));
    else
      std::memset(yd + from * n, 0, sizeof(float) * (to - from) * n);
  };
  zero_rows(0, a0);
  zero_rows(a1, b0);
  zero_rows(b1, M);

  auto state = std::make_shared<Work>();
  for (auto [lo, hi] : {std::pair<int64_t, int64_t>{a0, a1}, std::pair<int64_t, int64_t>{b0, b1}})
    for (int64_t m = lo; m < hi; m += ROWS_PER_ITEM) state->blocks.push_back({m, std::min(hi, m + ROWS_PER_ITEM)});
  if (state->blocks.empty()) return ffi::Error::Success();
  state->x = reinterpret_cast<const uint16_t*>(x.typed_data());
  state->w = reinterpret_cast<const uint16_t*>(w.typed_data()) + layer * NB * K * TILE_COLS;
  state->y = yd;
  state->act = act;
  state->amx = amx;
  state->N = n;
  state->K = K;
  state->NB = NB;
  state->pairs = (NB + 1) / 2;
  state->row_blocks = int64_t(state->blocks.size());
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  state->chunk = std::max<int64_t>(1, state->pairs / (threads * 8));
  state->items = ((state->pairs + state->chunk - 1) / state->chunk) * state->row_blocks;
  const int64_t helpers = std::min<int64_t>(threads - 1, state->items - 1);
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([state] { state->work(); });
  state->work();
  pagedjax_cpu::wait_done(state->done, state->items, state->mu, state->cv);
  return ffi::Error::Success();
}

ffi::Error AmxMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> w,
                         ffi::Buffer<ffi::S32> layer_buf, ffi::Buffer<ffi::S32> rows_buf, int64_t n,
                         ffi::ResultBuffer<ffi::F32> y) {
  return Run(pool, x, w, layer_buf, rows_buf, n, y->typed_data(), nullptr);
}

ffi::Error AmxMatmulSwigluImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> w,
                               ffi::Buffer<ffi::S32> layer_buf, ffi::Buffer<ffi::S32> rows_buf, int64_t n,
                               ffi::ResultBuffer<ffi::BF16> act) {
  return Run(pool, x, w, layer_buf, rows_buf, n, nullptr, reinterpret_cast<uint16_t*>(act->typed_data()));
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PagedJaxAmxMatmul, AmxMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // x
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // packed w (maybe stacked)
                                  .Arg<ffi::Buffer<ffi::S32>>()   // layer
                                  .Arg<ffi::Buffer<ffi::S32>>()   // rows
                                  .Attr<int64_t>("n")
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(PagedJaxAmxMatmulSwiglu, AmxMatmulSwigluImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // x
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // packed, interleaved [gate | up]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // layer
                                  .Arg<ffi::Buffer<ffi::S32>>()   // rows
                                  .Attr<int64_t>("n")
                                  .Ret<ffi::Buffer<ffi::BF16>>());

// Which path a call takes now: 2 AMX tiles, 1 AVX-512 BF16 dot products, 0 none (calls fail).
extern "C" int pagedjax_cpu_bf16_matmul_kernel() { return use_amx() ? 2 : (PJ_BF16DOT ? 1 : 0); }

// force != 0: take the AVX-512 BF16 path even where AMX works (0: the default choice again).
extern "C" void pagedjax_cpu_bf16_matmul_force_dot(int force) { g_force_dot.store(force != 0); }
