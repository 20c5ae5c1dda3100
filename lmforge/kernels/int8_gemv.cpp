// The op lmforge::int8_gemv (the kernel and why: int8_gemv.h).
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "int8_gemv.h"

namespace {

using namespace lmforge_int8;

at::Tensor int8_gemv(const at::Tensor& q, const at::Tensor& scales, const at::Tensor& x, bool fp32_out) {
  TORCH_CHECK(q.device().is_cpu() && scales.device().is_cpu() && x.device().is_cpu(), "int8_gemv: CPU tensors only");
  TORCH_CHECK(q.scalar_type() == at::kChar && q.dim() == 2 && q.is_contiguous() && q.size(1) % 32 == 0,
              "int8_gemv: q must be a contiguous int8 (N, K) matrix, K a multiple of 32");
  const int64_t N = q.size(0), K = q.size(1);
  TORCH_CHECK((scales.scalar_type() == at::kFloat || scales.scalar_type() == at::kHalf) && scales.dim() == 2 && scales.is_contiguous() &&
                  scales.size(0) == N && scales.size(1) >= 1 && K % scales.size(1) == 0,
              "int8_gemv: scales must be contiguous float32 or float16 (N, K / G)");
  const int64_t G = K / scales.size(1);
  TORCH_CHECK(G % 32 == 0, "int8_gemv: the group size K / scales.size(1) must be a multiple of 32, got ", G);
  TORCH_CHECK(x.dim() == 2 && x.size(0) >= 1 && x.size(0) <= 8 && x.size(1) == K,
              "int8_gemv: x must be (M <= 8, K) with K = q.size(1)");
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, "int8_gemv: x float32, bfloat16 or float16");
  const int64_t M = x.size(0);
  const Rows& xq = quantize(x);
  at::Tensor y = at::empty({M, N}, x.options().dtype(fp32_out ? at::kFloat : dt));
  const int8_t* W = q.const_data_ptr<int8_t>();
  with_scales(scales, "int8_gemv", [&](auto* S) {
    if (y.scalar_type() == at::kFloat) dispatch(W, S, xq, y.mutable_data_ptr<float>(), M, N, K, G);
    else if (dt == at::kBFloat16) dispatch(W, S, xq, y.mutable_data_ptr<c10::BFloat16>(), M, N, K, G);
    else dispatch(W, S, xq, y.mutable_data_ptr<c10::Half>(), M, N, K, G);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lmforge, m) {
  m.def("int8_gemv(Tensor q, Tensor scales, Tensor x, bool fp32_out=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(lmforge, CPU, m) { m.impl("int8_gemv", &int8_gemv); }
