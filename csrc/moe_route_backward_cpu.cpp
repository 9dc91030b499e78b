// CPU backward of minimind_fast::moe_route: the gradient of the router logits from the
// gradients of topk_weight, scores, prob_mean and seq_prob_mean, using the forward's saved scores
// (no exp). fp32 on transposed blocks of W tokens like the forward (moe_route_simd.h); fp64
// logits (gradcheck) take the per-row version, whose comment block holds the maths.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "moe_route_cpu.h"
#include "moe_route_simd.h"

#pragma GCC diagnostic ignored "-Wpsabi"  // 32-byte vectors only live inside AVX2 functions

namespace minimind_fast {
namespace {

template <typename real_t>
struct BackwardIn {
  const real_t* grad_weight;    // (T, k) or null
  const real_t* grad_scores;    // (T, E) or null
  const real_t* grad_mean;      // (E,) or null
  const real_t* grad_seq_mean;  // (B, E) or null
  const real_t* scores;         // (T, E)
  const int64_t* topk_idx;      // (T, k)
};

// Per token t (s = scores[t], g* = incoming gradients, S = sum_j s[idx_j] + 1e-20):
//   dL/ds_e  = g_scores[t, e] + g_prob_mean[e] / T + g_seq_prob_mean[t / L, e] / L
//   top-k    : dL/ds_{idx_j} += g_j                         (weights not renormalised)
//              dL/ds_{idx_j} += (g_j - sum_l g_l w_l) / S    (w_j = s_{idx_j} / S)
//   softmax  : dL/dx_e = s_e (dL/ds_e - sum_f s_f dL/ds_f);  sigmoid: dL/dx_e = dL/ds_e s_e (1 - s_e)
template <typename real_t, typename scalar_t>
MINIMIND_FAST_SIMD void route_backward_rows(const BackwardIn<real_t>& in, const RouteShape& shape, int64_t begin,
                                            int64_t end, real_t* grad_score, scalar_t* grad_logits) {
  const int64_t T = shape.tokens, E = shape.experts, k = shape.top_k, L = shape.seq_len;
  const real_t inv_tokens = real_t(1) / static_cast<real_t>(T), inv_len = real_t(1) / static_cast<real_t>(L);
  int64_t seq = begin / L, seq_end = (seq + 1) * L;
  for (int64_t t = begin; t < end; ++t) {
    const real_t* s = in.scores + t * E;
    for (int64_t e = 0; e < E; ++e) grad_score[e] = in.grad_scores ? in.grad_scores[t * E + e] : real_t(0);
    if (in.grad_mean)
      for (int64_t e = 0; e < E; ++e) grad_score[e] += in.grad_mean[e] * inv_tokens;
    if (in.grad_seq_mean) {
      if (t == seq_end) seq_end += L, ++seq;
      const real_t* g = in.grad_seq_mean + seq * E;
      for (int64_t e = 0; e < E; ++e) grad_score[e] += g[e] * inv_len;
    }
    if (in.grad_weight) {
      const int64_t* id = in.topk_idx + t * k;
      const real_t* g = in.grad_weight + t * k;
      if (shape.normalize) {
        real_t selected = 0, weighted = 0;
        for (int64_t j = 0; j < k; ++j) {
          selected += s[id[j]];
          weighted += g[j] * s[id[j]];
        }
        const real_t denom = selected + static_cast<real_t>(kNormEps);
        const real_t dot = weighted / denom;
        for (int64_t j = 0; j < k; ++j) grad_score[id[j]] += (g[j] - dot) / denom;
      } else {
        for (int64_t j = 0; j < k; ++j) grad_score[id[j]] += g[j];
      }
    }
    scalar_t* out = grad_logits + t * E;
    if (shape.scoring == Scoring::kSoftmax) {
      real_t partial[4] = {0, 0, 0, 0};  // a fixed-order 4-way dot product (vectorisable)
      int64_t e = 0;
      for (; e + 4 <= E; e += 4)
        for (int q = 0; q < 4; ++q) partial[q] += grad_score[e + q] * s[e + q];
      real_t dot = (partial[0] + partial[1]) + (partial[2] + partial[3]);
      for (; e < E; ++e) dot += grad_score[e] * s[e];
      for (e = 0; e < E; ++e) out[e] = static_cast<scalar_t>(s[e] * (grad_score[e] - dot));
    } else {
      for (int64_t e = 0; e < E; ++e) out[e] = static_cast<scalar_t>(grad_score[e] * s[e] * (real_t(1) - s[e]));
    }
  }
}

// The fp32 backward on transposed blocks of W tokens: the maths of route_backward_rows, with
// every per-expert step a W-lane vector operation.
template <int W, typename scalar_t>
MINIMIND_FAST_SIMD void route_backward_blocks(const BackwardIn<float>& in, const RouteShape& shape,
                                              int64_t block_begin, int64_t block_end, scalar_t* grad_logits) {
  using F = typename simd::Vec<W>::F;
  const int64_t T = shape.tokens, E = shape.experts, k = shape.top_k, L = shape.seq_len;
  const float inv_tokens = 1.0f / static_cast<float>(T), inv_len = 1.0f / static_cast<float>(L);
  AlignedArray<F> score_storage(E), grad_storage(E);
  F* s = score_storage.data();
  F* g = grad_storage.data();
  for (int64_t b = block_begin; b < block_end; ++b) {
    const int64_t t0 = b * W;
    const int n = static_cast<int>(std::min<int64_t>(W, T - t0));
    auto load = [&](const float* rows, F* out) {
      if (simd::load_block<W>(rows, E, n, out)) return;
      for (int64_t e = 0; e < E; ++e) out[e] = simd::splat<W>(0.0f);
      for (int w = 0; w < n; ++w)
        for (int64_t e = 0; e < E; ++e) out[e][w] = rows[w * E + e];
    };
    load(in.scores + t0 * E, s);
    if (in.grad_scores) {
      load(in.grad_scores + t0 * E, g);
    } else {
      for (int64_t e = 0; e < E; ++e) g[e] = simd::splat<W>(0.0f);
    }
    if (in.grad_mean)
      for (int64_t e = 0; e < E; ++e) g[e] += in.grad_mean[e] * inv_tokens;
    if (in.grad_seq_mean) {
      const int64_t first_seq = t0 / L, last_seq = (t0 + n - 1) / L;
      if (first_seq == last_seq) {
        for (int64_t e = 0; e < E; ++e) g[e] += in.grad_seq_mean[first_seq * E + e] * inv_len;
      } else {
        for (int w = 0; w < n; ++w)
          for (int64_t e = 0; e < E; ++e) g[e][w] += in.grad_seq_mean[((t0 + w) / L) * E + e] * inv_len;
      }
    }
    if (in.grad_weight) {
      for (int w = 0; w < n; ++w) {
        const int64_t* id = in.topk_idx + (t0 + w) * k;
        const float* gw = in.grad_weight + (t0 + w) * k;
        if (shape.normalize) {
          float selected = 0.0f, weighted = 0.0f;
          for (int64_t j = 0; j < k; ++j) {
            selected += s[id[j]][w];
            weighted += gw[j] * s[id[j]][w];
          }
          const float denom = selected + static_cast<float>(kNormEps);
          const float dot = weighted / denom;
          for (int64_t j = 0; j < k; ++j) g[id[j]][w] += (gw[j] - dot) / denom;
        } else {
          for (int64_t j = 0; j < k; ++j) g[id[j]][w] += gw[j];
        }
      }
    }
    if (shape.scoring == Scoring::kSoftmax) {
      F dot = simd::splat<W>(0.0f);
      for (int64_t e = 0; e < E; ++e) dot += g[e] * s[e];
      for (int64_t e = 0; e < E; ++e) g[e] = s[e] * (g[e] - dot);
    } else {
      for (int64_t e = 0; e < E; ++e) g[e] = g[e] * s[e] * (1.0f - s[e]);
    }
    scalar_t* out = grad_logits + t0 * E;
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (simd::store_block<W>(g, E, n, out)) continue;
    }
    for (int w = 0; w < n; ++w)
      for (int64_t e = 0; e < E; ++e) out[w * E + e] = static_cast<scalar_t>(g[e][w]);
  }
}

template <typename scalar_t>
void route_backward_fp32_sse(const BackwardIn<float>& in, const RouteShape& shape, int64_t begin, int64_t end,
                             scalar_t* grad_logits) {
  route_backward_blocks<4>(in, shape, begin, end, grad_logits);
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
template <typename scalar_t>
__attribute__((target("avx2,fma"))) void route_backward_fp32_avx2(const BackwardIn<float>& in,
                                                                 const RouteShape& shape, int64_t begin, int64_t end,
                                                                 scalar_t* grad_logits) {
  route_backward_blocks<8>(in, shape, begin, end, grad_logits);
}
#endif

template <typename scalar_t>
void run_backward(const BackwardIn<float>& in, const RouteShape& shape, scalar_t* out, bool avx2) {
  const int width = avx2 ? 8 : 4;
  const int64_t blocks = (shape.tokens + width - 1) / width;
  at::parallel_for(0, blocks, 2048 / width, [&](int64_t begin, int64_t end) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    if (avx2) return route_backward_fp32_avx2(in, shape, begin, end, out);
#endif
    route_backward_fp32_sse(in, shape, begin, end, out);
  });
}

void run_backward(const BackwardIn<double>& in, const RouteShape& shape, double* out, bool /*avx2*/) {
  at::parallel_for(0, shape.tokens, 256, [&](int64_t begin, int64_t end) {
    std::vector<double> grad_score(shape.experts);
    route_backward_rows(in, shape, begin, end, grad_score.data(), out);
  });
}

}  // namespace

void route_backward_cpu(const RouteGrads& grads, const at::Tensor& scores, const at::Tensor& topk_idx,
                        const RouteShape& shape, at::Tensor& grad_logits) {
  const bool avx2 = cpu_uses_avx2();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad_logits.scalar_type(), "moe_route_backward_cpu", [&] {
    using real_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    auto ptr = [](const at::Tensor& t) { return t.defined() ? t.const_data_ptr<real_t>() : nullptr; };
    const BackwardIn<real_t> in{ptr(grads.topk_weight), ptr(grads.scores),   ptr(grads.prob_mean),
                                ptr(grads.seq_prob_mean), scores.const_data_ptr<real_t>(),
                                topk_idx.const_data_ptr<int64_t>()};
    run_backward(in, shape, grad_logits.data_ptr<scalar_t>(), avx2);  // fp64 overload or fp32 template
  });
}

}  // namespace minimind_fast
