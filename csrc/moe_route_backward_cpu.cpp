// CPU backward of minimind_fast::moe_route: the gradient of the router logits from the
// gradients of topk_weight, scores, prob_mean and seq_prob_mean, using the forward's saved scores
// (no exp). fp32 on transposed blocks of W tokens like the forward (moe_route_simd.h); fp64
// logits (gradcheck) take the per-row version, whose comment block holds the maths.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
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
//              dL/ds_{idx_j} += (g_j - sum_l g_l w_l) / S    (w_j = s_{idx_j} / S; norm_topk_prob,
//              any k: at k = 1 it is g (1 - w) / S, which vanishes once w rounds to 1)
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

// The top-k terms of a block's slots when the weights are renormalised (route_backward_rows's
// maths on lane vectors): slot_grad[j] <- (g_j - sum_l g_l w_l) / S. Padding lanes (score 0,
// grad 0) get 0.
template <int W>
MINIMIND_FAST_SIMD void renormalised_slot_terms(const typename simd::Vec<W>::F* slot_score, int64_t k,
                                                typename simd::Vec<W>::F* slot_grad) {
  using F = typename simd::Vec<W>::F;
  F selected = simd::splat<W>(0.0f), weighted = simd::splat<W>(0.0f);
  for (int64_t j = 0; j < k; ++j) {
    selected += slot_score[j];
    weighted += slot_grad[j] * slot_score[j];
  }
  const F denom = selected + static_cast<float>(kNormEps);
  const F weighted_mean = weighted / denom;
  for (int64_t j = 0; j < k; ++j) slot_grad[j] = (slot_grad[j] - weighted_mean) / denom;
}

// Experts at or above this count take the row-major path (vectors over experts, no transposes).
constexpr int64_t kWideExperts = 16;

// The fp32 backward for E < kWideExperts on transposed blocks of W tokens: the maths of
// route_backward_rows with every per-expert step a W-lane vector operation, the top-k terms
// included (slots as lane vectors, added to expert e where a lane's slot holds e). kE, kK > 0:
// E and k known at compile time (the vectors stay in registers); 0: known at run time.
template <int W, int kE, int kK, typename scalar_t>
MINIMIND_FAST_SIMD void route_backward_blocks(const BackwardIn<float>& in, const RouteShape& shape,
                                              int64_t block_begin, int64_t block_end, scalar_t* grad_logits) {
  using F = typename simd::Vec<W>::F;
  using I = typename simd::Vec<W>::I;
  const int64_t T = shape.tokens, E = kE ? kE : shape.experts, k = kK ? kK : shape.top_k, L = shape.seq_len;
  const float inv_tokens = 1.0f / static_cast<float>(T), inv_len = 1.0f / static_cast<float>(L);
  F s[kWideExperts], g[kWideExperts];
  F slot_grad[kWideExperts], slot_score[kWideExperts];  // k <= E < kWideExperts
  I slot_id[kWideExperts];
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
      simd::load_slots<W>(in.grad_weight + t0 * k, in.topk_idx + t0 * k, k, n, slot_grad, slot_id);
      for (int64_t j = 0; j < k; ++j) {
        F selected = simd::splat<W>(0.0f);
        for (int64_t e = 0; e < E; ++e) selected = slot_id[j] == static_cast<int32_t>(e) ? s[e] : selected;
        slot_score[j] = selected;
      }
      if (shape.normalize) renormalised_slot_terms<W>(slot_score, k, slot_grad);
      for (int64_t j = 0; j < k; ++j)
        for (int64_t e = 0; e < E; ++e) g[e] += slot_id[j] == static_cast<int32_t>(e) ? slot_grad[j] : 0.0f;
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

// The fp32 backward for E >= kWideExperts, one token at a time with W-lane vectors over the
// experts. The top-k terms touch k of the E entries, so they are kept out of the per-expert passes
// and computed first for a block of W tokens at once (slots as lane vectors, like the forward):
//   c_j    = the top-k term of slot j (route_backward_rows)     (lane vectors over the block)
//   base_e = g_scores + g_prob_mean / T + g_seq_prob_mean / L   (vectors over experts, in `base`)
//   dot    = sum_e base_e s_e + sum_j c_j s_{idx_j}
//   softmax: out_e = s_e (base_e - dot), then out_{idx_j} = s (base + c_j - dot) at the k ids.
template <int W, typename scalar_t>
MINIMIND_FAST_SIMD void route_backward_wide(const BackwardIn<float>& in, const RouteShape& shape, int64_t block_begin,
                                            int64_t block_end, float* base, float* scratch_row,
                                            typename simd::Vec<W>::F* slot_grad, typename simd::Vec<W>::F* slot_score,
                                            typename simd::Vec<W>::I* slot_id, scalar_t* grad_logits) {
  using F = typename simd::Vec<W>::F;
  const int64_t T = shape.tokens, E = shape.experts, k = shape.top_k, L = shape.seq_len;
  const float inv_tokens = 1.0f / static_cast<float>(T), inv_len = 1.0f / static_cast<float>(L);
  const int64_t vector_end = E - E % W;
  for (int64_t b = block_begin; b < block_end; ++b) {
    const int64_t t0 = b * W;
    const int n = static_cast<int>(std::min<int64_t>(W, T - t0));
    F topk_dot = simd::splat<W>(0.0f);
    if (in.grad_weight) {
      simd::load_slots<W>(in.grad_weight + t0 * k, in.topk_idx + t0 * k, k, n, slot_grad, slot_id);
      for (int64_t j = 0; j < k; ++j) {
        slot_score[j] = simd::splat<W>(0.0f);
        for (int w = 0; w < n; ++w) slot_score[j][w] = in.scores[(t0 + w) * E + slot_id[j][w]];
      }
      if (shape.normalize) renormalised_slot_terms<W>(slot_score, k, slot_grad);
      for (int64_t j = 0; j < k; ++j) topk_dot += slot_grad[j] * slot_score[j];
    }
    for (int w = 0; w < n; ++w) {
      const int64_t t = t0 + w;
      const float* s = in.scores + t * E;
      float* row = scratch_row;  // the output row in fp32: the output itself when it is fp32
      if constexpr (std::is_same_v<scalar_t, float>) row = grad_logits + t * E;
      const float* g_scores = in.grad_scores ? in.grad_scores + t * E : nullptr;
      const float* g_seq = in.grad_seq_mean ? in.grad_seq_mean + (t / L) * E : nullptr;
      F partial = simd::splat<W>(0.0f);
      for (int64_t e = 0; e < vector_end; e += W) {
        F value = g_scores ? simd::load_row<W>(g_scores + e) : simd::splat<W>(0.0f);
        if (in.grad_mean) value += simd::load_row<W>(in.grad_mean + e) * inv_tokens;
        if (g_seq) value += simd::load_row<W>(g_seq + e) * inv_len;
        std::memcpy(base + e, &value, sizeof(F));
        partial += value * simd::load_row<W>(s + e);
      }
      float dot = simd::sum_lanes<W>(partial) + topk_dot[w];
      for (int64_t e = vector_end; e < E; ++e) {
        base[e] = g_scores ? g_scores[e] : 0.0f;
        if (in.grad_mean) base[e] += in.grad_mean[e] * inv_tokens;
        if (g_seq) base[e] += g_seq[e] * inv_len;
        dot += base[e] * s[e];
      }
      const int64_t* id = in.topk_idx + t * k;
      if (shape.scoring == Scoring::kSoftmax) {
        const F dot_vector = simd::splat<W>(dot);
        for (int64_t e = 0; e < vector_end; e += W) {
          const F value = simd::load_row<W>(s + e) * (simd::load_row<W>(base + e) - dot_vector);
          std::memcpy(row + e, &value, sizeof(F));
        }
        for (int64_t e = vector_end; e < E; ++e) row[e] = s[e] * (base[e] - dot);
        if (in.grad_weight)
          for (int64_t j = 0; j < k; ++j) row[id[j]] = s[id[j]] * ((base[id[j]] + slot_grad[j][w]) - dot);
      } else {
        for (int64_t e = 0; e < vector_end; e += W) {
          const F score = simd::load_row<W>(s + e);
          const F value = simd::load_row<W>(base + e) * score * (1.0f - score);
          std::memcpy(row + e, &value, sizeof(F));
        }
        for (int64_t e = vector_end; e < E; ++e) row[e] = base[e] * s[e] * (1.0f - s[e]);
        if (in.grad_weight)
          for (int64_t j = 0; j < k; ++j)
            row[id[j]] = (base[id[j]] + slot_grad[j][w]) * s[id[j]] * (1.0f - s[id[j]]);
      }
      if constexpr (!std::is_same_v<scalar_t, float>)
        for (int64_t e = 0; e < E; ++e) grad_logits[t * E + e] = static_cast<scalar_t>(row[e]);
    }
  }
}

// One thread's share: the blocks of W tokens [begin, end).
template <int W, typename scalar_t>
MINIMIND_FAST_SIMD void backward_range(const BackwardIn<float>& in, const RouteShape& shape, int64_t begin,
                                       int64_t end, scalar_t* grad_logits) {
  const int64_t E = shape.experts, k = shape.top_k;
  if (E >= kWideExperts) {
    AlignedArray<float> base(E), row(E);
    AlignedArray<typename simd::Vec<W>::F> slot_grad(k), slot_score(k);
    AlignedArray<typename simd::Vec<W>::I> slot_id(k);
    return route_backward_wide<W>(in, shape, begin, end, base.data(), row.data(), slot_grad.data(),
                                  slot_score.data(), slot_id.data(), grad_logits);
  }
  if (E == 4 && k == 1) return route_backward_blocks<W, 4, 1>(in, shape, begin, end, grad_logits);
  if (E == 4 && k == 2) return route_backward_blocks<W, 4, 2>(in, shape, begin, end, grad_logits);
  if (E == 8 && k == 1) return route_backward_blocks<W, 8, 1>(in, shape, begin, end, grad_logits);
  if (E == 8 && k == 2) return route_backward_blocks<W, 8, 2>(in, shape, begin, end, grad_logits);
  route_backward_blocks<W, 0, 0>(in, shape, begin, end, grad_logits);
}

template <typename scalar_t>
void backward_range_sse(const BackwardIn<float>& in, const RouteShape& shape, int64_t begin, int64_t end,
                        scalar_t* grad_logits) {
  backward_range<4>(in, shape, begin, end, grad_logits);
}

#ifdef MINIMIND_FAST_X86
template <typename scalar_t>
MINIMIND_FAST_TARGET_AVX2 void backward_range_avx2(const BackwardIn<float>& in, const RouteShape& shape,
                                                   int64_t begin, int64_t end, scalar_t* grad_logits) {
  backward_range<8>(in, shape, begin, end, grad_logits);
}

template <typename scalar_t>
MINIMIND_FAST_TARGET_AVX512 void backward_range_avx512(const BackwardIn<float>& in, const RouteShape& shape,
                                                       int64_t begin, int64_t end, scalar_t* grad_logits) {
  backward_range<8>(in, shape, begin, end, grad_logits);
}
#endif

template <typename scalar_t>
void run_backward(const BackwardIn<float>& in, const RouteShape& shape, scalar_t* out, CpuIsa isa) {
  const int width = isa == CpuIsa::kBaseline ? 4 : 8;
  const int64_t blocks = (shape.tokens + width - 1) / width;
  at::parallel_for(0, blocks, 2048 / width, [&](int64_t begin, int64_t end) {
#ifdef MINIMIND_FAST_X86
    if (isa == CpuIsa::kAvx512) return backward_range_avx512(in, shape, begin, end, out);
    if (isa == CpuIsa::kAvx2) return backward_range_avx2(in, shape, begin, end, out);
#endif
    backward_range_sse(in, shape, begin, end, out);
  });
}

void run_backward(const BackwardIn<double>& in, const RouteShape& shape, double* out, CpuIsa /*isa*/) {
  at::parallel_for(0, shape.tokens, 256, [&](int64_t begin, int64_t end) {
    std::vector<double> grad_score(shape.experts);
    route_backward_rows(in, shape, begin, end, grad_score.data(), out);
  });
}

}  // namespace

void route_backward_cpu(const RouteGrads& grads, const at::Tensor& scores, const at::Tensor& topk_idx,
                        const RouteShape& shape, at::Tensor& grad_logits) {
  if (grads.topk_weight.defined()) {  // the kernels index scores by these ids: a bad one must not reach them
    const int64_t* ids = topk_idx.const_data_ptr<int64_t>();
    const auto experts = static_cast<uint64_t>(shape.experts);
    uint64_t out_of_range = 0;
    for (int64_t i = 0; i < shape.tokens * shape.top_k; ++i) out_of_range |= static_cast<uint64_t>(ids[i]) >= experts;
    TORCH_CHECK(!out_of_range, "moe_route_backward: topk_idx holds an expert id outside [0, ", shape.experts,
                "); pass the topk_idx of the forward that produced `scores`");
  }
  const CpuIsa isa = cpu_isa();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad_logits.scalar_type(), "moe_route_backward_cpu", [&] {
    using real_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    auto ptr = [](const at::Tensor& t) { return t.defined() ? t.const_data_ptr<real_t>() : nullptr; };
    const BackwardIn<real_t> in{ptr(grads.topk_weight), ptr(grads.scores),   ptr(grads.prob_mean),
                                ptr(grads.seq_prob_mean), scores.const_data_ptr<real_t>(),
                                topk_idx.const_data_ptr<int64_t>()};
    run_backward(in, shape, grad_logits.data_ptr<scalar_t>(), isa);  // fp64 overload or fp32 template
  });
}

}  // namespace minimind_fast
