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
// result does not depend on its batch. Figures: BENCHMARKS.md, "int8 weights". On a CPU with
// AVX-512 VNNI, bf16 products take the int8-by-int8 kernel at the end of this file instead
// (`onehead_int8_linear`'s VNNI form), which reads the weights at up to twice the rate at one row.
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

// Int8-by-int8 products on AVX-512 VNNI, for CPUs without AMX-INT8: y (m, n) = bf16(f32(x_q @ q^T)
// * x_scale * scale), x_q (m, k) the rows of x quantized to int8 by their own scales (f32), q (n, k)
// the int8 weights. `VPDPBUSD` multiplies unsigned by signed bytes, so each row byte is taken as
// x + 128 (its sign bit flipped) and 128 * sum(q_j) is taken off each sum; the sums are exact in
// int32, so a row's result does not depend on its batch. Threads take consecutive ranges of
// weight rows; each takes them 4 at a time, and those 4 meet every row of x, 4 rows at a time
// (16 sums in registers), while they are in cache.
#define INT8_VNNI_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

struct VnniJob {
  const int8_t *x;  // (m, k)
  const float *x_scales;  // (m,)
  const int8_t *q;  // (n, k)
  const uint16_t *scales;  // (n,), bf16
  int64_t m, k, n;
  uint16_t *y;  // (m, n), bf16
};

constexpr int64_t kVnniRows = 4, kVnniWeights = 4;

// Rows r0 .. r0 + M of y against weight rows j0 .. j0 + W, whose sums of bytes are `q_sums`.
template <int M, int W>
INT8_VNNI_TARGET void tile_vnni(const VnniJob &job, int64_t r0, int64_t j0, const int32_t *q_sums) {
  const int64_t k = job.k, full = k / 64 * 64;
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  const int8_t *x = job.x + r0 * k, *q = job.q + j0 * k;
  __m512i acc[M][W];
  for (int r = 0; r < M; r++)
    for (int w = 0; w < W; w++) acc[r][w] = _mm512_setzero_si512();
  for (int64_t c = 0; c < full; c += 64) {
    __m512i xv[M];
    for (int r = 0; r < M; r++) xv[r] = _mm512_xor_si512(_mm512_loadu_si512(x + r * k + c), flip);
    for (int w = 0; w < W; w++) {
      const __m512i qv = _mm512_loadu_si512(q + w * k + c);
      for (int r = 0; r < M; r++) acc[r][w] = _mm512_dpbusd_epi32(acc[r][w], xv[r], qv);
    }
  }
  if (full < k) {  // the last k - full bytes, zeros past them (their flipped 128s meet zeros)
    const __mmask64 tail = _cvtu64_mask64(~0ULL >> (64 - (k - full)));
    __m512i xv[M];
    for (int r = 0; r < M; r++) xv[r] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(tail, x + r * k + full), flip);
    for (int w = 0; w < W; w++) {
      const __m512i qv = _mm512_maskz_loadu_epi8(tail, q + w * k + full);
      for (int r = 0; r < M; r++) acc[r][w] = _mm512_dpbusd_epi32(acc[r][w], xv[r], qv);
    }
  }
  for (int r = 0; r < M; r++) {
    const float x_scale = job.x_scales[r0 + r];
    for (int w = 0; w < W; w++) {
      const int32_t sum = _mm512_reduce_add_epi32(acc[r][w]) - 128 * q_sums[w];
      job.y[(r0 + r) * job.n + j0 + w] = to_bf16(static_cast<float>(sum) * x_scale * from_bf16(job.scales[j0 + w]));
    }
  }
}

// Every row of x against weight rows j0 .. j0 + W.
template <int W>
INT8_VNNI_TARGET void block_vnni(const VnniJob &job, int64_t j0) {
  const int64_t k = job.k;
  const __m512i ones = _mm512_set1_epi8(1);
  int32_t q_sums[W];
  for (int w = 0; w < W; w++) {
    const int8_t *q = job.q + (j0 + w) * k;
    __m512i acc = _mm512_setzero_si512();
    int64_t c = 0;
    for (; c + 64 <= k; c += 64) acc = _mm512_dpbusd_epi32(acc, ones, _mm512_loadu_si512(q + c));
    if (c < k) acc = _mm512_dpbusd_epi32(acc, ones, _mm512_maskz_loadu_epi8(_cvtu64_mask64(~0ULL >> (64 - (k - c))), q + c));
    q_sums[w] = _mm512_reduce_add_epi32(acc);
  }
  int64_t r0 = 0;
  for (; r0 + kVnniRows <= job.m; r0 += kVnniRows) tile_vnni<kVnniRows, W>(job, r0, j0, q_sums);
  switch (job.m - r0) {
    case 1: tile_vnni<1, W>(job, r0, j0, q_sums); break;
    case 2: tile_vnni<2, W>(job, r0, j0, q_sums); break;
    case 3: tile_vnni<3, W>(job, r0, j0, q_sums); break;
    default: break;
  }
}

// Rows of x (bf16) to int8, each by its own scale, as `quantize_rows` in `int8.rs` does (in f32:
// scale = max |x| / 127, or 1 for a row of zeros; q = round(x / scale), halves to even).
struct QuantizeJob {
  const uint16_t *x;  // (m, k)
  int64_t m, k;
  int8_t *q;  // (m, k)
  float *scales;  // (m,)
};

INT8_VNNI_TARGET inline __m512 widen_bf16(const uint16_t *x, int64_t c, int64_t k) {
  const __mmask16 mask = c + 16 <= k ? 0xffff : static_cast<__mmask16>((1u << (k - c)) - 1);
  const __m256i h = _mm256_maskz_loadu_epi16(mask, x + c);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

INT8_VNNI_TARGET void quantize_row(const QuantizeJob &job, int64_t r) {
  const uint16_t *x = job.x + r * job.k;
  int8_t *q = job.q + r * job.k;
  __m512 top = _mm512_setzero_ps();
  for (int64_t c = 0; c < job.k; c += 16) top = _mm512_max_ps(top, _mm512_abs_ps(widen_bf16(x, c, job.k)));
  const float max = _mm512_reduce_max_ps(top), scale = max > 0.0f ? max / 127.0f : 1.0f;
  job.scales[r] = scale;
  const __m512 by = _mm512_set1_ps(scale), hi = _mm512_set1_ps(127.0f), lo = _mm512_set1_ps(-127.0f);
  for (int64_t c = 0; c < job.k; c += 16) {
    const __m512 v = _mm512_roundscale_ps(_mm512_div_ps(widen_bf16(x, c, job.k), by), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512i i = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(v, lo), hi));
    const __mmask16 mask = c + 16 <= job.k ? 0xffff : static_cast<__mmask16>((1u << (job.k - c)) - 1);
    _mm512_mask_cvtsepi32_storeu_epi8(q + c, mask, i);
  }
}

void quantize_share(void *data) {
  const QuantizeJob &job = *static_cast<const QuantizeJob *>(data);
  const auto [threads, me] = onehead::team();
  for (int64_t r = job.m * me / threads; r < job.m * (me + 1) / threads; r++) quantize_row(job, r);
}

void vnni_share(void *data) {
  const VnniJob &job = *static_cast<const VnniJob *>(data);
  const auto [threads, me] = onehead::team();
  const int64_t n0 = job.n * me / threads, n1 = job.n * (me + 1) / threads;
  int64_t j = n0;
  for (; j + kVnniWeights <= n1; j += kVnniWeights) block_vnni<kVnniWeights>(job, j);
  switch (n1 - j) {
    case 1: block_vnni<1>(job, j); break;
    case 2: block_vnni<2>(job, j); break;
    case 3: block_vnni<3>(job, j); break;
    default: break;
  }
}

// y (m, n) = bf16(f32(x_q @ q^T) * x_scales * scales), x_q (m, k) and x_scales (m,) the rows of
// x (m, k) quantized to int8 by their own scales: `onehead_int8_linear`'s VNNI form.
void vnni_linear(const uint16_t *x, int64_t m, int64_t k, const int8_t *q, const uint16_t *scales, int64_t n,
                 uint16_t *y) {
  thread_local std::vector<int8_t> x_q;
  thread_local std::vector<float> x_scales;
  if (x_q.size() < static_cast<size_t>(m * k)) x_q.resize(m * k);
  if (x_scales.size() < static_cast<size_t>(m)) x_scales.resize(m);
  QuantizeJob rows{x, m, k, x_q.data(), x_scales.data()};
  onehead::on_team(quantize_share, &rows);
  VnniJob job{x_q.data(), x_scales.data(), q, scales, m, k, n, y};
  onehead::on_team(vnni_share, &job);
}

}  // namespace

extern "C" {

// The forms of `onehead_int8_linear` this CPU runs, as bits: 1 AVX2 (with FMA), 2 AVX-512 F,
// 4 AVX-512 VNNI (with BW).
int onehead_int8_forms() {
  return (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? 1 : 0) |
         (__builtin_cpu_supports("avx512f") ? 2 : 0) |
         (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vnni")
              ? 4
              : 0);
}

// Whether oneDNN multiplies int8 by int8 here with VNNI instructions (AVX-512 VNNI, AVX-VNNI;
// AMX CPUs have AVX-512 VNNI too). Without them LibTorch's `_int_mm` falls back to a plain loop.
int onehead_int8_vnni() {
  return __builtin_cpu_supports("avx512vnni") || __builtin_cpu_supports("avxvnni") ? 1 : 0;
}

// y (m, n) = (x (m, k) @ q^T) * scales, bf16 but q (n, k) int8, all contiguous, in `form` (one
// bit of `onehead_int8_forms`; in form 4, VNNI, each row of x quantized to int8 first, and k
// below 65536 so that no int32 sum overflows). The caller has checked the form and the sizes.
void onehead_int8_linear(const uint16_t *x, int64_t m, int64_t k, const int8_t *q, const uint16_t *scales,
                         int64_t n, uint16_t *y, int form) {
  if (form == 4) return vnni_linear(x, m, k, q, scales, n, y);
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
