// Weight-only int8 products of a few rows (decode), on AVX-512: y (m, n) = (x (m, k) @ Q^T) *
// scale, x, y and the scales bf16, Q int8 (n, k) as quantized per output channel
// (`engine/src/kernels/int8.rs`). Each weight row is read once for all m rows of x, widened to
// f32 in registers (16 at a time) and multiplied into f32 sums; the m rows of x are widened to
// f32 once, before. Threads take consecutive ranges of weight rows, so each streams one
// contiguous range of memory (four rows at a time, with software prefetches, measured no
// faster). On a 2-core EPYC this reads the weights 10-17% faster than LibTorch's
// `_weight_int8pack_mm` (BENCHMARKS.md, "int8 weights").
// GCC 12 flags its own AVX-512 intrinsics' `_mm512_undefined_*` as (maybe) uninitialized.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "omp_team.h"

#define INT8_TARGET __attribute__((target("avx512f")))

namespace {

constexpr int64_t kMaxRows = 4;

struct Int8Job {
  const float *x;  // (m, k), widened from bf16
  const int8_t *q;
  const uint16_t *scales;
  int64_t m, k, n;
  uint16_t *y;
};

inline float from_bf16(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Round to nearest even, as LibTorch converts f32 to bf16 (NaN is not expected here).
inline uint16_t to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  return static_cast<uint16_t>((bits + 0x7fff + ((bits >> 16) & 1)) >> 16);
}

template <int M>
INT8_TARGET void rows_of(const Int8Job &job, int64_t n0, int64_t n1) {
  const int64_t k = job.k, full = k / 16 * 16;
  for (int64_t j = n0; j < n1; j++) {
    const int8_t *q = job.q + j * k;
    __m512 acc[M];
    for (int r = 0; r < M; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t c = 0; c < full; c += 16) {
      const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i *>(q + c))));
      for (int r = 0; r < M; r++) acc[r] = _mm512_fmadd_ps(w, _mm512_loadu_ps(job.x + r * k + c), acc[r]);
    }
    const float scale = from_bf16(job.scales[j]);
    for (int r = 0; r < M; r++) {
      float sum = _mm512_reduce_add_ps(acc[r]);
      for (int64_t c = full; c < k; c++) sum += static_cast<float>(q[c]) * job.x[r * k + c];
      job.y[r * job.n + j] = to_bf16(sum * scale);
    }
  }
}

INT8_TARGET void int8_share(void *data) {
  const Int8Job &job = *static_cast<const Int8Job *>(data);
  const auto [threads, me] = onehead::team();
  const int64_t n0 = job.n * me / threads, n1 = job.n * (me + 1) / threads;
  switch (job.m) {
    case 1: rows_of<1>(job, n0, n1); break;
    case 2: rows_of<2>(job, n0, n1); break;
    case 3: rows_of<3>(job, n0, n1); break;
    default: rows_of<4>(job, n0, n1); break;
  }
}

}  // namespace

extern "C" {

// Whether this CPU runs `onehead_int8_linear` (AVX-512 F).
int onehead_int8_available() { return __builtin_cpu_supports("avx512f") ? 1 : 0; }

// y (m, n) = (x (m, k) @ q^T) * scales, bf16 but q (n, k) int8, all contiguous; m at most 4.
// The caller has checked `onehead_int8_available` and the sizes.
void onehead_int8_linear(const uint16_t *x, int64_t m, int64_t k, const int8_t *q, const uint16_t *scales,
                         int64_t n, uint16_t *y) {
  thread_local std::vector<float> widened;
  if (widened.size() < static_cast<size_t>(m * k)) widened.resize(m * k);
  for (int64_t i = 0; i < m * k; i++) widened[i] = from_bf16(x[i]);
  Int8Job job{widened.data(), q, scales, m < kMaxRows ? m : kMaxRows, k, n, y};
  onehead::on_team(int8_share, &job);
}

}  // extern "C"
