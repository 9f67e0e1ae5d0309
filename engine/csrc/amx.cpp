// bf16 matrix products on Intel AMX, and decode attention over the KV pool in place.
// Decode-sized products (at most 32 rows) stream each weight from memory once per step.
// oneDNN's kernels read a streamed weight at about 75% of the bandwidth a plain read reaches
// here, and at 32 rows stall on its tile products; this loop keeps the weight stream ahead with
// software prefetches and nothing else in its way. Larger products: see `gemm_blocks`.
//
// Weights are laid out once, at load (`engine/src/kernels/amx.rs`), as AMX B tiles: the output columns
// in blocks of 32, and within a block, for each 32 input columns, two 16 x 64-byte tiles (16
// output columns each) whose row r holds input columns 2r and 2r + 1 of every output column
// (VNNI pairs). A block is contiguous, so a run of blocks is one range of memory.
//
// The product runs on LibTorch's own OpenMP team (GOMP_parallel, looked up at run time), so
// that it adds no threads of its own; where that is missing it runs on the calling thread.
// GCC 12 flags its own AVX-512 intrinsics' `_mm512_undefined_ps` as maybe uninitialized.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <cpuid.h>
#include <dlfcn.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "avx512.h"
#include "omp_team.h"

#define AMX_TARGET __attribute__((target("amx-tile,amx-bf16,amx-int8,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

namespace {

using onehead::at_least;
using onehead::DecodeAttention;
using onehead::exp512;
using onehead::on_team;
using onehead::store_divided;
using onehead::team;

constexpr long kArchReqXcompPerm = 0x1023;
constexpr long kXfeatureXtiledata = 18;
// Bytes ahead of the tile being multiplied that each step asks the L2 cache to fetch. Measured
// over a SantaCoder step's 2.2 GB of weights: 2 KiB (one 32 input column step) gave the best
// rate at 32 rows, 8 KiB and more were 10-25% slower.
constexpr int kPrefetchBytes = 2048;

struct TileConfig {
  uint8_t palette;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

struct Job {
  const uint16_t *x;
  int64_t m, k, n;
  const uint16_t *tiles;
  const float *bias;
  int act;
  uint16_t *y;
  // Products of more than 32 rows: x's rows as A tiles (`pack_rows`).
  uint16_t *a;
  // Products of at most 32 rows: the first column block no thread has taken (`run_share`).
  std::atomic<int64_t> next{0};
};

// The activations of `config::Activation`, as LibTorch defines them: 0 none, 1 GELU (erf),
// 2 GELU (tanh approximation), 3 ReLU.
AMX_TARGET inline __m512 activate(__m512 v, int act) {
  switch (act) {
    case 1: {
      // 0.5 v (1 + erf(v / sqrt 2)); erf by Abramowitz and Stegun 7.1.26 (error below 1.5e-7).
      const __m512 z = _mm512_mul_ps(v, _mm512_set1_ps(0.70710678118654752f));
      const __m512 a = _mm512_abs_ps(z);
      const __m512 t = _mm512_div_ps(_mm512_set1_ps(1.f), _mm512_fmadd_ps(a, _mm512_set1_ps(0.3275911f), _mm512_set1_ps(1.f)));
      __m512 p = _mm512_set1_ps(1.061405429f);
      p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-1.453152027f));
      p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.421413741f));
      p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-0.284496736f));
      p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.254829592f));
      p = _mm512_mul_ps(p, t);
      const __m512 e = exp512(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), a), a));
      __m512 erf_abs = _mm512_fnmadd_ps(p, e, _mm512_set1_ps(1.f));
      const __mmask16 negative = _mm512_cmp_ps_mask(z, _mm512_setzero_ps(), _CMP_LT_OQ);
      const __m512 erf = _mm512_mask_sub_ps(erf_abs, negative, _mm512_setzero_ps(), erf_abs);
      return _mm512_mul_ps(_mm512_mul_ps(v, _mm512_set1_ps(0.5f)), _mm512_add_ps(erf, _mm512_set1_ps(1.f)));
    }
    case 2: {
      // 0.5 v (1 + tanh(u)) = v / (1 + exp(-2u)), u = sqrt(2 / pi) (v + 0.044715 v^3).
      const __m512 v3 = _mm512_mul_ps(_mm512_mul_ps(v, v), v);
      const __m512 u = _mm512_mul_ps(_mm512_fmadd_ps(v3, _mm512_set1_ps(0.044715f), v), _mm512_set1_ps(0.79788456080286536f));
      const __m512 e = exp512(_mm512_mul_ps(u, _mm512_set1_ps(-2.f)));
      return _mm512_div_ps(v, _mm512_add_ps(e, _mm512_set1_ps(1.f)));
    }
    case 3:
      return _mm512_max_ps(v, _mm512_setzero_ps());
    default:
      return v;
  }
}

// Tile t as rows[t] rows of 64 bytes (none where 0).
AMX_TARGET void configure_tiles(const int (&rows)[8]) {
  TileConfig config{};
  config.palette = 1;
  for (int t = 0; t < 8; t++) {
    config.rows[t] = static_cast<uint8_t>(rows[t]);
    config.colsb[t] = rows[t] > 0 ? 64 : 0;
  }
  _tile_loadconfig(&config);
}

// All 8 tiles as 16 rows of 64 bytes.
AMX_TARGET void configure_full_tiles() { configure_tiles({16, 16, 16, 16, 16, 16, 16, 16}); }

// `rows` rows of one 32-column block `c` (f32, row stride 32) plus bias, activated, rounded to
// bf16 into `y` (row stride `job.n`) at column `col`; columns past `job.n` are dropped.
AMX_TARGET void store_block(const Job &job, const float *c, int64_t rows, uint16_t *y, int64_t col) {
  for (int half = 0; half < 2; half++) {
    const int64_t first = col + 16 * half;
    if (first >= job.n) break;
    const int64_t valid = job.n - first < 16 ? job.n - first : 16;
    const __mmask16 mask = static_cast<__mmask16>((1u << valid) - 1);
    const __m512 bias = job.bias ? _mm512_maskz_loadu_ps(mask, job.bias + first) : _mm512_setzero_ps();
    for (int64_t r = 0; r < rows; r++) {
      const __m512 v = activate(_mm512_add_ps(_mm512_load_ps(c + r * 32 + 16 * half), bias), job.act);
      const __m256i out = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v));
      _mm256_mask_storeu_epi16(y + r * job.n + first, mask, out);
    }
  }
}

// Column blocks [first_block, end_block) of a product of at most 32 rows, on tiles configured
// by `run_share`.
AMX_TARGET void run_blocks(const Job &job, int64_t first_block, int64_t end_block) {
  const int64_t rows1 = job.m - 16;
  alignas(64) float c[32 * 32];
  const int64_t k_steps = job.k / 32;
  const int64_t x_stride = job.k * 2;
  for (int64_t block = first_block; block < end_block; block++) {
    const char *w = reinterpret_cast<const char *>(job.tiles) + block * k_steps * 2048;
    _tile_zero(4);
    _tile_zero(5);
    if (rows1 > 0) {
      _tile_zero(6);
      _tile_zero(7);
    }
    for (int64_t s = 0; s < k_steps; s++) {
      const char *b = w + s * 2048;
      for (int line = 0; line < 2048; line += 64) _mm_prefetch(b + kPrefetchBytes + line, _MM_HINT_T1);
      _tile_loadd(2, b, 64);
      _tile_loadd(3, b + 1024, 64);
      _tile_loadd(0, job.x + s * 32, x_stride);
      _tile_dpbf16ps(4, 0, 2);
      _tile_dpbf16ps(5, 0, 3);
      if (rows1 > 0) {
        _tile_loadd(1, job.x + 16 * job.k + s * 32, x_stride);
        _tile_dpbf16ps(6, 1, 2);
        _tile_dpbf16ps(7, 1, 3);
      }
    }
    _tile_stored(4, c, 128);
    _tile_stored(5, c + 16, 128);
    if (rows1 > 0) {
      _tile_stored(6, c + 16 * 32, 128);
      _tile_stored(7, c + 16 * 32 + 16, 128);
    }
    store_block(job, c, job.m, job.y, block * 32);
  }
}

// The threads take the column blocks (of 32) in runs, each run a share of the blocks left (at
// least one), so that a thread whose core or memory is slower at the moment takes fewer, and the
// last runs are short. Halves fixed in advance left one thread waiting for the other at the end
// of most products: a profile of batch-32 decode steps (2 cores) found one thread 35% longer in
// its half than the other. `job.next` is the first block no thread has taken.
template <typename J>
void take_runs(J &job, void (*blocks)(const J &, int64_t, int64_t)) {
  // Each run takes 1 / parts of the blocks left.
  const int64_t count = (job.n + 31) / 32, parts = 2 * team().threads;
  int64_t first = job.next.load(std::memory_order_relaxed);
  while (first < count) {
    const int64_t left = count - first, run = left / parts > 1 ? left / parts : 1;
    if (job.next.compare_exchange_weak(first, first + run, std::memory_order_relaxed)) {
      blocks(job, first, first + run);
      first = job.next.load(std::memory_order_relaxed);
    }
  }
}

AMX_TARGET void run_share(void *data) {
  Job &job = *static_cast<Job *>(data);
  const int rows0 = job.m < 16 ? static_cast<int>(job.m) : 16;
  const int rows1 = job.m > 16 ? static_cast<int>(job.m) - 16 : 0;
  // Tiles: 0, 1 rows 0-15 and 16-31 of x; 2, 3 the weight's two 16-column tiles; 4-7 the sums
  // (4: x0 w0, 5: x0 w1, 6: x1 w0, 7: x1 w1).
  configure_tiles({rows0, rows1, 16, 16, rows0, rows0, rows1, rows1});
  take_runs(job, run_blocks);
  _tile_release();
}

// Products of more than 32 rows (prefill). x is first laid out as A tiles, 32 rows at a time:
// for each 32 input columns, rows 0-15 then 16-31, 1 KiB each, so that a tile is one
// contiguous read (x's own rows lie a multiple of 4 KiB apart and would share cache sets).
// Each thread then takes a range of 32-row blocks (or of 32-column blocks where there are too
// few row blocks to share) and runs 2 x 2 tiles of products over it: input columns in chunks
// whose A tiles fit in half of a 2 MiB L2 cache, so they are read from there while each weight
// block streams past once, with the next block prefetched into L2 during the current one.
// Sums carried between chunks are kept for at most 64 column blocks at a time.
constexpr int64_t kChunkBytes = 1 << 20;
constexpr int64_t kGroupBlocks = 64;

AMX_TARGET void pack_rows(void *data) {
  const Job &job = *static_cast<const Job *>(data);
  const auto [threads, me] = team();
  const int64_t k_steps = job.k / 32, blocks = (job.m + 31) / 32;
  for (int64_t block = me; block < blocks; block += threads) {
    for (int64_t r = 0; r < 32; r++) {
      const int64_t row = block * 32 + r;
      uint16_t *out = job.a + block * k_steps * 1024 + r * 32;
      for (int64_t s = 0; s < k_steps; s++) {
        const __m512i v = row < job.m ? _mm512_loadu_si512(job.x + row * job.k + s * 32) : _mm512_setzero_si512();
        _mm512_store_si512(out + s * 1024, v);
      }
    }
  }
}

// Row blocks [m0, m1) by column blocks [n0, n1).
AMX_TARGET void gemm_blocks(const Job &job, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  configure_full_tiles();
  const int64_t k_steps = job.k / 32, rows = m1 - m0;
  int64_t chunk = kChunkBytes / (rows * 2048);
  chunk = chunk < 1 ? 1 : chunk > k_steps ? k_steps : chunk;
  // Sums carried from one chunk to the next, per (row block, column block of the group).
  thread_local std::vector<float> carried;
  float *sums = chunk < k_steps ? at_least(carried, static_cast<size_t>(rows * kGroupBlocks * 1024)) : nullptr;
  // Bytes of the next weight block to prefetch per step, spread over the row blocks.
  const int64_t per_step = ((2048 + rows - 1) / rows + 63) / 64 * 64;
  alignas(64) float c[32 * 32];
  for (int64_t g0 = n0; g0 < n1; g0 += kGroupBlocks) {
    const int64_t g1 = g0 + kGroupBlocks < n1 ? g0 + kGroupBlocks : n1;
    for (int64_t s0 = 0; s0 < k_steps; s0 += chunk) {
      const int64_t s1 = s0 + chunk < k_steps ? s0 + chunk : k_steps;
      const int64_t ahead = (s1 - s0) * 2048;
      for (int64_t nb = g0; nb < g1; nb++) {
        const char *w = reinterpret_cast<const char *>(job.tiles) + nb * k_steps * 2048;
        const char *next = nb + 1 < g1 ? w + (k_steps + s0) * 2048 : nullptr;
        for (int64_t mb = m0; mb < m1; mb++) {
          const char *a = reinterpret_cast<const char *>(job.a + mb * k_steps * 1024);
          float *carry = sums ? sums + ((mb - m0) * kGroupBlocks + nb - g0) * 1024 : nullptr;
          if (s0 == 0) {
            _tile_zero(4);
            _tile_zero(5);
            _tile_zero(6);
            _tile_zero(7);
          } else {
            _tile_loadd(4, carry, 128);
            _tile_loadd(5, carry + 16, 128);
            _tile_loadd(6, carry + 512, 128);
            _tile_loadd(7, carry + 528, 128);
          }
          int64_t fetched = (mb - m0) * (s1 - s0) * per_step;
          for (int64_t s = s0; s < s1; s++, fetched += per_step) {
            if (next) {
              for (int64_t line = fetched; line < fetched + per_step && line < ahead; line += 64) {
                _mm_prefetch(next + line, _MM_HINT_T1);
              }
            }
            const char *pa = a + s * 2048, *pb = w + s * 2048;
            _tile_loadd(0, pa, 64);
            _tile_loadd(2, pb, 64);
            _tile_dpbf16ps(4, 0, 2);
            _tile_loadd(3, pb + 1024, 64);
            _tile_dpbf16ps(5, 0, 3);
            _tile_loadd(1, pa + 1024, 64);
            _tile_dpbf16ps(6, 1, 2);
            _tile_dpbf16ps(7, 1, 3);
          }
          float *out = s1 < k_steps ? carry : c;
          _tile_stored(4, out, 128);
          _tile_stored(5, out + 16, 128);
          _tile_stored(6, out + 512, 128);
          _tile_stored(7, out + 528, 128);
          if (s1 == k_steps) {
            const int64_t valid = job.m - mb * 32 < 32 ? job.m - mb * 32 : 32;
            store_block(job, c, valid, job.y + mb * 32 * job.n, nb * 32);
          }
        }
      }
    }
  }
  _tile_release();
}

AMX_TARGET void gemm_share(void *data) {
  const Job &job = *static_cast<const Job *>(data);
  const auto [threads, me] = team();
  const int64_t row_blocks = (job.m + 31) / 32, col_blocks = (job.n + 31) / 32;
  if (row_blocks >= 2 * threads) {
    gemm_blocks(job, row_blocks * me / threads, row_blocks * (me + 1) / threads, 0, col_blocks);
  } else {
    gemm_blocks(job, 0, row_blocks, col_blocks * me / threads, col_blocks * (me + 1) / threads);
  }
}

// int8 products on AMX (`--quantize int8`): y (m, n) = (x_q (m, k) @ Q^T) * x_scale * w_scale,
// each row of x quantized to int8 by its own scale (max |x_row| / 127), Q int8 with a scale per
// output column, the sums exact in int32 (TDPBSSD), so a row's result does not depend on its
// batch. The weights are laid out once as int8 B tiles (`engine/src/kernels/int8.rs`): output
// columns in blocks of 32, and within a block, for each 64 input columns, two 16 x 64-byte tiles
// (16 output columns each) whose row r holds input columns 4r .. 4r + 3 of every output column.
// Nothing is widened: each column block streams from memory once, as the bf16 tiles above do,
// and meets every row of x, 32 at a time, while it is in cache.
struct Int8Job {
  int8_t *xq;  // (m, k), and zero rows up to a multiple of 32 where m > 32
  float *x_scales;
  int64_t m, k, n;
  const int8_t *tiles;
  const float *w_scales;
  const float *bias;  // (n) or null
  int act;            // as `activate`
  void *y;            // (m, n), f32 or bf16
  bool f32_out;
  const void *x;  // (m, k), f32 or bf16 (as `f32_out`), quantized by `quantize_share`
  std::atomic<int64_t> next{0};
};

// 16 values of x from `at` on, as f32.
AMX_TARGET inline __m512 load_x(const Int8Job &job, int64_t at) {
  if (job.f32_out) return _mm512_loadu_ps(static_cast<const float *>(job.x) + at);
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(static_cast<const uint16_t *>(job.x) + at));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// Rows of x to int8, each by its own scale: max |row| / 127 (1 for a row of zeros), the row
// divided by it and rounded to nearest even, as `quantize_rows` in `int8.rs` does.
AMX_TARGET void quantize_row(const Int8Job &job, int64_t row) {
  const int64_t k = job.k;
  __m512 amax = _mm512_setzero_ps();
  for (int64_t c = 0; c < k; c += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(load_x(job, row * k + c)));
  const float largest = _mm512_reduce_max_ps(amax);
  const float scale = largest > 0.0f ? largest / 127.0f : 1.0f;
  job.x_scales[row] = scale;
  const __m512 s = _mm512_set1_ps(scale), lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f);
  int8_t *out = job.xq + row * k;
  for (int64_t c = 0; c < k; c += 16) {
    const __m512 v = _mm512_min_ps(_mm512_max_ps(_mm512_div_ps(load_x(job, row * k + c), s), lo), hi);
    _mm_storeu_si128(reinterpret_cast<__m128i *>(out + c), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(v)));
  }
}

AMX_TARGET void quantize_share(void *data) {
  const Int8Job &job = *static_cast<const Int8Job *>(data);
  const auto [threads, me] = team();
  for (int64_t row = job.m * me / threads; row < job.m * (me + 1) / threads; row++) quantize_row(job, row);
}

// Rows row0 .. row0 + rows of the int32 sums `c` (row stride 32) of column block `col`, scaled
// by their row's and column's scales, plus bias, activated, into y; columns past `job.n` are
// dropped.
AMX_TARGET void store_int8_block(const Int8Job &job, const int32_t *c, int64_t row0, int64_t rows, int64_t col) {
  for (int half = 0; half < 2; half++) {
    const int64_t first = col + 16 * half;
    if (first >= job.n) break;
    const int64_t valid = job.n - first < 16 ? job.n - first : 16;
    const __mmask16 mask = static_cast<__mmask16>((1u << valid) - 1);
    const __m512 ws = _mm512_maskz_loadu_ps(mask, job.w_scales + first);
    const __m512 bias = job.bias ? _mm512_maskz_loadu_ps(mask, job.bias + first) : _mm512_setzero_ps();
    for (int64_t r = 0; r < rows; r++) {
      const __m512 sums = _mm512_cvtepi32_ps(_mm512_load_si512(c + r * 32 + 16 * half));
      __m512 v = _mm512_mul_ps(_mm512_mul_ps(sums, _mm512_set1_ps(job.x_scales[row0 + r])), ws);
      if (job.bias || job.act) v = activate(_mm512_add_ps(v, bias), job.act);
      const int64_t at = (row0 + r) * job.n + first;
      if (job.f32_out) {
        _mm512_mask_storeu_ps(static_cast<float *>(job.y) + at, mask, v);
      } else {
        _mm256_mask_storeu_epi16(static_cast<uint16_t *>(job.y) + at, mask, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
      }
    }
  }
}

// Column blocks [first_block, end_block), every row, on tiles configured by `int8_share`.
AMX_TARGET void int8_blocks(const Int8Job &job, int64_t first_block, int64_t end_block) {
  const int64_t k_steps = job.k / 64, groups = job.m <= 32 ? 1 : (job.m + 31) / 32;
  const bool two = job.m > 16;
  alignas(64) int32_t c[32 * 32];
  for (int64_t block = first_block; block < end_block; block++) {
    const char *w = reinterpret_cast<const char *>(job.tiles) + block * k_steps * 2048;
    for (int64_t g = 0; g < groups; g++) {
      const int8_t *a = job.xq + g * 32 * job.k;
      _tile_zero(4);
      _tile_zero(5);
      if (two) {
        _tile_zero(6);
        _tile_zero(7);
      }
      for (int64_t s = 0; s < k_steps; s++) {
        const char *b = w + s * 2048;
        if (g == 0) {
          for (int line = 0; line < 2048; line += 64) _mm_prefetch(b + kPrefetchBytes + line, _MM_HINT_T1);
        }
        _tile_loadd(2, b, 64);
        _tile_loadd(3, b + 1024, 64);
        _tile_loadd(0, a + s * 64, job.k);
        _tile_dpbssd(4, 0, 2);
        _tile_dpbssd(5, 0, 3);
        if (two) {
          _tile_loadd(1, a + 16 * job.k + s * 64, job.k);
          _tile_dpbssd(6, 1, 2);
          _tile_dpbssd(7, 1, 3);
        }
      }
      _tile_stored(4, c, 128);
      _tile_stored(5, c + 16, 128);
      if (two) {
        _tile_stored(6, c + 16 * 32, 128);
        _tile_stored(7, c + 16 * 32 + 16, 128);
      }
      const int64_t rows = job.m - g * 32 < 32 ? job.m - g * 32 : 32;
      store_int8_block(job, c, g * 32, rows, block * 32);
    }
  }
}

// As `run_share`: runs of column blocks (`take_runs`). Up to 32 rows the tiles hold exactly the
// rows there are; more are taken 32 at a time (x padded with zero rows).
AMX_TARGET void int8_share(void *data) {
  Int8Job &job = *static_cast<Int8Job *>(data);
  const int rows0 = job.m < 16 ? static_cast<int>(job.m) : 16;
  const int rows1 = job.m > 32 ? 16 : job.m > 16 ? static_cast<int>(job.m) - 16 : 0;
  configure_tiles({rows0, rows1, 16, 16, rows0, rows0, rows1, rows1});
  take_runs(job, int8_blocks);
  _tile_release();
}

// Decode attention (one new query token per sequence) over keys and values read in place from
// the KV pool, for the query heads that share one K/V head:
//   S^T (keys x queries) = K Q^T on AMX: K's rows are tiles straight from the pool, Q^T is laid
//     out once per sequence and head as VNNI pairs (1 KiB per 32 of head_dim);
//   softmax down each column in f32 (the queries are the 16 lanes of a vector), its
//     exponentials rounded to bf16 into P (queries x keys) by scattering pairs of keys;
//   O = P V on AMX, with V laid out as VNNI pairs of keys, then divided by each query's sum.
// As LibTorch's fused CPU attention: products in bf16 with f32 sums, softmax in f32, the
// exponentials in bf16 for the second product, the division at the end (`DecodeAttention`).

// A thread's scratch, grown as needed and kept between calls.
struct Scratch {
  std::vector<uint16_t> k_tail, q_t, p, v_pairs;
  std::vector<float> s, o;
};

// Rows t, t + 1 of V (`d` wide, zero past `len`) as VNNI pairs: row `pair` of each 16-column
// tile of block `out` (d / 16 tiles of 16 x 32 bf16).
AMX_TARGET inline void pair_rows(const uint16_t *v, int64_t t, int64_t len, int64_t d, int64_t pair, uint16_t *out) {
  alignas(64) static const uint16_t lo_idx[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                                  8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  alignas(64) static const uint16_t hi_idx[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
                                                  24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
  const __m512i lo = _mm512_load_si512(lo_idx), hi = _mm512_load_si512(hi_idx);
  for (int64_t c = 0; c < d; c += 32) {
    const __m512i a = t < len ? _mm512_loadu_si512(v + t * d + c) : _mm512_setzero_si512();
    const __m512i b = t + 1 < len ? _mm512_loadu_si512(v + (t + 1) * d + c) : _mm512_setzero_si512();
    _mm512_store_si512(out + (c / 16) * 512 + pair * 32, _mm512_permutex2var_epi16(a, lo, b));
    _mm512_store_si512(out + (c / 16 + 1) * 512 + pair * 32, _mm512_permutex2var_epi16(a, hi, b));
  }
}

// One sequence `i` and K/V head `h`: all its query heads, 16 at a time.
AMX_TARGET void attend_one(const DecodeAttention &job, Scratch &scratch, int64_t i, int64_t h) {
  const int64_t d = job.d, len = job.lens[i], padded = (len + 31) / 32 * 32, blocks = padded / 32;
  const int64_t *starts = job.block_starts + job.first_block[i];
  const uint16_t *k = job.k + h * job.capacity * d;
  const uint16_t *v = job.v + h * job.capacity * d;
  // The last block of 32 keys, zero past `len`, when the sequence ends inside it.
  uint16_t *k_tail = at_least(scratch.k_tail, 32 * d);
  if (padded != len) {
    const int64_t first = padded - 32;
    std::memset(k_tail, 0, 32 * d * 2);
    std::memcpy(k_tail, k + starts[blocks - 1] * d, (len - first) * d * 2);
  }
  uint16_t *v_pairs = at_least(scratch.v_pairs, padded * d);
  for (int64_t block = 0; block < blocks; block++) {
    const uint16_t *vb = v + starts[block] * d;
    for (int64_t pair = 0; pair < 16; pair++) pair_rows(vb, 2 * pair, len - block * 32, d, pair, v_pairs + block * 32 * d);
  }
  uint16_t *q_t = at_least(scratch.q_t, 16 * d);
  float *s = at_least(scratch.s, padded * 16);
  uint16_t *p = at_least(scratch.p, padded * 16);
  float *o = at_least(scratch.o, 16 * d);
  const int64_t n_heads = job.n_kv_heads * job.group;
  // Lane i: the byte offset of row i of a tile (64 bytes a row), where the scatters below go.
  const __m512i rows = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                          _mm512_set1_epi32(64));
  for (int64_t first_query = 0; first_query < job.group; first_query += 16) {
    const int64_t queries = job.group - first_query < 16 ? job.group - first_query : 16;
    const uint16_t *q = job.q + (i * n_heads + h * job.group + first_query) * d;
    // Q^T as VNNI pairs: tile s, row r, column g holds (q[g][32 s + 2 r], q[g][32 s + 2 r + 1]).
    std::memset(q_t, 0, 16 * d * 2);
    for (int64_t g = 0; g < queries; g++) {
      for (int64_t step = 0; step < d / 32; step++) {
        const __m512i pairs = _mm512_loadu_si512(q + g * d + step * 32);
        _mm512_i32scatter_epi32(q_t + step * 512 + g * 2, rows, pairs, 1);
      }
    }
    // S^T, 32 keys at a time: tiles 0 and 1 keys, 2 Q^T, 3 and 4 the sums.
    for (int64_t block = 0; block < blocks; block++) {
      const uint16_t *kb = block * 32 + 32 <= len ? k + starts[block] * d : k_tail;
      _tile_zero(3);
      _tile_zero(4);
      for (int64_t step = 0; step < d / 32; step++) {
        _tile_loadd(2, q_t + step * 512, 64);
        _tile_loadd(0, kb + step * 32, d * 2);
        _tile_loadd(1, kb + 16 * d + step * 32, d * 2);
        _tile_dpbf16ps(3, 0, 2);
        _tile_dpbf16ps(4, 1, 2);
      }
      _tile_stored(3, s + block * 512, 64);
      _tile_stored(4, s + block * 512 + 256, 64);
    }
    // Softmax down the columns; P gets the exponentials of keys t and t + 1 as one pair per
    // query, scattered to row g of P's block.
    __m512 max = _mm512_set1_ps(-INFINITY);
    for (int64_t t = 0; t < len; t++) max = _mm512_max_ps(max, _mm512_load_ps(s + t * 16));
    const __m512 scale = _mm512_set1_ps(job.scale);
    const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22,
                                                6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t t = 0; t < padded; t += 2) {
      const __m512 e0 = t < len ? exp512(_mm512_mul_ps(_mm512_sub_ps(_mm512_load_ps(s + t * 16), max), scale))
                                : _mm512_setzero_ps();
      const __m512 e1 = t + 1 < len
                            ? exp512(_mm512_mul_ps(_mm512_sub_ps(_mm512_load_ps(s + (t + 1) * 16), max), scale))
                            : _mm512_setzero_ps();
      sum = _mm512_add_ps(sum, _mm512_add_ps(e0, e1));
      const __m512i both = _mm512_permutexvar_epi16(interleave, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(e1, e0)));
      _mm512_i32scatter_epi32(p + (t / 32) * 512 + (t % 32), rows, both, 1);
    }
    // O = P V, up to 64 columns at a time: tile 0 P, 1 V, 4-7 the sums.
    for (int64_t col = 0; col < d; col += 64) {
      const int tiles = d - col >= 64 ? 4 : static_cast<int>((d - col) / 16);
      _tile_zero(4);
      _tile_zero(5);
      _tile_zero(6);
      _tile_zero(7);
      for (int64_t block = 0; block < blocks; block++) {
        const uint16_t *vb = v_pairs + block * 32 * d + (col / 16) * 512;
        _tile_loadd(0, p + block * 512, 64);
        _tile_loadd(1, vb, 64);
        _tile_dpbf16ps(4, 0, 1);
        _tile_loadd(1, vb + 512, 64);
        _tile_dpbf16ps(5, 0, 1);
        if (tiles > 2) {
          _tile_loadd(1, vb + 1024, 64);
          _tile_dpbf16ps(6, 0, 1);
          _tile_loadd(1, vb + 1536, 64);
          _tile_dpbf16ps(7, 0, 1);
        }
      }
      _tile_stored(4, o + col, d * 4);
      _tile_stored(5, o + col + 16, d * 4);
      if (tiles > 2) {
        _tile_stored(6, o + col + 32, d * 4);
        _tile_stored(7, o + col + 48, d * 4);
      }
    }
    alignas(64) float inverse[16];
    _mm512_store_ps(inverse, _mm512_div_ps(_mm512_set1_ps(1.f), sum));
    store_divided(o, inverse, queries, d, job.y + (i * n_heads + h * job.group + first_query) * d);
  }
}

AMX_TARGET void attend_share(void *data) {
  DecodeAttention &job = *static_cast<DecodeAttention *>(data);
  thread_local Scratch scratch;
  configure_full_tiles();
  const int64_t items = job.n * job.n_kv_heads;
  for (int64_t item = job.next.fetch_add(1); item < items; item = job.next.fetch_add(1)) {
    attend_one(job, scratch, item / job.n_kv_heads, item % job.n_kv_heads);
  }
  _tile_release();
}

}  // namespace

extern "C" {

// 1 when this CPU has AMX with bf16 and the kernel granted this process its tile state.
int onehead_amx_available() {
  static const int available = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
    const bool amx = ((d >> 22) & 1) && ((d >> 24) & 1);  // AMX-BF16, AMX-TILE
    const bool avx512 = ((b >> 16) & 1) && ((b >> 30) & 1) && ((b >> 31) & 1) && ((b >> 17) & 1);  // F, BW, VL, DQ
    if (!amx || !avx512 || !__get_cpuid_count(7, 1, &a, &b, &c, &d) || !((a >> 5) & 1)) return 0;  // AVX512-BF16
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0 ? 1 : 0;
  }();
  return available;
}

// y (m, n) = act(x (m, k) @ W^T + bias), bf16, `tiles` W laid out as above (n rounded up to 32
// columns, k a multiple of 32), `bias` f32 (n) or null, `act` as `activate`, m >= 1.
// The caller has checked `onehead_amx_available` and the sizes.
void onehead_amx_linear(const uint16_t *x, int64_t m, int64_t k, const uint16_t *tiles, int64_t n,
                        const float *bias, int act, uint16_t *y) {
  Job job{x, m, k, n, tiles, bias, act, y, nullptr};
  if (m <= 32) {
    on_team(run_share, &job);
    return;
  }
  thread_local std::vector<uint16_t> packed;
  job.a = at_least(packed, static_cast<size_t>((m + 31) / 32 * 32 * k));
  on_team(pack_rows, &job);
  on_team(gemm_share, &job);
}

// 1 when `onehead_amx_available` and this CPU has AMX-INT8 too.
int onehead_amx_int8_available() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  return onehead_amx_available() && __get_cpuid_count(7, 0, &a, &b, &c, &d) && ((d >> 25) & 1) ? 1 : 0;
}

// y (m, n) = act((x (m, k) quantized per row @ Q^T) * scales + bias), as `Int8Job` says: x and
// y f32 when `f32` else bf16, `tiles` Q laid out as int8 tiles (n rounded up to 32, k a multiple
// of 64), `scales` f32 (n), `bias` f32 (n) or null, `act` as `activate`, m >= 1. The caller has
// checked `onehead_amx_int8_available` and the sizes.
void onehead_amx_int8_linear(const void *x, int64_t m, int64_t k, const int8_t *tiles, const float *scales,
                             int64_t n, const float *bias, int act, void *y, int f32) {
  thread_local std::vector<int8_t> quantized;
  thread_local std::vector<float> x_scales;
  const int64_t padded = m <= 32 ? m : (m + 31) / 32 * 32;
  int8_t *xq = at_least(quantized, static_cast<size_t>(padded * k));
  std::memset(xq + m * k, 0, static_cast<size_t>((padded - m) * k));
  Int8Job job{xq, at_least(x_scales, static_cast<size_t>(m)), m, k, n, tiles, scales, bias, act, y, f32 != 0, x};
  on_team(quantize_share, &job, m * k >= (1 << 16));
  on_team(int8_share, &job);
}

// Decode attention, as `DecodeAttention` (avx512.h) says; d a multiple of 32, lens at least 1.
// The caller has checked `onehead_amx_available` and that every block lies inside the pool.
void onehead_amx_decode_attention(const uint16_t *q, const uint16_t *k, const uint16_t *v, int64_t capacity,
                                  int64_t n_kv_heads, int64_t group, int64_t d, const int64_t *block_starts,
                                  const int64_t *first_block, const int64_t *lens, int64_t n, float scale,
                                  uint16_t *y) {
  DecodeAttention job{q, k, v, capacity, n_kv_heads, group, d, block_starts, first_block, lens, n, scale, y};
  on_team(attend_share, &job, n * n_kv_heads > 1);
}

}  // extern "C"
