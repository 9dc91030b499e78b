// CUDA launchers of the fused MoE routing op: raw pointers, sizes and a stream in, no torch
// header (nvcc must compile moe_route_forward.cu and moe_route_backward.cu on machines whose
// torch has no CUDA headers; see DESIGN.md). The torch binding is moe_route_binding.cpp.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "../moe_route_common.h"

namespace minimind_fast {
namespace cuda {

constexpr int64_t kMaxExperts = 256;  // a warp holds a token's experts, 8 per lane at most

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

struct RouteProblem {
  int64_t tokens;    // T
  int64_t experts;   // E (1..256)
  int64_t top_k;     // k (1..E), T * k < 2^31
  int64_t seq_len;   // L, divides T
  int64_t num_seqs;  // B = T / L
  Scoring scoring;
  bool normalize;    // norm_topk_prob (for every top_k)
  DType dtype;       // logits (forward) / grad_logits (backward); real outputs are fp64 iff kFloat64
};

// Output pointers; "real" ones are float (double for kFloat64). Shapes as in the schema.
struct RouteForwardOutputs {
  void* topk_weight;           // (T, k)
  int64_t* topk_idx;           // (T, k)
  void* scores;                // (T, E)
  void* prob_mean;             // (E,)
  void* seq_prob_mean;         // (B, E)
  int64_t* expert_counts;      // (E,)
  int64_t* seq_expert_counts;  // (B, E)
  int64_t* sorted_pairs;       // (T * k,)
  int64_t* expert_offsets;     // (E + 1,)
  int64_t* pair_positions;     // (T * k,)
};

// Bytes of device scratch the forward needs (per-chunk partial counts and sums).
size_t route_forward_workspace_bytes(const RouteProblem& problem);

// Four kernels on `stream`: routing (scores + top-k + weights + per-chunk statistics, one warp
// per chunk of tokens), a per-expert scan over chunks (offsets, token means, prefix sums), the
// stable scatter of the permutation, and the per-sequence sums of sequences spanning chunks.
// No atomics: the outputs are bitwise reproducible. Returns the launch status.
cudaError_t launch_route_forward(const RouteProblem& problem, const void* logits, const RouteForwardOutputs& out,
                                 void* workspace, cudaStream_t stream);

struct RouteBackwardInputs {
  const void* grad_topk_weight;    // (T, k) real, or null
  const void* grad_scores;         // (T, E) real, or null
  const void* grad_prob_mean;      // (E,) real, or null
  const void* grad_seq_prob_mean;  // (B, E) real, or null
  const void* scores;              // (T, E) real, from the forward
  const int64_t* topk_idx;         // (T, k), from the forward
};

// grad_logits (T, E) in problem.dtype; one warp per token.
cudaError_t launch_route_backward(const RouteProblem& problem, const RouteBackwardInputs& in, void* grad_logits,
                                  cudaStream_t stream);

}  // namespace cuda
}  // namespace minimind_fast
