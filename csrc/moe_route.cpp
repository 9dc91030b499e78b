// Fused MoE routing: the TORCH_LIBRARY schema of minimind_fast::moe_route (+ its backward), the
// input checks shared with the CUDA binding, and the CPU entry points. The CPU maths lives in
// moe_route_forward_cpu.cpp and moe_route_backward_cpu.cpp, the CUDA kernels in cuda/, the
// autograd in moe_route_autograd.cpp.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdlib>
#include <limits>
#include <string>

#include "moe_route_cpu.h"

namespace minimind_fast {
namespace {

Scoring parse_scoring(c10::string_view scoring, const char* op) {
  if (scoring == "softmax") return Scoring::kSoftmax;
  if (scoring == "sigmoid") return Scoring::kSigmoid;
  TORCH_CHECK(false, op, ": scoring must be 'softmax' or 'sigmoid', got '",
              std::string(scoring.data(), scoring.size()), "'");
}

at::ScalarType real_dtype(at::ScalarType logits_dtype) {
  return logits_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace

CpuIsa cpu_isa() {
  CpuIsa best = CpuIsa::kBaseline;
#ifdef MINIMIND_FAST_X86
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  static const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                             __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
  best = avx512 ? CpuIsa::kAvx512 : avx2 ? CpuIsa::kAvx2 : CpuIsa::kBaseline;
#endif
  const char* cap = std::getenv("MINIMIND_FAST_CPU_ISA");
  if (cap == nullptr || *cap == '\0') return best;
  const std::string name(cap);
  TORCH_CHECK(name == "baseline" || name == "avx2" || name == "avx512", "MINIMIND_FAST_CPU_ISA=", name,
              " is not an instruction set of moe_route; use baseline, avx2 or avx512 (or unset it)");
  const CpuIsa limit = name == "avx512" ? CpuIsa::kAvx512 : name == "avx2" ? CpuIsa::kAvx2 : CpuIsa::kBaseline;
  return static_cast<int>(limit) < static_cast<int>(best) ? limit : best;
}

RouteShape check_route_inputs(const at::Tensor& router_logits, int64_t top_k, bool norm_topk_prob,
                              c10::string_view scoring, int64_t seq_len) {
  TORCH_CHECK(router_logits.dim() == 2, "moe_route: router_logits must be 2-D (tokens, experts), got shape ",
              router_logits.sizes());
  const auto dtype = router_logits.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf,
              "moe_route: router_logits must be float32, float64, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(router_logits.is_contiguous(), "moe_route: router_logits must be contiguous (strides ",
              router_logits.strides(), "); call .contiguous() first");
  RouteShape shape;
  shape.tokens = router_logits.size(0);
  shape.experts = router_logits.size(1);
  TORCH_CHECK(shape.experts >= 1, "moe_route: router_logits has 0 expert columns; need at least one expert");
  TORCH_CHECK(shape.tokens >= 1, "moe_route: router_logits has 0 token rows; need at least one token");
  TORCH_CHECK(top_k >= 1 && top_k <= shape.experts, "moe_route: top_k=", top_k, " must be in [1, ",
              shape.experts, "] (the number of experts)");
  TORCH_CHECK(shape.tokens <= std::numeric_limits<int32_t>::max() / top_k, "moe_route: tokens * top_k = ",
              shape.tokens, " * ", top_k, " exceeds 2^31 - 1 (the pair index is 32-bit on CUDA); route fewer ",
              "tokens per call");
  TORCH_CHECK(seq_len >= 0, "moe_route: seq_len=", seq_len, " must be >= 0 (0 means one sequence of all tokens)");
  shape.top_k = top_k;
  shape.seq_len = seq_len == 0 ? shape.tokens : seq_len;
  TORCH_CHECK(shape.tokens % shape.seq_len == 0, "moe_route: seq_len=", seq_len, " does not divide the ",
              shape.tokens, " tokens; pass tokens = batch * seq_len rows");
  shape.num_seqs = shape.tokens / shape.seq_len;
  shape.scoring = parse_scoring(scoring, "moe_route");
  shape.normalize = norm_topk_prob;  // every k, top-1 included (MiniMind-3, Qwen3-MoE)
  return shape;
}

RouteShape check_route_backward_inputs(const OptionalTensor& grad_topk_weight, const OptionalTensor& grad_scores,
                                       const OptionalTensor& grad_prob_mean, const OptionalTensor& grad_seq_prob_mean,
                                       const at::Tensor& scores, const at::Tensor& topk_idx, bool norm_topk_prob,
                                       c10::string_view scoring, int64_t seq_len, at::ScalarType logits_dtype) {
  const auto real = real_dtype(logits_dtype);
  TORCH_CHECK(scores.scalar_type() == real, "moe_route_backward: scores must be ", real, " for ", logits_dtype,
              " logits, got ", scores.scalar_type());
  TORCH_CHECK(topk_idx.dim() == 2 && topk_idx.scalar_type() == at::kLong && topk_idx.is_contiguous(),
              "moe_route_backward: topk_idx must be a contiguous int64 (tokens, top_k) tensor, got ",
              topk_idx.scalar_type(), " of shape ", topk_idx.sizes());
  const RouteShape shape = check_route_inputs(scores, topk_idx.size(1), norm_topk_prob, scoring, seq_len);
  TORCH_CHECK(topk_idx.size(0) == shape.tokens && topk_idx.device() == scores.device(), "moe_route_backward: ",
              "topk_idx (", topk_idx.sizes(), " on ", topk_idx.device(), ") does not match scores (", scores.sizes(),
              " on ", scores.device(), ")");
  auto check_grad = [&](const OptionalTensor& grad, at::IntArrayRef expected, const char* name) {
    if (!grad.has_value() || !grad->defined()) return;
    TORCH_CHECK(grad->sizes() == expected, "moe_route_backward: ", name, " must have shape ", expected, ", got ",
                grad->sizes());
    TORCH_CHECK(grad->scalar_type() == real, "moe_route_backward: ", name, " must be ", real, ", got ",
                grad->scalar_type());
    TORCH_CHECK(grad->device() == scores.device(), "moe_route_backward: ", name, " is on ", grad->device(),
                " but scores are on ", scores.device());
  };
  check_grad(grad_topk_weight, {shape.tokens, shape.top_k}, "grad_topk_weight");
  check_grad(grad_scores, {shape.tokens, shape.experts}, "grad_scores");
  check_grad(grad_prob_mean, {shape.experts}, "grad_prob_mean");
  check_grad(grad_seq_prob_mean, {shape.num_seqs, shape.experts}, "grad_seq_prob_mean");
  return shape;
}

RouteResult allocate_route_outputs(const at::Tensor& router_logits, const RouteShape& shape) {
  const auto real = router_logits.options().dtype(real_dtype(router_logits.scalar_type()));
  const auto index = router_logits.options().dtype(at::kLong);
  const int64_t T = shape.tokens, E = shape.experts, k = shape.top_k, B = shape.num_seqs;
  return RouteResult(at::empty({T, k}, real), at::empty({T, k}, index), at::empty({T, E}, real), at::empty({E}, real),
                     at::empty({B, E}, real), at::empty({E}, index), at::empty({B, E}, index),
                     at::empty({T * k}, index), at::empty({E + 1}, index), at::empty({T * k}, index));
}

RouteGrads dense_route_grads(const OptionalTensor& grad_topk_weight, const OptionalTensor& grad_scores,
                             const OptionalTensor& grad_prob_mean, const OptionalTensor& grad_seq_prob_mean) {
  auto dense = [](const OptionalTensor& grad) -> at::Tensor {
    return grad.has_value() && grad->defined() ? grad->contiguous() : at::Tensor();
  };
  return RouteGrads{dense(grad_topk_weight), dense(grad_scores), dense(grad_prob_mean), dense(grad_seq_prob_mean)};
}

RouteResult moe_route_cpu(const at::Tensor& router_logits, int64_t top_k, bool norm_topk_prob,
                          c10::string_view scoring, int64_t seq_len) {
  const RouteShape shape = check_route_inputs(router_logits, top_k, norm_topk_prob, scoring, seq_len);
  TORCH_CHECK(router_logits.device().is_cpu(), "moe_route_cpu: router_logits must be on the CPU");
  RouteResult result = allocate_route_outputs(router_logits, shape);
  route_forward_cpu(router_logits, shape, result);
  return result;
}

at::Tensor moe_route_backward_cpu(const OptionalTensor& grad_topk_weight, const OptionalTensor& grad_scores,
                                  const OptionalTensor& grad_prob_mean, const OptionalTensor& grad_seq_prob_mean,
                                  const at::Tensor& scores, const at::Tensor& topk_idx, bool norm_topk_prob,
                                  c10::string_view scoring, int64_t seq_len, at::ScalarType logits_dtype) {
  const RouteShape shape = check_route_backward_inputs(grad_topk_weight, grad_scores, grad_prob_mean,
                                                       grad_seq_prob_mean, scores, topk_idx, norm_topk_prob, scoring,
                                                       seq_len, logits_dtype);
  TORCH_CHECK(scores.device().is_cpu(), "moe_route_backward_cpu: scores must be on the CPU");
  const RouteGrads grads = dense_route_grads(grad_topk_weight, grad_scores, grad_prob_mean, grad_seq_prob_mean);
  at::Tensor grad_logits = at::empty(scores.sizes(), scores.options().dtype(logits_dtype));
  route_backward_cpu(grads, scores, topk_idx, shape, grad_logits);
  return grad_logits;
}

}  // namespace minimind_fast

TORCH_LIBRARY(minimind_fast, m) {
  // Outputs (real = float64 for float64 logits, float32 otherwise; B = T / seq_len):
  //   topk_weight (T, k) real    selected scores, renormalised iff norm_topk_prob
  //   topk_idx (T, k) int64      expert ids, best first; ties -> lower id
  //   scores (T, E) real         softmax / sigmoid of the logits
  //   prob_mean (E,) real        mean score of each expert over all T tokens
  //   seq_prob_mean (B, E) real  mean score of each expert within each sequence
  //   expert_counts (E,) int64   (token, slot) pairs routed to each expert
  //   seq_expert_counts (B, E)   the same per sequence
  //   sorted_pairs (T*k,) int64  pair ids t*k + j ordered by expert, ascending within an expert
  //   expert_offsets (E+1,)      expert e owns sorted_pairs[offsets[e]:offsets[e+1]]
  //   pair_positions (T*k,)      inverse permutation: sorted_pairs[pair_positions[p]] == p
  m.def(
      "moe_route(Tensor router_logits, int top_k, bool norm_topk_prob, str scoring=\"softmax\", "
      "int seq_len=0) -> (Tensor topk_weight, Tensor topk_idx, Tensor scores, Tensor prob_mean, "
      "Tensor seq_prob_mean, Tensor expert_counts, Tensor seq_expert_counts, Tensor sorted_pairs, "
      "Tensor expert_offsets, Tensor pair_positions)");
  // Gradient of router_logits (dtype logits_dtype) from the gradients of topk_weight, scores,
  // prob_mean and seq_prob_mean (any may be None), given the forward's scores and topk_idx.
  m.def(
      "moe_route_backward(Tensor? grad_topk_weight, Tensor? grad_scores, Tensor? grad_prob_mean, "
      "Tensor? grad_seq_prob_mean, Tensor scores, Tensor topk_idx, bool norm_topk_prob, str scoring, "
      "int seq_len, ScalarType logits_dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(minimind_fast, CPU, m) {
  m.impl("moe_route", &minimind_fast::moe_route_cpu);
  m.impl("moe_route_backward", &minimind_fast::moe_route_backward_cpu);
}
