// y = x W^T for one to eight bf16/fp16 rows x (decoding) on an AVX2 CPU (bf16 with AVX512-BF16: gemm_rows_dp).
//
// Why: oneDNN's and ATen's kernels for this shape convert and multiply at ~5-6 GB/s of weights per core
// (compute-bound), far below what the cores can read. Here each weight row is streamed once: 16 bytes of
// bf16 -> 8 floats (a widen and a shift; fp16 via F16C), fused multiply-add into accumulators against x held
// as fp32; weight rows are split over ATen's own thread pool. No software prefetch: the rows are one sequential
// stream that the hardware prefetcher follows, and a prefetch 1 KiB ahead cost 9% (SmolLM2 bf16, one core of a
// 2-core EPYC with AVX512-BF16: 72.7-73.4 tok/s without, 66.7-67.7 with; the AVX-512 form of this loop read no
// faster). Where the CPU has AVX512-BF16, bf16 weights take its dot product instead (gemm_rows_dp). Sums are in
// fp32 and rounded once to the output dtype (round to nearest even), as the library kernels do; or, with
// fp32_out (the LM head: logits compared by argmax/softmax), not rounded at all.
// (The kernel itself; half_gemv.cpp registers it as an op, decode_step.cpp calls it directly.)
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include "vec8.h"

#include <algorithm>
#include <type_traits>
#include <vector>

namespace lmforge_half {

using namespace lmforge_vec;

// M = 1..8 rows of x (decoding one sequence or a small batch, a short prompt): each weight row is read once,
// for all M rows (SmolLM2's head on a 2-core EPYC: oneDNN 5.2 / 8.5 / 15.7 / 31.3 ms for 1 / 2 / 4 / 8 rows,
// this kernel 3.7 / 4.2 / 4.8 / 10.3).
// Four accumulators per x row (four 8-wide column blocks at a time) keep the FMA pipes busy (at 8 rows some
// spill to the stack: still 3x oneDNN). Every row is summed
// in the same order whatever M is, so a row's result does not depend on the batch it came in.
template <typename T, typename Out, int M>
void gemm_rows(const T* W, const float* x, Out* y, int64_t N, int64_t K) {
  constexpr int U = 4;  // at one row (decoding), 2 accumulators read 14.5 GB/s, 4 read 18.8
  at::parallel_for(0, N, 256, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* w = W + r * K;
      __m256 acc[U][M];
      for (int u = 0; u < U; ++u)
        for (int m = 0; m < M; ++m) acc[u][m] = _mm256_setzero_ps();
      int64_t k = 0;
      for (; k + 8 * U <= K; k += 8 * U) {
        for (int u = 0; u < U; ++u) {
          const __m256 wv = load8(w + k + 8 * u);
          for (int m = 0; m < M; ++m) acc[u][m] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * K + k + 8 * u), acc[u][m]);
        }
      }
      for (; k + 8 <= K; k += 8) {
        const __m256 wv = load8(w + k);
        for (int m = 0; m < M; ++m) acc[0][m] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * K + k), acc[0][m]);
      }
      for (int m = 0; m < M; ++m) {
        __m256 a = acc[0][m];
        for (int u = 1; u < U; ++u) a = _mm256_add_ps(a, acc[u][m]);
        float s = hsum(a);
        for (int64_t j = k; j < K; ++j) s += static_cast<float>(w[j]) * x[m * K + j];
        y[m * N + r] = static_cast<Out>(s);
      }
    }
  });
}

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
// bf16 weights on a CPU with AVX512-BF16: vdpbf16ps multiplies 32 bf16 pairs and sums them into 16 fp32 lanes in
// one instruction, where the loop above widens, shifts and multiplies 8 at a time, so a core issues its loads
// with far fewer instructions between them. SmolLM2's 121 products back to back in C++ on the 2-core EPYC C:
// 25.2 / 38.0 GB/s on 1 / 2 threads against 18.5 / 31.1 above (8 alternating rounds in one process); its whole
// decode step on 2 threads, 10 alternating rounds: 96.0 tok/s median (up to 121) against 86.9 (up to 105); on
// 1 thread the step was 1-5% slower (81.1 against 85.4 tok/s; 10.4-12.2 ms against 10.3-12.1). x (fp32) is first split into two bf16 parts, hi = bf16(x)
// and lo = bf16(x - hi), and each weight block is multiplied by both: x keeps ~16 bits, not bf16's 8 (products of
// two bf16 are exact in fp32; sums in fp32, as above). Columns past the last multiple of 32 are summed in fp32.
// Rows of x go 4 at a time (16 accumulators); each row is summed in the same order whatever M is.
inline __m512bh bf16x32(const uint16_t* p) { return (__m512bh)_mm512_loadu_si512(p); }

inline void split_hi_lo(const float* x, uint16_t* hi, uint16_t* lo, int64_t n) {  // n: a multiple of 16
  for (int64_t i = 0; i < n; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    const __m256i h = (__m256i)_mm512_cvtneps_pbh(v);  // round to nearest even
    const __m512 back = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(hi + i), h);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(lo + i), (__m256i)_mm512_cvtneps_pbh(_mm512_sub_ps(v, back)));
  }
}

template <typename Out, int G>  // G = 1..4 rows of x, from row m0
inline void dp_rows(const uint16_t* w, const uint16_t* hi, const uint16_t* lo, const float* x, Out* y, int64_t r,
                    int64_t m0, int64_t N, int64_t K, int64_t K32) {
  __m512 a[G][2], c[G][2];
  for (int g = 0; g < G; ++g) a[g][0] = a[g][1] = c[g][0] = c[g][1] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 64 <= K32; k += 64) {
    const __m512bh w0 = bf16x32(w + k), w1 = bf16x32(w + k + 32);
    for (int g = 0; g < G; ++g) {
      const int64_t o = (m0 + g) * K + k;
      a[g][0] = _mm512_dpbf16_ps(a[g][0], w0, bf16x32(hi + o));
      a[g][1] = _mm512_dpbf16_ps(a[g][1], w1, bf16x32(hi + o + 32));
      c[g][0] = _mm512_dpbf16_ps(c[g][0], w0, bf16x32(lo + o));
      c[g][1] = _mm512_dpbf16_ps(c[g][1], w1, bf16x32(lo + o + 32));
    }
  }
  if (k < K32) {  // one block of 32 left
    const __m512bh w0 = bf16x32(w + k);
    for (int g = 0; g < G; ++g) {
      const int64_t o = (m0 + g) * K + k;
      a[g][0] = _mm512_dpbf16_ps(a[g][0], w0, bf16x32(hi + o));
      c[g][0] = _mm512_dpbf16_ps(c[g][0], w0, bf16x32(lo + o));
    }
  }
  for (int g = 0; g < G; ++g) {
    float s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a[g][0], a[g][1]), _mm512_add_ps(c[g][0], c[g][1])));
    const float* xm = x + (m0 + g) * K;
    for (int64_t j = K32; j < K; ++j) s += static_cast<float>(c10::BFloat16(w[j], c10::BFloat16::from_bits())) * xm[j];
    y[(m0 + g) * N + r] = static_cast<Out>(s);
  }
}

template <typename Out>
void gemm_rows_dp(const c10::BFloat16* W, const float* x, Out* y, int64_t M, int64_t N, int64_t K) {
  const int64_t K32 = K / 32 * 32;
  thread_local std::vector<uint16_t> parts;  // hi, then lo: M x K each (only the first K32 columns written)
  parts.resize(2 * M * K);
  uint16_t *hi = parts.data(), *lo = hi + M * K;
  for (int64_t m = 0; m < M; ++m) split_hi_lo(x + m * K, hi + m * K, lo + m * K, K32);
  const uint16_t* w16 = reinterpret_cast<const uint16_t*>(W);
  at::parallel_for(0, N, 256, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const uint16_t* w = w16 + r * K;
      for (int64_t m0 = 0; m0 < M; m0 += 4) {
        switch (std::min<int64_t>(4, M - m0)) {
          case 1: dp_rows<Out, 1>(w, hi, lo, x, y, r, m0, N, K, K32); break;
          case 2: dp_rows<Out, 2>(w, hi, lo, x, y, r, m0, N, K, K32); break;
          case 3: dp_rows<Out, 3>(w, hi, lo, x, y, r, m0, N, K, K32); break;
          default: dp_rows<Out, 4>(w, hi, lo, x, y, r, m0, N, K, K32);
        }
      }
    }
  });
}
#endif

template <typename T, typename Out>
void dispatch(const T* W, const float* x, Out* y, int64_t M, int64_t N, int64_t K) {
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    TORCH_CHECK(M >= 1 && M <= 8, "half_gemv: 1 to 8 rows, got ", M);
    return gemm_rows_dp<Out>(W, x, y, M, N, K);
  }
#endif
  switch (M) {
    case 1: return gemm_rows<T, Out, 1>(W, x, y, N, K);
    case 2: return gemm_rows<T, Out, 2>(W, x, y, N, K);
    case 3: return gemm_rows<T, Out, 3>(W, x, y, N, K);
    case 4: return gemm_rows<T, Out, 4>(W, x, y, N, K);
    case 5: return gemm_rows<T, Out, 5>(W, x, y, N, K);
    case 6: return gemm_rows<T, Out, 6>(W, x, y, N, K);
    case 7: return gemm_rows<T, Out, 7>(W, x, y, N, K);
    case 8: return gemm_rows<T, Out, 8>(W, x, y, N, K);
    default: TORCH_CHECK(false, "half_gemv: 1 to 8 rows, got ", M);
  }
}

}  // namespace lmforge_half
