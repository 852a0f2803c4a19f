// Fused CPU kernels for the torch backend (fnllm/device/cpu_kernels.py).
//
// Each kernel does in one pass what the eager path does in several ATen
// calls: at batch 1 a decode step is dominated by per-op overhead, and at
// large batch by the copy of every row's KV blocks into a gather buffer.
// All arithmetic is float32; inputs and outputs are float32 or bfloat16.
// Layouts (contiguous): kv_cache [2, num_blocks, block_size, kv_heads, d],
// block_tables [B, max_blocks] int32, seq_lens [B] int32.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "common.h"
#include "kernels.h"
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

#include <cmath>
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

using fnllm_cpu::check;
using fnllm_cpu::from_float;
using fnllm_cpu::to_float;

// s[j] = q . k_j for n rows of length D, ``stride`` floats apart.
inline void dots(const float* __restrict q, const float* __restrict rows, float* __restrict s, int64_t n, int64_t D,
                 int64_t stride) {
  for (int64_t j = 0; j < n; ++j) {
    const float* kr = rows + j * stride;
    float dot = 0.f;
#pragma omp simd reduction(+ : dot)
    for (int64_t d = 0; d < D; ++d) dot += q[d] * kr[d];
    s[j] = dot;
  }
}

// acc += sum_j p[j] * rows[j] for n rows of length D, ``stride`` floats apart.
inline void axpys(const float* __restrict p, const float* __restrict rows, float* __restrict acc, int64_t n, int64_t D,
                  int64_t stride) {
  for (int64_t j = 0; j < n; ++j) {
    const float pj = p[j];
    const float* vr = rows + j * stride;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) acc[d] += pj * vr[d];
  }
}

// In place: s = exp(s - max(s)); returns 1 / sum.
inline float softmax_unnormalized(float* __restrict s, int64_t L) {
  float mx = s[0], sum = 0.f;
  for (int64_t t = 1; t < L; ++t) mx = s[t] > mx ? s[t] : mx;
#pragma omp simd
  for (int64_t t = 0; t < L; ++t) s[t] = std::exp(s[t] - mx);
#pragma omp simd reduction(+ : sum)
  for (int64_t t = 0; t < L; ++t) sum += s[t];
  return 1.f / sum;
}

// Scores of one block of a row: s[h, t0 + j] = scale * q_h . k_j. For
// bfloat16 with AVX512-BF16 the products are taken straight from q and the
// cache (one dpbf16 per 32 values, float32 accumulation); otherwise from qf
// (q in float32, already scaled) and the block converted to float32.
template <typename T>
inline void block_scores(const T* q, const float* qf, const T* kblk, float* rows, float* s, int64_t n, int64_t L,
                         int64_t t0, int64_t h0, int64_t H, int64_t G, int64_t D, int64_t tok, float scale) {
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (D % 32 == 0) {
      for (int64_t h = h0; h < H; ++h) {
        const T* qh = q + h * D;
        for (int64_t j = 0; j < n; ++j) {
          const T* kr = kblk + j * tok + (h / G) * D;
          __m512 acc = _mm512_setzero_ps();
          for (int64_t d = 0; d < D; d += 32)
            acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(qh + d), (__m512bh)_mm512_loadu_si512(kr + d));
          s[h * L + t0 + j] = _mm512_reduce_add_ps(acc) * scale;
        }
      }
      return;
    }
  }
#endif
  to_float(kblk, rows, n * tok);
  for (int64_t h = h0; h < H; ++h) dots(qf + h * D, rows + (h / G) * D, s + h * L + t0, n, D, tok);
}

#if defined(__AVX512BF16__)
// acc[h] = sum_t p[h, t] v_t over the row's tokens start .. L-1 for query heads
// h0 .. h1-1, all of one kv head (vbase: that head's values in block 0). The
// sums stay in registers across all blocks, a few heads at a time, and each
// value row is widened from bfloat16 once for them all. Per lane the terms are
// added in token order, one fused multiply-add each.
template <int64_t DC>
inline void value_sums_bf16(const c10::BFloat16* vbase, const int32_t* table, int64_t start, int64_t L, int64_t BS,
                            int64_t blk, int64_t tok, const float* s, int64_t Lw, int64_t h0, int64_t h1, float* acc) {
  constexpr int64_t V = DC / 16, HC = V < 16 ? 16 / V : 1;  // vectors per head; heads per pass (<= 16 accumulators)
  for (int64_t hb = h0; hb < h1; hb += HC) {
    const int64_t nh = std::min(HC, h1 - hb);
    __m512 a[HC][V];
    for (int64_t i = 0; i < HC; ++i)
      for (int64_t c = 0; c < V; ++c) a[i][c] = _mm512_setzero_ps();
    for (int64_t t0 = start - start % BS; t0 < L; t0 += BS) {
      const int64_t j0 = std::max(start, t0) - t0, n = std::min(BS, L - t0) - j0;
      const uint16_t* vb = reinterpret_cast<const uint16_t*>(vbase + table[t0 / BS] * blk + j0 * tok);
      const float* p = s + t0 + j0 - start;
      for (int64_t j = 0; j < n; ++j) {
        __m512 v[V];
        for (int64_t c = 0; c < V; ++c)
          v[c] = _mm512_castsi512_ps(_mm512_slli_epi32(
              _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(vb + j * tok + 16 * c))), 16));
        for (int64_t i = 0; i < HC; ++i) {
          if (i >= nh) break;
          const __m512 pj = _mm512_set1_ps(p[(hb + i) * Lw + j]);
          for (int64_t c = 0; c < V; ++c) a[i][c] = _mm512_fmadd_ps(pj, v[c], a[i][c]);
        }
      }
    }
    for (int64_t i = 0; i < nh; ++i)
      for (int64_t c = 0; c < V; ++c) _mm512_storeu_ps(acc + (hb + i) * DC + 16 * c, a[i][c]);
  }
}
#endif

// One row of paged decode attention: its query heads h0 .. H-1 (G per kv head; a task
// may take any run of heads, and a head's arithmetic does not depend on the split) attend
// over its cached tokens start .. L-1 (start > 0 under a sliding window: the
// table's entries before block start / BS are never read, they may be holes),
// read a block at a time: a block's K (then V) for all kv heads is one
// contiguous run of BS * KVH * D values.
// Scratch: qf and acc [H * D], rows [BS * KVH * D], s [H * (L - start)].
template <typename T, int64_t DC>  // DC: the head size when known at compile time (then loops unroll), else 0
void decode_row(const T* q, const T* kv, const int32_t* table, T* out, int64_t start, int64_t L, int64_t h0, int64_t H,
                int64_t KVH, int64_t G, int64_t Dr, int64_t NB, int64_t BS, float scale, float* qf, float* acc, float* rows,
                float* s) {
  const int64_t D = DC ? DC : Dr;
  const int64_t tok = KVH * D, blk = BS * KVH * D, v_off = NB * blk, Lw = L - start;
  to_float(q, qf, H * D);
  for (int64_t i = h0 * D; i < H * D; ++i) qf[i] *= scale;
  for (int64_t t0 = start - start % BS; t0 < L; t0 += BS) {
    const int64_t j0 = std::max(start, t0) - t0, n = std::min(BS, L - t0) - j0;
    block_scores<T>(q, qf, kv + table[t0 / BS] * blk + j0 * tok, rows, s, n, Lw, t0 + j0 - start, h0, H, G, D, tok,
                    scale);
  }
  float inv[512];
  for (int64_t h = h0; h < H; ++h) inv[h] = softmax_unnormalized(s + h * Lw, Lw);
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, c10::BFloat16> && DC % 16 == 0 && DC > 0) {
    for (int64_t g = h0 / G; g * G < H; ++g)  // each kv head's query heads (those of this task)
      value_sums_bf16<DC>(kv + v_off + g * D, table, start, L, BS, blk, tok, s, Lw, std::max(h0, g * G),
                          std::min(H, (g + 1) * G), acc);
  } else
#endif
  {
    std::fill(acc, acc + H * D, 0.f);
    for (int64_t t0 = start - start % BS; t0 < L; t0 += BS) {
      const int64_t j0 = std::max(start, t0) - t0, n = std::min(BS, L - t0) - j0;
      to_float(kv + v_off + table[t0 / BS] * blk + j0 * tok, rows, n * tok);
      for (int64_t h = h0; h < H; ++h) axpys(s + h * Lw + t0 + j0 - start, rows + (h / G) * D, acc + h * D, n, D, tok);
    }
  }
  for (int64_t h = h0; h < H; ++h)
    for (int64_t d = 0; d < D; ++d) out[h * D + d] = from_float<T>(acc[h * D + d] * inv[h]);
}

// The first key a row of length L reads: its last `window` keys (all when window is 0).
inline int64_t window_start(int64_t L, int64_t window) { return window > 0 ? std::max<int64_t>(0, L - window) : 0; }

// Paged decode attention: one query token per row, keys/values read in place
// through the row's block table (no gather). Tasks are rows, or with fewer rows
// than threads (batch-1 decode) a row's query heads, split evenly.
template <typename T>
void paged_decode_impl(const T* q, const T* kv, const int32_t* tables, const int32_t* lens, T* out,
                       int64_t B, int64_t H, int64_t KVH, int64_t D, int64_t NB, int64_t BS, int64_t MAXB,
                       float scale, int64_t window) {
  int64_t longest = 1;
  for (int64_t b = 0; b < B; ++b) longest = std::max<int64_t>(longest, lens[b]);
  const int64_t G = H / KVH, parts = B < at::get_num_threads() ? std::min<int64_t>(H, at::get_num_threads()) : 1;
  at::parallel_for(0, B * parts, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(H * D), acc(H * D), rows(BS * KVH * D), s(H * longest);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / parts, part = task % parts;
      const int64_t h0 = H * part / parts, h1 = H * (part + 1) / parts;
      auto row = D == 64 ? decode_row<T, 64> : D == 128 ? decode_row<T, 128> : decode_row<T, 0>;
      row(q + b * H * D, kv, tables + b * MAXB, out + b * H * D, window_start(lens[b], window), lens[b], h0, h1, KVH, G,
          D, NB, BS, scale, qf.data(), acc.data(), rows.data(), s.data());
    }
  });
}

// residual += x (when x is given), then out = weight * rms_norm(residual),
// rounded like transformers' LlamaRMSNorm: normalize in float32, round to T,
// then multiply by the weight.
template <typename T>
void add_rms_norm_impl(const T* x, T* residual, const T* weight, T* out, int64_t rows, int64_t n, float eps) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> r(n), w(n), xf(n);
    to_float(weight, w.data(), n);
    for (int64_t i = begin; i < end; ++i) {
      T* res = residual + i * n;
      to_float(res, r.data(), n);
      if (x != nullptr) {
        to_float(x + i * n, xf.data(), n);
        for (int64_t j = 0; j < n; ++j) {
          r[j] = static_cast<float>(from_float<T>(r[j] + xf[j]));
          res[j] = from_float<T>(r[j]);
        }
      }
      float ss = 0.f;
#pragma omp simd reduction(+ : ss)
      for (int64_t j = 0; j < n; ++j) ss += r[j] * r[j];
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(n) + eps);
      T* o = out + i * n;
      for (int64_t j = 0; j < n; ++j) o[j] = from_float<T>(w[j] * static_cast<float>(from_float<T>(r[j] * inv)));
    }
  });
}

// out[r, j] = silu(gate_up[r, j]) * gate_up[r, n + j]
template <typename T>
void silu_mul_impl(const T* gu, T* out, int64_t rows, int64_t n) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> g(n), u(n);
    for (int64_t i = begin; i < end; ++i) {
      to_float(gu + i * 2 * n, g.data(), n);
      to_float(gu + i * 2 * n + n, u.data(), n);
      float* gf = g.data();
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) gf[j] = gf[j] / (1.f + std::exp(-gf[j]));
      T* o = out + i * n;
      for (int64_t j = 0; j < n; ++j) o[j] = from_float<T>(static_cast<float>(from_float<T>(g[j])) * u[j]);
    }
  });
}

// Neox rotary on the q and k heads of fused qkv [T, (H + 2 KVH) * D];
// returns them rotated, q [T, H, D] and k [T, KVH, D] (v stays a view of qkv).
template <typename T>
void rope_impl(const T* qkv, const int64_t* pos, const float* cos_sin, T* q_out, T* k_out, int64_t tokens, int64_t H,
               int64_t KVH, int64_t D) {
  const int64_t half = D / 2, width = (H + 2 * KVH) * D;
  at::parallel_for(0, tokens, 8, [&](int64_t begin, int64_t end) {
    std::vector<float> x(D);
    for (int64_t t = begin; t < end; ++t) {
      const float* cs = cos_sin + pos[t] * D;
      for (int64_t h = 0; h < H + KVH; ++h) {
        to_float(qkv + t * width + h * D, x.data(), D);
        T* dst = h < H ? q_out + (t * H + h) * D : k_out + (t * KVH + h - H) * D;
        for (int64_t i = 0; i < half; ++i) {
          // rounded like the eager path: cos/sin and x*cos in T, then one fused multiply-add
          const float c = static_cast<float>(from_float<T>(cs[i])), s = static_cast<float>(from_float<T>(cs[half + i]));
          const float x1c = static_cast<float>(from_float<T>(x[i] * c));
          const float x2c = static_cast<float>(from_float<T>(x[half + i] * c));
          dst[i] = from_float<T>(x1c - x[half + i] * s);
          dst[half + i] = from_float<T>(x2c + x[i] * s);
        }
      }
    }
  });
}

}  // namespace

namespace fnllm_cpu {

torch::Tensor paged_decode(torch::Tensor q, torch::Tensor kv_cache, torch::Tensor block_tables, torch::Tensor seq_lens,
                           double scale, int64_t window) {
  check(q, "q"), check(kv_cache, "kv_cache"), check(block_tables, "block_tables"), check(seq_lens, "seq_lens");
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt32 && seq_lens.scalar_type() == torch::kInt32,
              "block_tables and seq_lens must be int32");
  TORCH_CHECK(q.scalar_type() == kv_cache.scalar_type(), "q and kv_cache dtypes differ");
  TORCH_CHECK(q.size(1) % kv_cache.size(3) == 0 && q.size(1) <= 512, "query heads must be a multiple of kv heads, at most 512");
  TORCH_CHECK(q.dim() == 3 && kv_cache.dim() == 5 && kv_cache.size(0) == 2, "paged_decode: q must be [B, H, D] and "
              "kv_cache [2, blocks, block_size, kv_heads, D]");
  TORCH_CHECK(block_tables.dim() == 2 && seq_lens.dim() == 1, "paged_decode: block_tables must be 2-D, seq_lens 1-D");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t NB = kv_cache.size(1), BS = kv_cache.size(2), KVH = kv_cache.size(3);
  TORCH_CHECK(kv_cache.size(4) == D, "paged_decode: head size ", D, " differs from the cache's ", kv_cache.size(4));
  TORCH_CHECK(block_tables.size(0) == B && seq_lens.size(0) == B, "block_tables and seq_lens need one row per query");
  const int32_t* tab = block_tables.data_ptr<int32_t>();
  TORCH_CHECK(window >= 0, "paged_decode: window must be >= 0 (0: no sliding window)");
  for (int64_t b = 0; b < B; ++b) {  // every block a row reads must exist: a bad table is an error, not a stray read
    const int64_t len = seq_lens.data_ptr<int32_t>()[b], used = (len + BS - 1) / BS;
    TORCH_CHECK(len >= 1 && used <= block_tables.size(1), "row ", b, ": length ", len, " does not fit its block table");
    for (int64_t j = window_start(len, window) / BS; j < used; ++j)
      TORCH_CHECK(tab[b * block_tables.size(1) + j] >= 0 && tab[b * block_tables.size(1) + j] < NB, "row ", b,
                  ": block id ", tab[b * block_tables.size(1) + j], " outside the cache of ", NB, " blocks");
  }
  auto out = torch::empty_like(q);
  FNLLM_DISPATCH(q.scalar_type(), [&] {
    paged_decode_impl<scalar_t>(q.data_ptr<scalar_t>(), kv_cache.data_ptr<scalar_t>(), block_tables.data_ptr<int32_t>(),
                                seq_lens.data_ptr<int32_t>(), out.data_ptr<scalar_t>(), B, H, KVH, D, NB, BS,
                                block_tables.size(1), static_cast<float>(scale), window);
  });
  return out;
}

// kv_cache[0] and kv_cache[1] at each token's slot (block * block_size + offset)
// <- its k and v rows: a step's paged cache write, one copy per token and side.
// k and v are [T, kv_heads, D] with each token's heads contiguous (their rows may
// be strided: v is a view of the fused qkv). A slot outside the cache is an error.
void write_kv(torch::Tensor k, torch::Tensor v, torch::Tensor kv_cache, torch::Tensor slots) {
  check(kv_cache, "kv_cache"), check(slots, "slots");
  TORCH_CHECK(slots.scalar_type() == torch::kInt64 && slots.dim() == 1, "write_kv: slots must be 1-D int64");
  TORCH_CHECK(kv_cache.dim() == 5 && kv_cache.size(0) == 2, "write_kv: kv_cache must be [2, blocks, block_size, "
              "kv_heads, D]");
  const int64_t T = slots.size(0), KVH = kv_cache.size(3), D = kv_cache.size(4), width = KVH * D;
  const int64_t nslots = kv_cache.size(1) * kv_cache.size(2);
  for (const torch::Tensor* t : {&k, &v}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == kv_cache.scalar_type(), "write_kv: k and v must be CPU "
                "tensors of the cache's dtype");
    TORCH_CHECK(t->dim() == 3 && t->size(0) == T && t->size(1) == KVH && t->size(2) == D, "write_kv: k and v must be [",
                T, ", ", KVH, ", ", D, "], got ", t->sizes());
    TORCH_CHECK(t->stride(2) == 1 && t->stride(1) == D, "write_kv: each token's k and v heads must be contiguous");
  }
  const int64_t* slot = slots.data_ptr<int64_t>();
  for (int64_t i = 0; i < T; ++i)
    TORCH_CHECK(slot[i] >= 0 && slot[i] < nslots, "write_kv: slot ", slot[i], " of token ", i, " is outside the cache of ",
                nslots, " slots");
  const int64_t bytes = width * kv_cache.element_size();
  char* cache = static_cast<char*>(kv_cache.data_ptr());
  const int64_t side = nslots * bytes;
  const char* src[2] = {static_cast<const char*>(k.data_ptr()), static_cast<const char*>(v.data_ptr())};
  const int64_t row[2] = {k.stride(0) * k.element_size(), v.stride(0) * v.element_size()};
  for (int64_t i = 0; i < T; ++i)
    for (int s = 0; s < 2; ++s) std::memcpy(cache + s * side + slot[i] * bytes, src[s] + i * row[s], bytes);
}

torch::Tensor add_rms_norm(c10::optional<torch::Tensor> x, torch::Tensor residual, torch::Tensor weight, double eps) {
  check(residual, "residual"), check(weight, "weight");
  if (x) check(*x, "x");
  if (x) TORCH_CHECK(x->sizes() == residual.sizes() && x->scalar_type() == residual.scalar_type(),
                    "add_rms_norm: x and residual differ in shape or dtype");
  TORCH_CHECK(residual.dim() >= 1 && weight.dim() == 1 && weight.size(0) == residual.size(-1) &&
              weight.scalar_type() == residual.scalar_type(), "add_rms_norm: weight must match the last dimension");
  auto out = torch::empty_like(residual);
  const int64_t n = residual.size(-1), rows = n ? residual.numel() / n : 0;
  FNLLM_DISPATCH(residual.scalar_type(), [&] {
    add_rms_norm_impl<scalar_t>(x ? x->data_ptr<scalar_t>() : nullptr, residual.data_ptr<scalar_t>(),
                                weight.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), rows, n, static_cast<float>(eps));
  });
  return out;
}

torch::Tensor silu_mul(torch::Tensor gate_up) {
  check(gate_up, "gate_up");
  TORCH_CHECK(gate_up.dim() >= 1 && gate_up.size(-1) % 2 == 0 && gate_up.size(-1) > 0,
              "silu_mul: the last dimension must be even and non-empty");
  const int64_t n = gate_up.size(-1) / 2, rows = gate_up.numel() / (2 * n);
  auto out = torch::empty({rows, n}, gate_up.options());
  FNLLM_DISPATCH(gate_up.scalar_type(), [&] {
    silu_mul_impl<scalar_t>(gate_up.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), rows, n);
  });
  return out;
}

std::vector<torch::Tensor> rope(torch::Tensor qkv, torch::Tensor positions, torch::Tensor cos_sin, int64_t H,
                                int64_t KVH) {
  check(qkv, "qkv"), check(positions, "positions"), check(cos_sin, "cos_sin");
  TORCH_CHECK(positions.scalar_type() == torch::kInt64, "positions must be int64");
  TORCH_CHECK(cos_sin.scalar_type() == torch::kFloat32, "cos_sin must be float32");
  TORCH_CHECK(qkv.dim() == 2 && cos_sin.dim() == 2 && positions.dim() == 1, "rope: qkv and cos_sin must be 2-D, positions 1-D");
  const int64_t T = qkv.size(0), D = cos_sin.size(1), P = cos_sin.size(0);
  TORCH_CHECK(H >= 1 && KVH >= 1 && D % 2 == 0, "rope: head counts must be >= 1 and the head size even");
  TORCH_CHECK(qkv.size(1) == (H + 2 * KVH) * D, "qkv width does not match the head counts");
  TORCH_CHECK(positions.size(0) == T, "rope: ", positions.size(0), " positions for ", T, " tokens");
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t)  // the table is read at pos[t]: a position past it is an error, not a stray read
    TORCH_CHECK(pos[t] >= 0 && pos[t] < P, "rope: position ", pos[t], " of token ", t, " is outside the table of ", P,
                " positions");
  auto q = torch::empty({T, H, D}, qkv.options()), k = torch::empty({T, KVH, D}, qkv.options());
  FNLLM_DISPATCH(qkv.scalar_type(), [&] {
    rope_impl<scalar_t>(qkv.data_ptr<scalar_t>(), positions.data_ptr<int64_t>(), cos_sin.data_ptr<float>(),
                        q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), T, H, KVH, D);
  });
  return {q, k};
}

}  // namespace fnllm_cpu

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace fnllm_cpu;
  m.def("paged_decode", &paged_decode, "paged decode attention (one query token per row; window > 0: its last "
        "`window` keys only)", pybind11::arg("q"), pybind11::arg("kv_cache"), pybind11::arg("block_tables"),
        pybind11::arg("seq_lens"), pybind11::arg("scale"), pybind11::arg("window") = 0);
  m.def("write_kv", &write_kv, "k and v rows into the paged cache at their slots", pybind11::arg("k"),
        pybind11::arg("v"), pybind11::arg("kv_cache"), pybind11::arg("slots"));
  m.def("add_rms_norm", &add_rms_norm, "residual += x; weight * rms_norm(residual)");
  m.def("silu_mul", &silu_mul, "silu(gate) * up");
  m.def("rope", &rope, "neox rotary on the q and k heads of fused qkv");
  m.def("small_linear", &small_linear, "x w^T (+ bias) for a few rows, w row-major [N, K] read once",
        pybind11::arg("x"), pybind11::arg("w"), pybind11::arg("bias") = pybind11::none());
  m.def("decode_layers", &decode_layers, "the decoder layers of a step whose every token is a decode row, in one call",
        pybind11::arg("x"), pybind11::arg("residual"), pybind11::arg("params"), pybind11::arg("kv_caches"),
        pybind11::arg("positions"), pybind11::arg("cos_sin"), pybind11::arg("slots"), pybind11::arg("block_tables"),
        pybind11::arg("seq_lens"), pybind11::arg("heads"), pybind11::arg("kv_heads"), pybind11::arg("eps"),
        pybind11::arg("scale"), pybind11::arg("window"), pybind11::call_guard<pybind11::gil_scoped_release>());
}
