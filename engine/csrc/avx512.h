// What onehead's AVX-512 kernels share (amx.cpp, attention.cpp): grown scratch buffers, a vector
// exp, and the decode attention job that both attention kernels take.
#pragma once

#include <immintrin.h>

#include <atomic>
#include <cstdint>
#include <vector>

#define AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

namespace onehead {

// `buffer` grown to at least `n` elements (kept between calls), from its first cache line.
template <typename T>
T *at_least(std::vector<T> &buffer, size_t n) {
  // 64 elements of slack, so that the start can be rounded up to a cache line.
  if (buffer.size() < n + 64) buffer.resize(n + 64);
  auto address = reinterpret_cast<uintptr_t>(buffer.data());
  return reinterpret_cast<T *>((address + 63) & ~uintptr_t{63});
}

AVX512_TARGET inline __m512 exp512(__m512 x) {
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

// y (rows, d) in bf16 = o (rows, d) in f32, row g multiplied by inverse[g]: the attention kernels'
// division of each query's sums by its exponentials' sum. d a multiple of 16.
AVX512_TARGET inline void store_divided(const float *o, const float *inverse, int64_t rows, int64_t d, uint16_t *y) {
  for (int64_t g = 0; g < rows; g++) {
    const __m512 by = _mm512_set1_ps(inverse[g]);
    for (int64_t c = 0; c < d; c += 16) {
      const __m512 out = _mm512_mul_ps(_mm512_loadu_ps(o + g * d + c), by);
      _mm256_storeu_si256(reinterpret_cast<__m256i *>(y + g * d + c), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(out)));
    }
  }
}

// Attention of one new token per sequence over its cached keys and values, read in place from
// one layer of the KV pool (`engine/src/kernels/attention.rs`): `q` (n, n_kv_heads * group, d);
// `k`, `v` (n_kv_heads, capacity, d); `y` like `q`. Sequence i's keys: lens[i] of them, in blocks
// of 32 starting at pool positions block_starts[first_block[i]], block_starts[first_block[i] +
// 1], ... Query heads h * group .. (h + 1) * group read K/V head h. bf16 throughout, as
// LibTorch's fused CPU attention computes it: products with f32 sums, softmax in f32, the
// exponentials rounded to bf16 for the second product, the division at the end.
struct DecodeAttention {
  const uint16_t *q;
  const uint16_t *k, *v;
  int64_t capacity, n_kv_heads, group, d;
  const int64_t *block_starts, *first_block, *lens;
  int64_t n;
  float scale;
  uint16_t *y;
  // The first (sequence, K/V head) item no thread has taken: item = i * n_kv_heads + h.
  std::atomic<int64_t> next{0};
};

}  // namespace onehead
