// out = softmax(q k^T * scale + mask) v for decoding: a few query rows per K/V head (GQA's G query heads that
// share it; one new token) against the S cached keys. q (B, K, G, D); k, v (B, K, S, D) with any strides but a
// contiguous last dim (views of the KV cache); mask broadcastable to (B, K, G, S): bool (false: not seen) or
// float (added: ALiBi, padding). fp32 / bf16 / fp16, the same for q, k and v; sums in fp32.
//
// Why: torch's SDPA for CPU runs a flash-attention loop built for long query blocks, with a GEMM call per block;
// for one token it costs ~20 us a layer at S = 128 (SmolLM2: ~0.6 ms of a ~6 ms quantized decode step), where
// reading the K/V head once for its G rows takes a few. Each key row is read once for all G rows: G dot products,
// then each value row once into G fp32 accumulators (registers for D <= 128). The (B, K) heads go over ATen's
// thread pool when they hold enough work to pay for waking it (2 threads, 3 heads: 9.6 us at 128 keys, 11.6 on one).
// (The kernel itself; decode_attention.cpp registers it as an op, decode_step.cpp calls it directly.)
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include "vec8.h"

#include <cmath>
#include <limits>
#include <vector>

namespace lmforge_attn {

using Vec = at::vec::Vectorized<float>;
using namespace lmforge_vec;


// a (B, K, G or S, D) operand: its first element and the strides of its first three dims (the last is contiguous)
template <typename T>
struct Heads {
  T* p;
  int64_t s0, s1, s2;
};

// a mask expanded to (B, K, G, S): bool (b) or float (f), or neither (no mask), and its strides
struct Mask {
  const bool* b = nullptr;
  const float* f = nullptr;
  int64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
};

// T: the keys' and values' dtype; Q: the queries' and the output's (the same by default; the C++ decode step's
// fp32 activations against a bf16 / fp16 cache)
template <typename T, typename Q = T>
void attend(int64_t B, int64_t K, int64_t G, int64_t D, int64_t S, Heads<const Q> q, Heads<const T> k,
            Heads<const T> v, const Mask& mask, float scale, Heads<Q> out) {
  const int64_t C = D / 8;
  const Q* Qp = q.p;
  const T *Kp = k.p, *Vp = v.p;
  Q* O = out.p;
  const int64_t qs[3] = {q.s0, q.s1, q.s2}, ks[3] = {k.s0, k.s1, k.s2}, vs[3] = {v.s0, v.s1, v.s2},
                os[3] = {out.s0, out.s1, out.s2}, ms[4] = {mask.s0, mask.s1, mask.s2, mask.s3};
  const bool* mb = mask.b;
  const float* mf = mask.f;
  const bool boolean = mb != nullptr, masked = mb || mf;
  const float sc = scale, neg_inf = -std::numeric_limits<float>::infinity();
  // heads split over threads from ~8 K multiply-adds each (below, waking a thread costs more than it saves)
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 13) / std::max<int64_t>(1, 2 * S * D * G));
  at::parallel_for(0, B * K, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> p(G * S), acc(G * D), qf(D), inv(G);
    for (int64_t bk = begin; bk < end; ++bk) {
      const int64_t b = bk / K, h = bk % K;
      const T* kh = Kp + b * ks[0] + h * ks[1];
      const T* vh = Vp + b * vs[0] + h * vs[1];
      for (int64_t g = 0; g < G; ++g) {  // scores: 4 keys at a time (independent chains of multiply-adds)
        const Q* qr = Qp + b * qs[0] + h * qs[1] + g * qs[2];
        for (int64_t d = 0; d < D; ++d) qf[d] = static_cast<float>(qr[d]) * sc;
        float* pg = p.data() + g * S;
        int64_t s = 0;
        for (; s + 4 <= S; s += 4) {
          __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
          const T *k0 = kh + s * ks[2], *k1 = k0 + ks[2], *k2 = k1 + ks[2], *k3 = k2 + ks[2];
          for (int64_t c = 0; c < C; ++c) {
            const __m256 qc = _mm256_loadu_ps(qf.data() + 8 * c);
            a0 = _mm256_fmadd_ps(qc, load8(k0 + 8 * c), a0), a1 = _mm256_fmadd_ps(qc, load8(k1 + 8 * c), a1);
            a2 = _mm256_fmadd_ps(qc, load8(k2 + 8 * c), a2), a3 = _mm256_fmadd_ps(qc, load8(k3 + 8 * c), a3);
          }
          pg[s] = hsum(a0), pg[s + 1] = hsum(a1), pg[s + 2] = hsum(a2), pg[s + 3] = hsum(a3);
        }
        for (; s < S; ++s) {
          __m256 a0 = _mm256_setzero_ps();
          for (int64_t c = 0; c < C; ++c) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qf.data() + 8 * c), load8(kh + s * ks[2] + 8 * c), a0);
          pg[s] = hsum(a0);
        }
        if (masked) {
          const int64_t at = b * ms[0] + h * ms[1] + g * ms[2];
          for (int64_t s = 0; s < S; ++s)
            pg[s] = boolean ? (mb[at + s * ms[3]] ? pg[s] : neg_inf) : pg[s] + mf[at + s * ms[3]];
        }
      }
      for (int64_t g = 0; g < G; ++g) {  // softmax numerators (SLEEF's 1-ulp exp, as torch's) and 1 / their sum
        float* pg = p.data() + g * S;
        float mx = neg_inf;
        for (int64_t s = 0; s < S; ++s) mx = std::max(mx, pg[s]);
        if (mx == neg_inf) {  // a row that sees nothing: zeros
          std::fill(pg, pg + S, 0.f), inv[g] = 0.f;
          continue;
        }
        const Vec vm(mx);
        Vec vsum(0.f);
        int64_t s = 0;
        for (; s + Vec::size() <= S; s += Vec::size()) {
          const Vec e = (Vec::loadu(pg + s) - vm).exp();
          e.store(pg + s), vsum = vsum + e;
        }
        float sum = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, vsum);
        for (; s < S; ++s) sum += (pg[s] = std::exp(pg[s] - mx));
        inv[g] = 1.f / sum;
      }
      for (int64_t g = 0; g < G; ++g) {  // p . v: 8 columns of 8 at a time in registers, every value row
        const float* pg = p.data() + g * S;
        float* ag = acc.data() + g * D;
        int64_t c = 0;
        for (; c + 8 <= C; c += 8) {
          __m256 a[8];
          for (int j = 0; j < 8; ++j) a[j] = _mm256_setzero_ps();
          for (int64_t s = 0; s < S; ++s) {
            const __m256 ps = _mm256_set1_ps(pg[s]);
            const T* vr = vh + s * vs[2] + 8 * c;
            for (int j = 0; j < 8; ++j) a[j] = _mm256_fmadd_ps(ps, load8(vr + 8 * j), a[j]);
          }
          for (int j = 0; j < 8; ++j) _mm256_storeu_ps(ag + 8 * (c + j), a[j]);
        }
        for (; c < C; ++c) {
          __m256 a0 = _mm256_setzero_ps();
          for (int64_t s = 0; s < S; ++s) a0 = _mm256_fmadd_ps(_mm256_set1_ps(pg[s]), load8(vh + s * vs[2] + 8 * c), a0);
          _mm256_storeu_ps(ag + 8 * c, a0);
        }
        Q* o = O + b * os[0] + h * os[1] + g * os[2];
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<Q>(ag[d] * inv[g]);
      }
    }
  });
}

// the same for tensors: q (B, K, G, D), k and v (B, K, S, D), out like q; mask broadcastable to (B, K, G, S)
template <typename T>
void attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor* mask, double scale,
            at::Tensor& out) {
  const int64_t B = q.size(0), K = q.size(1), G = q.size(2), D = q.size(3), S = k.size(2);
  auto heads = [](const at::Tensor& t) {
    return Heads<const T>{t.const_data_ptr<T>(), t.stride(0), t.stride(1), t.stride(2)};
  };
  Mask m;
  at::Tensor e;  // kept alive while used
  if (mask) {
    e = mask->expand({B, K, G, S});
    if (e.scalar_type() == at::kBool) m.b = e.const_data_ptr<bool>();
    else m.f = e.const_data_ptr<float>();
    m.s0 = e.stride(0), m.s1 = e.stride(1), m.s2 = e.stride(2), m.s3 = e.stride(3);
  }
  attend<T>(B, K, G, D, S, heads(q), heads(k), heads(v), m, static_cast<float>(scale),
            Heads<T>{out.mutable_data_ptr<T>(), out.stride(0), out.stride(1), out.stride(2)});
}

}  // namespace lmforge_attn
