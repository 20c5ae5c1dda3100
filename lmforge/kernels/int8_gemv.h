// y = x (q * s)^T for one to eight rows x (decoding) and int8 weights q (N, K) with one scale (fp32, or fp16
// as a GGUF file holds it) per group
// of G inputs of a row (G = K: one scale per row, lmforge.quantize's int8; G = 32: GGUF's Q8_0 blocks); K and G
// multiples of 32.
//
// Why: a decode step reads every weight once, so its speed is bytes read, and int8 weights are a quarter of
// fp32's - as long as the instructions per weight keep up. x is quantized to int16 blocks of 32 (qx.h) and each
// block's product is an integer dot (q widened to int16), scaled once by the weight's group scale times the
// block's dx. Each weight row is streamed
// once for all M rows; rows are split over ATen's own thread pool. Sums are fp32, rounded once to the output
// dtype, or kept fp32 with fp32_out (the LM head).
// (The kernel itself; int8_gemv.cpp registers it as an op, decode_step.cpp calls it directly.)
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include "qx.h"

namespace lmforge_int8 {

using namespace lmforge_qx;

// Every row is summed in the same order whatever M is: a row's result does not depend on its batch.
// Lanes (VNNI builds, 2 to 8 rows): each int32 lane sums 4 consecutive values of a block, as vpdpbusd's do in
// gemv_bytes (one row), so that a row's sum is the same to the bit alone or in a batch: the weight block's values
// 0, 1, 4, 5, ... widened into w0 and 2, 3, 6, 7, ... into w1, against x permuted the same way (qx.h's lanes).
template <typename Out, int M, bool Lanes = false, typename Sc = float>
void gemv_rows(const int8_t* W, const Sc* S, const Rows& x, Out* y, int64_t N, int64_t K, int64_t G) {
  const int16_t* xq = Lanes ? lanes(x.q).data() : x.q.data();
  const __m256i pick = _mm256_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15,
                                        0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15);
  const int64_t B = K / 32;
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int8_t* w = W + r * K;
      const Sc* s = S + r * (K / G);
      __m256 even[M], odd[M];  // two chains of multiply-adds: even and odd blocks
      for (int m = 0; m < M; ++m) even[m] = odd[m] = _mm256_setzero_ps();
      auto block = [&](int64_t b, __m256* acc) {
        if ((b & 1) == 0) _mm_prefetch(reinterpret_cast<const char*>(w + 32 * b + 512), _MM_HINT_T0);
        __m256i w0, w1;
        if constexpr (Lanes) {  // bytes 0 1 4 5 .. 28 29 in the low half, 2 3 6 7 .. 30 31 in the high one
          const __m256i v = _mm256_permute4x64_epi64(
              _mm256_shuffle_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32 * b)), pick), 0xD8);
          w0 = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(v)), w1 = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(v, 1));
        } else {
          const __m128i* q = reinterpret_cast<const __m128i*>(w + 32 * b);
          w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(q)), w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(q + 1));
        }
        const float scale = static_cast<float>(s[32 * b / G]);
        for (int m = 0; m < M; ++m) {
          const __m256 p = _mm256_cvtepi32_ps(dot32(w0, w1, xq + m * K + 32 * b));
          acc[m] = _mm256_fmadd_ps(p, _mm256_set1_ps(scale * x.d[m * B + b]), acc[m]);
        }
      };
      int64_t b = 0;
      for (; b + 1 < B; b += 2) block(b, even), block(b + 1, odd);
      if (b < B) block(b, even);
      for (int m = 0; m < M; ++m) y[m * N + r] = static_cast<Out>(hsum(_mm256_add_ps(even[m], odd[m])));
    }
  });
}

#ifdef LMFORGE_QX_VNNI
// The same sums with AVX512-VNNI and x in bytes (qx.h's split_blocks: hi + 128 unsigned, lo): a block's w . hi is
// w . (hi + 128) minus 128 * (each 4 weights' sum), the latter once per block for every x row; shifted by 8, plus
// lo . w: per x row two vpdpbusd, no widening.
template <typename Out, int M, typename Sc>
void gemv_bytes(const int8_t* W, const Sc* S, const Rows& x, Out* y, int64_t N, int64_t K, int64_t G) {
  const int64_t B = K / 32;
  const std::vector<int8_t>& xb = split_blocks(x, M, K);
  const __m256i k128 = _mm256_set1_epi8(static_cast<char>(0x80));
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> ds(M * B);  // each block's weight scale times each x row's dx
    for (int64_t r = begin; r < end; ++r) {
      const int8_t* w = W + r * K;
      const Sc* s = S + r * (K / G);
      __m256 even[M], odd[M];
      for (int m = 0; m < M; ++m) {
        even[m] = odd[m] = _mm256_setzero_ps();
        if (G == 32) scales(s, x.d.data() + m * B, ds.data() + m * B, B);
        else for (int64_t b = 0; b < B; ++b) ds[m * B + b] = static_cast<float>(s[32 * b / G]) * x.d[m * B + b];
      }
      auto block = [&](int64_t b, __m256* acc) {
        const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32 * b));
        const __m256i fix = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_dpbusd_epi32(_mm256_setzero_si256(), k128, q));
        for (int m = 0; m < M; ++m) {
          const int64_t i = m * B + b;
          const __m256i* xq = reinterpret_cast<const __m256i*>(xb.data() + 64 * i);
          const __m256i h = _mm256_dpbusd_epi32(fix, _mm256_loadu_si256(xq), q);  // w . hi
          const __m256i t = _mm256_dpbusd_epi32(_mm256_slli_epi32(h, 8), _mm256_loadu_si256(xq + 1), q);
          acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), _mm256_set1_ps(ds[i]), acc[m]);
        }
      };
      int64_t b = 0;
      for (; b + 1 < B; b += 2) block(b, even), block(b + 1, odd);
      if (b < B) block(b, even);
      for (int m = 0; m < M; ++m) y[m * N + r] = static_cast<Out>(hsum(_mm256_add_ps(even[m], odd[m])));
    }
  });
}
#endif

template <typename Out, typename Sc>
void dispatch(const int8_t* W, const Sc* S, const Rows& x, Out* y, int64_t M, int64_t N, int64_t K, int64_t G) {
#ifdef LMFORGE_QX_VNNI
  // one row: x in bytes; more: the widened weights shared by the rows, in the same lanes (bit-identical sums)
  if (M == 1) gemv_bytes<Out, 1, Sc>(W, S, x, y, N, K, G);
  else with_rows(M, "int8_gemv", [&](auto rows) { gemv_rows<Out, decltype(rows)::value, true, Sc>(W, S, x, y, N, K, G); });
#else
  with_rows(M, "int8_gemv", [&](auto rows) { gemv_rows<Out, decltype(rows)::value, false, Sc>(W, S, x, y, N, K, G); });
#endif
}

}  // namespace lmforge_int8
