// The fused CPU kernels' entry points (cpu_kernels.cpp, small_linear.cpp,
// decode_layers.cpp), bound into one Python module in cpu_kernels.cpp.
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <vector>

namespace fnllm_cpu {

torch::Tensor paged_decode(torch::Tensor q, torch::Tensor kv_cache, torch::Tensor block_tables, torch::Tensor seq_lens,
                           double scale, int64_t window);
void write_kv(torch::Tensor k, torch::Tensor v, torch::Tensor kv_cache, torch::Tensor slots);
torch::Tensor add_rms_norm(c10::optional<torch::Tensor> x, torch::Tensor residual, torch::Tensor weight, double eps);
torch::Tensor silu_mul(torch::Tensor gate_up);
std::vector<torch::Tensor> rope(torch::Tensor qkv, torch::Tensor positions, torch::Tensor cos_sin, int64_t H,
                                int64_t KVH);
torch::Tensor small_linear(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias);
std::vector<torch::Tensor> decode_layers(torch::Tensor x, c10::optional<torch::Tensor> residual,
                                         const std::vector<c10::optional<torch::Tensor>>& params,
                                         const std::vector<torch::Tensor>& kv_caches, torch::Tensor positions,
                                         torch::Tensor cos_sin, torch::Tensor slots, torch::Tensor block_tables,
                                         torch::Tensor seq_lens, int64_t heads, int64_t kv_heads, double eps,
                                         double scale, int64_t window);

}  // namespace fnllm_cpu
