// The op lmforge::decode_attention (the kernel and why: decode_attention.h).
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "decode_attention.h"

namespace {

using namespace lmforge_attn;

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& mask, double scale) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "decode_attention: CPU tensors only");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "decode_attention: q (B, K, G, D), k and v (B, K, S, D)");
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3),
              "decode_attention: q ", q.sizes(), " does not match k ", k.sizes(), " / v ", v.sizes());
  TORCH_CHECK(q.size(3) % 8 == 0, "decode_attention: head_dim must be a multiple of 8, got ", q.size(3));
  const auto dt = q.scalar_type();
  TORCH_CHECK(k.scalar_type() == dt && v.scalar_type() == dt &&
                  (dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf),
              "decode_attention: q, k, v of one dtype: float32, bfloat16 or float16");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "decode_attention: contiguous last dims");
  if (mask) {
    TORCH_CHECK(mask->device().is_cpu() && (mask->scalar_type() == at::kBool || mask->scalar_type() == at::kFloat),
                "decode_attention: the mask must be bool or float32 on CPU");
    TORCH_CHECK(mask->dim() == 4, "decode_attention: the mask must be 4-D, broadcastable to (B, K, G, S)");
  }
  at::Tensor out = at::empty(q.sizes(), q.options());
  const at::Tensor* m = mask ? &*mask : nullptr;
  if (dt == at::kFloat) attend<float>(q, k, v, m, scale, out);
  else if (dt == at::kBFloat16) attend<c10::BFloat16>(q, k, v, m, scale, out);
  else attend<c10::Half>(q, k, v, m, scale, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lmforge, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(lmforge, CPU, m) { m.impl("decode_attention", &decode_attention); }
