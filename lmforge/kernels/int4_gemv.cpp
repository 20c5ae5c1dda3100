// The op lmforge::int4_gemv (the kernel and why: int4_gemv.h).
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "int4_gemv.h"

namespace {

using namespace lmforge_int4;

at::Tensor int4_gemv(const at::Tensor& packed, const at::Tensor& scale, const at::Tensor& minimum,
                     const at::Tensor& x, bool fp32_out) {
  TORCH_CHECK(packed.device().is_cpu() && scale.device().is_cpu() && minimum.device().is_cpu() &&
                  x.device().is_cpu(), "int4_gemv: CPU tensors only");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 2 && packed.is_contiguous() &&
                  packed.size(1) % 16 == 0, "int4_gemv: packed must be contiguous uint8 (N, K / 2), K a multiple of 32");
  const int64_t N = packed.size(0), K = packed.size(1) * 2, B = K / 32;
  for (const at::Tensor* t : {&scale, &minimum})
    TORCH_CHECK((t->scalar_type() == at::kFloat || t->scalar_type() == at::kHalf) &&
                    t->scalar_type() == scale.scalar_type() && t->is_contiguous() && t->dim() == 2 &&
                    t->size(0) == N && t->size(1) == B,
                "int4_gemv: scale and minimum must be contiguous (N, K / 32), both float32 or both float16");
  TORCH_CHECK(x.dim() == 2 && x.size(0) >= 1 && x.size(0) <= 8 && x.size(1) == K,
              "int4_gemv: x must be (M <= 8, K) with K = 2 * packed.size(1)");
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, "int4_gemv: x float32, bfloat16 or float16");
  const int64_t M = x.size(0);
  const Rows& xq = quantize(x);
  at::Tensor y = at::empty({M, N}, x.options().dtype(fp32_out ? at::kFloat : dt));
  const uint8_t* W = packed.const_data_ptr<uint8_t>();
  with_scales(scale, "int4_gemv", [&](auto* D) {
    const auto* Mn = static_cast<decltype(D)>(minimum.const_data_ptr());
    if (y.scalar_type() == at::kFloat) dispatch(W, D, Mn, xq, y.mutable_data_ptr<float>(), M, N, K);
    else if (dt == at::kBFloat16) dispatch(W, D, Mn, xq, y.mutable_data_ptr<c10::BFloat16>(), M, N, K);
    else dispatch(W, D, Mn, xq, y.mutable_data_ptr<c10::Half>(), M, N, K);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lmforge, m) {
  m.def("int4_gemv(Tensor packed, Tensor scale, Tensor minimum, Tensor x, bool fp32_out=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(lmforge, CPU, m) { m.impl("int4_gemv", &int4_gemv); }
