// y = x (q * s)^T for one to eight rows x (decoding) and int8 weights q (N, K) with one fp32 scale per group
// of G inputs of a row (G = K: one scale per row, lmforge.quantize's int8; G = 32: GGUF's Q8_0 blocks).
//
// Why: a decode step reads every weight once, so its speed is bytes read; int8 weights are a quarter of fp32's.
// torch's _weight_int8pack_mm converts more than it streams for one row. Here each weight row is streamed
// once for all M rows: 8 int8 -> 8 floats in registers (sign-extend, convert), fused multiply-add against x
// held as fp32, each group's sum scaled once; rows are split over ATen's own thread pool. Sums are fp32,
// rounded once to the output dtype, or kept fp32 with fp32_out (the LM head).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>
#include <torch/library.h>

#include <vector>

namespace {

inline __m256 load8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Every row is summed in the same order whatever M is: a row's result does not depend on its batch.
template <typename Out, int M>
void gemv_rows(const int8_t* W, const float* S, const float* x, Out* y, int64_t N, int64_t K, int64_t G) {
  at::parallel_for(0, N, 256, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int8_t* w = W + r * K;
      const float* s = S + r * (K / G);
      __m256 acc[M];
      for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
      for (int64_t g0 = 0; g0 < K; g0 += G) {
        __m256 part[2][M];  // two accumulators per row keep the FMA pipes busy
        for (int m = 0; m < M; ++m) part[0][m] = part[1][m] = _mm256_setzero_ps();
        int64_t k = g0;
        for (; k + 16 <= g0 + G; k += 16) {
          if ((k & 63) == 0) _mm_prefetch(reinterpret_cast<const char*>(w + k + 512), _MM_HINT_T0);
          const __m256 w0 = load8(w + k), w1 = load8(w + k + 8);
          for (int m = 0; m < M; ++m) {
            part[0][m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + m * K + k), part[0][m]);
            part[1][m] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + m * K + k + 8), part[1][m]);
          }
        }
        if (k < g0 + G) {  // G % 16 == 8: one more block of 8
          const __m256 w0 = load8(w + k);
          for (int m = 0; m < M; ++m) part[0][m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + m * K + k), part[0][m]);
        }
        const __m256 scale = _mm256_set1_ps(s[g0 / G]);
        for (int m = 0; m < M; ++m) acc[m] = _mm256_fmadd_ps(_mm256_add_ps(part[0][m], part[1][m]), scale, acc[m]);
      }
      for (int m = 0; m < M; ++m) y[m * N + r] = static_cast<Out>(hsum(acc[m]));
    }
  });
}

template <typename Out>
void dispatch(const int8_t* W, const float* S, const float* x, Out* y, int64_t M, int64_t N, int64_t K, int64_t G) {
  switch (M) {
    case 1: return gemv_rows<Out, 1>(W, S, x, y, N, K, G);
    case 2: return gemv_rows<Out, 2>(W, S, x, y, N, K, G);
    case 3: return gemv_rows<Out, 3>(W, S, x, y, N, K, G);
    case 4: return gemv_rows<Out, 4>(W, S, x, y, N, K, G);
    case 5: return gemv_rows<Out, 5>(W, S, x, y, N, K, G);
    case 6: return gemv_rows<Out, 6>(W, S, x, y, N, K, G);
    case 7: return gemv_rows<Out, 7>(W, S, x, y, N, K, G);
    case 8: return gemv_rows<Out, 8>(W, S, x, y, N, K, G);
    default: TORCH_CHECK(false, "int8_gemv: 1 to 8 rows, got ", M);
  }
}

template <typename T>
void to_float(const at::Tensor& x, float* out) {
  const T* p = x.const_data_ptr<T>();
  for (int64_t i = 0; i < x.numel(); ++i) out[i] = static_cast<float>(p[i]);
}

at::Tensor int8_gemv(const at::Tensor& q, const at::Tensor& scales, const at::Tensor& x, bool fp32_out) {
  TORCH_CHECK(q.device().is_cpu() && scales.device().is_cpu() && x.device().is_cpu(), "int8_gemv: CPU tensors only");
  TORCH_CHECK(q.scalar_type() == at::kChar && q.dim() == 2 && q.is_contiguous(),
              "int8_gemv: q must be a contiguous int8 (N, K) matrix");
  const int64_t N = q.size(0), K = q.size(1);
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.dim() == 2 && scales.is_contiguous() &&
                  scales.size(0) == N && scales.size(1) >= 1 && K % scales.size(1) == 0,
              "int8_gemv: scales must be contiguous fp32 (N, K / G)");
  const int64_t G = K / scales.size(1);
  TORCH_CHECK(G % 8 == 0, "int8_gemv: the group size K / scales.size(1) must be a multiple of 8, got ", G);
  TORCH_CHECK(x.dim() == 2 && x.size(0) >= 1 && x.size(0) <= 8 && x.size(1) == K,
              "int8_gemv: x must be (M <= 8, K) with K = q.size(1)");
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, "int8_gemv: x float32, bfloat16 or float16");
  const int64_t M = x.size(0);
  const at::Tensor xc = x.contiguous();
  std::vector<float> xf(M * K);
  if (dt == at::kFloat) to_float<float>(xc, xf.data());
  else if (dt == at::kBFloat16) to_float<c10::BFloat16>(xc, xf.data());
  else to_float<c10::Half>(xc, xf.data());
  at::Tensor y = at::empty({M, N}, x.options().dtype(fp32_out ? at::kFloat : dt));
  const int8_t* W = q.const_data_ptr<int8_t>();
  const float* S = scales.const_data_ptr<float>();
  if (y.scalar_type() == at::kFloat) dispatch(W, S, xf.data(), y.mutable_data_ptr<float>(), M, N, K, G);
  else if (dt == at::kBFloat16) dispatch(W, S, xf.data(), y.mutable_data_ptr<c10::BFloat16>(), M, N, K, G);
  else dispatch(W, S, xf.data(), y.mutable_data_ptr<c10::Half>(), M, N, K, G);
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lmforge, m) {
  m.def("int8_gemv(Tensor q, Tensor scales, Tensor x, bool fp32_out=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(lmforge, CPU, m) { m.impl("int8_gemv", &int8_gemv); }
