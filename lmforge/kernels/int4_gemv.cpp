// y = x w'^T for one to eight rows x (decoding) and 4-bit weights in GGUF's Q4_0 / Q4_1 block layout: each
// block of 32 inputs of a row is 16 bytes (value j in the low nibble of byte j, value j + 16 in its high
// nibble) with an fp32 scale d and minimum m: w' = q * d + m.
//
// Why: a decode step reads every weight once; these weights are 4.5-5 bits each, a seventh of fp32's, so the
// instructions per weight decide the speed. x is quantized to int16 blocks of 32 (qx.h) and each weight block's
// sum is the integer dot q . qx (two or three instructions for 32 products) times d * dx, plus m times the
// block's sum of the quantized x. Weight rows are split over ATen's own thread pool; sums are fp32, rounded once to the
// output dtype, or kept fp32 with fp32_out (the LM head).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "qx.h"

namespace {

using namespace lmforge_qx;

// a block's 32 values as int16, in input order: the 16 low nibbles (values 0-15), the 16 high ones (16-31)
inline void nibbles(const uint8_t* w, __m128i low, __m256i& w0, __m256i& w1) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
  w0 = _mm256_cvtepu8_epi16(_mm_and_si128(v, low));
  w1 = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(v, 4), low));
}

// Every row is summed in the same order whatever M is: a row's result does not depend on its batch.
template <typename Out, int M>
void gemv_rows(const uint8_t* W, const float* D, const float* Mn, const Rows& x, Out* y, int64_t N, int64_t K) {
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

template <typename Out>
void dispatch(const uint8_t* W, const float* D, const float* Mn, const Rows& x, Out* y, int64_t M, int64_t N,
              int64_t K) {
  with_rows(M, "int4_gemv", [&](auto rows) { gemv_rows<Out, decltype(rows)::value>(W, D, Mn, x, y, N, K); });
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
  const Rows xq = quantize(to_float(x).data(), M, K);
  at::Tensor y = at::empty({M, N}, x.options().dtype(fp32_out ? at::kFloat : dt));
  const uint8_t* W = packed.const_data_ptr<uint8_t>();
  const float *D = scale.const_data_ptr<float>(), *Mn = minimum.const_data_ptr<float>();
  if (y.scalar_type() == at::kFloat) dispatch(W, D, Mn, xq, y.mutable_data_ptr<float>(), M, N, K);
  else if (dt == at::kBFloat16) dispatch(W, D, Mn, xq, y.mutable_data_ptr<c10::BFloat16>(), M, N, K);
  else dispatch(W, D, Mn, xq, y.mutable_data_ptr<c10::Half>(), M, N, K);
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lmforge, m) {
  m.def("int4_gemv(Tensor packed, Tensor scale, Tensor minimum, Tensor x, bool fp32_out=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(lmforge, CPU, m) { m.impl("int4_gemv", &int4_gemv); }
