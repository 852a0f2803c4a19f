// The decoder layers of a step whose every token is a decode row, in one call
// (fnllm/device/cpu_fused.py, FusedCpuBackend.decode_layers).
//
// The same kernels, in the same order and on the same values, as
// DecoderLayer.forward through FusedCpuBackend's ops for such a step:
// add_rms_norm, small_linear (qkv), rope, write_kv, paged_decode over every
// token, small_linear (o), add_rms_norm, small_linear (gate_up), silu_mul,
// small_linear (down). The result is therefore bit-identical; what goes is
// the return to Python between the ~10 kernels of each layer. The GIL is
// released for the whole call (the binding's call guard).
#include "kernels.h"

namespace fnllm_cpu {

namespace {
// params, per layer: qkv weight, qkv bias, o weight, o bias, gate_up weight, down weight, input norm, post norm
constexpr size_t kParams = 8;
constexpr bool kOptional[kParams] = {false, true, false, true, false, false, false, false};
}  // namespace

std::vector<torch::Tensor> decode_layers(torch::Tensor x, c10::optional<torch::Tensor> residual,
                                         const std::vector<c10::optional<torch::Tensor>>& params,
                                         const std::vector<torch::Tensor>& kv_caches, torch::Tensor positions,
                                         torch::Tensor cos_sin, torch::Tensor slots, torch::Tensor block_tables,
                                         torch::Tensor seq_lens, int64_t heads, int64_t kv_heads, double eps,
                                         double scale, int64_t window) {
  const size_t layers = kv_caches.size();
  TORCH_CHECK(params.size() == layers * kParams, "decode_layers: ", kParams, " params per layer needed, got ",
              params.size(), " for ", layers, " layers");
  for (size_t i = 0; i < params.size(); ++i)
    TORCH_CHECK(kOptional[i % kParams] || params[i].has_value(), "decode_layers: param ", i % kParams, " of layer ",
                i / kParams, " is missing");
  TORCH_CHECK(x.dim() == 2 && cos_sin.dim() == 2, "decode_layers: x must be [T, hidden], cos_sin 2-D");
  const int64_t T = x.size(0), D = cos_sin.size(1);
  torch::Tensor res = residual ? *residual : x;
  for (size_t l = 0; l < layers; ++l) {
    const c10::optional<torch::Tensor>* p = &params[l * kParams];
    // the first layer without a residual normalizes x, which becomes the residual (DecoderLayer.forward)
    torch::Tensor h = (l == 0 && !residual) ? add_rms_norm(c10::nullopt, res, *p[6], eps)
                                            : add_rms_norm(x, res, *p[6], eps);
    torch::Tensor qkv = small_linear(h, *p[0], p[1]);
    std::vector<torch::Tensor> qk = rope(qkv, positions, cos_sin, heads, kv_heads);
    write_kv(qk[1], qkv.narrow(1, (heads + kv_heads) * D, kv_heads * D).view({T, kv_heads, D}), kv_caches[l], slots);
    torch::Tensor attn = paged_decode(qk[0], kv_caches[l], block_tables, seq_lens, scale, window).view({T, heads * D});
    h = add_rms_norm(small_linear(attn, *p[2], p[3]), res, *p[7], eps);
    x = small_linear(silu_mul(small_linear(h, *p[4], c10::nullopt)), *p[5], c10::nullopt);
  }
  return {x, res};
}

}  // namespace fnllm_cpu
