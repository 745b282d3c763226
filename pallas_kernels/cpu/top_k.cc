// The k largest values of each row of x f32 [S, V], sorted descending: the values `lax.top_k(x, k)`
// returns, bit for bit, as an XLA:CPU FFI call.
//
// Why: the sampler's top-k / top-p thresholds start from the 256 largest logits of every row, and
// XLA:CPU's TopK runs a partial sort of each row on one thread: ~75 ms for 256 rows of SmolLM2's
// 49,152-entry vocabulary on the 2026-12-04 Zen 4 VM, a third of a whole 200-row decode step.
// Here each row is one pass: 16 values at a time are compared with the smallest value kept so far
// (a min-heap of k entries), and only the few that beat it touch the heap. For rows in no particular
// order that is about k ln(V / k) heap insertions against V comparisons; rows are shared between the
// calling thread and XLA's intra-op pool.
//
// Order: lax.top_k's total order on float bits, which this reproduces by comparing the monotone
// uint32 key of each value: a positive NaN above +inf, then the numbers, +0 above -0, -inf, and a
// negative NaN below -inf. Ties keep every copy (the k-th value may repeat).

#include <algorithm>
#include <cstdint>
#include <functional>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#define PJ_TOPK_AVX512 1
#else
#define PJ_TOPK_AVX512 0
#endif

#include "parallel_rows.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Monotone map float bits -> uint32 (a < b in lax.top_k's order <=> key(a) < key(b)), and back.
inline uint32_t to_key(uint32_t b) { return (b >> 31) ? ~b : (b | 0x80000000u); }
inline uint32_t from_key(uint32_t k) { return (k >> 31) ? (k & 0x7fffffffu) : ~k; }

// The k largest keys of one row, into heap (size k, a min-heap: heap[0] is the smallest kept).
void row_top_k(const uint32_t* bits, int64_t V, int64_t k, std::vector<uint32_t>& heap) {
  heap.resize(k);
  for (int64_t i = 0; i < k; ++i) heap[i] = to_key(bits[i]);
  std::make_heap(heap.begin(), heap.end(), std::greater<uint32_t>());
  auto offer = [&](uint32_t key) {
    if (key <= heap[0]) return;
    std::pop_heap(heap.begin(), heap.end(), std::greater<uint32_t>());
    heap.back() = key;
    std::push_heap(heap.begin(), heap.end(), std::greater<uint32_t>());
  };
  int64_t i = k;
#if PJ_TOPK_AVX512
  const __m512i sign = _mm512_set1_epi32(int32_t(0x80000000u));
  for (; i + 16 <= V; i += 16) {
    const __m512i b = _mm512_loadu_si512(bits + i);
    // key = b < 0 (sign set) ? ~b : b | sign
    const __mmask16 neg = _mm512_movepi32_mask(b);
    const __m512i key = _mm512_mask_xor_epi32(_mm512_or_si512(b, sign), neg, b, _mm512_set1_epi32(-1));
    __mmask16 above = _mm512_cmpgt_epu32_mask(key, _mm512_set1_epi32(int32_t(heap[0])));
    if (!above) continue;
    alignas(64) uint32_t keys[16];
    _mm512_store_si512(keys, key);
    while (above) {
      const int lane = __builtin_ctz(above);
      above &= above - 1;
      offer(keys[lane]);
    }
  }
#endif
  for (; i < V; ++i) offer(to_key(bits[i]));
  std::sort(heap.begin(), heap.end(), std::greater<uint32_t>());
}

ffi::Error TopKImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> out) {
  const auto xd = x.dimensions();
  const auto od = out->dimensions();
  if (xd.size() != 2 || od.size() != 2 || od[0] != xd[0]) return ffi::Error::InvalidArgument("x must be [S, V], out [S, k]");
  const int64_t S = xd[0], V = xd[1], k = od[1];
  if (k < 1 || k > V) return ffi::Error::InvalidArgument("need 1 <= k <= V");
  const auto* xs = reinterpret_cast<const uint32_t*>(x.typed_data());
  auto* os = reinterpret_cast<uint32_t*>(out->typed_data());
  pagedjax_cpu::parallel_rows<std::vector<uint32_t>>(pool, S, [=](std::vector<uint32_t>& heap, int64_t r) {
    row_top_k(xs + r * V, V, k, heap);
    for (int64_t j = 0; j < k; ++j) os[r * k + j] = from_key(heap[j]);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PagedJaxTopKValues, TopKImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [S, V]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // the k largest, descending [S, k]
