// y = x w'^T for one to eight rows x (decoding) and 4-bit weights in GGUF's Q4_0 / Q4_1 block layout: each
// block of 32 inputs of a row is 16 bytes (value j in the low nibble of byte j, value j + 16 in its high
// nibble) with a scale d and minimum m (fp32, or fp16 as GGUF files hold them): w' = q * d + m.
//
// Why: a decode step reads every weight once; these weights are 4.5-5 bits each, a seventh of fp32's, so the
// instructions per weight decide the speed. x is quantized to int16 blocks of 32 (qx.h) and each weight block's
// sum is the integer dot q . qx (two or three instructions for 32 products; with VNNI four vpdpbusd for two
// blocks) times d * dx, plus m times the block's sum of the quantized x. Weight rows are split over ATen's own
// thread pool; sums are fp32, rounded once to the output dtype, or kept fp32 with fp32_out (the LM head).
// (The kernel itself; int4_gemv.cpp registers it as an op, decode_step.cpp calls it directly.)
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include "qx.h"

namespace lmforge_int4 {

using namespace lmforge_qx;

// a block's 32 values as int16, in input order: the 16 low nibbles (values 0-15), the 16 high ones (16-31)
inline void nibbles(const uint8_t* w, __m128i low, __m256i& w0, __m256i& w1) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
  w0 = _mm256_cvtepu8_epi16(_mm_and_si128(v, low));
  w1 = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(v, 4), low));
}

// Every row is summed in the same order whatever M is: a row's result does not depend on its batch.
template <typename Out, int M, typename Sc>
void gemv_rows(const uint8_t* W, const Sc* D, const Sc* Mn, const Rows& x, Out* y, int64_t N, int64_t K) {
  const int64_t B = K / 32;  // blocks per row
  const __m128i low = _mm_set1_epi8(0x0F);
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> ds(M * B);  // each block's d times each x row's dx
    for (int64_t r = begin; r < end; ++r) {
      const uint8_t* w = W + r * (K / 2);
      __m256 even[M], odd[M];  // two chains of multiply-adds: even and odd blocks
      float bias[M];  // the minimums' part: sum over blocks of m * sum(x')
      for (int m = 0; m < M; ++m) {
        even[m] = odd[m] = _mm256_setzero_ps();
        scales(D + r * B, x.d.data() + m * B, ds.data() + m * B, B);
        bias[m] = dot(Mn + r * B, x.sum.data() + m * B, B);
      }
      auto block = [&](int64_t b, __m256* acc) {
        // (no software prefetch: the stream is sequential)
        __m256i w0, w1;
        nibbles(w + 16 * b, low, w0, w1);
        for (int m = 0; m < M; ++m) {
          const __m256 s = _mm256_cvtepi32_ps(dot32(w0, w1, x.q.data() + m * K + 32 * b));
          acc[m] = _mm256_fmadd_ps(s, _mm256_broadcast_ss(ds.data() + m * B + b), acc[m]);
        }
      };
      int64_t b = 0;
      for (; b + 1 < B; b += 2) block(b, even), block(b + 1, odd);
      if (b < B) block(b, even);
      for (int m = 0; m < M; ++m) y[m * N + r] = static_cast<Out>(hsum(_mm256_add_ps(even[m], odd[m])) + bias[m]);
    }
  });
}

#ifdef LMFORGE_QX_VNNI
// The same sums with AVX512-VNNI, two blocks at a time: their 32 packed bytes as one vector, masked to the low
// nibbles (values 0-15 of both) and shifted to the high ones (16-31), each multiplied by the x bytes laid out in
// that order (qx.h's split_pairs): four vpdpbusd and a shift give both blocks' exact integer sums, lanes 0-3 the
// first block's, 4-7 the second's; then one conversion and one multiply-add with the two blocks' scales.
template <typename Out, int M, typename Sc>
void gemv_pairs(const uint8_t* W, const Sc* D, const Sc* Mn, const Rows& x, Out* y, int64_t N, int64_t K) {
  const int64_t B = K / 32, P = (B + 1) / 2;
  const Pairs& xp = split_pairs(x, M, K);
  const __m256i low = _mm256_set1_epi8(0x0F);
  const __m256i spread = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const uint8_t* w = W + r * (K / 2);
      const Sc* d = D + r * B;
      __m256 even[M], odd[M];
      float bias[M];
      for (int m = 0; m < M; ++m) {
        even[m] = odd[m] = _mm256_setzero_ps();
        bias[m] = dot(Mn + r * B, x.sum.data() + m * B, B);
      }
      auto pair = [&](int64_t p, __m256* acc) {
        const bool whole = 2 * p + 1 < B;
        const __m256i v = whole ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32 * p))
                                : _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 32 * p)));
        const __m256i lo4 = _mm256_and_si256(v, low), hi4 = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
        const __m256 dw = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(load2(d + 2 * p, !whole)), spread);
        for (int m = 0; m < M; ++m) {
          const __m256i* xb = reinterpret_cast<const __m256i*>(xp.b.data() + 128 * (m * P + p));
          __m256i h = _mm256_dpbusd_epi32(_mm256_setzero_si256(), lo4, _mm256_loadu_si256(xb));
          h = _mm256_dpbusd_epi32(h, hi4, _mm256_loadu_si256(xb + 1));
          __m256i s = _mm256_dpbusd_epi32(_mm256_slli_epi32(h, 8), _mm256_loadu_si256(xb + 2), lo4);
          s = _mm256_dpbusd_epi32(s, _mm256_loadu_si256(xb + 3), hi4);
          const __m256 scale = _mm256_mul_ps(dw, _mm256_loadu_ps(xp.d.data() + 8 * (m * P + p)));
          acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), scale, acc[m]);
        }
      };
      int64_t p = 0;
      for (; p + 1 < P; p += 2) pair(p, even), pair(p + 1, odd);
      if (p < P) pair(p, even);
      for (int m = 0; m < M; ++m) y[m * N + r] = static_cast<Out>(hsum(_mm256_add_ps(even[m], odd[m])) + bias[m]);
    }
  });
}
#endif

template <typename Out, typename Sc>
void dispatch(const uint8_t* W, const Sc* D, const Sc* Mn, const Rows& x, Out* y, int64_t M, int64_t N, int64_t K) {
#ifdef LMFORGE_QX_VNNI
  with_rows(M, "int4_gemv", [&](auto rows) { gemv_pairs<Out, decltype(rows)::value>(W, D, Mn, x, y, N, K); });
#else
  with_rows(M, "int4_gemv", [&](auto rows) { gemv_rows<Out, decltype(rows)::value>(W, D, Mn, x, y, N, K); });
#endif
}

}  // namespace lmforge_int4
