// The op lmforge::half_gemv (the kernel and why: half_gemv.h).
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "half_gemv.h"

namespace {

using namespace lmforge_half;

template <typename T>
void run(const at::Tensor& weight, const at::Tensor& x, at::Tensor& y) {
  const int64_t N = weight.size(0), K = weight.size(1), M = x.dim() == 1 ? 1 : x.size(0);  // 1 <= M <= 8
  std::vector<float> xf(M * K);
  const at::Tensor xc = x.contiguous();  // kept alive: a strided x is copied here
  const T* xp = xc.const_data_ptr<T>();
  for (int64_t i = 0; i < M * K; ++i) xf[i] = static_cast<float>(xp[i]);
  if (y.scalar_type() == at::kFloat) {
    dispatch(weight.const_data_ptr<T>(), xf.data(), y.mutable_data_ptr<float>(), M, N, K);
  } else {
    dispatch(weight.const_data_ptr<T>(), xf.data(), y.mutable_data_ptr<T>(), M, N, K);
  }
}

at::Tensor half_gemv(const at::Tensor& weight, const at::Tensor& x, bool fp32_out) {
  TORCH_CHECK(weight.device().is_cpu() && x.device().is_cpu(), "half_gemv: CPU tensors only");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "half_gemv: weight must be a contiguous (N, K) matrix");
  TORCH_CHECK((x.dim() == 1 || (x.dim() == 2 && x.size(0) >= 1 && x.size(0) <= 8)) && x.size(-1) == weight.size(1),
              "half_gemv: x must be (K,) or (M <= 8, K) with K = weight.size(1)");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "half_gemv: x and weight must share a dtype");
  TORCH_CHECK(weight.scalar_type() == at::kBFloat16 || weight.scalar_type() == at::kHalf,
              "half_gemv: bfloat16 or float16 only");
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = weight.size(0);  // (N,) or (M, N)
  at::Tensor y = at::empty(shape, weight.options().dtype(fp32_out ? at::kFloat : weight.scalar_type()));
  if (weight.scalar_type() == at::kBFloat16) {
    run<c10::BFloat16>(weight, x, y);
  } else {
    run<c10::Half>(weight, x, y);
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lmforge, m) { m.def("half_gemv(Tensor weight, Tensor x, bool fp32_out=False) -> Tensor"); }

TORCH_LIBRARY_IMPL(lmforge, CPU, m) { m.impl("half_gemv", &half_gemv); }
