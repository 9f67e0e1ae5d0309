// Decode attention over the KV pool in place on AVX-512 with bf16 dot products (AMD Zen 4 and
// later, Intel Cooper Lake and later), for CPUs without AMX; `DecodeAttention` (avx512.h) says
// what it computes. Each (sequence, K/V head) item walks the sequence's blocks of the pool once
// for its keys and once for its values, so a step reads every cached byte once, whatever the
// number of K/V heads, and copies nothing out of the pool but a block of 32 values at a time
// (widened to f32, in the L1 cache). For each of the item's query heads:
//   S = q K^T, 16 keys at a time: a dot product per key in one vector of f32 sums
//     (`_mm512_dpbf16_ps`, 32 bf16 pairs a step), the 16 vectors summed across lanes into one;
//   softmax along the keys in f32, the exponentials rounded to bf16;
//   O = P V, the widened values multiplied into 64 output columns at a time, then divided by
//     the exponentials' sum.
// The items are shared by LibTorch's OpenMP team, as the AMX kernels do.
// GCC 12 flags its own AVX-512 intrinsics' `_mm512_undefined_*` as (maybe) uninitialized.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "avx512.h"
#include "omp_team.h"

namespace {

using onehead::at_least;
using onehead::DecodeAttention;
using onehead::exp512;
using onehead::store_divided;

// A thread's scratch, grown as needed and kept between calls: the scores and then the
// exponentials (group x keys, rows padded to 16), the output sums (group x d), one block of
// values widened to f32 (32 x d).
struct Scratch {
  std::vector<float> s, o, v;
};

// Lane j of the result: the sum of the 16 lanes of a[j].
AVX512_TARGET inline __m512 sum_lanes(const __m512 (&a)[16]) {
  __m512 b[8], c[4], e[2];
  // Within each 128-bit lane: b[i] holds partial sums of a[2i] (elements 0, 2) and a[2i + 1] (1, 3).
  for (int i = 0; i < 8; i++) {
    b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  }
  // Within each 128-bit lane: element j the partial sum of a[4i + j].
  for (int i = 0; i < 4; i++) {
    c[i] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0x44), _mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0xEE));
  }
  // Across the 128-bit lanes: pairs of lanes added, twice.
  for (int i = 0; i < 2; i++) {
    e[i] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0xDD));
  }
  return _mm512_add_ps(_mm512_shuffle_f32x4(e[0], e[1], 0x88), _mm512_shuffle_f32x4(e[0], e[1], 0xDD));
}

// Scores of query `q` (d bf16) against `keys` (at most 16) consecutive rows of `k` into s[0..16),
// zero past `keys`.
template <bool kFull>
AVX512_TARGET inline void scores16(const uint16_t *q, const uint16_t *k, int64_t keys, int64_t d, float *s) {
  const int64_t n = kFull ? 16 : keys;
  __m512 acc[16];
  for (int j = 0; j < 16; j++) acc[j] = _mm512_setzero_ps();
  for (int64_t c = 0; c < d; c += 32) {
    const __m512bh qc = reinterpret_cast<__m512bh>(_mm512_loadu_si512(q + c));
    for (int64_t j = 0; j < n; j++) {
      acc[j] = _mm512_dpbf16_ps(acc[j], reinterpret_cast<__m512bh>(_mm512_loadu_si512(k + j * d + c)), qc);
    }
  }
  _mm512_storeu_ps(s, sum_lanes(acc));
}

// f32 values rounded to the nearest bf16 (ties to even), kept as f32.
AVX512_TARGET inline __m512 round_to_bf16(__m512 x) {
  const __m256i h = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(x));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// o (columns c .. c + 16 * kVectors of one query) += sum over `keys` rows t of p[t] * v[t].
template <int kVectors>
AVX512_TARGET inline void accumulate(const float *p, const float *v, int64_t keys, int64_t d, float *o) {
  __m512 acc[kVectors];
  for (int x = 0; x < kVectors; x++) acc[x] = _mm512_loadu_ps(o + 16 * x);
  for (int64_t t = 0; t < keys; t++) {
    const __m512 pt = _mm512_set1_ps(p[t]);
    for (int x = 0; x < kVectors; x++) acc[x] = _mm512_fmadd_ps(pt, _mm512_loadu_ps(v + t * d + 16 * x), acc[x]);
  }
  for (int x = 0; x < kVectors; x++) _mm512_storeu_ps(o + 16 * x, acc[x]);
}

// One sequence `i` and K/V head `h`: all its query heads.
AVX512_TARGET void attend_one(const DecodeAttention &job, Scratch &scratch, int64_t i, int64_t h) {
  const int64_t d = job.d, len = job.lens[i], group = job.group, row = (len + 15) / 16 * 16;
  const int64_t *starts = job.block_starts + job.first_block[i];
  const uint16_t *k = job.k + h * job.capacity * d;
  const uint16_t *v = job.v + h * job.capacity * d;
  const uint16_t *q = job.q + (i * job.n_kv_heads + h) * group * d;
  float *s = at_least(scratch.s, static_cast<size_t>(group * row));
  // S: 16 keys at a time (half a block of the pool), for every query of the group while they
  // are in the L1 cache.
  for (int64_t t = 0; t < len; t += 16) {
    const uint16_t *rows = k + (starts[t / 32] + t % 32) * d;
    const int64_t keys = len - t < 16 ? len - t : 16;
    for (int64_t g = 0; g < group; g++) {
      if (keys == 16) {
        scores16<true>(q + g * d, rows, 16, d, s + g * row + t);
      } else {
        scores16<false>(q + g * d, rows, keys, d, s + g * row + t);
      }
    }
  }
  // Softmax of each query's scores; the exponentials, rounded to bf16, replace them.
  float *o = at_least(scratch.o, static_cast<size_t>(group * d + group));
  float *inverse = o + group * d;
  const __m512 scale = _mm512_set1_ps(job.scale);
  const __mmask16 tail = static_cast<__mmask16>((1u << (len - (row - 16))) - 1);
  for (int64_t g = 0; g < group; g++) {
    float *sg = s + g * row;
    __m512 max = _mm512_set1_ps(-INFINITY);
    for (int64_t t = 0; t < row; t += 16) {
      max = _mm512_mask_max_ps(max, t + 16 <= len ? 0xFFFF : tail, max, _mm512_loadu_ps(sg + t));
    }
    const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(max));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t t = 0; t < row; t += 16) {
      const __m512 e = exp512(_mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(sg + t), top), scale));
      const __m512 kept = _mm512_maskz_mov_ps(t + 16 <= len ? 0xFFFF : tail, e);
      sum = _mm512_add_ps(sum, kept);
      _mm512_storeu_ps(sg + t, round_to_bf16(kept));
    }
    inverse[g] = 1.f / _mm512_reduce_add_ps(sum);
  }
  // O = P V, a block of values at a time, widened to f32 once for all queries.
  std::memset(o, 0, group * d * sizeof(float));
  float *vf = at_least(scratch.v, static_cast<size_t>(32 * d));
  for (int64_t t = 0; t < len; t += 32) {
    const uint16_t *block = v + starts[t / 32] * d;
    const int64_t keys = len - t < 32 ? len - t : 32;
    for (int64_t e = 0; e < keys * d; e += 16) {
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(block + e));
      _mm512_storeu_ps(vf + e, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16)));
    }
    for (int64_t g = 0; g < group; g++) {
      const float *p = s + g * row + t;
      int64_t c = 0;
      for (; c + 64 <= d; c += 64) accumulate<4>(p, vf + c, keys, d, o + g * d + c);
      if (c < d) accumulate<2>(p, vf + c, keys, d, o + g * d + c);
    }
  }
  store_divided(o, inverse, group, d, job.y + (i * job.n_kv_heads + h) * group * d);
}

AVX512_TARGET void attend_share(void *data) {
  DecodeAttention &job = *static_cast<DecodeAttention *>(data);
  thread_local Scratch scratch;
  const int64_t items = job.n * job.n_kv_heads;
  for (int64_t item = job.next.fetch_add(1); item < items; item = job.next.fetch_add(1)) {
    attend_one(job, scratch, item / job.n_kv_heads, item % job.n_kv_heads);
  }
}

}  // namespace

extern "C" {

// 1 when this CPU (and the OS) runs AVX-512 F, BW, VL, DQ and BF16.
int onehead_avx512_bf16_available() {
  static const int available = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                               __builtin_cpu_supports("avx512bf16");
  return available;
}

// csrc/amx.cpp's kernel.
void onehead_amx_decode_attention(const uint16_t *q, const uint16_t *k, const uint16_t *v, int64_t capacity,
                                  int64_t n_kv_heads, int64_t group, int64_t d, const int64_t *block_starts,
                                  const int64_t *first_block, const int64_t *lens, int64_t n, float scale,
                                  uint16_t *y);

// Decode attention, as `DecodeAttention` (avx512.h) says, by `kernel`: 0 AMX (csrc/amx.cpp), 1
// AVX-512 BF16 (above); d a multiple of 32, lens at least 1. The caller has checked that this
// CPU runs the kernel and that every block lies inside the pool.
void onehead_decode_attention(int kernel, const uint16_t *q, const uint16_t *k, const uint16_t *v, int64_t capacity,
                              int64_t n_kv_heads, int64_t group, int64_t d, const int64_t *block_starts,
                              const int64_t *first_block, const int64_t *lens, int64_t n, float scale, uint16_t *y) {
  if (kernel == 0) {
    onehead_amx_decode_attention(q, k, v, capacity, n_kv_heads, group, d, block_starts, first_block, lens, n, scale, y);
    return;
  }
  DecodeAttention job{q, k, v, capacity, n_kv_heads, group, d, block_starts, first_block, lens, n, scale, y};
  onehead::on_team(attend_share, &job, n * n_kv_heads > 1);
}

}  // extern "C"
