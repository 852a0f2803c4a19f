// Helpers shared by the fused CPU kernels (cpu_kernels.cpp, small_linear.cpp).
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <cstring>

namespace fnllm_cpu {

inline void to_float(const float* x, float* out, int64_t n) { std::memcpy(out, x, n * sizeof(float)); }

inline void to_float(const c10::BFloat16* x, float* out, int64_t n) {
  const uint16_t* raw = reinterpret_cast<const uint16_t*>(x);
  uint32_t* dst = reinterpret_cast<uint32_t*>(out);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<uint32_t>(raw[i]) << 16;
}

template <typename T>
inline T from_float(float x) { return static_cast<T>(x); }

inline void check(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
}

}  // namespace fnllm_cpu

#define FNLLM_DISPATCH(dtype, ...)                                              \
  if ((dtype) == torch::kFloat32) {                                            \
    using scalar_t = float;                                                    \
    __VA_ARGS__();                                                             \
  } else if ((dtype) == torch::kBFloat16) {                                    \
    using scalar_t = c10::BFloat16;                                            \
    __VA_ARGS__();                                                             \
  } else {                                                                     \
    TORCH_CHECK(false, "fnllm cpu kernels: unsupported dtype ", (dtype));      \
  }
