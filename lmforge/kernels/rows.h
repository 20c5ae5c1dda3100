// One row's element-wise passes, shared by the training kernels (fused.cpp, over many rows on ATen's threads)
// and the decode step (decode_step.cpp, over a few rows): RMSNorm, silu(gate) * up and RoPE, fp32, vectorised
// with ATen's Vectorized<float> (exp is SLEEF's 1-ulp expf, the one torch's exp and silu use).
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <cstdint>

namespace lmforge_rows {

using Vec = at::vec::Vectorized<float>;

inline Vec sigmoid(const Vec& x) { return Vec(1.f) / (Vec(1.f) + x.neg().exp()); }

// y = x * rstd * w over n values, rstd = 1 / sqrt(mean(x^2) + eps); returns rstd
inline float rms_norm(const float* x, const float* w, float* y, int64_t n, float eps) {
  const float ss = at::vec::map_reduce_all<float>([](Vec v) { return v * v; },
                                                  [](Vec& a, Vec& b) { return a + b; }, x, n);
  const float rs = 1.f / std::sqrt(ss / n + eps);
  at::vec::map2([rs](Vec v, Vec wv) { return v * Vec(rs) * wv; }, y, x, w, n);
  return rs;
}

// o = silu(g) * u over n values
inline void silu_mul(const float* g, const float* u, float* o, int64_t n) {
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    const Vec x = Vec::loadu(g + j);
    (x * sigmoid(x) * Vec::loadu(u + j)).store(o + j);
  }
  for (; j < n; ++j) o[j] = g[j] / (1.f + std::exp(-g[j])) * u[j];
}

// one head of D values: its first r rotated, o = x * c + swap(x) * s, swap exchanging the members of each pair
// ((j, j + r/2), or (2j, 2j + 1) when interleaved); the rest copied. o may be x (each pair is read first).
inline void rope(const float* x, const float* c, const float* s, float* o, int64_t r, int64_t D, bool interleaved) {
  const int64_t half = r / 2;
  if (interleaved) {
    for (int64_t j = 0; j < r; j += 2) {
      const float a = x[j], b = x[j + 1];
      o[j] = a * c[j] + b * s[j];
      o[j + 1] = b * c[j + 1] + a * s[j + 1];
    }
  } else {
    for (int64_t j = 0; j < half; ++j) {
      const float a = x[j], b = x[j + half];
      o[j] = a * c[j] + b * s[j];
      o[j + half] = b * c[j + half] + a * s[j + half];
    }
  }
  if (o != x)
    for (int64_t j = r; j < D; ++j) o[j] = x[j];
}

}  // namespace lmforge_rows
