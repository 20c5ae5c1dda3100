// y = x w'^T for one to eight rows x (decoding) and 4-bit weights in GGUF's Q4_0 / Q4_1 block layout: each
// block of 32 inputs of a row is 16 bytes (value j in the low nibble of byte j, value j + 16 in its high
// nibble) with an fp32 scale d and minimum m: w' = q * d + m.
//
// Why: a decode step reads every weight once; these weights are 4.5-5 bits each, a seventh of fp32's. Each
// block is unpacked in registers and its sum is q . x times d, plus m times the block's sum of x (computed
// once per row of x, for all weight rows). Weight rows are split over ATen's own thread pool; sums are fp32,
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

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline __m256 widen(__m128i bytes8) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes8)); }

// Every row is summed in the same order whatever M is: a row's result does not depend on its batch.
template <typename Out, int M>
void gemv_rows(const uint8_t* W, const float* D, const float* Mn, const float* x, const float* xsum, Out* y,
               int64_t N, int64_t K) {
  const int64_t B = K / 32;  // blocks per row
  const __m128i low = _mm_set1_epi8(0x0F);
  at::parallel_for(0, N, 128, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const uint8_t* w = W + r * (K / 2);
      const float* d = D + r * B;
      const float* mn = Mn + r * B;
      __m256 acc[M];
      float bias[M];
      for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps(), bias[m] = 0.f;
      for (int64_t b = 0; b < B; ++b) {
        if ((b & 3) == 0) _mm_prefetch(reinterpret_cast<const char*>(w + 16 * b + 512), _MM_HINT_T0);
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 16 * b));  // 32 nibbles
        const __m128i lo = _mm_and_si128(v, low), hi = _mm_and_si128(_mm_srli_epi16(v, 4), low);
        const __m256 q0 = widen(lo), q1 = widen(_mm_srli_si128(lo, 8));  // values 0-7, 8-15
        const __m256 q2 = widen(hi), q3 = widen(_mm_srli_si128(hi, 8));  // values 16-23, 24-31
        const __m256 scale = _mm256_set1_ps(d[b]);
        for (int m = 0; m < M; ++m) {
          const float* xb = x + m * K + 32 * b;
          __m256 s = _mm256_mul_ps(q0, _mm256_loadu_ps(xb));
          s = _mm256_fmadd_ps(q1, _mm256_loadu_ps(xb + 8), s);
          s = _mm256_fmadd_ps(q2, _mm256_loadu_ps(xb + 16), s);
          s = _mm256_fmadd_ps(q3, _mm256_loadu_ps(xb + 24), s);
          acc[m] = _mm256_fmadd_ps(s, scale, acc[m]);
          bias[m] += mn[b] * xsum[m * B + b];
        }
      }
      for (int m = 0; m < M; ++m) y[m * N + r] = static_cast<Out>(hsum(acc[m]) + bias[m]);
    }
  });
}

template <typename Out>
void dispatch(const uint8_t* W, const float* D, const float* Mn, const float* x, const float* xs, Out* y,
              int64_t M, int64_t N, int64_t K) {
  switch (M) {
    case 1: return gemv_rows<Out, 1>(W, D, Mn, x, xs, y, N, K);
    case 2: return gemv_rows<Out, 2>(W, D, Mn, x, xs, y, N, K);
    case 3: return gemv_rows<Out, 3>(W, D, Mn, x, xs, y, N, K);
    case 4: return gemv_rows<Out, 4>(W, D, Mn, x, xs, y, N, K);
    case 5: return gemv_rows<Out, 5>(W, D, Mn, x, xs, y, N, K);
    case 6: return gemv_rows<Out, 6>(W, D, Mn, x, xs, y, N, K);
    case 7: return gemv_rows<Out, 7>(W, D, Mn, x, xs, y, N, K);
    case 8: return gemv_rows<Out, 8>(W, D, Mn, x, xs, y, N, K);
    default: TORCH_CHECK(false, "int4_gemv: 1 to 8 rows, got ", M);
  }
}

template <typename T>
void to_float(const at::Tensor& x, float* out) {
  const T* p = x.const_data_ptr<T>();
  for (int64_t i = 0; i < x.numel(); ++i) out[i] = static_cast<float>(p[i]);
}

at::Tensor int4_gemv(const at::Tensor& packed, const at::Tensor& scale, const at::Tensor& minimum,
                     const at::Tensor& x, bool fp32_out) {
  TORCH_CHECK(packed.device().is_cpu() && scale.device().is_cpu() && minimum.device().is_cpu() &&
                  x.device().is_cpu(), "int4_gemv: CPU tensors only");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 2 && packed.is_contiguous() &&
                  packed.size(1) % 16 == 0, "int4_gemv: packed must be contiguous uint8 (N, K / 2), K a multiple of 32");
  const int64_t N = packed.size(0), K = packed.size(1) * 2, B = K / 32;
  for (const at::Tensor* t : {&scale, &minimum})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 2 && t->size(0) == N &&
                    t->size(1) == B, "int4_gemv: scale and minimum must be contiguous fp32 (N, K / 32)");
  TORCH_CHECK(x.dim() == 2 && x.size(0) >= 1 && x.size(0) <= 8 && x.size(1) == K,
              "int4_gemv: x must be (M <= 8, K) with K = 2 * packed.size(1)");
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, "int4_gemv: x float32, bfloat16 or float16");
  const int64_t M = x.size(0);
  const at::Tensor xc = x.contiguous();
  std::vector<float> xf(M * K), xs(M * B, 0.f);
  if (dt == at::kFloat) to_float<float>(xc, xf.data());
  else if (dt == at::kBFloat16) to_float<c10::BFloat16>(xc, xf.data());
  else to_float<c10::Half>(xc, xf.data());
  for (int64_t i = 0; i < M * K; ++i) xs[i / 32] += xf[i];  // each block's sum of x, for the minimum
  at::Tensor y = at::empty({M, N}, x.options().dtype(fp32_out ? at::kFloat : dt));
  const uint8_t* W = packed.const_data_ptr<uint8_t>();
  const float *D = scale.const_data_ptr<float>(), *Mn = minimum.const_data_ptr<float>();
  if (y.scalar_type() == at::kFloat) dispatch(W, D, Mn, xf.data(), xs.data(), y.mutable_data_ptr<float>(), M, N, K);
  else if (dt == at::kBFloat16) dispatch(W, D, Mn, xf.data(), xs.data(), y.mutable_data_ptr<c10::BFloat16>(), M, N, K);
  else dispatch(W, D, Mn, xf.data(), xs.data(), y.mutable_data_ptr<c10::Half>(), M, N, K);
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lmforge, m) {
  m.def("int4_gemv(Tensor packed, Tensor scale, Tensor minimum, Tensor x, bool fp32_out=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(lmforge, CPU, m) { m.impl("int4_gemv", &int4_gemv); }
