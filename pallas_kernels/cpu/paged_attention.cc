// Paged attention for XLA:CPU as an FFI custom call: reads the KV page pool in place.
//
// Semantics are those of pallas_kernels/reference.py `paged_attention` (see metadata.py):
//   q       f32 [T, H, Dh]   decode rows first (D of them), then packed prefill rows
//   k, v    f32 | u16 | bf16 [L, KV, P, page, Dh]   (u16 = bfloat16 bit patterns)
//   layer   s32 []           which layer of the pool to read (a traced scalar inside lax.scan)
//   decode_block_tables s32 [D, MPd], decode_context_lens s32 [D]
//   prefill_block_tables s32 [Sp, MPp], prefill_context_lens / prefill_q_start / prefill_q_len s32 [Sp]
//   num_prefill_seqs s32 []
//   attrs: scale f32, sliding_window s32 (0: none), soft_cap f32 (0: none)
//   out     f32 [T, H, Dh]   padding rows are zero
//
// Work is split into items of (query block, kv head): a decode row is a block of one query row;
// a prefill sequence is cut into blocks of a few rows. For each item the G = H / KV query heads of
// the group (times the block's rows) share every K/V row load; keys are walked in blocks of 16
// logical positions (gathered through the block table straight from the pool, converted to f32
// into a small L1-resident buffer) with a single-pass online softmax. Decode rows use a register-
// resident row kernel (run_row), prefill blocks a GEMM-shaped one (run_item_gemm), the rest the
// dot-product block kernel (run_item). Items are claimed dynamically by the calling thread and by
// helpers scheduled on XLA's intra-op thread pool.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#define PJ_AVX512 1
#else
#define PJ_AVX512 0
#endif

#include "simd_math.h"
#include "wait_done.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int BK = 16;  // keys per block (one 16-lane score vector per query vector)
#ifndef PJ_PREFETCH_BLOCKS
#define PJ_PREFETCH_BLOCKS 1  // how many key blocks ahead to prefetch K/V rows
#endif
#ifndef PJ_PREFETCH_DECODE
#define PJ_PREFETCH_DECODE 1
#endif
#ifndef PJ_PREFETCH_PREFILL
#define PJ_PREFETCH_PREFILL 0
#endif
#ifndef PJ_GEMM_MIN_M
#define PJ_GEMM_MIN_M 8  // fewer query vectors per item: the dot-product block kernel
#endif
#ifndef PJ_PREFETCH_NEXT_ITEM
#define PJ_PREFETCH_NEXT_ITEM 1  // the decode kernel prefetches the next item's first key block
#endif
// Locality hints (__builtin_prefetch: 3 = into L1, 2 = into L2) of the software prefetches. Inside an
// item the rows a block ahead go to L2 only: an L1 prefetch of every K/V row holds one of the few L1
// miss buffers per line until DRAM answers and stalls the loads behind it (engine-like harness, 30
// layers x 200 decode rows of SmolLM2's heads, bf16 pool, AMD Zen 4: 22 vs 19 GB/s with contiguous
// pages, 16.5 vs 12 GB/s with scattered ones; on the Intel VMs T1 measured within 2% of T0). The
// next item's first block still goes to L1: it is what the next row waits for first (short contexts,
// 64 rows x 8-128 keys: 5.8 ms vs 7.9 ms with both hints at L1, 8.3 ms with both at L2).
#ifndef PJ_PREFETCH_HINT
#define PJ_PREFETCH_HINT 2
#endif
#ifndef PJ_PREFETCH_NEXT_HINT
#define PJ_PREFETCH_NEXT_HINT 3
#endif
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

enum class KvType { kF32, kBF16 };

struct Problem {
  const float* q;
  float* out;
  int T, H, KV, G, Dh, Dhp;  // Dhp: Dh rounded up to 16
  const void* k;
  const void* v;
  KvType kv_type;
  int64_t P, page;
  int64_t head_base;  // element offset of (layer, kv head 0, page 0) in the pool
  int64_t head_stride;  // elements per kv head (P * page * Dh)
  bool no_row_kernel;  // PAGEDJAX_CPU_ATTN_GENERIC=1: block kernel only (tests, tuning)
  bool no_gemm_kernel;  // PAGEDJAX_CPU_ATTN_GENERIC=1 also skips the GEMM-shaped prefill kernel
  float scale;
  float soft_cap;
  int window;  // 0: none
};

// One unit of work: `nr` consecutive query rows starting at `row0` (absolute row in q), whose
// positions are pos0, pos0+1, ..., of one sequence with context `ctx` and block table `table`.
struct Item {
  int row0, nr, pos0, ctx;
  const int32_t* table;
  int table_len;
  int h;  // kv head
  int64_t cost;
};

// ---------------------------------------------------------------------------------------------
// Per-thread scratch (grown, never shrunk: no allocation in steady state).
struct Scratch {
  std::vector<float> qs, acc, kbuf, vbuf, zero, p, m, l, alpha, bmax, lvec;
  void ensure(int M, int Dhp) {
    auto grow = [](std::vector<float>& v, size_t n) {
      if (v.size() < n) v.resize(n);
    };
    grow(qs, size_t(M) * Dhp);
    grow(acc, size_t(M) * Dhp);
    grow(kbuf, size_t(BK) * Dhp);
    grow(vbuf, size_t(BK) * Dhp);
    grow(zero, Dhp);
    grow(p, size_t(M) * BK);
    grow(m, M);
    grow(l, M);
    grow(alpha, M);
    grow(bmax, M);
    grow(lvec, size_t(M) * BK);
  }
};

Scratch& thread_scratch() {
  static thread_local Scratch s;
  return s;
}

// Copy one pool row (Dh values) into a float buffer of Dhp values (zero tail).
inline void load_row(const Problem& pb, const void* base, int64_t off, float* dst) {
  const int Dh = pb.Dh;
  if (pb.kv_type == KvType::kF32) {
    const float* src = static_cast<const float*>(base) + off;
#if PJ_AVX512
    int d = 0;
    for (; d + 16 <= Dh; d += 16) _mm512_storeu_ps(dst + d, _mm512_loadu_ps(src + d));
    if (d < Dh) {
      __mmask16 mk = (__mmask16)((1u << (Dh - d)) - 1);
      _mm512_storeu_ps(dst + d, _mm512_maskz_loadu_ps(mk, src + d));
    }
#else
    std::memcpy(dst, src, sizeof(float) * Dh);
    for (int d = Dh; d < pb.Dhp; ++d) dst[d] = 0.f;
#endif
  } else {
    const uint16_t* src = static_cast<const uint16_t*>(base) + off;
#if PJ_AVX512
    int d = 0;
    for (; d + 16 <= Dh; d += 16) {
      __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + d)));
      _mm512_storeu_ps(dst + d, _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)));
    }
    if (d < Dh) {
      __mmask16 mk = (__mmask16)((1u << (Dh - d)) - 1);
      __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mk, src + d));
      _mm512_storeu_ps(dst + d, _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)));
    }
#else
    for (int d = 0; d < Dh; ++d) {
      uint32_t bits = uint32_t(src[d]) << 16;
      std::memcpy(dst + d, &bits, 4);
    }
    for (int d = Dh; d < pb.Dhp; ++d) dst[d] = 0.f;
#endif
  }
}

#if PJ_AVX512
// exp512: simd_math.h
using pagedjax_cpu::exp512;

// 16 vectors -> one vector whose lane i is the horizontal sum of v[i].
inline __m512 hsum16x16(__m512* v) {
  __m512 a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)
    a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i)
    b[i] = _mm512_add_ps(_mm512_shuffle_ps(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  for (int i = 0; i < 2; ++i)
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

// Online softmax bookkeeping for query vectors [m0, m1), 16 at a time: running max
// mrow = max(mrow, bmax) and the rescale factor alpha = exp(old max - new max) of what was
// accumulated so far (1 where nothing was seen yet, 0 where the old max was -inf).
inline void update_running_max(float* mrow, const float* bmax, float* alpha, int m0, int m1) {
  const __m512 ninf = _mm512_set1_ps(kNegInf);
  for (int m = m0; m < m1; m += 16) {
    const __mmask16 mk = m1 - m >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (m1 - m)) - 1);
    const __m512 m_old = _mm512_maskz_loadu_ps(mk, mrow + m);
    const __m512 m_new = _mm512_max_ps(m_old, _mm512_maskz_loadu_ps(mk, bmax + m));
    const __mmask16 seen = _mm512_cmp_ps_mask(m_new, ninf, _CMP_NEQ_OQ);
    const __m512 diff = _mm512_maskz_sub_ps(seen, m_old, m_new);
    const __m512 a = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(m_old, ninf, _CMP_EQ_OQ) & seen, exp512(diff),
                                          _mm512_setzero_ps());
    _mm512_mask_storeu_ps(alpha + m, mk, a);
    _mm512_mask_storeu_ps(mrow + m, mk, m_new);
  }
}

// How a block's K/V rows are read. kRowF32: float rows (in the pool, or converted into the scratch
// buffers). kRowBF16: bf16 rows read in place, 32 values per 64-byte load, split into the even and
// the odd elements (one shift, one and); queries and accumulators then live in the same permuted
// order (chunk 2j = even elements of values [32j, 32j + 32), chunk 2j + 1 = odd ones).
enum RowMode { kRowF32 = 0, kRowBF16 = 1 };

template <int MODE>
inline __m512 ld_chunk(const void* row, int c) {
  if constexpr (MODE == kRowF32) {
    return _mm512_loadu_ps(static_cast<const float*>(row) + 16 * c);
  } else {
    const __m512i w = _mm512_loadu_si512(static_cast<const uint16_t*>(row) + 32 * (c >> 1));
    return (c & 1) ? _mm512_castsi512_ps(_mm512_and_si512(w, _mm512_set1_epi32(int(0xFFFF0000u))))
                   : _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  }
}

// scores[t] = dot(q, row t) for the block's 16 K rows. NC: chunks of 16 per row (0: runtime `nc`).
template <int NC, int MODE>
inline __m512 block_scores(const float* q, const void* const* krow, int nc_rt) {
  const int nc = NC ? NC : nc_rt;
  __m512 part[BK];
  if constexpr (NC > 0 && NC <= 8) {
    __m512 qr[NC];
    for (int c = 0; c < NC; ++c) qr[c] = _mm512_loadu_ps(q + 16 * c);
    for (int t = 0; t < BK; ++t) {
      __m512 s0 = _mm512_mul_ps(qr[0], ld_chunk<MODE>(krow[t], 0));
      __m512 s1 = NC > 1 ? _mm512_mul_ps(qr[1], ld_chunk<MODE>(krow[t], 1)) : _mm512_setzero_ps();
      for (int c = 2; c < NC; ++c) {
        if (c & 1)
          s1 = _mm512_fmadd_ps(qr[c], ld_chunk<MODE>(krow[t], c), s1);
        else
          s0 = _mm512_fmadd_ps(qr[c], ld_chunk<MODE>(krow[t], c), s0);
      }
      part[t] = _mm512_add_ps(s0, s1);
    }
  } else {
    for (int t = 0; t < BK; ++t) {
      __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
      int c = 0;
      for (; c + 1 < nc; c += 2) {
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(q + 16 * c), ld_chunk<MODE>(krow[t], c), s0);
        s1 = _mm512_fmadd_ps(_mm512_loadu_ps(q + 16 * c + 16), ld_chunk<MODE>(krow[t], c + 1), s1);
      }
      if (c < nc) s0 = _mm512_fmadd_ps(_mm512_loadu_ps(q + 16 * c), ld_chunk<MODE>(krow[t], c), s0);
      part[t] = _mm512_add_ps(s0, s1);
    }
  }
  return hsum16x16(part);
}

// acc = acc * alpha + sum_{t < n} p[t] * (V row t)
template <int NC, int MODE>
inline void block_pv(float* acc, const float* p, const void* const* vrow, int n, float alpha, int nc_rt) {
  const int nc = NC ? NC : nc_rt;
  const __m512 av = _mm512_set1_ps(alpha);
  if constexpr (NC > 0 && NC <= 8) {
    __m512 a[NC];
    for (int c = 0; c < NC; ++c) a[c] = _mm512_mul_ps(_mm512_loadu_ps(acc + 16 * c), av);
    for (int t = 0; t < n; ++t) {
      const __m512 pt = _mm512_set1_ps(p[t]);
      for (int c = 0; c < NC; ++c) a[c] = _mm512_fmadd_ps(pt, ld_chunk<MODE>(vrow[t], c), a[c]);
    }
    for (int c = 0; c < NC; ++c) _mm512_storeu_ps(acc + 16 * c, a[c]);
  } else {
    for (int c = 0; c < nc; ++c) {
      __m512 a = _mm512_mul_ps(_mm512_loadu_ps(acc + 16 * c), av);
      for (int t = 0; t < n; ++t) a = _mm512_fmadd_ps(_mm512_set1_ps(p[t]), ld_chunk<MODE>(vrow[t], c), a);
      _mm512_storeu_ps(acc + 16 * c, a);
    }
  }
}
#endif  // PJ_AVX512

// The item this thread runs after the current one (set by WorkState::work), or null: its first key
// block is prefetched while the current item's last block is computed, so a decode row does not
// start with a cold miss on every page row (short contexts are a handful of blocks).
thread_local const Item* tl_next_item = nullptr;

// Prefetches the K/V rows of the first key block item `it` reads (the positions run_row / run_item
// start from).
void prefetch_first_block(const Problem& pb, const Item& it) {
  const int lo = pb.window > 0 ? std::max(0, it.pos0 - pb.window + 1) : 0;
  const int hi = int(std::min<int64_t>(std::min(it.ctx, it.pos0 + it.nr), int64_t(it.table_len) * pb.page));
  const int64_t elem_bytes = pb.kv_type == KvType::kF32 ? 4 : 2;
  const int row_lines = int((pb.Dh * elem_bytes + 63) / 64);
  const int64_t head_off = pb.head_base + int64_t(it.h) * pb.head_stride;
  const char* kbase = static_cast<const char*>(pb.k);
  const char* vbase = static_cast<const char*>(pb.v);
  for (int kp = lo; kp < std::min(hi, lo + BK); ++kp) {
    const int pi = kp / int(pb.page);
    const int64_t pg = std::min<int64_t>(std::max<int64_t>(it.table[pi], 0), pb.P - 1);
    const int64_t off = (head_off + pg * pb.page * pb.Dh + int64_t(kp - pi * int(pb.page)) * pb.Dh) * elem_bytes;
    for (int c = 0; c < row_lines; ++c) {
      __builtin_prefetch(kbase + off + 64 * c, 0, PJ_PREFETCH_NEXT_HINT);
      __builtin_prefetch(vbase + off + 64 * c, 0, PJ_PREFETCH_NEXT_HINT);
    }
  }
}

// Walks an item's keys in blocks of BK positions: pool row offsets through the block table (one
// division per block) and software prefetch of the rows PF blocks ahead of their use (and, past
// the item's last block, of the next item's first block).
struct KvWalker {
  static constexpr int PF = PJ_PREFETCH_BLOCKS;
  const Problem& pb;
  const int32_t* table;
  int hi;
  int64_t head_off, page_elems, elem_bytes;
  int row_lines;
  const char* kbase;
  const char* vbase;
  bool prefetch;
  int64_t ring[PF + 1][BK];

  KvWalker(const Problem& p, const Item& it, int lo, int hi_, bool prefetch_)
      : pb(p), table(it.table), hi(hi_), prefetch(prefetch_), head_off(p.head_base + int64_t(it.h) * p.head_stride),
        page_elems(p.page * p.Dh), elem_bytes(p.kv_type == KvType::kF32 ? 4 : 2),
        row_lines(int((p.Dh * elem_bytes + 63) / 64)), kbase(static_cast<const char*>(p.k)),
        vbase(static_cast<const char*>(p.v)) {
    for (int b = 0; b < PF && lo + b * BK < hi; ++b) fill(lo + b * BK, ring[b]);
  }
  // Element offsets of the rows of key positions [kb, kb + n) into offs, and prefetch them.
  void fill(int kb, int64_t* offs) {
    const int n = std::min(BK, hi - kb);
    int pi = kb / int(pb.page), po = kb - pi * int(pb.page);
    int64_t base = 0;
    bool fresh = true;
    for (int t = 0; t < n; ++t) {
      if (fresh) {
        const int64_t pg = std::min<int64_t>(std::max<int64_t>(table[pi], 0), pb.P - 1);
        base = head_off + pg * page_elems;
        fresh = false;
      }
      offs[t] = base + int64_t(po) * pb.Dh;
      if (++po == pb.page) po = 0, ++pi, fresh = true;
      if (PF > 0 && prefetch) {
        const int64_t off = offs[t] * elem_bytes;
        for (int c = 0; c < row_lines; ++c) {
          __builtin_prefetch(kbase + off + 64 * c, 0, PJ_PREFETCH_HINT);
          __builtin_prefetch(vbase + off + 64 * c, 0, PJ_PREFETCH_HINT);
        }
      }
    }
  }
  // Offsets of block number blk (starting at kb); prefetches block blk + PF.
  const int64_t* block(int kb, int blk) {
    if (kb + PF * BK < hi) {
      fill(kb + PF * BK, ring[(blk + PF) % (PF + 1)]);
    } else if (PJ_PREFETCH_NEXT_ITEM && PF > 0 && prefetch && kb + (PF - 1) * BK < hi && tl_next_item != nullptr) {
      prefetch_first_block(pb, *tl_next_item);  // once: at the first block past the item's end
    }
    return ring[blk % (PF + 1)];
  }
};

#if !PJ_AVX512
enum RowMode { kRowF32 = 0, kRowBF16 = 1 };
#endif

// Position of value d in the even/odd-split order of kRowBF16.
inline int permuted(int d) { return (d & ~31) | ((d & 1) << 4) | ((d & 31) >> 1); }

// ---------------------------------------------------------------------------------------------
// MODE: kRowF32 with DIRECT (f32 pool rows read in place), kRowBF16 (bf16 pool rows read in place,
// permuted order), or kRowF32 without DIRECT (rows converted into the scratch buffers first).
template <int NC, int MODE, bool DIRECT>
void run_item(const Problem& pb, const Item& it, Scratch& s) {
  const int G = pb.G, Dh = pb.Dh, Dhp = pb.Dhp, H = pb.H;
  const int M = it.nr * G;
  const int nc = Dhp / 16;
  s.ensure(M, Dhp);
  float* qs = s.qs.data();
  float* acc = s.acc.data();
  float* kbuf = s.kbuf.data();
  float* vbuf = s.vbuf.data();
  float* pbuf = s.p.data();
  float* mrow = s.m.data();
  float* lrow = s.l.data();
  float* alpha = s.alpha.data();
  float* bmax = s.bmax.data();

  // Query vectors of the block, m = r * G + g, pre-scaled (as the reference does).
  const float scale = pb.scale;
  for (int r = 0; r < it.nr; ++r)
    for (int g = 0; g < G; ++g) {
      const float* src = pb.q + (size_t(it.row0 + r) * H + size_t(it.h) * G + g) * Dh;
      float* dst = qs + size_t(r * G + g) * Dhp;
      for (int d = Dh; d < Dhp; ++d) dst[d] = 0.f;
      if (MODE == kRowBF16)
        for (int d = 0; d < Dh; ++d) dst[permuted(d)] = src[d] * scale;
      else
        for (int d = 0; d < Dh; ++d) dst[d] = src[d] * scale;
    }
  std::fill(acc, acc + size_t(M) * Dhp, 0.f);
  std::fill(mrow, mrow + M, kNegInf);
  std::fill(lrow, lrow + M, 0.f);

  // Keys this block of rows can see.
  const int last_pos = it.pos0 + it.nr - 1;
  int hi = std::min<int64_t>(std::min(it.ctx, last_pos + 1), int64_t(it.table_len) * pb.page);
  int lo = 0;
  if (pb.window > 0) lo = std::max(0, it.pos0 - pb.window + 1);
  KvWalker walk(pb, it, lo, hi, PJ_PREFETCH_PREFILL);
  const int64_t elem_bytes = walk.elem_bytes;
  std::fill(s.zero.begin(), s.zero.end(), 0.f);
  const void* krow[BK];
  const void* vrow[BK];

  for (int kb = lo, blk = 0; kb < hi; kb += BK, ++blk) {
    const int n = std::min(BK, hi - kb);
    const int64_t* offs_cur = walk.block(kb, blk);
    // The block's K and V rows through the block table: in place, or converted to f32.
    for (int t = 0; t < n; ++t) {
      const int64_t off = offs_cur[t];
      if (DIRECT) {
        krow[t] = walk.kbase + off * elem_bytes;
        vrow[t] = walk.vbase + off * elem_bytes;
      } else {
        load_row(pb, pb.k, off, kbuf + size_t(t) * Dhp);
        load_row(pb, pb.v, off, vbuf + size_t(t) * Dhp);
        krow[t] = kbuf + size_t(t) * Dhp;
        vrow[t] = vbuf + size_t(t) * Dhp;
      }
    }
    for (int t = n; t < BK; ++t) krow[t] = vrow[t] = s.zero.data();
    for (int r = 0; r < it.nr; ++r) {
      const int pos = it.pos0 + r;
      // Valid keys for this row: lo_r <= k <= pos, k < hi.
      const int kmax = std::min(pos, hi - 1);  // inclusive
      const int kmin = pb.window > 0 ? std::max(0, pos - pb.window + 1) : 0;
      for (int g = 0; g < G; ++g) {
        const int m = r * G + g;
        float* p = pbuf + size_t(m) * BK;
        if (kmax < kb || kmin > kb + n - 1) {  // nothing visible in this block
          alpha[m] = 1.f;
          bmax[m] = kNegInf;
          std::fill(p, p + BK, PJ_AVX512 ? kNegInf : 0.f);  // AVX-512: phase 2 turns -inf into 0
          continue;
        }
#if PJ_AVX512
        // Phase 1 (independent across m): masked scores into p, their max into bmax.
        __m512 sv = block_scores<NC, MODE>(qs + size_t(m) * Dhp, krow, nc);
        if (pb.soft_cap > 0.f) {
          alignas(64) float tmp[BK];
          _mm512_store_ps(tmp, sv);
          for (int t = 0; t < BK; ++t) tmp[t] = pb.soft_cap * std::tanh(tmp[t] / pb.soft_cap);
          sv = _mm512_load_ps(tmp);
        }
        const __m512i kv = _mm512_add_epi32(_mm512_set1_epi32(kb),
                                            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
        const __mmask16 valid = _mm512_cmple_epi32_mask(kv, _mm512_set1_epi32(kmax)) &
                                _mm512_cmpge_epi32_mask(kv, _mm512_set1_epi32(kmin));
        _mm512_storeu_ps(p, _mm512_mask_blend_ps(valid, _mm512_set1_ps(kNegInf), sv));
        bmax[m] = _mm512_mask_reduce_max_ps(valid, sv);
#else
        const float* qm = qs + size_t(m) * Dhp;
        float sc[BK];
        float bmax = kNegInf;
        for (int t = 0; t < BK; ++t) {
          const int k = kb + t;
          if (t >= n || k > kmax || k < kmin) {
            sc[t] = kNegInf;
            continue;
          }
          const float* kr = static_cast<const float*>(krow[t]);
          float d0 = 0.f;
#pragma omp simd reduction(+ : d0)
          for (int d = 0; d < Dhp; ++d) d0 += qm[d] * kr[d];
          if (pb.soft_cap > 0.f) d0 = pb.soft_cap * std::tanh(d0 / pb.soft_cap);
          sc[t] = d0;
          bmax = std::max(bmax, d0);
        }
        const float m_new = std::max(mrow[m], bmax);
        const float a = std::exp(mrow[m] - m_new);
        float sum = 0.f;
        for (int t = 0; t < BK; ++t) {
          p[t] = sc[t] == kNegInf ? 0.f : std::exp(sc[t] - m_new);
          sum += p[t];
        }
        lrow[m] = lrow[m] * a + sum;
        mrow[m] = m_new;
        alpha[m] = a;
#endif
      }
    }
#if PJ_AVX512
    // Phase 2 (independent across m, so the out-of-order core overlaps the rows' latency chains):
    // new running max, rescale factor, probabilities, running sum.
    update_running_max(mrow, bmax, alpha, 0, M);
    for (int m = 0; m < M; ++m) {
      float* p = pbuf + size_t(m) * BK;
      const __m512 sv = _mm512_loadu_ps(p);
      const __mmask16 valid = _mm512_cmp_ps_mask(sv, _mm512_set1_ps(kNegInf), _CMP_NEQ_OQ);
      const __m512 pv = _mm512_maskz_mov_ps(valid, exp512(_mm512_sub_ps(sv, _mm512_set1_ps(mrow[m]))));
      lrow[m] = lrow[m] * alpha[m] + _mm512_reduce_add_ps(pv);
      _mm512_storeu_ps(p, pv);
    }
#endif
    for (int m = 0; m < M; ++m) {
#if PJ_AVX512
      block_pv<NC, MODE>(acc + size_t(m) * Dhp, pbuf + size_t(m) * BK, vrow, n, alpha[m], nc);
#else
      float* am = acc + size_t(m) * Dhp;
      const float* p = pbuf + size_t(m) * BK;
      for (int d = 0; d < Dhp; ++d) am[d] *= alpha[m];
      for (int t = 0; t < n; ++t) {
        const float pt = p[t];
        const float* vr = static_cast<const float*>(vrow[t]);
#pragma omp simd
        for (int d = 0; d < Dhp; ++d) am[d] += pt * vr[d];
      }
#endif
    }
  }

  for (int r = 0; r < it.nr; ++r)
    for (int g = 0; g < G; ++g) {
      const int m = r * G + g;
      const float inv = lrow[m] > 0.f ? 1.f / lrow[m] : 0.f;
      float* dst = pb.out + (size_t(it.row0 + r) * H + size_t(it.h) * G + g) * Dh;
      const float* am = acc + size_t(m) * Dhp;
      if (MODE == kRowBF16)
        for (int d = 0; d < Dh; ++d) dst[d] = am[permuted(d)] * inv;
      else
        for (int d = 0; d < Dh; ++d) dst[d] = am[d] * inv;
    }
}

#if PJ_AVX512
// ---------------------------------------------------------------------------------------------
// Prefill blocks as small GEMMs. A block of query rows (M = rows x G query vectors) against 16 keys
// is S = Q K^T, then P V. The block kernel above computes each score as a dot product and needs a
// horizontal reduction per score; here the 16 x Dh K block is transposed once (cheap: shared by all
// M vectors), so S comes from broadcast-FMAs into one 16-key vector per query vector, and P V is
// register-blocked over rows x head_dim chunks. Interleaved A/B, 12 layers of the 125M benchmark's
// heads (12 q / 4 kv, head_dim 64): 4 chunks of 256 rows at 512 context 131 -> 179 GFLOP/s, 2 x 512
// at 512 132 -> 182, one 1,024-row chunk at 2,048 context 149 -> 211, 16 x 64 rows at 300 110 -> 141.

// dst[16 d + t] = rows[t][c0 + d] for d, t < 16 (one 16 x 16 tile of a K block, transposed).
inline void transpose16(const float* const* rows, int c0, float* dst) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(rows[i] + c0);
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i + 0] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int j = 0; j < 4; ++j) {
    t[j] = _mm512_shuffle_f32x4(r[j], r[4 + j], 0x88);
    t[4 + j] = _mm512_shuffle_f32x4(r[j], r[4 + j], 0xDD);
    t[8 + j] = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0x88);
    t[12 + j] = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0xDD);
  }
  for (int j = 0; j < 4; ++j) {
    _mm512_storeu_ps(dst + 16 * j, _mm512_shuffle_f32x4(t[j], t[8 + j], 0x88));
    _mm512_storeu_ps(dst + 16 * (8 + j), _mm512_shuffle_f32x4(t[j], t[8 + j], 0xDD));
    _mm512_storeu_ps(dst + 16 * (4 + j), _mm512_shuffle_f32x4(t[4 + j], t[12 + j], 0x88));
    _mm512_storeu_ps(dst + 16 * (12 + j), _mm512_shuffle_f32x4(t[4 + j], t[12 + j], 0xDD));
  }
}

// s[r][0:16] = q_r . K^T for R query vectors: each row d of K^T (16 keys) is loaded once for all R;
// R independent accumulator chains keep both FMA ports busy.
template <int R>
inline void gemm_scores(const float* q, int ldq, int Dh, const float* kt, float* s) {
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int d = 0; d < Dh; ++d) {
    const __m512 kd = _mm512_loadu_ps(kt + 16 * d);
    for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(q[r * ldq + d]), kd, acc[r]);
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(s + r * BK, acc[r]);
}

// acc_r = acc_r * alpha_r + sum_{t < n} p[r][t] V[t] for R rows: R x NC accumulators in registers.
template <int R, int NC>
inline void gemm_pv(float* acc, int lda, const float* p, const float* alpha, const float* const* vrow, int n) {
  __m512 a[R][NC];
  for (int r = 0; r < R; ++r) {
    const __m512 al = _mm512_set1_ps(alpha[r]);
    for (int c = 0; c < NC; ++c) a[r][c] = _mm512_mul_ps(_mm512_loadu_ps(acc + r * lda + 16 * c), al);
  }
  for (int t = 0; t < n; ++t) {
    __m512 v[NC];
    for (int c = 0; c < NC; ++c) v[c] = _mm512_loadu_ps(vrow[t] + 16 * c);
    for (int r = 0; r < R; ++r) {
      const __m512 pt = _mm512_set1_ps(p[r * BK + t]);
      for (int c = 0; c < NC; ++c) a[r][c] = _mm512_fmadd_ps(pt, v[c], a[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NC; ++c) _mm512_storeu_ps(acc + r * lda + 16 * c, a[r][c]);
}

constexpr int kScoreRows = 8;  // query vectors per gemm_scores call

// Scores of query vectors [m0, m1), kScoreRows at a time.
inline void gemm_scores_range(const float* qs, int Dh, const float* kt, float* pbuf, int m0, int m1) {
  int m = m0;
  for (; m + kScoreRows <= m1; m += kScoreRows) gemm_scores<kScoreRows>(qs + size_t(m) * Dh, Dh, Dh, kt, pbuf + m * BK);
  const float* q = qs + size_t(m) * Dh;
  float* s = pbuf + m * BK;
  switch (m1 - m) {
    case 7: return gemm_scores<7>(q, Dh, Dh, kt, s);
    case 6: return gemm_scores<6>(q, Dh, Dh, kt, s);
    case 5: return gemm_scores<5>(q, Dh, Dh, kt, s);
    case 4: return gemm_scores<4>(q, Dh, Dh, kt, s);
    case 3: return gemm_scores<3>(q, Dh, Dh, kt, s);
    case 2: return gemm_scores<2>(q, Dh, Dh, kt, s);
    case 1: return gemm_scores<1>(q, Dh, Dh, kt, s);
    default: return;
  }
}

// P V for query vectors [m0, m1), RP = 24 / NC rows at a time.
template <int NC>
inline void gemm_pv_range(float* acc, const float* pbuf, const float* alpha, const float* const* vrow, int n, int m0,
                          int m1) {
  constexpr int RP = 24 / NC;
  constexpr int Dh = 16 * NC;
  int m = m0;
  for (; m + RP <= m1; m += RP) gemm_pv<RP, NC>(acc + size_t(m) * Dh, Dh, pbuf + m * BK, alpha + m, vrow, n);
  for (; m < m1; ++m) gemm_pv<1, NC>(acc + size_t(m) * Dh, Dh, pbuf + m * BK, alpha + m, vrow, n);
}

// The block-of-rows item (see run_item) with GEMM-shaped inner loops; f32 K/V rows (read in place, or
// bf16 rows converted into the scratch buffers), head_dim = 16 NC, no soft cap.
template <int NC>
void run_item_gemm(const Problem& pb, const Item& it, Scratch& s) {
  constexpr int Dh = 16 * NC;
  const int G = pb.G, H = pb.H;
  const int M = it.nr * G;
  s.ensure(M, Dh);
  float* qs = s.qs.data();
  float* acc = s.acc.data();
  float* pbuf = s.p.data();
  float* mrow = s.m.data();
  float* alpha = s.alpha.data();
  float* bmax = s.bmax.data();
  float* lvec = s.lvec.data();
  alignas(64) float kt[Dh * BK];

  for (int r = 0; r < it.nr; ++r)
    for (int g = 0; g < G; ++g) {
      const float* src = pb.q + (size_t(it.row0 + r) * H + size_t(it.h) * G + g) * Dh;
      float* dst = qs + size_t(r * G + g) * Dh;
      for (int d = 0; d < Dh; ++d) dst[d] = src[d] * pb.scale;
    }
  std::fill(acc, acc + size_t(M) * Dh, 0.f);
  std::fill(mrow, mrow + M, kNegInf);
  std::fill(lvec, lvec + size_t(M) * BK, 0.f);

  const int last_pos = it.pos0 + it.nr - 1;
  const int hi = std::min<int64_t>(std::min(it.ctx, last_pos + 1), int64_t(it.table_len) * pb.page);
  const int lo = pb.window > 0 ? std::max(0, it.pos0 - pb.window + 1) : 0;
  KvWalker walk(pb, it, lo, hi, PJ_PREFETCH_PREFILL);
  const bool direct = pb.kv_type == KvType::kF32;
  const float* zero = s.zero.data();
  std::fill(s.zero.begin(), s.zero.end(), 0.f);
  const float* krow[BK];
  const float* vrow[BK];
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);

  for (int kb = lo, blk = 0; kb < hi; kb += BK, ++blk) {
    const int n = std::min(BK, hi - kb);
    const int64_t* offs = walk.block(kb, blk);
    // Rows that see a key of this block: pos >= kb (causal), pos - window + 1 <= kb + n - 1.
    const int r_lo = std::max(0, kb - it.pos0);
    const int r_hi = pb.window > 0 ? std::min(it.nr, kb + n - 1 + pb.window - it.pos0) : it.nr;
    if (r_lo >= r_hi) continue;
    const int m_lo = r_lo * G, m_hi = r_hi * G;
    for (int t = 0; t < n; ++t) {
      if (direct) {
        krow[t] = static_cast<const float*>(pb.k) + offs[t];
        vrow[t] = static_cast<const float*>(pb.v) + offs[t];
      } else {
        load_row(pb, pb.k, offs[t], s.kbuf.data() + size_t(t) * Dh);
        load_row(pb, pb.v, offs[t], s.vbuf.data() + size_t(t) * Dh);
        krow[t] = s.kbuf.data() + size_t(t) * Dh;
        vrow[t] = s.vbuf.data() + size_t(t) * Dh;
      }
    }
    for (int t = n; t < BK; ++t) krow[t] = vrow[t] = zero;
    for (int c = 0; c < NC; ++c) transpose16(krow, 16 * c, kt + 16 * 16 * c);
    gemm_scores_range(qs, Dh, kt, pbuf, m_lo, m_hi);
    // Mask (causal, window, past the context) and each vector's block max. Most blocks are seen
    // whole by every row of the item: no mask there.
    const bool whole = n == BK && kb + BK - 1 <= it.pos0 && (pb.window == 0 || kb >= last_pos - pb.window + 1);
    if (whole) {
      for (int m = m_lo; m < m_hi; ++m) bmax[m] = _mm512_reduce_max_ps(_mm512_loadu_ps(pbuf + m * BK));
    }
    const __m512i kv = _mm512_add_epi32(_mm512_set1_epi32(kb), iota);
    for (int m = whole ? m_hi : m_lo; m < m_hi; ++m) {
      const int pos = it.pos0 + m / G;
      const int kmax = std::min(pos, hi - 1);
      const int kmin = pb.window > 0 ? std::max(0, pos - pb.window + 1) : 0;
      const __mmask16 valid = _mm512_cmple_epi32_mask(kv, _mm512_set1_epi32(kmax)) &
                              _mm512_cmpge_epi32_mask(kv, _mm512_set1_epi32(kmin));
      float* p = pbuf + m * BK;
      const __m512 sv = _mm512_loadu_ps(p);
      _mm512_storeu_ps(p, _mm512_mask_blend_ps(valid, _mm512_set1_ps(kNegInf), sv));
      bmax[m] = _mm512_mask_reduce_max_ps(valid, sv);
    }
    update_running_max(mrow, bmax, alpha, m_lo, m_hi);
    // Probabilities; the running sums stay 16-lane vectors (one reduction at the end).
    for (int m = m_lo; m < m_hi; ++m) {
      float* p = pbuf + m * BK;
      const __m512 sv = _mm512_loadu_ps(p);
      __m512 pv = exp512(_mm512_sub_ps(sv, _mm512_set1_ps(mrow[m])));
      if (!whole) pv = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(sv, _mm512_set1_ps(kNegInf), _CMP_NEQ_OQ), pv);
      _mm512_storeu_ps(lvec + size_t(m) * BK,
                       _mm512_fmadd_ps(_mm512_loadu_ps(lvec + size_t(m) * BK), _mm512_set1_ps(alpha[m]), pv));
      _mm512_storeu_ps(p, pv);
    }
    gemm_pv_range<NC>(acc, pbuf, alpha, vrow, n, m_lo, m_hi);
  }

  for (int m = 0; m < M; ++m) {
    const float l = _mm512_reduce_add_ps(_mm512_loadu_ps(lvec + size_t(m) * BK));
    const float inv = l > 0.f ? 1.f / l : 0.f;
    const int r = m / G, g = m % G;
    float* dst = pb.out + (size_t(it.row0 + r) * H + size_t(it.h) * G + g) * Dh;
    const float* am = acc + size_t(m) * Dh;
    for (int d = 0; d < Dh; ++d) dst[d] = am[d] * inv;
  }
}

// The GEMM-shaped block kernel where it applies (enough query vectors to share a K transpose).
bool try_run_item_gemm(const Problem& pb, const Item& it, Scratch& s) {
  if (pb.soft_cap > 0.f || pb.Dh != pb.Dhp || it.nr * pb.G < PJ_GEMM_MIN_M) return false;
  if (pb.Dh == 64) return run_item_gemm<4>(pb, it, s), true;
  if (pb.Dh == 128) return run_item_gemm<8>(pb, it, s), true;
  return false;
}
#endif  // PJ_AVX512

#if PJ_AVX512
// One query row of a GQA group (M = G query heads, one position), K/V read in place: the M query
// vectors and M accumulators stay in registers; each K/V row chunk is loaded (and converted) once and
// used by all M heads. This is the decode path: memory-bound, so loads are what it minimises.
template <int M, int NC, int MODE>
void run_row(const Problem& pb, const Item& it) {
  constexpr int Dh = 16 * NC;  // try_run_row guarantees it
  const int H = pb.H;
  const int pos = it.pos0;
  const int hi = std::min<int64_t>(std::min(it.ctx, pos + 1), int64_t(it.table_len) * pb.page);
  const int lo = pb.window > 0 ? std::max(0, pos - pb.window + 1) : 0;
  const float* qsrc = pb.q + (size_t(it.row0) * H + size_t(it.h) * M) * Dh;
  float* dst = pb.out + (size_t(it.row0) * H + size_t(it.h) * M) * Dh;
  if (lo >= hi) {
    std::memset(dst, 0, sizeof(float) * M * Dh);
    return;
  }
  // Queries pre-scaled, in the rows' chunk order (kRowBF16: even / odd elements of each 32 values).
  __m512 q[M][NC], acc[M][NC];
  const __m512 scale = _mm512_set1_ps(pb.scale);
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  for (int m = 0; m < M; ++m) {
    const float* qm = qsrc + size_t(m) * Dh;
    for (int c = 0; c < NC; ++c) acc[m][c] = _mm512_setzero_ps();
    if constexpr (MODE == kRowBF16) {
      for (int c = 0; c < NC; c += 2) {
        const __m512 a = _mm512_loadu_ps(qm + 16 * c), b = _mm512_loadu_ps(qm + 16 * c + 16);
        q[m][c] = _mm512_mul_ps(_mm512_permutex2var_ps(a, even, b), scale);
        q[m][c + 1] = _mm512_mul_ps(_mm512_permutex2var_ps(a, odd, b), scale);
      }
    } else {
      for (int c = 0; c < NC; ++c) q[m][c] = _mm512_mul_ps(_mm512_loadu_ps(qm + 16 * c), scale);
    }
  }
  float mrow[M], lrow[M], mnew[M];
  alignas(64) float mdiff[16] = {}, alpha[16];  // lanes >= M stay 0
  for (int m = 0; m < M; ++m) mrow[m] = kNegInf, lrow[m] = 0.f;
  alignas(64) float zero[NC * 16] = {};
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);

  KvWalker walk(pb, it, lo, hi, PJ_PREFETCH_DECODE);
  for (int kb = lo, blk = 0; kb < hi; kb += BK, ++blk) {
    const int n = std::min(BK, hi - kb);
    const int64_t* offs = walk.block(kb, blk);
    const void* krow[BK];
    const void* vrow[BK];
    for (int t = 0; t < n; ++t) {
      krow[t] = walk.kbase + offs[t] * walk.elem_bytes;
      vrow[t] = walk.vbase + offs[t] * walk.elem_bytes;
    }
    for (int t = n; t < BK; ++t) krow[t] = vrow[t] = zero;
    // Scores: part[m][t] holds 16 partial sums of q[m] . k[t].
    __m512 part[M][BK];
    for (int t = 0; t < BK; ++t) {
      __m512 kc[NC];
      for (int c = 0; c < NC; ++c) kc[c] = ld_chunk<MODE>(krow[t], c);
      for (int m = 0; m < M; ++m) {  // one FMA chain per (head, key): 16 x M chains overlap
        __m512 s0 = _mm512_mul_ps(q[m][0], kc[0]);
        for (int c = 1; c < NC; ++c) s0 = _mm512_fmadd_ps(q[m][c], kc[c], s0);
        part[m][t] = s0;
      }
    }
    const __m512i kv = _mm512_add_epi32(_mm512_set1_epi32(kb), iota);
    const __mmask16 valid = _mm512_cmplt_epi32_mask(kv, _mm512_set1_epi32(hi)) &
                            _mm512_cmpge_epi32_mask(kv, _mm512_set1_epi32(lo));
    alignas(64) float p[M][BK];
    __m512 sv[M];
    for (int m = 0; m < M; ++m) {
      sv[m] = hsum16x16(part[m]);
      if (pb.soft_cap > 0.f) {
        alignas(64) float tmp[BK];
        _mm512_store_ps(tmp, sv[m]);
        for (int t = 0; t < BK; ++t) tmp[t] = pb.soft_cap * std::tanh(tmp[t] / pb.soft_cap);
        sv[m] = _mm512_load_ps(tmp);
      }
      mnew[m] = std::max(mrow[m], _mm512_mask_reduce_max_ps(valid, sv[m]));
      mdiff[m] = mrow[m] - mnew[m];
    }
    // Rescale factors of all M heads in one vector exp: exp(old max - new max), 0 where the old
    // max was -inf (nothing accumulated yet).
    const __m512 dv = _mm512_load_ps(mdiff);
    _mm512_store_ps(alpha, _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(dv, _mm512_set1_ps(kNegInf), _CMP_NEQ_OQ), exp512(dv)));
    for (int m = 0; m < M; ++m) {
      const float a = alpha[m];
      const __m512 pv = _mm512_maskz_mov_ps(valid, exp512(_mm512_sub_ps(sv[m], _mm512_set1_ps(mnew[m]))));
      lrow[m] = lrow[m] * a + _mm512_reduce_add_ps(pv);
      mrow[m] = mnew[m];
      _mm512_store_ps(p[m], pv);
      const __m512 av = _mm512_set1_ps(a);
      for (int c = 0; c < NC; ++c) acc[m][c] = _mm512_mul_ps(acc[m][c], av);
    }
    for (int t = 0; t < n; ++t) {
      __m512 vc[NC];
      for (int c = 0; c < NC; ++c) vc[c] = ld_chunk<MODE>(vrow[t], c);
      for (int m = 0; m < M; ++m) {
        const __m512 pt = _mm512_set1_ps(p[m][t]);
        for (int c = 0; c < NC; ++c) acc[m][c] = _mm512_fmadd_ps(pt, vc[c], acc[m][c]);
      }
    }
  }
  const __m512i lo_half = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i hi_half = _mm512_add_epi32(lo_half, _mm512_set1_epi32(8));
  for (int m = 0; m < M; ++m) {
    const __m512 inv = _mm512_set1_ps(lrow[m] > 0.f ? 1.f / lrow[m] : 0.f);
    float* om = dst + size_t(m) * Dh;
    if constexpr (MODE == kRowBF16) {
      for (int c = 0; c < NC; c += 2) {  // re-interleave the even / odd chunks
        const __m512 e = _mm512_mul_ps(acc[m][c], inv), o = _mm512_mul_ps(acc[m][c + 1], inv);
        _mm512_storeu_ps(om + 16 * c, _mm512_permutex2var_ps(e, lo_half, o));
        _mm512_storeu_ps(om + 16 * c + 16, _mm512_permutex2var_ps(e, hi_half, o));
      }
    } else {
      for (int c = 0; c < NC; ++c) _mm512_storeu_ps(om + 16 * c, _mm512_mul_ps(acc[m][c], inv));
    }
  }
}

template <int NC, int MODE>
bool run_row_g(const Problem& pb, const Item& it) {
  // f32 rows: only where queries and accumulators fit in registers (G * NC <= 12); beyond that the
  // block kernel was as fast or faster. bf16 rows: converting each row chunk once pays off.
  if (MODE == kRowF32 && pb.G * NC > 12) return false;
  switch (pb.G) {
    case 1: return run_row<1, NC, MODE>(pb, it), true;
    case 2: return run_row<2, NC, MODE>(pb, it), true;
    case 3: return run_row<3, NC, MODE>(pb, it), true;
    case 4: return run_row<4, NC, MODE>(pb, it), true;
    case 6: return run_row<6, NC, MODE>(pb, it), true;
    case 8: return run_row<8, NC, MODE>(pb, it), true;
    default: return false;
  }
}

// The register-resident single-row kernel where it applies (one query row, common G and head_dim).
template <int MODE>
bool try_run_row(const Problem& pb, const Item& it) {
  if (it.nr != 1) return false;
  if (pb.Dh == 64) return run_row_g<4, MODE>(pb, it);
  if (pb.Dh == 128) return run_row_g<8, MODE>(pb, it);
  return false;
}
#endif  // PJ_AVX512

template <int MODE, bool DIRECT>
void run_item_nc(const Problem& pb, const Item& it, Scratch& s) {
  switch (pb.Dhp / 16) {
    case 4: return run_item<4, MODE, DIRECT>(pb, it, s);
    case 8: return run_item<8, MODE, DIRECT>(pb, it, s);
    default: return run_item<0, MODE, DIRECT>(pb, it, s);
  }
}

void run_item_dispatch(const Problem& pb, const Item& it) {
#if PJ_AVX512
  if (!pb.no_row_kernel) {
    if (pb.kv_type == KvType::kF32 && try_run_row<kRowF32>(pb, it)) return;
    if (pb.kv_type == KvType::kBF16 && try_run_row<kRowBF16>(pb, it)) return;
  }
#endif
  Scratch& s = thread_scratch();
#if PJ_AVX512
  if (!pb.no_gemm_kernel && try_run_item_gemm(pb, it, s)) return;
#endif
  if (pb.kv_type == KvType::kF32 && pb.Dh % 16 == 0) return run_item_nc<kRowF32, true>(pb, it, s);
#if PJ_AVX512
  // bf16 rows in place only for few query vectors; a block of many shares one f32 conversion.
  if (pb.kv_type == KvType::kBF16 && pb.Dh % 32 == 0 && it.nr * pb.G <= 8)
    return run_item_nc<kRowBF16, true>(pb, it, s);
#endif
  return run_item_nc<kRowF32, false>(pb, it, s);
}

// ---------------------------------------------------------------------------------------------
// Dynamic work sharing between the calling thread and helpers on XLA's intra-op pool. The caller
// waits only for the items to be *done*, never for helpers to start: a helper that starts after
// everything is claimed finds no work and exits (it holds the shared state alive by itself), so a
// busy or single-threaded pool cannot deadlock the call.
struct WorkState {
  const Problem* pb = nullptr;
  std::vector<Item> items;
  std::atomic<int> next{0};
  std::atomic<int> done{0};
  std::mutex mu;
  std::condition_variable cv;

  void work() {
    const int n = int(items.size());
    // Claim one item ahead, so the current item can prefetch the start of the next (tl_next_item).
    int i = next.fetch_add(1, std::memory_order_relaxed);
    while (i < n) {
      const int following = next.fetch_add(1, std::memory_order_relaxed);
      tl_next_item = following < n ? &items[following] : nullptr;
      run_item_dispatch(*pb, items[i]);
      if (done.fetch_add(1, std::memory_order_acq_rel) + 1 == n) {
        std::lock_guard<std::mutex> lock(mu);
        cv.notify_all();
      }
      i = following;
    }
    tl_next_item = nullptr;
  }
};

int env_threads() {
  const char* e = std::getenv("PAGEDJAX_CPU_ATTN_THREADS");
  return e ? std::atoi(e) : -1;
}

ffi::Error PagedAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k_cache,
                              ffi::AnyBuffer v_cache, ffi::Buffer<ffi::S32> layer_buf,
                              ffi::Buffer<ffi::S32> d_tables, ffi::Buffer<ffi::S32> d_ctx,
                              ffi::Buffer<ffi::S32> p_tables, ffi::Buffer<ffi::S32> p_ctx,
                              ffi::Buffer<ffi::S32> p_qstart, ffi::Buffer<ffi::S32> p_qlen,
                              ffi::Buffer<ffi::S32> num_prefill, float scale, int32_t sliding_window,
                              float soft_cap,
                              ffi::ResultBuffer<ffi::F32> out) {
  auto qd = q.dimensions();
  auto kd = k_cache.dimensions();
  if (qd.size() != 3 || kd.size() != 5) return ffi::Error::InvalidArgument("q must be [T,H,Dh], pool [L,KV,P,page,Dh]");
  if (k_cache.element_type() != v_cache.element_type()) return ffi::Error::InvalidArgument("k/v dtype mismatch");
  Problem pb;
  const auto et = k_cache.element_type();
  if (et == ffi::DataType::F32)
    pb.kv_type = KvType::kF32;
  else if (et == ffi::DataType::U16 || et == ffi::DataType::BF16)
    pb.kv_type = KvType::kBF16;
  else
    return ffi::Error::InvalidArgument("pool dtype must be float32, bfloat16 or uint16 (bf16 bits)");
  pb.T = int(qd[0]);
  pb.H = int(qd[1]);
  pb.Dh = int(qd[2]);
  pb.Dhp = (pb.Dh + 15) / 16 * 16;
  const int64_t L = kd[0];
  pb.KV = int(kd[1]);
  pb.P = kd[2];
  pb.page = kd[3];
  if (kd[4] != pb.Dh) return ffi::Error::InvalidArgument("pool head_dim differs from q's");
  if (pb.KV <= 0 || pb.H % pb.KV) return ffi::Error::InvalidArgument("heads must be a multiple of kv heads");
  pb.G = pb.H / pb.KV;
  pb.q = q.typed_data();
  pb.out = out->typed_data();
  pb.k = k_cache.untyped_data();
  pb.v = v_cache.untyped_data();
  pb.scale = scale;
  const bool generic_only = std::getenv("PAGEDJAX_CPU_ATTN_GENERIC") != nullptr;
  pb.no_row_kernel = generic_only;
  pb.no_gemm_kernel = generic_only;
  pb.soft_cap = soft_cap;
  pb.window = sliding_window > 0 ? sliding_window : 0;
  int64_t layer = layer_buf.typed_data()[0];
  layer = std::min<int64_t>(std::max<int64_t>(layer, 0), L - 1);
  pb.head_stride = pb.P * pb.page * pb.Dh;
  pb.head_base = layer * pb.KV * pb.head_stride;
  const size_t row_elems = size_t(pb.H) * pb.Dh;
  if (pb.T == 0) return ffi::Error::Success();
  if (L == 0 || pb.P == 0) {
    std::memset(pb.out, 0, sizeof(float) * row_elems * pb.T);
    return ffi::Error::Success();
  }

  auto state = std::make_shared<WorkState>();
  state->pb = &pb;
  std::vector<Item>& items = state->items;

  // Decode rows.
  const int D = int(d_ctx.dimensions()[0]);
  const int dw = d_tables.dimensions().size() == 2 ? int(d_tables.dimensions()[1]) : 0;
  for (int i = 0; i < D && i < pb.T; ++i) {
    const int ctx = d_ctx.typed_data()[i];
    if (ctx <= 0 || dw == 0) {
      std::memset(pb.out + size_t(i) * row_elems, 0, sizeof(float) * row_elems);
      continue;
    }
    for (int h = 0; h < pb.KV; ++h)
      items.push_back(Item{i, 1, ctx - 1, ctx, d_tables.typed_data() + size_t(i) * dw, dw, h, int64_t(ctx)});
  }
  // Prefill rows: zero those no sequence owns, cut each sequence into blocks of rows.
  const int Tq = pb.T - std::min(D, pb.T);
  if (Tq > 0) {
    std::vector<char> owned(Tq, 0);
    const int Sp = int(p_ctx.dimensions()[0]);
    const int pw = p_tables.dimensions().size() == 2 ? int(p_tables.dimensions()[1]) : 0;
    const int nps = std::min(Sp, std::max(0, num_prefill.typed_data()[0]));
    // Rows per block: enough query vectors (rows x G) to reuse each K/V block, few enough for L1.
#ifndef PJ_TARGET_M
    const int target_m = pb.Dhp >= 128 ? 32 : 64;
#else
    const int target_m = PJ_TARGET_M;
#endif
    const int qb = std::max(1, target_m / pb.G);
    for (int j = 0; j < nps; ++j) {
      const int ctx = p_ctx.typed_data()[j];
      const int qs = std::max(0, p_qstart.typed_data()[j]);
      const int ql = std::min(std::max(0, p_qlen.typed_data()[j]), Tq - std::min(qs, Tq));
      if (ql <= 0) continue;
      const int prefix = ctx - ql;
      for (int r = qs; r < qs + ql; ++r) owned[r] = 1;
      for (int b = 0; b < ql; b += qb) {
        const int nr = std::min(qb, ql - b);
        const int64_t keys = std::max(0, std::min(ctx, prefix + b + nr));
        for (int h = 0; h < pb.KV; ++h)
          items.push_back(Item{D + qs + b, nr, prefix + b, ctx, p_tables.typed_data() + size_t(j) * pw, pw, h,
                               keys * nr});
      }
    }
    for (int r = 0; r < Tq; ++r)
      if (!owned[r]) std::memset(pb.out + size_t(D + r) * row_elems, 0, sizeof(float) * row_elems);
  }
  if (items.empty()) return ffi::Error::Success();
  // Longest first, so that the last items to be claimed are short ones (good balance).
  std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) { return a.cost > b.cost; });

  int64_t threads = pool.num_threads();
  const int forced = env_threads();
  if (forced >= 0) threads = forced;
  static const bool debug = std::getenv("PAGEDJAX_CPU_ATTN_DEBUG") != nullptr;
  if (debug) std::fprintf(stderr, "pagedjax cpu attention: %zu items, pool threads %lld, helpers %lld\n", items.size(), (long long)pool.num_threads(), (long long)std::min<int64_t>(threads - 1, int64_t(items.size()) - 1));
  const int64_t helpers = std::min<int64_t>(threads - 1, int64_t(items.size()) - 1);
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([state] { state->work(); });
  state->work();
  const int n = int(items.size());
  pagedjax_cpu::wait_done(state->done, n, state->mu, state->cv);
  return ffi::Error::Success();
}

// float32 -> bfloat16 bits, round to nearest even, NaN -> the sign and the canonical quiet NaN
// (what XLA's convert does).
inline uint16_t to_bf16_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  if ((b & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>(((b >> 16) & 0x8000u) | 0x7fc0u);
  return static_cast<uint16_t>((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}

// A row of n floats -> bfloat16 bits, the same rounding as to_bf16_bits, 16 values per step (the
// scalar loop was ~4% of a short-context decode step: every new K/V row of every layer goes here).
inline void row_to_bf16_bits(const float* src, uint16_t* dst, int64_t n) {
  int64_t i = 0;
#if PJ_AVX512
  const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff), inf = _mm512_set1_epi32(0x7f800000);
  const __m512i bias = _mm512_set1_epi32(0x7fff), one = _mm512_set1_epi32(1);
  const __m512i sign = _mm512_set1_epi32(0x8000), qnan = _mm512_set1_epi32(0x7fc0);
  for (; i < n; i += 16) {
    const __mmask16 mk = n - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - i)) - 1);
    const __m512i b = _mm512_castps_si512(_mm512_maskz_loadu_ps(mk, src + i));
    const __m512i hi = _mm512_srli_epi32(b, 16);
    const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(b, bias), _mm512_and_si512(hi, one)), 16);
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(b, abs_mask), inf);
    const __m512i bits = _mm512_mask_or_epi32(rounded, nan, _mm512_and_si512(hi, sign), qnan);
    _mm256_mask_storeu_epi16(dst + i, mk, _mm512_cvtepi32_epi16(bits));
  }
#endif
  for (; i < n; ++i) dst[i] = to_bf16_bits(src[i]);
}

// The fused variant: first write this step's K/V rows ([T, KV, Dh] f32) into their pool slots
// (slot_pages[t] outside [0, P) = padding, dropped), then attend. The pools are outputs aliased to
// the inputs (input_output_aliases), so the write is in place and the attention reads the result:
// one custom call per layer instead of an XLA scatter followed by the kernel.
ffi::Error PagedAttentionWriteImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k_cache,
                                   ffi::AnyBuffer v_cache, ffi::Buffer<ffi::S32> layer_buf,
                                   ffi::Buffer<ffi::S32> d_tables, ffi::Buffer<ffi::S32> d_ctx,
                                   ffi::Buffer<ffi::S32> p_tables, ffi::Buffer<ffi::S32> p_ctx,
                                   ffi::Buffer<ffi::S32> p_qstart, ffi::Buffer<ffi::S32> p_qlen,
                                   ffi::Buffer<ffi::S32> num_prefill, ffi::Buffer<ffi::F32> k_new,
                                   ffi::Buffer<ffi::F32> v_new, ffi::Buffer<ffi::S32> slot_pages,
                                   ffi::Buffer<ffi::S32> slot_offsets, float scale, int32_t sliding_window,
                                   float soft_cap, ffi::ResultBuffer<ffi::F32> out,
                                   ffi::Result<ffi::AnyBuffer> k_out, ffi::Result<ffi::AnyBuffer> v_out) {
  auto kd = k_out->dimensions();
  auto nd = k_new.dimensions();
  if (kd.size() != 5) return ffi::Error::InvalidArgument("pool must be [L,KV,P,page,Dh]");
  const int64_t L = kd[0], KV = kd[1], P = kd[2], page = kd[3], Dh = kd[4];
  auto vnd = v_new.dimensions();
  if (nd.size() != 3 || nd[1] != KV || nd[2] != Dh || vnd.size() != 3 || vnd[0] != nd[0] || vnd[1] != KV ||
      vnd[2] != Dh)
    return ffi::Error::InvalidArgument("new k/v must be [T, KV, Dh] matching the pool");
  const int64_t T = nd[0];
  if (slot_pages.element_count() != T || slot_offsets.element_count() != T)
    return ffi::Error::InvalidArgument("slot_pages/slot_offsets must have one entry per new row");
  const auto et = k_out->element_type();
  const bool bf16 = et == ffi::DataType::U16 || et == ffi::DataType::BF16;
  if (!bf16 && et != ffi::DataType::F32) return ffi::Error::InvalidArgument("pool dtype must be f32 or bf16");
  if (k_out->untyped_data() != k_cache.untyped_data() || v_out->untyped_data() != v_cache.untyped_data())
    return ffi::Error::InvalidArgument("pools must be aliased to the outputs (input_output_aliases)");
  int64_t layer = std::min<int64_t>(std::max<int64_t>(layer_buf.typed_data()[0], 0), L - 1);
  const int32_t* sp = slot_pages.typed_data();
  const int32_t* so = slot_offsets.typed_data();
  for (int which = 0; which < 2; ++which) {
    const float* src = (which ? v_new : k_new).typed_data();
    void* dst_base = (which ? v_out : k_out)->untyped_data();
    for (int64_t t = 0; t < T; ++t) {
      if (sp[t] < 0 || sp[t] >= P || so[t] < 0 || so[t] >= page) continue;
      for (int64_t h = 0; h < KV; ++h) {
        const int64_t off = (((layer * KV + h) * P + sp[t]) * page + so[t]) * Dh;
        const float* row = src + (t * KV + h) * Dh;
        if (bf16) {
          row_to_bf16_bits(row, static_cast<uint16_t*>(dst_base) + off, Dh);
        } else {
          std::memcpy(static_cast<float*>(dst_base) + off, row, sizeof(float) * Dh);
        }
      }
    }
  }
  return PagedAttentionImpl(pool, q, *k_out, *v_out, layer_buf, d_tables, d_ctx, p_tables, p_ctx, p_qstart,
                            p_qlen, num_prefill, scale, sliding_window, soft_cap, out);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PagedJaxPagedAttention, PagedAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::AnyBuffer>()         // k pool
                                  .Arg<ffi::AnyBuffer>()         // v pool
                                  .Arg<ffi::Buffer<ffi::S32>>()  // layer
                                  .Arg<ffi::Buffer<ffi::S32>>()  // decode_block_tables
                                  .Arg<ffi::Buffer<ffi::S32>>()  // decode_context_lens
                                  .Arg<ffi::Buffer<ffi::S32>>()  // prefill_block_tables
                                  .Arg<ffi::Buffer<ffi::S32>>()  // prefill_context_lens
                                  .Arg<ffi::Buffer<ffi::S32>>()  // prefill_q_start
                                  .Arg<ffi::Buffer<ffi::S32>>()  // prefill_q_len
                                  .Arg<ffi::Buffer<ffi::S32>>()  // num_prefill_seqs
                                  .Attr<float>("scale")
                                  .Attr<int32_t>("sliding_window")
                                  .Attr<float>("soft_cap")
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(PagedJaxPagedAttentionWrite, PagedAttentionWriteImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::AnyBuffer>()         // k pool (aliased to k_out)
                                  .Arg<ffi::AnyBuffer>()         // v pool (aliased to v_out)
                                  .Arg<ffi::Buffer<ffi::S32>>()  // layer
                                  .Arg<ffi::Buffer<ffi::S32>>()  // decode_block_tables
                                  .Arg<ffi::Buffer<ffi::S32>>()  // decode_context_lens
                                  .Arg<ffi::Buffer<ffi::S32>>()  // prefill_block_tables
                                  .Arg<ffi::Buffer<ffi::S32>>()  // prefill_context_lens
                                  .Arg<ffi::Buffer<ffi::S32>>()  // prefill_q_start
                                  .Arg<ffi::Buffer<ffi::S32>>()  // prefill_q_len
                                  .Arg<ffi::Buffer<ffi::S32>>()  // num_prefill_seqs
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k_new [T, KV, Dh]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v_new
                                  .Arg<ffi::Buffer<ffi::S32>>()  // slot_pages [T]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // slot_offsets [T]
                                  .Attr<float>("scale")
                                  .Attr<int32_t>("sliding_window")
                                  .Attr<float>("soft_cap")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // out
                                  .Ret<ffi::AnyBuffer>()          // k pool
                                  .Ret<ffi::AnyBuffer>());        // v pool

// Lets the Python side check that it loaded the source it hashed.
extern "C" int pagedjax_cpu_attention_abi_version() { return 1; }
extern "C" int pagedjax_cpu_attention_has_avx512() { return PJ_AVX512; }
