// Torch-side declarations of the fused MoE routing op, shared by the CPU implementation
// (moe_route.cpp and moe_route_*_cpu.cpp), the CUDA binding (cuda/moe_route_binding.cpp) and the C++ unit test.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/string_view.h>

#include <optional>
#include <tuple>

#include "moe_route_common.h"

namespace minimind_fast {

// (topk_weight, topk_idx, scores, prob_mean, seq_prob_mean, expert_counts, seq_expert_counts,
//  sorted_pairs, expert_offsets, pair_positions) -- see the schema in moe_route.cpp.
using RouteResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                               at::Tensor, at::Tensor, at::Tensor>;
using OptionalTensor = std::optional<at::Tensor>;

struct RouteShape {
  int64_t tokens;     // T
  int64_t experts;    // E
  int64_t top_k;      // k
  int64_t seq_len;    // L (T when the caller passed 0)
  int64_t num_seqs;   // B = T / L
  Scoring scoring;
  bool normalize;     // norm_topk_prob, for every top_k (MiniMind-3's rule)
};

// Validates the forward arguments (TORCH_CHECK with a message) and resolves the shape.
RouteShape check_route_inputs(const at::Tensor& router_logits, int64_t top_k, bool norm_topk_prob,
                              c10::string_view scoring, int64_t seq_len);

// Validates the backward arguments (scores and topk_idx as saved by the forward).
RouteShape check_route_backward_inputs(const OptionalTensor& grad_topk_weight, const OptionalTensor& grad_scores,
                                       const OptionalTensor& grad_prob_mean, const OptionalTensor& grad_seq_prob_mean,
                                       const at::Tensor& scores, const at::Tensor& topk_idx, bool norm_topk_prob,
                                       c10::string_view scoring, int64_t seq_len, at::ScalarType logits_dtype);

// The backward's incoming gradients, made dense (a .sum() hands back stride-0 tensors);
// undefined where autograd passed None.
struct RouteGrads {
  at::Tensor topk_weight, scores, prob_mean, seq_prob_mean;
};
RouteGrads dense_route_grads(const OptionalTensor& grad_topk_weight, const OptionalTensor& grad_scores,
                             const OptionalTensor& grad_prob_mean, const OptionalTensor& grad_seq_prob_mean);

// Allocates the ten forward outputs (real ones fp64 for fp64 logits, fp32 otherwise).
RouteResult allocate_route_outputs(const at::Tensor& router_logits, const RouteShape& shape);

RouteResult moe_route_cpu(const at::Tensor& router_logits, int64_t top_k, bool norm_topk_prob,
                          c10::string_view scoring, int64_t seq_len);

at::Tensor moe_route_backward_cpu(const OptionalTensor& grad_topk_weight, const OptionalTensor& grad_scores,
                                  const OptionalTensor& grad_prob_mean, const OptionalTensor& grad_seq_prob_mean,
                                  const at::Tensor& scores, const at::Tensor& topk_idx, bool norm_topk_prob,
                                  c10::string_view scoring, int64_t seq_len, at::ScalarType logits_dtype);

}  // namespace minimind_fast
