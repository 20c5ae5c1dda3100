// y = x W^T for one to eight bf16/fp16 rows x (decoding) on an AVX2 CPU without native bf16/fp16 math.
//
// Why: oneDNN's and ATen's kernels for this shape convert and multiply at ~5-6 GB/s of weights per core
// (compute-bound), far below what the cores can read. Here each weight row is streamed once: 16 bytes of
// bf16 -> 8 floats (a widen and a shift; fp16 via F16C), fused multiply-add into accumulators against x held
// as fp32; weight rows are split over ATen's own thread pool. No software prefetch: the rows are one sequential
// stream that the hardware prefetcher follows, and a prefetch 1 KiB ahead cost 9% (SmolLM2 bf16, one core of a
// 2-core EPYC with AVX512-BF16: 72.7-73.4 tok/s without, 66.7-67.7 with; the AVX-512 form of this loop and
// AVX512-BF16's vdpbf16ps read no faster from memory). Sums are in
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

template <typename T, typename Out>
void dispatch(const T* W, const float* x, Out* y, int64_t M, int64_t N, int64_t K) {
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
