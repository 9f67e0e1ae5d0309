// Weight-only int8 products, on AVX-512 or AVX2: y (m, n) = (x (m, k) @ Q^T) * scale, x, y and
// the scales bf16, Q int8 (n, k) as quantized per output channel (`engine/src/kernels/int8.rs`).
// The rows of x are widened to f32 once (in slabs of up to 64 rows), the weights 16 (AVX-512) or
// 8 (AVX2) at a time in registers, and multiplied into f32 sums. Threads take consecutive ranges
// of weight rows, so each streams one contiguous range of memory (four rows at a time, with
// software prefetches, measured no faster); each takes its range in blocks of weight rows (8 on
// AVX-512, 24 on AVX2), and each block meets all the slab's rows, 4 at a time, while it is in
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

// Rows of x widened and multiplied together in one parallel region; weight rows per block (on
// AVX2 a multiple of `tile_avx2`'s 3).
constexpr int64_t kSlab = 64, kBlock = 8, kBlockAvx2 = 24;

struct Int8Job {
  const float *x;  // (m, stride), widened from bf16
  const int8_t *q;
  const uint16_t *scales;
  int64_t m, k, n;
  int64_t stride;  // of x: k on AVX-512, k rounded up to `kChunk` and zero-padded on AVX2
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

// Rows r0 .. r0 + M of y, columns n0 .. n1. Each pair of a row and a weight row is summed as 4
// sums of 16 lanes over interleaved blocks of 16 columns (block i goes to sum i % 4), so that
// 4 FMA chains run at once; the sums are added in one order whatever M is. The weights are
// prefetched `kAhead` bytes ahead: without it, on 2 cores of an AMX Xeon, one row read 8192 x
// 2048 weights at 15-23 GB/s, with it 29-30 (the streaming read: 32).
constexpr int64_t kSums512 = 4, kAhead = 2048;

template <int M>
INT8_TARGET void rows_of(const Int8Job &job, int64_t r0, int64_t n0, int64_t n1) {
  const int64_t k = job.k, blocks = k / 16, full = blocks * 16, wide = blocks / kSums512 * kSums512 * 16;
  const float *x = job.x + r0 * k;
  for (int64_t j = n0; j < n1; j++) {
    const int8_t *q = job.q + j * k;
    __m512 acc[M][kSums512];
    for (int r = 0; r < M; r++)
      for (int u = 0; u < kSums512; u++) acc[r][u] = _mm512_setzero_ps();
    for (int64_t c = 0; c < wide; c += 16 * kSums512) {
      _mm_prefetch(reinterpret_cast<const char *>(q + c + kAhead), _MM_HINT_T0);
      for (int u = 0; u < kSums512; u++) {
        const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i *>(q + c + 16 * u))));
        for (int r = 0; r < M; r++) acc[r][u] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + r * k + c + 16 * u), acc[r][u]);
      }
    }
    for (int64_t c = wide; c < full; c += 16) {
      const int u = static_cast<int>(c / 16 % kSums512);
      const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i *>(q + c))));
      for (int r = 0; r < M; r++) acc[r][u] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + r * k + c), acc[r][u]);
    }
    const float scale = from_bf16(job.scales[j]);
    for (int r = 0; r < M; r++) {
      float sum = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]), _mm512_add_ps(acc[r][2], acc[r][3])));
      for (int64_t c = full; c < k; c++) sum += static_cast<float>(q[c]) * x[r * k + c];
      job.y[(r0 + r) * job.n + j] = to_bf16(sum * scale);
    }
  }
}

// The AVX2 form. Each pair of a row of x and a weight row is summed as 4 sums of 8 lanes over
// interleaved chunks (chunk i of 8 columns goes to sum i % 4), over the slab's width padded to
// 32 (`Int8Job::stride`: zeros past k in x, and the weight row's last partial 32 bytes read from a
// zero-padded copy), then added in one order (`sum_of`). Both forms below compute exactly that,
// so a row's result does not depend on which form its batch sent it through.
constexpr int64_t kSums = 4, kChunk = 8 * kSums, kSegment = 512;

INT8_AVX2_TARGET inline __m256 widen(const int8_t *bytes) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i *>(bytes))));
}

INT8_AVX2_TARGET inline float sum_of(__m256 s0, __m256 s1, __m256 s2, __m256 s3) {
  const __m256 all = _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3));
  __m128 half = _mm_add_ps(_mm256_castps256_ps128(all), _mm256_extractf128_ps(all, 1));
  half = _mm_add_ps(half, _mm_movehl_ps(half, half));
  half = _mm_add_ss(half, _mm_movehdup_ps(half));
  return _mm_cvtss_f32(half);
}

// M (up to 3) rows of x against weight rows j0 .. j1, one weight row at a time with its 4 sums
// per row in registers (Zen 2's FMAs take 5 cycles; 3 rows x 4 sums fill 12 of 16 registers):
// each row streams one contiguous range of weights, the fastest from memory at a few rows.
template <int M>
INT8_AVX2_TARGET void rows_of_avx2(const Int8Job &job, int64_t r0, int64_t j0, int64_t j1) {
  const int64_t k = job.k, full = k / kChunk * kChunk;
  const float *x = job.x + r0 * job.stride;
  for (int64_t j = j0; j < j1; j++) {
    const int8_t *q = job.q + j * k;
    int8_t tail[kChunk] = {};
    std::memcpy(tail, q + full, k - full);
    __m256 acc[M][kSums];
    for (int r = 0; r < M; r++)
      for (int u = 0; u < kSums; u++) acc[r][u] = _mm256_setzero_ps();
    for (int64_t c = 0; c < job.stride; c += kChunk) {
      const int8_t *bytes = c < full ? q + c : tail;
      for (int u = 0; u < kSums; u++) {
        const __m256 w = widen(bytes + 8 * u);
        for (int r = 0; r < M; r++) acc[r][u] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + r * job.stride + c + 8 * u), acc[r][u]);
      }
    }
    const float scale = from_bf16(job.scales[j]);
    for (int r = 0; r < M; r++) job.y[(r0 + r) * job.n + j] = to_bf16(sum_of(acc[r][0], acc[r][1], acc[r][2], acc[r][3]) * scale);
  }
}

// 4 rows of x against 3 weight rows: 12 sums in registers beside 3 weight vectors and 1 row
// vector, so each widened weight vector serves 4 FMAs and each row vector 3. The 4 sums of a pair
// do not fit at once, so the tile takes the columns in segments of `kSegment` (4 rows' segment of x
// stays in L1) and each segment in 4 passes, one per sum, over every 4th chunk; the sums wait in
// memory between passes, which keeps each one's order. On 2 Zen 2 cores: 9.2-9.5 ms for one
// 8192 x 2048 matrix at 32 rows, against 12.0-13.8 ms 3 rows at a time in `rows_of_avx2`.
INT8_AVX2_TARGET void tile_avx2(const Int8Job &job, int64_t r0, int64_t j0) {
  constexpr int M = 4, W = 3;
  const int64_t k = job.k, full = k / kChunk * kChunk;
  const float *x = job.x + r0 * job.stride;
  const int8_t *q[W];
  int8_t tails[W][kChunk] = {};
  for (int w = 0; w < W; w++) {
    q[w] = job.q + (j0 + w) * k;
    std::memcpy(tails[w], q[w] + full, k - full);
  }
  __m256 sums[kSums][M][W];
  for (int64_t u = 0; u < kSums; u++)
    for (int r = 0; r < M; r++)
      for (int w = 0; w < W; w++) sums[u][r][w] = _mm256_setzero_ps();
  for (int64_t s0 = 0; s0 < job.stride; s0 += kSegment) {
    const int64_t s1 = std::min(job.stride, s0 + kSegment);
    for (int64_t u = 0; u < kSums; u++) {
      __m256 acc[M][W];
      for (int r = 0; r < M; r++)
        for (int w = 0; w < W; w++) acc[r][w] = sums[u][r][w];
      for (int64_t c = s0 + 8 * u; c < s1; c += kChunk) {
        __m256 wv[W];
        for (int w = 0; w < W; w++) wv[w] = widen(c < full ? q[w] + c : tails[w] + (c - full));
        for (int r = 0; r < M; r++) {
          const __m256 xv = _mm256_loadu_ps(x + r * job.stride + c);
          for (int w = 0; w < W; w++) acc[r][w] = _mm256_fmadd_ps(wv[w], xv, acc[r][w]);
        }
      }
      for (int r = 0; r < M; r++)
        for (int w = 0; w < W; w++) sums[u][r][w] = acc[r][w];
    }
  }
  for (int r = 0; r < M; r++)
    for (int w = 0; w < W; w++)
      job.y[(r0 + r) * job.n + j0 + w] =
          to_bf16(sum_of(sums[0][r][w], sums[1][r][w], sums[2][r][w], sums[3][r][w]) * from_bf16(job.scales[j0 + w]));
}

// Rows r0 .. r0 + rows (up to 4) against weight rows j0 .. j1.
INT8_AVX2_TARGET void rows_avx2(const Int8Job &job, int64_t r0, int64_t rows, int64_t j0, int64_t j1) {
  switch (rows) {
    case 1: rows_of_avx2<1>(job, r0, j0, j1); break;
    case 2: rows_of_avx2<2>(job, r0, j0, j1); break;
    case 3: rows_of_avx2<3>(job, r0, j0, j1); break;
    default: {
      int64_t j = j0;
      for (; j + 3 <= j1; j += 3) tile_avx2(job, r0, j);
      rows_of_avx2<2>(job, r0, j, j1);
      rows_of_avx2<2>(job, r0 + 2, j, j1);
    }
  }
}

void int8_share(void *data) {
  const Int8Job &job = *static_cast<const Int8Job *>(data);
  const auto [threads, me] = onehead::team();
  const int64_t n0 = job.n * me / threads, n1 = job.n * (me + 1) / threads;
  const int64_t block = job.avx512 ? kBlock : kBlockAvx2, rows_at_once = 4;
  for (int64_t b0 = n0; b0 < n1; b0 += block) {
    const int64_t b1 = std::min(n1, b0 + block);
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
        rows_avx2(job, r0, rows, b0, b1);
      }
    }
  }
}

}  // namespace

extern "C" {

// The forms of `onehead_int8_linear` this CPU runs, as bits: 1 AVX2 (with FMA), 2 AVX-512 F.
int onehead_int8_forms() {
  return (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? 1 : 0) |
         (__builtin_cpu_supports("avx512f") ? 2 : 0);
}

// Whether oneDNN multiplies int8 by int8 here with VNNI instructions (AVX-512 VNNI, AVX-VNNI;
// AMX CPUs have AVX-512 VNNI too). Without them LibTorch's `_int_mm` falls back to a plain loop.
int onehead_int8_vnni() {
  return __builtin_cpu_supports("avx512vnni") || __builtin_cpu_supports("avxvnni") ? 1 : 0;
}

// y (m, n) = (x (m, k) @ q^T) * scales, bf16 but q (n, k) int8, all contiguous, in `form` (one
// bit of `onehead_int8_forms`). The caller has checked the form and the sizes.
void onehead_int8_linear(const uint16_t *x, int64_t m, int64_t k, const int8_t *q, const uint16_t *scales,
                         int64_t n, uint16_t *y, int form) {
  const bool avx512 = form == 2;
  const int64_t stride = avx512 ? k : (k + kChunk - 1) / kChunk * kChunk;
  thread_local std::vector<float> widened;
  const size_t slab = static_cast<size_t>(std::min(m, kSlab) * stride);
  if (widened.size() < slab) widened.resize(slab);
  for (int64_t s0 = 0; s0 < m; s0 += kSlab) {
    const int64_t rows = std::min(kSlab, m - s0);
    for (int64_t r = 0; r < rows; r++) {
      float *row = widened.data() + r * stride;
      for (int64_t c = 0; c < k; c++) row[c] = from_bf16(x[(s0 + r) * k + c]);
      std::fill(row + k, row + stride, 0.0f);
    }
    Int8Job job{widened.data(), q, scales, rows, k, n, stride, y + s0 * n, avx512};
    onehead::on_team(int8_share, &job);
  }
}

}  // extern "C"
