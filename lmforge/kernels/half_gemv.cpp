// y = W x for one bf16/fp16 row x (decoding at batch 1) on an AVX2 CPU without native bf16/fp16 math.
//
// Why: oneDNN's and ATen's kernels for this shape convert and multiply at ~5-6 GB/s of weights per core
// (compute-bound), far below what the cores can read. Here each weight row is streamed once: 16 bytes of
// bf16 -> 8 floats (a widen and a shift; fp16 via F16C), fused multiply-add into four accumulators against x
// held as fp32, with a software prefetch 1 KiB ahead; rows are split over ATen's own thread pool. Sums are in
// fp32 and rounded once to the output dtype (round to nearest even), as the library kernels do; or, with
// fp32_out (the LM head: logits compared by argmax/softmax), not rounded at all.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>
#include <torch/library.h>

#include <vector>

namespace {

inline __m256 load8(const c10::BFloat16* p) {
  __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}

inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <typename T, typename Out>
void gemv(const T* W, const float* x, Out* y, int64_t N, int64_t K) {
  at::parallel_for(0, N, 256, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* w = W + r * K;
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      int64_t k = 0;
      for (; k + 32 <= K; k += 32) {
        _mm_prefetch(reinterpret_cast<const char*>(w + k + 512), _MM_HINT_T0);
        a0 = _mm256_fmadd_ps(load8(w + k), _mm256_loadu_ps(x + k), a0);
        a1 = _mm256_fmadd_ps(load8(w + k + 8), _mm256_loadu_ps(x + k + 8), a1);
        a2 = _mm256_fmadd_ps(load8(w + k + 16), _mm256_loadu_ps(x + k + 16), a2);
        a3 = _mm256_fmadd_ps(load8(w + k + 24), _mm256_loadu_ps(x + k + 24), a3);
      }
      for (; k + 8 <= K; k += 8) a0 = _mm256_fmadd_ps(load8(w + k), _mm256_loadu_ps(x + k), a0);
      float s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
      for (; k < K; ++k) s += static_cast<float>(w[k]) * x[k];
      y[r] = static_cast<Out>(s);
    }
  });
}

template <typename T>
void run(const at::Tensor& weight, const at::Tensor& x, at::Tensor& y) {
  const int64_t N = weight.size(0), K = weight.size(1);
  std::vector<float> xf(K);
  const T* xp = x.contiguous().const_data_ptr<T>();
  for (int64_t k = 0; k < K; ++k) xf[k] = static_cast<float>(xp[k]);
  if (y.scalar_type() == at::kFloat) {
    gemv(weight.const_data_ptr<T>(), xf.data(), y.mutable_data_ptr<float>(), N, K);
  } else {
    gemv(weight.const_data_ptr<T>(), xf.data(), y.mutable_data_ptr<T>(), N, K);
  }
}

at::Tensor half_gemv(const at::Tensor& weight, const at::Tensor& x, bool fp32_out) {
  TORCH_CHECK(weight.device().is_cpu() && x.device().is_cpu(), "half_gemv: CPU tensors only");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "half_gemv: weight must be a contiguous (N, K) matrix");
  TORCH_CHECK(x.dim() == 1 && x.size(0) == weight.size(1), "half_gemv: x must be (K,) with K = weight.size(1)");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "half_gemv: x and weight must share a dtype");
  TORCH_CHECK(weight.scalar_type() == at::kBFloat16 || weight.scalar_type() == at::kHalf,
              "half_gemv: bfloat16 or float16 only");
  at::Tensor y = at::empty({weight.size(0)}, weight.options().dtype(fp32_out ? at::kFloat : weight.scalar_type()));
  if (weight.scalar_type() == at::kBFloat16) {
    run<c10::BFloat16>(weight, x, y);
  } else {
    run<c10::Half>(weight, x, y);
  }
  return y;
}

}  // namespace

TORCH_LIBRARY(lmforge, m) { m.def("half_gemv(Tensor weight, Tensor x, bool fp32_out=False) -> Tensor"); }

TORCH_LIBRARY_IMPL(lmforge, CPU, m) { m.impl("half_gemv", &half_gemv); }
