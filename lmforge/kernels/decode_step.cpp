// A whole decode step of a LLaMA-family model in one call: embedding -> per layer RMSNorm, the fused QKV
// product, RoPE (half-split or interleaved, partial rotary), the new K/V written into the cache, attention over
// the filled slots (GQA / MQA / MHA), the output product and residual, RMSNorm, the fused gate/up product,
// SiLU(gate) * up, the down product and residual -> final RMSNorm -> LM head, for B rows (1 to any), each at its
// own cache slot, one new token a row or a short prompt. Weights: lmforge.quantize's int8 / int4 blocks (GGUF
// Q8_0 / Q4_0 / Q4_1 as they are) or fp32 / bf16 / fp16 matrices; the KV cache fp32, bf16 or fp16 (a bf16 model's
// own: each new key and value rounded to it once, as the forward writes them); activations and every sum fp32.
// `lmforge.kernels.step` packs a model for it.
//
// Why: with 4-bit weights a token of SmolLM2-135M is ~3.7 ms of products on 2 cores, and as a compiled
// torch graph another ~2.5 ms of serial work around them: dynamo's frame and guards, ~500 arguments passed
// each call, a boxed dispatcher call per custom op (151 a token), ~100 small element-wise kernels. Here the
// same kernels (int8_gemv.h, int4_gemv.h, half_gemv.h, decode_attention.h) are called directly on buffers
// this object keeps, and the element-wise work is a few loops over ~600 values a row.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include "decode_attention.h"
#include "half_gemv.h"
#include "int4_gemv.h"
#include "int8_gemv.h"
#include "rows.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t KERNEL_ROWS = 8;  // rows per call of the GEMV kernels (their loops are compiled for 1 to 8)

bool given(const at::Tensor& t) { return t.defined() && t.numel() > 0; }

// A linear layer as lmforge.quantize and torch hold it: int8 q (N, K) with scales (N, K / G), G a multiple of
// 32; int4 packed (N, K / 2) with scales and minimums (N, K / 32); or a float32 / bfloat16 / float16 weight
// (N, K). Scales fp32 or fp16. Bias: none, or (N,) float32.
struct Linear {
  at::Tensor w, scale, minimum, bias;
  int64_t N = 0, K = 0;

  Linear() = default;
  Linear(at::Tensor w_, at::Tensor s, at::Tensor m, at::Tensor b, const std::string& name)
      : w(std::move(w_)), scale(std::move(s)), minimum(std::move(m)), bias(std::move(b)) {
    TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.device().is_cpu(), "decode_step: ", name,
                ": a contiguous 2-D CPU weight");
    const auto dt = w.scalar_type();
    N = w.size(0), K = dt == at::kByte ? 2 * w.size(1) : w.size(1);
    if (dt == at::kChar || dt == at::kByte) {
      TORCH_CHECK(K % 32 == 0 && scale.dim() == 2 && scale.is_contiguous() && scale.size(0) == N &&
                      scale.size(1) >= 1 && K % scale.size(1) == 0 && (K / scale.size(1)) % 32 == 0 &&
                      (scale.scalar_type() == at::kFloat || scale.scalar_type() == at::kHalf),
                  "decode_step: ", name, ": scales (N, K / G) float32 or float16, G a multiple of 32");
      TORCH_CHECK(dt == at::kChar || (scale.size(1) == K / 32 && minimum.sizes() == scale.sizes() &&
                                      minimum.is_contiguous() && minimum.scalar_type() == scale.scalar_type()),
                  "decode_step: ", name, ": int4 blocks need scales and minimums (N, K / 32) of one dtype");
    } else {
      TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, "decode_step: ", name,
                  ": weights int8, int4 (uint8), float32, bfloat16 or float16, got ", dt);
    }
    TORCH_CHECK(!given(bias) || (bias.scalar_type() == at::kFloat && bias.is_contiguous() && bias.numel() == N),
                "decode_step: ", name, ": the bias must be float32 (N,)");
  }

  // y (M, N) = x (M, K) w^T + bias, fp32, KERNEL_ROWS rows a kernel call
  void apply(const float* x, float* y, int64_t M) const {
    for (int64_t m0 = 0; m0 < M; m0 += KERNEL_ROWS) {
      const int64_t rows = std::min(KERNEL_ROWS, M - m0);
      const float* xm = x + m0 * K;
      float* ym = y + m0 * N;
      switch (w.scalar_type()) {
        case at::kChar: {
          const lmforge_qx::Rows& xq = lmforge_qx::quantize(xm, rows, K);
          lmforge_qx::with_scales(scale, "decode_step", [&](auto* S) {
            lmforge_int8::dispatch(w.const_data_ptr<int8_t>(), S, xq, ym, rows, N, K, K / scale.size(1));
          });
          break;
        }
        case at::kByte: {
          const lmforge_qx::Rows& xq = lmforge_qx::quantize(xm, rows, K);
          lmforge_qx::with_scales(scale, "decode_step", [&](auto* D) {
            const auto* Mn = static_cast<decltype(D)>(minimum.const_data_ptr());
            lmforge_int4::dispatch(w.const_data_ptr<uint8_t>(), D, Mn, xq, ym, rows, N, K);
          });
          break;
        }
        case at::kFloat: lmforge_half::dispatch(w.const_data_ptr<float>(), xm, ym, rows, N, K); break;
        case at::kBFloat16: lmforge_half::dispatch(w.const_data_ptr<c10::BFloat16>(), xm, ym, rows, N, K); break;
        default: lmforge_half::dispatch(w.const_data_ptr<c10::Half>(), xm, ym, rows, N, K);
      }
    }
    if (given(bias)) {
      const float* b = bias.const_data_ptr<float>();
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < N; ++n) y[m * N + n] += b[n];
    }
  }

  // row r of the weight as fp32 (K,): a token's embedding when the table is the tied LM head's
  void row(int64_t r, float* out) const {
    switch (w.scalar_type()) {
      case at::kChar: {
        const int8_t* q = w.const_data_ptr<int8_t>() + r * K;
        const int64_t G = K / scale.size(1);
        lmforge_qx::with_scales(scale, "decode_step", [&](auto* S) {
          for (int64_t k = 0; k < K; ++k) out[k] = q[k] * static_cast<float>(S[r * (K / G) + k / G]);
        });
        break;
      }
      case at::kByte: {
        const uint8_t* p = w.const_data_ptr<uint8_t>() + r * (K / 2);
        lmforge_qx::with_scales(scale, "decode_step", [&](auto* D) {
          const auto* Mn = static_cast<decltype(D)>(minimum.const_data_ptr());
          for (int64_t b = 0; b < K / 32; ++b) {
            const float d = static_cast<float>(D[r * (K / 32) + b]), m = static_cast<float>(Mn[r * (K / 32) + b]);
            for (int j = 0; j < 16; ++j) {
              out[32 * b + j] = (p[16 * b + j] & 0x0F) * d + m;
              out[32 * b + 16 + j] = (p[16 * b + j] >> 4) * d + m;
            }
          }
        });
        break;
      }
      case at::kFloat: std::copy_n(w.const_data_ptr<float>() + r * K, K, out); break;
      case at::kBFloat16: for (int64_t k = 0; k < K; ++k) out[k] = w.const_data_ptr<c10::BFloat16>()[r * K + k]; break;
      default: for (int64_t k = 0; k < K; ++k) out[k] = w.const_data_ptr<c10::Half>()[r * K + k];
    }
  }
};

// out = x / rms(x) * w for each of M rows of n values (as F.rms_norm in fp32)
void rms_norm(const float* x, const float* w, float* out, int64_t M, int64_t n, float eps) {
  for (int64_t m = 0; m < M; ++m) lmforge_rows::rms_norm(x + m * n, w, out + m * n, n, eps);
}

// y[m] = silu(gate) * up of each row's fused (gate | up) product of 2f values
void silu_mul(const float* gu, float* y, int64_t M, int64_t f) {
  for (int64_t m = 0; m < M; ++m) lmforge_rows::silu_mul(gu + 2 * f * m, gu + 2 * f * m + f, y + f * m, f);
}

class DecodeStep : public torch::CustomClassHolder {
 public:
  // ints: dim, n_heads, n_kv_heads, head_dim, ffn_dim, rope_dim, interleaved (0/1), n_layers.
  // tensors: the embedding table ((vocab, dim) fp32, bf16 or fp16; or empty: the LM head's rows), rope cos and sin
  // (max_len, rope_dim) fp32, the final norm's weight, the LM head (weight, scale, minimum, bias: empty where none),
  // then per layer: attention and MLP norm weights, qkv, out, gate_up, down (4 tensors each), the cache's k and v
  // (batch, n_kv_heads, max_len, head_dim) fp32, bf16 or fp16, every layer's alike. Norm weights and biases fp32.
  DecodeStep(std::vector<at::Tensor> t, std::vector<int64_t> c, double eps)
      : dim_(c.at(0)), H_(c.at(1)), KV_(c.at(2)), D_(c.at(3)), F_(c.at(4)), R_(c.at(5)), interleaved_(c.at(6) != 0),
        eps_(static_cast<float>(eps)) {
    const int64_t L = c.at(7);
    TORCH_CHECK(static_cast<int64_t>(t.size()) == 8 + 20 * L, "decode_step: expected ", 8 + 20 * L, " tensors");
    TORCH_CHECK(H_ % KV_ == 0 && D_ % 8 == 0 && R_ % 2 == 0 && R_ <= D_,
                "decode_step: heads must share K/V heads evenly, head_dim be a multiple of 8 and rope_dim even");
    cos_ = t[1], sin_ = t[2], norm_ = t[3];
    head_ = Linear(t[4], t[5], t[6], t[7], "lm_head");
    for (const at::Tensor* r : {&cos_, &sin_})
      TORCH_CHECK(r->scalar_type() == at::kFloat && r->is_contiguous() && r->dim() == 2 && r->size(1) == R_,
                  "decode_step: rope tables (max_len, rope_dim) float32");
    TORCH_CHECK(head_.K == dim_, "decode_step: the LM head takes ", head_.K, " inputs, not dim ", dim_);
    vocab_ = head_.N;
    if (given(t[0])) {
      TORCH_CHECK(t[0].dim() == 2 && t[0].size(1) == dim_ && t[0].is_floating_point(),
                  "decode_step: the embedding table must be float (vocab, dim)");
      table_ = Linear(t[0], {}, {}, {}, "tok_emb");
      TORCH_CHECK(table_.N >= vocab_, "decode_step: the embedding table holds ", table_.N, " rows, the head ", vocab_);
    }
    check_norm(norm_, "norm");
    const int64_t qkv = (H_ + 2 * KV_) * D_;
    for (int64_t l = 0; l < L; ++l) {
      const at::Tensor* p = t.data() + 8 + 20 * l;
      const std::string n = "layers." + std::to_string(l) + ".";
      Layer y{p[0], p[1], Linear(p[2], p[3], p[4], p[5], n + "qkv"), Linear(p[6], p[7], p[8], p[9], n + "out"),
              Linear(p[10], p[11], p[12], p[13], n + "gate_up"), Linear(p[14], p[15], p[16], p[17], n + "down"),
              p[18], p[19]};
      check_norm(y.attn_norm, n + "attn_norm"), check_norm(y.mlp_norm, n + "mlp_norm");
      TORCH_CHECK(y.qkv.N == qkv && y.qkv.K == dim_ && y.out.N == dim_ && y.out.K == H_ * D_ &&
                      y.gate_up.N == 2 * F_ && y.gate_up.K == dim_ && y.down.N == dim_ && y.down.K == F_,
                  "decode_step: ", n, "* shapes do not match the config");
      for (const at::Tensor* kv : {&y.k, &y.v})
        TORCH_CHECK((kv->scalar_type() == at::kFloat || kv->scalar_type() == at::kBFloat16 ||
                     kv->scalar_type() == at::kHalf) && kv->dim() == 4 && kv->size(1) == KV_ && kv->size(3) == D_ &&
                        kv->stride(3) == 1 && kv->sizes() == y.k.sizes() && kv->scalar_type() == y.k.scalar_type() &&
                        (layers_.empty() || (kv->sizes() == layers_[0].k.sizes() &&
                                             kv->scalar_type() == layers_[0].k.scalar_type())),
                    "decode_step: ", n, "cache must be float32, bfloat16 or float16 (batch, n_kv_heads, max_len, "
                    "head_dim), as every layer's");
      layers_.push_back(std::move(y));
    }
    TORCH_CHECK(!layers_.empty(), "decode_step: a model without layers");
  }

  // Next-token logits (B, vocab) fp32 after tokens (B, T) int64 (one new token a row, T = 1, or a short prompt),
  // row b's tokens going to its cache slots first[b] .. first[b] + T - 1 and each seeing the filled slots up to
  // its own. first: (1,), the same for every row, or (B,), each row's own (a server's rows hold sequences of
  // different lengths). key_valid: (B, >= the last slot + 1) bool, false at pad slots; offsets: (B,) int64, each
  // row's left-pad count (a token at slot s sits at position s - offsets[b], pads at 0); last: (B,) int64, the
  // token of each row whose logits are returned (default the last); row0: the cache row of row 0.
  at::Tensor step(const at::Tensor& tokens, const at::Tensor& first, const std::optional<at::Tensor>& key_valid,
                  const std::optional<at::Tensor>& offsets, const std::optional<at::Tensor>& last, int64_t row0) {
    const at::Tensor& k0 = layers_[0].k;
    TORCH_CHECK(tokens.dim() == 2 && tokens.scalar_type() == at::kLong && tokens.is_contiguous(),
                "decode_step: tokens must be int64 (B, T)");
    const int64_t B = tokens.size(0), T = tokens.size(1), M = B * T;
    TORCH_CHECK(B >= 1 && T >= 1 && row0 >= 0 && row0 + B <= k0.size(0), "decode_step: cache rows ", row0, "..",
                row0 + B - 1, " asked for, but the KV cache holds ", k0.size(0), " rows");
    TORCH_CHECK(first.dim() == 1 && first.scalar_type() == at::kLong && first.is_contiguous() &&
                    (first.size(0) == 1 || first.size(0) == B), "decode_step: slots must be int64 (1,) or (B,)");
    pos_.resize(B);
    for (int64_t b = 0; b < B; ++b) {
      pos_[b] = first.const_data_ptr<int64_t>()[first.size(0) == 1 ? 0 : b];
      TORCH_CHECK(pos_[b] >= 0 && pos_[b] + T <= k0.size(2), "decode_step: slot ", pos_[b] + T - 1,
                  " is beyond the KV cache length ", k0.size(2));
    }
    const int64_t lo = *std::min_element(pos_.begin(), pos_.end()), hi = *std::max_element(pos_.begin(), pos_.end());
    const bool* kv = nullptr;
    int64_t kv0 = 0, kv1 = 0;
    if (key_valid) {
      const at::Tensor& t = *key_valid;
      TORCH_CHECK(t.scalar_type() == at::kBool && t.dim() == 2 && t.size(0) >= B && t.size(1) >= hi + T,
                  "decode_step: key_valid must be bool (B, >= the last slot + 1)");
      kv = t.const_data_ptr<bool>(), kv0 = t.stride(0), kv1 = t.stride(1);
    }
    const int64_t* off = nullptr;
    if (offsets) {
      TORCH_CHECK(offsets->scalar_type() == at::kLong && offsets->is_contiguous() && offsets->numel() >= B,
                  "decode_step: offsets must be int64 (B,)");
      off = offsets->const_data_ptr<int64_t>();
    }
    std::vector<int64_t> want(B, T - 1);
    if (last) {
      TORCH_CHECK(last->scalar_type() == at::kLong && last->is_contiguous() && last->numel() == B,
                  "decode_step: last must be int64 (B,)");
      for (int64_t b = 0; b < B; ++b) {
        want[b] = last->const_data_ptr<int64_t>()[b];
        TORCH_CHECK(want[b] >= 0 && want[b] < T, "decode_step: last[", b, "] = ", want[b], " is not one of the ", T, " tokens");
      }
    }
    const int64_t qkv_n = (H_ + 2 * KV_) * D_;
    x_.resize(M * dim_), h_.resize(M * dim_), y_.resize(M * dim_), qkv_.resize(M * qkv_n), att_.resize(M * H_ * D_);
    gu_.resize(M * 2 * F_), a_.resize(M * F_);
    const int64_t* tok = tokens.const_data_ptr<int64_t>();
    for (int64_t i = 0; i < M; ++i) {
      TORCH_CHECK(tok[i] >= 0 && tok[i] < vocab_, "decode_step: token id ", tok[i], " outside the vocabulary of ", vocab_);
      (table_.N ? table_ : head_).row(tok[i], x_.data() + i * dim_);
    }
    // the slots each token sees: (T, B, S) with S = the last slot + 1, where padding or rows at different slots
    // need it (one row, or rows at one slot without padding: exactly the first S slots, no mask)
    const int64_t S = hi + T;
    const bool masked = kv || lo != hi;
    if (masked) {
      mask_.resize(T * B * S);
      for (int64_t t = 0; t < T; ++t)
        for (int64_t b = 0; b < B; ++b)
          for (int64_t s = 0; s < S; ++s)
            mask_[(t * B + b) * S + s] = s <= pos_[b] + t && (!kv || kv[b * kv0 + s * kv1]);
    }
    const float scale = 1.f / std::sqrt(static_cast<float>(D_));
    for (Layer& l : layers_) {
      rms_norm(x_.data(), l.attn_norm.const_data_ptr<float>(), h_.data(), M, dim_, eps_);
      l.qkv.apply(h_.data(), qkv_.data(), M);
      switch (l.k.scalar_type()) {  // the new keys and values into the cache, then attention over it
        case at::kFloat: attention<float>(l, B, T, row0, masked, S, lo, off, scale); break;
        case at::kBFloat16: attention<c10::BFloat16>(l, B, T, row0, masked, S, lo, off, scale); break;
        default: attention<c10::Half>(l, B, T, row0, masked, S, lo, off, scale);
      }
      l.out.apply(att_.data(), y_.data(), M);
      add(x_.data(), y_.data(), M * dim_);
      rms_norm(x_.data(), l.mlp_norm.const_data_ptr<float>(), h_.data(), M, dim_, eps_);
      l.gate_up.apply(h_.data(), gu_.data(), M);
      silu_mul(gu_.data(), a_.data(), M, F_);
      l.down.apply(a_.data(), y_.data(), M);
      add(x_.data(), y_.data(), M * dim_);
    }
    for (int64_t b = 0; b < B; ++b)  // only the tokens whose logits are wanted: the final norm, then the head
      rms_norm(x_.data() + (b * T + want[b]) * dim_, norm_.const_data_ptr<float>(), h_.data() + b * dim_, 1, dim_, eps_);
    at::Tensor logits = at::empty({B, vocab_}, tokens.options().dtype(at::kFloat));
    head_.apply(h_.data(), logits.mutable_data_ptr<float>(), B);
    return logits;
  }

 private:
  struct Layer {
    at::Tensor attn_norm, mlp_norm;
    Linear qkv, out, gate_up, down;
    at::Tensor k, v;
  };

  void check_norm(const at::Tensor& w, const std::string& name) const {
    TORCH_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous() && w.numel() == dim_, "decode_step: ", name,
                ": an RMSNorm weight float32 (dim,)");
  }

  // RoPE on each token's queries and keys (qkv_), its key and value into cache slot pos_[b] + t of cache row
  // row0 + b (as T: rounded once), then every query row's attention over its row's slots into att_
  template <typename T>
  void attention(Layer& l, int64_t B, int64_t T_, int64_t row0, bool masked, int64_t S, int64_t lo,
                 const int64_t* off, float scale) {
    const int64_t qkv_n = (H_ + 2 * KV_) * D_, G = H_ / KV_;
    T* kc = l.k.mutable_data_ptr<T>() + row0 * l.k.stride(0);
    T* vc = l.v.mutable_data_ptr<T>() + row0 * l.v.stride(0);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < T_; ++t) {
        float* row = qkv_.data() + (b * T_ + t) * qkv_n;
        const int64_t slot = pos_[b] + t, p = std::max<int64_t>(0, slot - (off ? off[b] : 0));
        TORCH_CHECK(p < cos_.size(0), "decode_step: position ", p, " outside the rope tables");
        rope(row, H_ + KV_, cos_.const_data_ptr<float>() + p * R_, sin_.const_data_ptr<float>() + p * R_);
        for (int64_t h = 0; h < KV_; ++h) {  // the new key and value into their slot
          T* kd = kc + b * l.k.stride(0) + h * l.k.stride(1) + slot * l.k.stride(2);
          T* vd = vc + b * l.v.stride(0) + h * l.v.stride(1) + slot * l.v.stride(2);
          const float *ks = row + (H_ + h) * D_, *vs = row + (H_ + KV_ + h) * D_;
          for (int64_t d = 0; d < D_; ++d) kd[d] = static_cast<T>(ks[d]), vd[d] = static_cast<T>(vs[d]);
        }
      }
    for (int64_t t = 0; t < T_; ++t) {  // the t-th token of every row: one query row per head
      lmforge_attn::Mask mask;
      if (masked) mask.b = reinterpret_cast<const bool*>(mask_.data()) + t * B * S, mask.s0 = S, mask.s3 = 1;
      lmforge_attn::attend<T, float>(
          B, KV_, G, D_, masked ? S : lo + t + 1, {qkv_.data() + t * qkv_n, T_ * qkv_n, G * D_, D_},
          {kc, l.k.stride(0), l.k.stride(1), l.k.stride(2)}, {vc, l.v.stride(0), l.v.stride(1), l.v.stride(2)},
          mask, scale, {att_.data() + t * H_ * D_, T_ * H_ * D_, G * D_, D_});
    }
  }

  // rotates the first R_ dims of each of n heads of D_ values in place (model.apply_rope)
  void rope(float* x, int64_t n, const float* C, const float* S) const {
    for (int64_t h = 0; h < n; ++h) lmforge_rows::rope(x + h * D_, C, S, x + h * D_, R_, D_, interleaved_);
  }

  static void add(float* x, const float* y, int64_t n) {
    int64_t i = 0;
    for (; i + Vec::size() <= n; i += Vec::size()) (Vec::loadu(x + i) + Vec::loadu(y + i)).store(x + i);
    for (; i < n; ++i) x[i] += y[i];
  }

  int64_t dim_, H_, KV_, D_, F_, R_, vocab_ = 0;
  bool interleaved_;
  float eps_;
  at::Tensor cos_, sin_, norm_;
  Linear table_, head_;  // table_: no rows (N = 0) when the LM head's rows are the embedding
  std::vector<Layer> layers_;
  std::vector<float> x_, h_, y_, qkv_, att_, gu_, a_;  // activations, reused by every step
  std::vector<int64_t> pos_;  // each row's slot
  std::vector<uint8_t> mask_;  // (B, S): the slots each row sees
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(lmforge, m) {
  m.class_<DecodeStep>("DecodeStep")
      .def(torch::init<std::vector<at::Tensor>, std::vector<int64_t>, double>())
      .def("step", &DecodeStep::step);
}
