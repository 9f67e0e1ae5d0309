// Decode-sized bf16 matrix products (at most 32 rows) on Intel AMX, for weights streamed from
// memory once per step. oneDNN's kernels read a streamed weight at about 75% of the bandwidth a
// plain read reaches here, and at 32 rows stall on its tile products; this loop keeps the
// weight stream ahead with software prefetches and nothing else in its way.
//
// Weights are laid out once, at load (`worker/src/amx.rs`), as AMX B tiles: the output columns
// in blocks of 32, and within a block, for each 32 input columns, two 16 x 64-byte tiles (16
// output columns each) whose row r holds input columns 2r and 2r + 1 of every output column
// (VNNI pairs). A block is contiguous, so each thread streams one range of memory.
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

#include <cstdint>
#include <cstring>

#define AMX_TARGET __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

namespace {

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

using GompParallel = void (*)(void (*)(void *), void *, unsigned, unsigned);
using OmpInt = int (*)();

struct Omp {
  GompParallel parallel = nullptr;
  OmpInt thread_num = nullptr;
  OmpInt num_threads = nullptr;
};

const Omp &omp() {
  static const Omp found = [] {
    Omp o;
    o.parallel = reinterpret_cast<GompParallel>(dlsym(RTLD_DEFAULT, "GOMP_parallel"));
    o.thread_num = reinterpret_cast<OmpInt>(dlsym(RTLD_DEFAULT, "omp_get_thread_num"));
    o.num_threads = reinterpret_cast<OmpInt>(dlsym(RTLD_DEFAULT, "omp_get_num_threads"));
    if (!o.parallel || !o.thread_num || !o.num_threads) o = Omp{};
    return o;
  }();
  return found;
}

struct Job {
  const uint16_t *x;
  int64_t m, k, n;
  const uint16_t *tiles;
  const float *bias;
  int act;
  uint16_t *y;
};

AMX_TARGET inline __m512 exp512(__m512 x) {
  // 2^(x log2 e) = 2^n * 2^f, f in [-0.5, 0.5], 2^f by its Taylor polynomial (relative error
  // below 2e-7); scalef applies 2^n and saturates to 0 or infinity.
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.7f)), _mm512_set1_ps(-88.7f));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.69314718055994531f));
  __m512 p = _mm512_set1_ps(1.f / 720);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

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

// Rows `m` of one 32-column block `c` (f32, row stride 32) plus bias, activated, rounded to
// bf16 into `y` (row stride `n`) at column `col`; columns past `n` are dropped.
AMX_TARGET void store_block(const Job &job, const float *c, int64_t col) {
  for (int half = 0; half < 2; half++) {
    const int64_t first = col + 16 * half;
    if (first >= job.n) break;
    const int64_t valid = job.n - first < 16 ? job.n - first : 16;
    const __mmask16 mask = static_cast<__mmask16>((1u << valid) - 1);
    const __m512 bias = job.bias ? _mm512_maskz_loadu_ps(mask, job.bias + first) : _mm512_setzero_ps();
    for (int64_t r = 0; r < job.m; r++) {
      const __m512 v = activate(_mm512_add_ps(_mm512_load_ps(c + r * 32 + 16 * half), bias), job.act);
      const __m256i out = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v));
      _mm256_mask_storeu_epi16(job.y + r * job.n + first, mask, out);
    }
  }
}

AMX_TARGET void run_blocks(const Job &job, int64_t first_block, int64_t end_block) {
  const int rows0 = job.m < 16 ? static_cast<int>(job.m) : 16;
  const int rows1 = job.m > 16 ? static_cast<int>(job.m) - 16 : 0;
  // Tiles: 0, 1 rows 0-15 and 16-31 of x; 2, 3 the weight's two 16-column tiles; 4-7 the sums
  // (4: x0 w0, 5: x0 w1, 6: x1 w0, 7: x1 w1).
  TileConfig config{};
  config.palette = 1;
  const int tile_rows[8] = {rows0, rows1, 16, 16, rows0, rows0, rows1, rows1};
  for (int t = 0; t < 8; t++) {
    config.rows[t] = static_cast<uint8_t>(tile_rows[t]);
    config.colsb[t] = tile_rows[t] > 0 ? 64 : 0;
  }
  _tile_loadconfig(&config);
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
    store_block(job, c, block * 32);
  }
  _tile_release();
}

AMX_TARGET void run_share(void *data) {
  const Job &job = *static_cast<const Job *>(data);
  const Omp &o = omp();
  const int64_t threads = o.parallel ? o.num_threads() : 1;
  const int64_t me = o.parallel ? o.thread_num() : 0;
  const int64_t blocks = (job.n + 31) / 32;
  run_blocks(job, blocks * me / threads, blocks * (me + 1) / threads);
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
// columns, k a multiple of 32), `bias` f32 (n) or null, `act` as `activate`, 1 <= m <= 32.
// The caller has checked `onehead_amx_available` and the sizes.
void onehead_amx_linear(const uint16_t *x, int64_t m, int64_t k, const uint16_t *tiles, int64_t n,
                        const float *bias, int act, uint16_t *y) {
  Job job{x, m, k, n, tiles, bias, act, y};
  const Omp &o = omp();
  if (o.parallel) {
    o.parallel(run_share, &job, 0, 0);
  } else {
    run_share(&job);
  }
}

}  // extern "C"
