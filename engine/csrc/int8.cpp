// Weight-only int8 products, on AVX-512 or AVX2: y (m, n) = (x (m, k) @ Q^T) * scale, x, y and
// the scales bf16, Q int8 (n, k) as quantized per output channel (`engine/src/kernels/int8.rs`).
// The rows of x are widened to f32 once (in slabs of up to 64 rows), the weights 16 (AVX-512) or
// 8 (AVX2) at a time in registers, and multiplied into f32 sums. Threads take consecutive ranges
// of weight rows, so each streams one contiguous range of memory (four rows at a time, with
// software prefetches, measured no faster); each takes its range in blocks of 8 weight rows, and
// each block meets all the slab's rows, a few at a time (4 on AVX-512, 3 on AVX2), while it is in
// cache: the weights are read from memory once per slab.
//
// Every row of y is summed in the same order whatever rows it is computed beside, so a row's
// result does not depend on its batch. Figures: BENCHMARKS.md, "int8 weights".
// GCC 12 flags its own AVX-512 intrinsics' `_mm512_undefined_*` as (maybe) uninitialized.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "omp_team.h"

#define INT8_TARGET __attribute__((target("avx512f")))
#define INT8_AVX2_TARGET __attribute__((target("avx2,fma")))

namespace {

// Rows of x widened and multiplied together in one parallel region; weight rows per block.
constexpr int64_t kSlab = 64, kBlock = 8;

struct Int8Job {
  const float *x;  // (m, k), widened from bf16
  const int8_t *q;
  const uint16_t *scales;
  int64_t m, k, n;
  uint16_t *y;
  bool avx512;  // else AVX2
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

// Rows r0 .. r0 + M of y, columns n0 .. n1.
template <int M>
INT8_TARGET void rows_of(const Int8Job &job, int64_t r0, int64_t n0, int64_t n1) {
  const int64_t k = job.k, full = k / 16 * 16;
  const float *x = job.x + r0 * k;
  for (int64_t j = n0; j < n1; j++) {
    const int8_t *q = job.q + j * k;
    __m512 acc[M];
    for (int r = 0; r < M; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t c = 0; c < full; c += 16) {
      const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i *>(q + c))));
      for (int r = 0; r < M; r++) acc[r] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + r * k + c), acc[r]);
    }
    const float scale = from_bf16(job.scales[j]);
    for (int r = 0; r < M; r++) {
      float sum = _mm512_reduce_add_ps(acc[r]);
      for (int64_t c = full; c < k; c++) sum += static_cast<float>(q[c]) * x[r * k + c];
      job.y[(r0 + r) * job.n + j] = to_bf16(sum * scale);
    }
  }
}

// `rows_of` in 8 lanes, for CPUs without AVX-512. Each row keeps four sums, so that the FMAs of
// one row alone (Zen 2's take 5 cycles) overlap; 3 rows x 4 sums fill 12 of the 16 registers.
template <int M>
INT8_AVX2_TARGET void rows_of_avx2(const Int8Job &job, int64_t r0, int64_t n0, int64_t n1) {
  constexpr int U = 4;
  const int64_t k = job.k, full = k / (8 * U) * (8 * U);
  const float *x = job.x + r0 * k;
  for (int64_t j = n0; j < n1; j++) {
    const int8_t *q = job.q + j * k;
    __m256 acc[M][U];
    for (int r = 0; r < M; r++)
      for (int u = 0; u < U; u++) acc[r][u] = _mm256_setzero_ps();
    for (int64_t c = 0; c < full; c += 8 * U) {
      for (int u = 0; u < U; u++) {
        const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i *>(q + c + 8 * u));
        const __m256 w = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
        for (int r = 0; r < M; r++) acc[r][u] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + r * k + c + 8 * u), acc[r][u]);
      }
    }
    const float scale = from_bf16(job.scales[j]);
    for (int r = 0; r < M; r++) {
      const __m256 all = _mm256_add_ps(_mm256_add_ps(acc[r][0], acc[r][1]), _mm256_add_ps(acc[r][2], acc[r][3]));
      __m128 half = _mm_add_ps(_mm256_castps256_ps128(all), _mm256_extractf128_ps(all, 1));
      half = _mm_add_ps(half, _mm_movehl_ps(half, half));
      half = _mm_add_ss(half, _mm_movehdup_ps(half));
      float sum = _mm_cvtss_f32(half);
      for (int64_t c = full; c < k; c++) sum += static_cast<float>(q[c]) * x[r * k + c];
      job.y[(r0 + r) * job.n + j] = to_bf16(sum * scale);
    }
  }
}

void int8_share(void *data) {
  const Int8Job &job = *static_cast<const Int8Job *>(data);
  const auto [threads, me] = onehead::team();
  const int64_t n0 = job.n * me / threads, n1 = job.n * (me + 1) / threads;
  const int64_t rows_at_once = job.avx512 ? 4 : 3;
  for (int64_t b0 = n0; b0 < n1; b0 += kBlock) {
    const int64_t b1 = std::min(n1, b0 + kBlock);
    for (int64_t r0 = 0; r0 < job.m; r0 += rows_at_once) {
      const int64_t rows = std::min(rows_at_once, job.m - r0);
      if (job.avx512) {
        switch (rows) {
          case 1: rows_of<1>(job, r0, b0, b1); break;
          case 2: rows_of<2>(job, r0, b0, b1); break;
          case 3: rows_of<3>(job, r0, b0, b1); break;
          default: rows_of<4>(job, r0, b0, b1); break;
        }
      } else {
        switch (rows) {
          case 1: rows_of_avx2<1>(job, r0, b0, b1); break;
          case 2: rows_of_avx2<2>(job, r0, b0, b1); break;
          default: rows_of_avx2<3>(job, r0, b0, b1); break;
        }
      }
    }
  }
}

}  // namespace

extern "C" {

// Whether this CPU runs `onehead_int8_linear` (AVX-512 F, or AVX2 with FMA).
int onehead_int8_available() {
  return __builtin_cpu_supports("avx512f") || (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) ? 1 : 0;
}

// Whether oneDNN multiplies int8 by int8 here with VNNI instructions (AVX-512 VNNI, AVX-VNNI;
// AMX CPUs have AVX-512 VNNI too). Without them LibTorch's `_int_mm` falls back to a plain loop.
int onehead_int8_vnni() {
  return __builtin_cpu_supports("avx512vnni") || __builtin_cpu_supports("avxvnni") ? 1 : 0;
}

// y (m, n) = (x (m, k) @ q^T) * scales, bf16 but q (n, k) int8, all contiguous. The caller has
// checked `onehead_int8_available` and the sizes.
void onehead_int8_linear(const uint16_t *x, int64_t m, int64_t k, const int8_t *q, const uint16_t *scales,
                         int64_t n, uint16_t *y) {
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  thread_local std::vector<float> widened;
  if (widened.size() < static_cast<size_t>(std::min(m, kSlab) * k)) widened.resize(std::min(m, kSlab) * k);
  for (int64_t s0 = 0; s0 < m; s0 += kSlab) {
    const int64_t rows = std::min(kSlab, m - s0);
    for (int64_t i = 0; i < rows * k; i++) widened[i] = from_bf16(x[s0 * k + i]);
    Int8Job job{widened.data(), q, scales, rows, k, n, y + s0 * n, avx512};
    onehead::on_team(int8_share, &job);
  }
}

}  // extern "C"
