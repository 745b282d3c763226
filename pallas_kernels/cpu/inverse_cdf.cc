// One random draw per row from softmax(x / T) restricted to x / T >= thr: the token at quantile u of
// that distribution, as an XLA:CPU FFI call (the sampler's `_inverse_cdf`, sampling/sampler.py).
//
// Why: for every row that samples at a temperature (the OpenAI API's default) the XLA version makes
// several passes over the [rows, vocab] logits (divide by T, row max, mask, exp, block sums, a
// gathered block): ~12 ms per 128-row step on a 49k vocabulary, against ~1.5 ms for a greedy step.
// Here each row is handled by one core (rows on all cores) in passes that stay in its L2: x / T and
// its maximum m, block masses of exp(x / T - m) for the kept tokens, then, in the one block where the
// running mass passes u * total, the first token that passes it.
//
//   logits f32 [S, V], T f32 [S] (> 0), thr f32 [S], u f32 [S] in [0, 1)  ->  token s32 [S]
//
// x / T is an IEEE division, as XLA's, so thresholds computed by XLA on x / T compare exactly. thr
// NaN means "keep only the maximum" (a greedy row: m). Kept tokens: x / T >= thr and > -inf (NaN is
// never kept, and the maximum ignores NaN as XLA:CPU's max does). Masses are summed in double; the
// draw is the first kept token whose running mass exceeds min(u * total, the largest double below
// total), so u = 0 gives the first kept token (a greedy row's first argmax), and the last kept token
// is the answer if rounding leaves the target unreached. A row with nothing kept returns its last
// kept token, else its last token.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>

#include "simd_math.h"
#define PJ_CDF_AVX512 1
#else
#define PJ_CDF_AVX512 0
#endif

#include "parallel_rows.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t BLOCK = 256;  // tokens per block of the first pass

inline bool kept(float v, float t) { return v >= t && v > -INFINITY; }

// Sum of exp(x - m) over the kept tokens of x[0, n).
double block_mass(const float* x, int64_t n, float t, float m) {
  int64_t i = 0;
  double sum = 0.0;
#if PJ_CDF_AVX512
  __m512 acc = _mm512_setzero_ps();
  const __m512 tv = _mm512_set1_ps(t), mv = _mm512_set1_ps(m), ninf = _mm512_set1_ps(-INFINITY);
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    const __mmask16 k = _mm512_cmp_ps_mask(v, tv, _CMP_GE_OQ) & _mm512_cmp_ps_mask(v, ninf, _CMP_GT_OQ);
    if (k) acc = _mm512_mask_add_ps(acc, k, acc, pagedjax_cpu::exp512(_mm512_sub_ps(v, mv)));
  }
  sum = _mm512_reduce_add_ps(acc);
#endif
  for (; i < n; ++i)
    if (kept(x[i], t)) sum += std::exp(double(x[i]) - double(m));
  return sum;
}

// y[0, n) = x / T; returns the largest non-NaN y (-inf if none).
float scale_and_max(const float* x, int64_t n, float T, float* y) {
  int64_t i = 0;
  float m = -INFINITY;
#if PJ_CDF_AVX512
  const __m512 tv = _mm512_set1_ps(T);
  __m512 mv = _mm512_set1_ps(-INFINITY);
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_div_ps(_mm512_loadu_ps(x + i), tv);
    _mm512_storeu_ps(y + i, v);
    mv = _mm512_mask_max_ps(mv, _mm512_cmp_ps_mask(v, v, _CMP_ORD_Q), mv, v);
  }
  m = _mm512_reduce_max_ps(mv);
#endif
  for (; i < n; ++i) {
    y[i] = x[i] / T;
    if (y[i] > m) m = y[i];
  }
  return m;
}

int32_t draw_row(const float* logits, int64_t V, float T, float t, float u, std::vector<float>& y,
                 std::vector<double>& masses) {
  y.resize(V);
  const float m = scale_and_max(logits, V, T, y.data());
  if (std::isnan(t)) t = m;
  const float* x = y.data();
  const int64_t nb = (V + BLOCK - 1) / BLOCK;
  masses.resize(nb);
  double total = 0.0;
  for (int64_t b = 0; b < nb; ++b) total += masses[b] = block_mass(x + b * BLOCK, std::min(BLOCK, V - b * BLOCK), t, m);
  if (!(total > 0.0)) {  // nothing kept (or NaN masses): the last kept token, else the last token
    for (int64_t i = V - 1; i >= 0; --i)
      if (kept(x[i], t)) return int32_t(i);
    return int32_t(V - 1);
  }
  const double target = std::min(double(u) * total, std::nextafter(total, 0.0));
  double run = 0.0;
  int64_t b = 0;
  for (; b + 1 < nb && run + masses[b] <= target; ++b) run += masses[b];
  while (b > 0 && masses[b] <= 0.0) --b, run -= masses[b];  // never a block without mass
  const int64_t lo = b * BLOCK, hi = std::min(V, lo + BLOCK);
  int64_t last = -1;
  for (int64_t i = lo; i < hi; ++i) {
    if (!kept(x[i], t)) continue;
    const double w = std::exp(double(x[i]) - double(m));
    if (w <= 0.0) continue;
    run += w;
    last = i;
    if (run > target) return int32_t(i);
  }
  if (last >= 0) return int32_t(last);  // rounding left the target just out of reach
  for (int64_t i = V - 1; i >= 0; --i)
    if (kept(x[i], t)) return int32_t(i);
  return int32_t(V - 1);
}

// Per-thread buffers: the row divided by T, and its block masses.
struct Scratch {
  std::vector<float> y;
  std::vector<double> masses;
};

ffi::Error InverseCdfImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> temp,
                          ffi::Buffer<ffi::F32> thr, ffi::Buffer<ffi::F32> u, ffi::ResultBuffer<ffi::S32> out) {
  const auto xd = x.dimensions();
  if (xd.size() != 2) return ffi::Error::InvalidArgument("x must be [S, V]");
  const int64_t S = xd[0], V = xd[1];
  if (temp.element_count() != S || thr.element_count() != S || u.element_count() != S ||
      out->element_count() != S)
    return ffi::Error::InvalidArgument("T, thr, u and the output must have S elements");
  if (S == 0) return ffi::Error::Success();
  if (V == 0) return ffi::Error::InvalidArgument("empty vocabulary");
  const float *xs = x.typed_data(), *ts = temp.typed_data(), *hs = thr.typed_data(), *us = u.typed_data();
  int32_t* os = out->typed_data();
  pagedjax_cpu::parallel_rows<Scratch>(pool, S, [=](Scratch& sc, int64_t r) {
    os[r] = draw_row(xs + r * V, V, ts[r], hs[r], us[r], sc.y, sc.masses);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PagedJaxInverseCdf, InverseCdfImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // logits [S, V]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // T [S]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // thr [S] (NaN: the row max)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // u [S]
                                  .Ret<ffi::Buffer<ffi::S32>>());  // token [S]
