// y = x w^T (+ bias) for a few rows of x: the memory-bound linear of a
// decode step (fnllm/device/cpu_fused.py). Bound into the cpu_kernels module.
//
// w is read once, row-major [N, K], in groups of four output columns; each
// thread streams its own range of w, row after row, and keeps the group's
// four rows in L1 while every row of x is dotted with them, so the step reads
// the weights at close to memory bandwidth. Accumulation is float32. With AVX512-BF16 the
// bfloat16 products are taken straight from x and w (one dpbf16 per 32
// values); otherwise both are widened to float32 first. A column's result
// does not depend on M or on the thread count (one fixed summation order).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "common.h"
#include "kernels.h"
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kGroup = 4;  // output columns per inner loop

inline float widen(float v) { return v; }
inline float widen(c10::BFloat16 v) {
  uint32_t bits = static_cast<uint32_t>(*reinterpret_cast<const uint16_t*>(&v)) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// y[m, n0 .. n0 + g) for one group of g <= kGroup columns, portable form.
template <typename T>
inline void group_dots(const float* xf, const T* w, float* out, int64_t M, int64_t K, int64_t g) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < g; ++j) {
      const T* wr = w + j * K;
      const float* xr = xf + m * K;
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t k = 0; k < K; ++k) dot += xr[k] * widen(wr[k]);
      out[m * kGroup + j] = dot;
    }
}

#if defined(__AVX512BF16__)
// The same with AVX512-BF16 for a full group: 32 products per instruction. Each
// weight row is streamed whole before the next (interleaving the group's four
// rows reads at a third of the bandwidth on the machines measured).
inline void group_dots_bf16(const c10::BFloat16* x, const c10::BFloat16* w, float* out, int64_t M, int64_t K) {
  const int64_t tail = K % 64, body = K - tail;
  for (int64_t m = 0; m < M; ++m) {
    const c10::BFloat16* xr = x + m * K;
    for (int64_t j = 0; j < kGroup; ++j) {
      const c10::BFloat16* wr = w + j * K;
      __m512 a0 = _mm512_setzero_ps(), a1 = a0;
      for (int64_t k = 0; k < body; k += 64) {
        a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(xr + k), (__m512bh)_mm512_loadu_si512(wr + k));
        a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(xr + k + 32), (__m512bh)_mm512_loadu_si512(wr + k + 32));
      }
      for (int64_t k = body; k < K; k += 32) {  // the tail, 32 values at a time, the last masked
        const __mmask32 mask = K - k >= 32 ? ~0u : ((1u << (K - k)) - 1u);
        a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_maskz_loadu_epi16(mask, xr + k),
                              (__m512bh)_mm512_maskz_loadu_epi16(mask, wr + k));
      }
      out[m * kGroup + j] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
    }
  }
}
#endif

#if defined(__AVX512BF16__)
template <typename T>
constexpr bool kNative = std::is_same_v<T, c10::BFloat16>;  // dots straight from bfloat16
#else
template <typename T>
constexpr bool kNative = false;
#endif

template <typename T>
void small_linear_impl(const T* x, const T* w, const T* bias, T* y, int64_t M, int64_t N, int64_t K) {
  std::vector<float> xf;  // x in float32, for the portable form
  if (!kNative<T> || N % kGroup) {
    xf.resize(static_cast<size_t>(M * K));
    fnllm_cpu::to_float(x, xf.data(), M * K);
  }
  const int64_t groups = (N + kGroup - 1) / kGroup;
  at::parallel_for(0, groups, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> out(static_cast<size_t>(M * kGroup));
    for (int64_t gi = begin; gi < end; ++gi) {
      const int64_t n0 = gi * kGroup, g = std::min(kGroup, N - n0);
      bool done = false;
#if defined(__AVX512BF16__)
      if constexpr (kNative<T>)
        if (g == kGroup) group_dots_bf16(x, w + n0 * K, out.data(), M, K), done = true;
#endif
      if (!done) group_dots(xf.data(), w + n0 * K, out.data(), M, K, g);  // portable form, or the last partial group
      for (int64_t m = 0; m < M; ++m)
        for (int64_t j = 0; j < g; ++j) {
          const float b = bias ? widen(bias[n0 + j]) : 0.f;
          y[m * N + n0 + j] = static_cast<T>(out[m * kGroup + j] + b);
        }
    }
  });
}

}  // namespace

namespace fnllm_cpu {

torch::Tensor small_linear(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias) {
  fnllm_cpu::check(x, "small_linear: x"), fnllm_cpu::check(w, "small_linear: w");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "small_linear: x [M, K] and w [N, K] needed, got ",
              x.sizes(), " and ", w.sizes());
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "small_linear: x and w dtypes differ");
  const int64_t M = x.size(0), N = w.size(0), K = x.size(1);
  if (bias) TORCH_CHECK(bias->is_contiguous() && bias->dim() == 1 && bias->size(0) == N &&
                        bias->scalar_type() == x.scalar_type(), "small_linear: bias must be [N] of x's dtype");
  auto y = torch::empty({M, N}, x.options());
  FNLLM_DISPATCH(x.scalar_type(), [&] {
    small_linear_impl<scalar_t>(x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
                                bias ? bias->data_ptr<scalar_t>() : nullptr, y.data_ptr<scalar_t>(), M, N, K);
  });
  return y;
}

}  // namespace fnllm_cpu
