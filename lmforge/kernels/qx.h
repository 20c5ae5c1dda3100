// Shared by the quantized GEMVs (int8_gemv.cpp, int4_gemv.cpp): activations as int16 in blocks of 32, and the
// integer dot product of a block of 32 weights (widened to int16) with them; on AVX512-VNNI CPUs the int16 split
// into bytes for vpdpbusd (no widening of the weights, the same exact sums: split_blocks, split_pairs below).
//
// Why: a decode step multiplies every weight once. Converting each weight to fp32 and multiplying in fp32 costs
// more instructions than the weight costs to read. In integers, 16 products and their pairwise sums are one
// instruction (AVX2's vpmaddwd; AVX512-VNNI's vpdpwssd also adds them in), and a block's sum is scaled once.
// llama.cpp does the same with int8 activations (one instruction per 32 products), which moves SmolLM2-135M's
// Q4_1 answer to "What is the capital of France?" from "Paris" to "L'Étoile..."; int16 keeps x to 1 part in
// 65534 of its block's largest value, as close as fp32 for any use here, for one instruction more a block.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include "vec8.h"

#include <cmath>
#include <type_traits>
#include <vector>

namespace lmforge_qx {

using lmforge_vec::hsum;
using lmforge_vec::load8;

// M rows of K activations (K a multiple of 32) as int16 blocks: q (M, K), d and the block's sum of d * q
// (M, K / 32), x' = d * q with d = max |x| / 32767. The sum is of x', so that a product is exactly w . x'.
struct Rows {
  std::vector<int16_t> q;
  std::vector<float> d, sum;
};

// x (M, K) fp32, K a multiple of 32, quantized 32 values at a time in registers (the same rounding as
// std::nearbyint: MXCSR's nearest-even). Held per thread and reused by the next call (a decode step makes ~150 of
// these; no allocation each time).
inline const Rows& quantize(const float* src, int64_t M, int64_t K) {
  thread_local Rows r;
  const int64_t B = K / 32;
  r.q.resize(M * K), r.d.resize(M * B), r.sum.resize(M * B);
  const __m256 sign = _mm256_set1_ps(-0.f);
  for (int64_t i = 0; i < M * B; ++i) {
    const float* v = src + 32 * i;
    const __m256 a0 = _mm256_loadu_ps(v), a1 = _mm256_loadu_ps(v + 8), a2 = _mm256_loadu_ps(v + 16),
                 a3 = _mm256_loadu_ps(v + 24);
    const __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, a0), _mm256_andnot_ps(sign, a1)),
                                   _mm256_max_ps(_mm256_andnot_ps(sign, a2), _mm256_andnot_ps(sign, a3)));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    const float d = _mm_cvtss_f32(h) / 32767.f, inv = d > 0.f ? 1.f / d : 0.f;
    const __m256 vi = _mm256_set1_ps(inv);
    const __m256i q0 = _mm256_cvtps_epi32(_mm256_mul_ps(a0, vi)), q1 = _mm256_cvtps_epi32(_mm256_mul_ps(a1, vi)),
                  q2 = _mm256_cvtps_epi32(_mm256_mul_ps(a2, vi)), q3 = _mm256_cvtps_epi32(_mm256_mul_ps(a3, vi));
    __m256i* out = reinterpret_cast<__m256i*>(r.q.data() + 32 * i);
    _mm256_storeu_si256(out, _mm256_permute4x64_epi64(_mm256_packs_epi32(q0, q1), 0xD8));
    _mm256_storeu_si256(out + 1, _mm256_permute4x64_epi64(_mm256_packs_epi32(q2, q3), 0xD8));
    const __m256i s8 = _mm256_add_epi32(_mm256_add_epi32(q0, q1), _mm256_add_epi32(q2, q3));
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s8), _mm256_extracti128_si256(s8, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
    r.d[i] = d, r.sum[i] = d * static_cast<float>(_mm_cvtsi128_si32(s4));
  }
  return r;
}

// the same of a float32 / bfloat16 / float16 tensor (M, K)
inline const Rows& quantize(const at::Tensor& x) {
  thread_local std::vector<float> xf;
  const at::Tensor xc = x.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1);
  if (xc.scalar_type() == at::kFloat) return quantize(xc.const_data_ptr<float>(), M, K);
  xf.resize(M * K);
  auto copy = [&](auto* p) { for (int64_t i = 0; i < M * K; ++i) xf[i] = static_cast<float>(p[i]); };
  if (xc.scalar_type() == at::kBFloat16) copy(xc.const_data_ptr<c10::BFloat16>());
  else copy(xc.const_data_ptr<c10::Half>());
  return quantize(xf.data(), M, K);
}

#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define LMFORGE_QX_VNNI 1
// With AVX512-VNNI the int16 x is split into bytes, q = 256 * hi + lo (hi signed, lo unsigned), so that a block of
// weights needs no widening: vpdpbusd multiplies 32 bytes by 32 bytes and sums each 4 into an int32 lane, once
// against hi and once against lo, and (256 * hi-sum + lo-sum) is the same exact integer as before.

// The bytes of q in plain block order, for int8 weights: per row m and block b, 32 bytes hi + 128 (unsigned: vpdpbusd
// wants one unsigned side, and int8 weights are signed) then 32 bytes lo.
inline const std::vector<int8_t>& split_blocks(const Rows& r, int64_t M, int64_t K) {
  thread_local std::vector<int8_t> s;
  s.resize(M * K * 2);
  for (int64_t i = 0; i < M * K / 32; ++i) {
    const int16_t* q = r.q.data() + 32 * i;
    int8_t* o = s.data() + 64 * i;
    for (int j = 0; j < 32; ++j) o[j] = static_cast<int8_t>((q[j] >> 8) ^ 0x80), o[32 + j] = static_cast<int8_t>(q[j] & 0xFF);
  }
  return s;
}

// q with each block's values reordered 0 1 4 5 8 9 .. 28 29, 2 3 6 7 .. 30 31: paired so by vpmaddwd, the two
// halves' int32 lanes each sum 4 consecutive values, as vpdpbusd's lanes do
inline const std::vector<int16_t>& lanes(const std::vector<int16_t>& q) {
  thread_local std::vector<int16_t> o;
  o.resize(q.size());
  for (size_t i = 0; i < q.size(); i += 32)
    for (int j = 0; j < 8; ++j)
      o[i + 2 * j] = q[i + 4 * j], o[i + 2 * j + 1] = q[i + 4 * j + 1],
      o[i + 16 + 2 * j] = q[i + 4 * j + 2], o[i + 16 + 2 * j + 1] = q[i + 4 * j + 3];
  return o;
}

// The bytes of q in pairs of blocks, for 4-bit weights: two blocks' 32 packed bytes, read as one 32-byte vector,
// hold in their low nibbles values 0-15 of both blocks and in their high nibbles values 16-31. Per row m and pair
// p (blocks 2p, 2p + 1; a missing last block as zeros): hi of those values in that order (32 bytes: values 0-15
// of both blocks), hi of the values 16-31 (32), then the same of lo (64); and each block's dx four times (8 floats).
struct Pairs {
  std::vector<int8_t> b;
  std::vector<float> d;
};

inline const Pairs& split_pairs(const Rows& r, int64_t M, int64_t K) {
  const int64_t B = K / 32, P = (B + 1) / 2;
  thread_local Pairs s;
  s.b.assign(M * P * 128, 0), s.d.assign(M * P * 8, 0.f);  // (a missing last block: zeros)
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < B; ++b) {
      const int16_t* q = r.q.data() + m * K + 32 * b;
      const int64_t p = m * P + b / 2, half = 16 * (b % 2);
      int8_t* o = s.b.data() + 128 * p;
      for (int j = 0; j < 16; ++j) {
        o[half + j] = static_cast<int8_t>(q[j] >> 8), o[32 + half + j] = static_cast<int8_t>(q[16 + j] >> 8);
        o[64 + half + j] = static_cast<int8_t>(q[j] & 0xFF), o[96 + half + j] = static_cast<int8_t>(q[16 + j] & 0xFF);
      }
      for (int l = 0; l < 4; ++l) s.d[8 * p + 4 * (b % 2) + l] = r.d[m * B + b];
    }
  return s;
}
#endif

// the 32 products w . x of a block, as 8 int32 partial sums: w0, x0 its first 16 values, w1, x1 the rest (int16;
// |w| <= 128 and |x| <= 32767: 32 products stay far inside int32)
inline __m256i dot32(__m256i w0, __m256i w1, const int16_t* x) {
  const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 16));
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpwssd_epi32(_mm256_madd_epi16(w0, x0), w1, x1);
#else
  return _mm256_add_epi32(_mm256_madd_epi16(w0, x0), _mm256_madd_epi16(w1, x1));
#endif
}

// f(std::integral_constant<int, M>()) for 1 <= M <= 8: the row loops are compiled for each number of rows
template <typename F>
void with_rows(int64_t M, const char* name, F&& f) {
  switch (M) {
    case 1: return f(std::integral_constant<int, 1>());
    case 2: return f(std::integral_constant<int, 2>());
    case 3: return f(std::integral_constant<int, 3>());
    case 4: return f(std::integral_constant<int, 4>());
    case 5: return f(std::integral_constant<int, 5>());
    case 6: return f(std::integral_constant<int, 6>());
    case 7: return f(std::integral_constant<int, 7>());
    case 8: return f(std::integral_constant<int, 8>());
    default: TORCH_CHECK(false, name, ": 1 to 8 rows, got ", M);
  }
}

// 2 (or, `one`, 1) block scales as fp32 in the low lanes: the weights' scales and minimums are fp32, or fp16 as
// GGUF files hold them (8 at a time: vec8.h's load8)
inline __m128 load2(const float* p, bool one) {
  return one ? _mm_load_ss(p) : _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(p)));
}
inline __m128 load2(const c10::Half* p, bool one) {
  const uint16_t* h = reinterpret_cast<const uint16_t*>(p);
  return _mm_cvtph_ps(_mm_cvtsi32_si128(one ? h[0] : h[0] | (static_cast<int>(h[1]) << 16)));
}

// out[b] = a[b] * c[b] for b < n (each block's weight scale times its x scale), 8 at a time
template <typename Sc>
inline void scales(const Sc* a, const float* c, float* out, int64_t n) {
  int64_t b = 0;
  for (; b + 8 <= n; b += 8) _mm256_storeu_ps(out + b, _mm256_mul_ps(load8(a + b), _mm256_loadu_ps(c + b)));
  for (; b < n; ++b) out[b] = static_cast<float>(a[b]) * c[b];
}

// sum of a[b] * c[b] for b < n, 8 at a time (off the blocks' dependency chain)
template <typename Sc>
inline float dot(const Sc* a, const float* c, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t b = 0;
  for (; b + 8 <= n; b += 8) acc = _mm256_fmadd_ps(load8(a + b), _mm256_loadu_ps(c + b), acc);
  float s = hsum(acc);
  for (; b < n; ++b) s += static_cast<float>(a[b]) * c[b];
  return s;
}

// f(scale pointer) with the weights' fp32 or fp16 scales (name: the op, for the error)
template <typename F>
void with_scales(const at::Tensor& scale, const char* name, F&& f) {
  if (scale.scalar_type() == at::kFloat) return f(scale.const_data_ptr<float>());
  TORCH_CHECK(scale.scalar_type() == at::kHalf, name, ": scales must be float32 or float16");
  return f(scale.const_data_ptr<c10::Half>());
}

}  // namespace lmforge_qx
